"""The shipped Prometheus config and every dashboard query against real servers.

Starts a real IDP server and a real LoRA-mode server (tiny random model, tests/servers.py),
sends them the same traffic, runs the real Prometheus binary on loopback with
deploy/prometheus/prometheus.yml (targets rewritten to the local ports, 1 s scrapes) and the
shipped rules, then sends every PromQL expression of the Grafana dashboard through Prometheus'
HTTP API: each must parse and return data for both methods (idp and lora; the prompt-selection
panels for idp only). A dashboard that reads a metric the server does not export fails here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from deploy_files import (
    COMPOSE,
    IDP_ONLY,
    PROMETHEUS_CONFIG,
    PROMETHEUS_RULES,
    Query,
    base_metric,
    is_idp_only,
    load_compose,
    load_dashboard,
    metric_names,
    panel_queries,
    substitute,
    variable_queries,
)
from servers import RemoteServer, free_port, wait_until, write_tiny_artefacts

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)"
)

MODEL = "tiny"
BOTH = {"idp", "lora"}
# Template variables become regex matchers, as Grafana sends them for a multi-value selection.
VARIABLES = {"model": MODEL, "instance": ".*", "method": "idp|lora"}
REQUESTS_PER_ROUND = 6


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    wait_until(what, check, timeout_s, poll_s=0.25)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RemoteServer]]:
    """job name (as in prometheus.yml) -> a running server; both on the same tiny model."""
    art = write_tiny_artefacts(tmp_path_factory.mktemp("tiny"))
    common = ("--model", str(art["model"]), "--served-model-name", MODEL, "--max-batch-size", "4")
    started: dict[str, RemoteServer] = {}
    try:
        started["idp"] = RemoteServer(*common, "--bank", str(art["bank"]))
        started["lora"] = RemoteServer(*common, "--lora", str(art["lora"]))
        yield started
    finally:
        for srv in started.values():
            srv.stop()


def local_config(shipped: dict[str, Any], targets: dict[str, str], rules: Path) -> dict[str, Any]:
    """The shipped config with each job's targets replaced by a local address, 1 s scrapes
    and evaluations, and `rules` as its rule file. Unknown jobs fail: keep this in sync."""
    config = yaml.safe_load(yaml.safe_dump(shipped))  # deep copy
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    for job in config["scrape_configs"]:
        assert job["job_name"] in targets, f"no local target for job {job['job_name']!r}"
        for static in job["static_configs"]:
            static["targets"] = [targets[job["job_name"]]]
    return config


class Prometheus:
    """The real binary on a free loopback port, with a temporary TSDB."""

    def __init__(self, config: Path, data: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = (data / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait("prometheus /-/ready", lambda: self._ready(), 60)
        except TimeoutError:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited: {self.logs()}"
        return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200

    def query(self, promql: str) -> httpx.Response:
        return httpx.post(f"{self.url}/api/v1/query", data={"query": promql}, timeout=10)

    def vector(self, promql: str) -> list[dict[str, Any]]:
        r = self.query(promql)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{promql}\n{body}"
        return body["data"]["result"]

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _traffic(url: str, n: int) -> None:
    """n concurrent completions (so they batch) plus one invalid request (counted as an error)."""

    def one(i: int) -> None:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": f"hello {i} " * (1 + i % 3), "max_tokens": 4 + i % 3,
                  "temperature": 0},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(one, range(n)))
    bad = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x",
                                                    "max_tokens": -1}, timeout=30)  # fmt: skip
    assert bad.status_code == 400, bad.text


@pytest.fixture(scope="module")
def prometheus(
    servers: dict[str, RemoteServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """Prometheus after two rounds of traffic, so every rate() window holds an increase."""
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    targets = {job: srv.url.removeprefix("http://") for job, srv in servers.items()}
    targets["prometheus"] = f"127.0.0.1:{port}"
    # The shipped rules, each group evaluated every second instead of its own interval.
    rules = yaml.safe_load(PROMETHEUS_RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = local_config(yaml.safe_load(PROMETHEUS_CONFIG.read_text()), targets,
                          tmp / "rules.yml")  # fmt: skip
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    subprocess.run([shutil.which("promtool") or "promtool", "check", "config",
                    str(tmp / "prometheus.yml")], check=True, capture_output=True)  # fmt: skip
    prom = Prometheus(tmp / "prometheus.yml", tmp, port)
    try:
        _wait("both servers up", lambda: {
            s["metric"]["job"] for s in prom.vector("up == 1")} >= BOTH)  # fmt: skip
        expected = 0
        for _ in range(2):
            # Round 1 creates the labelled series; round 2 makes them grow between scrapes.
            for srv in servers.values():
                _traffic(srv.url, REQUESTS_PER_ROUND)
            expected += REQUESTS_PER_ROUND

            def scraped(n: int = expected) -> bool:
                counts = prom.vector("sum by (method) (idp_e2e_request_latency_seconds_count)")
                return {s["metric"]["method"] for s in counts if float(s["value"][1]) >= n} >= BOTH

            _wait(f"{expected} requests per method in Prometheus", scraped, 30)
            time.sleep(2.5)  # two more scrapes and rule evaluations
        yield prom
    finally:
        prom.stop()


def _methods(result: list[dict[str, Any]], *, finite: bool = False) -> set[str]:
    return {
        s["metric"].get("method", "")
        for s in result
        if not finite or math.isfinite(float(s["value"][1]))
    }


def _queries() -> list[Query]:
    dashboard = load_dashboard()
    return [*panel_queries(dashboard), *variable_queries(dashboard)]


def test_servers_export_every_metric_the_dashboard_reads(servers: dict[str, RemoteServer]) -> None:
    """Before Prometheus: the names in the dashboard appear in each server's /metrics."""
    for srv in servers.values():
        _traffic(srv.url, 2)
    exposed = {
        job: {
            line.split("{")[0].split(" ")[0]
            for line in httpx.get(f"{srv.url}/metrics", timeout=10).text.splitlines()
            if line and not line.startswith("#")
        }
        for job, srv in servers.items()
    }
    for q in _queries():
        for name in metric_names(q.expr):
            jobs = {"idp"} if base_metric(name) in IDP_ONLY else BOTH
            for job in jobs:
                assert name in exposed[job], f"{q.where}: {job} server does not export {name}"


@pytest.mark.parametrize("query", _queries(), ids=lambda q: q.where)
def test_dashboard_query_returns_data_for_both_methods(
    prometheus: Prometheus, query: Query
) -> None:
    promql = substitute(query.expr, VARIABLES, rate_interval="1m", range_="5m")
    r = prometheus.query(promql)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{promql}\n{body}"
    result = body["data"]["result"]
    if query.where.startswith("variable"):
        label = query.where.split()[-1]
        values = {s["metric"].get(label) for s in result}
        wanted = {"method": BOTH, "model": {MODEL}}.get(label)
        assert values and (wanted is None or wanted <= values), f"{promql} -> {values}"
        return
    need = {"idp"} if is_idp_only(query.expr) else BOTH
    assert need <= _methods(result), f"{query.where}: no data for {need - _methods(result)}"
    if "histogram_quantile" in promql or "rate(" in promql:
        # Real numbers, not NaN from empty rate windows.
        finite = _methods(result, finite=True)
        assert need <= finite, f"{query.where}: only NaN for {need - finite}:\n{result}"


def test_shipped_rules_evaluate_on_real_metrics(prometheus: Prometheus) -> None:
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(
        [r for g in yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"] for r in g["rules"]]
    )
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    for record in (
        "model_method:idp_time_to_first_token_seconds:p99_5m",
        "model_method:idp_generation_tokens:rate5m",
        "model_method:idp_request_error_ratio:rate5m",
    ):
        assert _methods(prometheus.vector(record), finite=True) >= BOTH, record
    # firing only: one scrape slower than its timeout makes an alert pending for a moment
    firing = {a["metric"]["alertname"]
              for a in prometheus.vector('ALERTS{alertstate="firing"}')}
    assert "IDPServerDown" not in firing


def test_a_query_naming_an_unknown_metric_fails_here(prometheus: Prometheus) -> None:
    """The check above has teeth: a misspelt metric parses but returns no data."""
    promql = substitute(
        'sum by (method) (rate(idp_generated_tokens_total{model=~"$model"}[$__rate_interval]))',
        VARIABLES,
    )
    assert prometheus.vector(promql) == []


def test_compose_loadgen_command_runs_against_both_servers(
    servers: dict[str, RemoteServer], tmp_path: Path
) -> None:
    """The loadgen service's shell command, as written in docker-compose.yml, with the service
    URLs, data file and output folder mapped to this machine, and a short run."""
    loadgen = load_compose(COMPOSE)["services"]["loadgen"]
    assert loadgen["entrypoint"] == ["sh", "-c"]
    script = loadgen["command"][0].replace("$$", "$")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} " * 40}) + "\n" for i in range(20)))
    mapping = {
        "exec idp ": f"exec {sys.executable} -m idp_core.lab.cli ",
        "http://idp:8000": servers["idp"].url,
        "http://lora:8000": servers["lora"].url,
        "/shared/data/eval/wikitext2_raw_test.rows.jsonl": str(data),
        "/tmp/loadgen": str(tmp_path / "out"),
    }
    for old, new in mapping.items():
        assert old in script, old
        script = script.replace(old, new)
    env = {"LOADGEN_CONCURRENCY": "1 2", "LOADGEN_DURATION_S": "300",
           "LOADGEN_REQUESTS_PER_LEVEL": "3"}  # fmt: skip
    out = subprocess.run(["sh", "-c", script], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    written = json.loads((tmp_path / "out" / "serving.json").read_text())
    assert {written["env"]["targets"][t]["mode"] for t in ("idp", "lora")} == {"idp", "lora"}
    results = written["results"]
    assert {(r["target"], r["concurrency"]) for r in results} == {
        (t, c) for t in ("idp", "lora") for c in (1, 2)
    }
    assert all(r["completed"] == 3 and r["failed"] == 0 for r in results)
