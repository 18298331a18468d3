"""The server as Ray Serve replicas (server/ray_app.py) on this machine: one local Ray for the
module, the tiny random model, short autoscaling delays.

a. greedy text and `prompt_used` through Serve equal the engine's in-process; errors keep
   their OpenAI shape (the replica's and the proxy's own);
b. a burst of concurrent requests scales 1 -> 2 replicas, idle scales back to 1;
   every replica's idp_* metrics reach the real Prometheus (deploy/ray/prometheus.yml) with a
   replica label, and every dashboard query returns data aggregated across replicas;
c. a replica killed under load: its streams end with an OpenAI-shaped error event, the other
   replica's streams finish untouched, and the service answers again within 30 s;
d. deleting the application drains in-flight requests.
Timings (scale-up, scale-down, recovery) are recorded as junit properties, never asserted
beyond the issue's bounds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from deploy_files import PROMETHEUS_RULES, load_dashboard, panel_queries, substitute
from servers import free_port, wait_until, write_tiny_artefacts

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from server.ray_app import DEPLOYMENT, REPLICA_HEADER, build  # noqa: E402
from server.ray_cli import PROXY_CALLBACK  # noqa: E402
from server.settings import ReplicaSettings, Settings  # noqa: E402

APP = "idp"
MODEL = "tiny"
# The test's autoscaling: react within seconds instead of Ray's 30 s up / 600 s down.
FAST = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
        "max_ongoing_requests": 16, "upscale_delay_s": 1.0, "downscale_delay_s": 3.0,
        "look_back_period_s": 2.0, "metrics_interval_s": 0.5, "cpus_per_replica": 1.0}
LONG = 400  # tokens per streamed request: long enough to be in flight when something happens


@dataclass
class Cluster:
    url: str
    metrics_port: int
    artefacts: dict[str, Path]

    def deploy(self, **replicas: Any) -> None:
        settings = Settings(model=str(self.artefacts["model"]), bank=str(self.artefacts["bank"]),
                            dtype="float32", served_model_name=MODEL, max_batch_size=8,
                            drain_timeout_s=30)
        serve.run(build(settings, ReplicaSettings(**{**FAST, **replicas})), name=APP,
                  route_prefix="/")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    artefacts = write_tiny_artefacts(tmp_path_factory.mktemp("tiny"))
    metrics_port, http_port = free_port(), free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_port,
                 _system_config={"metrics_report_interval_ms": 1000})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            yield Cluster(f"http://127.0.0.1:{http_port}", metrics_port, artefacts)
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def autoscaled(cluster: Cluster) -> Cluster:
    cluster.deploy()
    return cluster


def running_replicas() -> int:
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def complete(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": MODEL, "temperature": 0, **body},
                      timeout=60)


@dataclass
class Stream:
    """One streamed completion read on its own thread: which replica, tokens, how it ended."""

    url: str
    max_tokens: int = LONG
    status: int = 0
    replica: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    done: bool = False
    error: dict[str, Any] | None = None
    started: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        body = {"model": MODEL, "prompt": "hello there", "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body,
                              timeout=120) as r:
                self.status, self.replica = r.status_code, r.headers.get(REPLICA_HEADER, "")
                if r.status_code != 200:
                    self.error = json.loads(r.read()).get("error")
                    return
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.error = event["error"]
                        else:
                            self.chunks += 1
                            self.finish_reason = event["choices"][0].get("finish_reason")
                            self.started.set()
        except httpx.HTTPError as e:
            self.error = {"transport": repr(e)}
        finally:
            self.started.set()

    def join(self, timeout_s: float = 120.0) -> None:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "stream still open"


def assert_openai_error(error: dict[str, Any] | None) -> None:
    assert error is not None and set(error) == {"message", "type", "param", "code"}, error


# ---- a. same answers as the engine in-process ----------------------------------------------


def test_same_text_and_prompt_as_the_engine_in_process(autoscaled: Cluster) -> None:
    from idp_core.bank import PromptBank
    from idp_core.build import build_engine
    from idp_core.config import GenConfig
    from idp_core.generate import GenRequest
    from idp_core.model import load_model

    lm = load_model(str(autoscaled.artefacts["model"]), dtype="float32")
    engine = build_engine(lm, bank=PromptBank.load(autoscaled.artefacts["bank"]))
    prompts = ["hello", "The capital of France is", "a b c d e f", "zzz 123"]
    for text in prompts:
        got = complete(autoscaled.url, prompt=text, max_tokens=12)
        assert got.status_code == 200, got.text
        assert got.headers[REPLICA_HEADER]
        choice = got.json()["choices"][0]
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        want = engine.generate([GenRequest(ids, GenConfig(max_tokens=12))])[0]
        assert (choice["text"], choice["prompt_used"]) == (want.text, want.prompt_used), text
    # The replica's errors, as the plain server's; the proxy's own (no route) OpenAI-shaped too.
    bad = complete(autoscaled.url, prompt="x", max_tokens=-1)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    unknown = complete(autoscaled.url, prompt="x", prompt_selection="nope")
    assert unknown.status_code == 400
    assert_openai_error(unknown.json()["error"])
    assert httpx.get(autoscaled.url + "/health", timeout=10).json()["status"] == "ok"


# ---- b. autoscaling, and metrics from every replica ----------------------------------------


def test_a_burst_scales_to_two_replicas_and_idle_back_to_one(
        autoscaled: Cluster, record_property: Any, tmp_path: Path) -> None:
    assert running_replicas() == 1
    stop = threading.Event()
    replicas_seen: set[str] = set()
    failed: list[Stream] = []

    def load() -> None:  # closed loop: 8 clients, each sends its next request when one ends
        while not stop.is_set():
            s = Stream(autoscaled.url, max_tokens=64).start()
            s.join()
            if not s.done or s.error is not None:
                failed.append(s)
            replicas_seen.add(s.replica)

    clients = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    start = time.monotonic()
    for c in clients:
        c.start()
    try:
        wait_until("a second replica", lambda: running_replicas() == 2, timeout_s=90, poll_s=0.2)
        scaled_up = time.monotonic() - start
        wait_until("requests on both replicas", lambda: len(replicas_seen) >= 2, timeout_s=60)
        prometheus_sees_every_replica(autoscaled, tmp_path)
    finally:
        stop.set()
        for c in clients:
            c.join(120)
    assert not failed, failed[:3]
    idle = time.monotonic()
    wait_until("back to one replica", lambda: running_replicas() == 1, timeout_s=90, poll_s=0.2)
    scaled_down = time.monotonic() - idle
    record_property("scale_up_s", round(scaled_up, 1))
    record_property("scale_down_s", round(scaled_down, 1))
    print(f"\nscale-up 1->2 under load: {scaled_up:.1f} s; idle 2->1: {scaled_down:.1f} s")


def prometheus_sees_every_replica(cluster: Cluster, tmp: Path) -> None:
    """The shipped deploy/ray/prometheus.yml (file_sd replaced by the local metrics port) with
    the shipped rules: both replicas' series, under the plain server's metric names, and every
    dashboard query answering with data."""
    from test_prometheus_live import PROMETHEUS, Prometheus

    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not installed")
    config = yaml.safe_load((Path(__file__).parents[2] / "deploy/ray/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_RULES)]
    port = free_port()
    for job in config["scrape_configs"]:
        job.pop("file_sd_configs", None)
        target = f"127.0.0.1:{cluster.metrics_port if job['job_name'] == 'ray' else port}"
        job["static_configs"] = [{"targets": [target]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = Prometheus(tmp / "prometheus.yml", tmp, port)
    try:
        def per_replica() -> set[str]:
            counts = prom.vector("sum by (replica) (idp_e2e_request_latency_seconds_count)")
            return {s["metric"].get("replica", "") for s in counts if float(s["value"][1]) > 0}

        wait_until("both replicas' requests in Prometheus", lambda: len(per_replica()) >= 2,
                   timeout_s=60, poll_s=0.5)
        assert "" not in per_replica()
        assert not prom.vector('{__name__=~"ray_idp_.*"}'), "relabelling to idp_* failed"
        time.sleep(2.5)  # a few more scrapes: rate() windows hold an increase
        variables = {"model": MODEL, "instance": ".*", "method": "idp"}
        for q in panel_queries(load_dashboard()):
            expr = substitute(q.expr, variables, rate_interval="10s", range_="1m")
            result = prom.vector(expr)
            assert "idp" in {s["metric"].get("method") for s in result}, f"{q.where}: {expr}"
    finally:
        prom.stop()


# ---- c. a killed replica -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_replicas(cluster: Cluster) -> Cluster:
    """Two replicas that each take at most 4 requests at a time, so 8 streams use both."""
    cluster.deploy(min_replicas=2, max_replicas=2, max_ongoing_requests=4)
    wait_until("two replicas", lambda: running_replicas() == 2, timeout_s=60)
    seen: set[str] = set()

    def both_answer() -> bool:  # the proxy's router knows both (its table lags the controller)
        streams = [Stream(cluster.url, max_tokens=16).start() for _ in range(6)]
        for s in streams:
            s.join()
        seen.update(s.replica for s in streams if s.done)
        return len(seen) == 2

    wait_until("both replicas answering", both_answer, timeout_s=60, poll_s=0.5)
    return cluster


def test_a_killed_replica_is_replaced(two_replicas: Cluster, record_property: Any) -> None:
    url = two_replicas.url
    streams = [Stream(url).start() for _ in range(8)]
    for s in streams:
        assert s.started.wait(60)
    assert all(s.chunks and not s.done for s in streams), "streams ended before the kill"
    by_replica = {s.replica for s in streams}
    assert len(by_replica) == 2, f"all streams landed on {by_replica}"
    victim = sorted(by_replica)[0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{victim}", namespace="serve"),
             no_restart=True)
    killed = time.monotonic()
    # Requests sent right after the kill may still be routed to the dead replica (a 500, OpenAI-
    # shaped) until Serve notices; the service must answer again within 30 s.
    wait_until("an answer", lambda: complete(url, prompt="hi", max_tokens=4).status_code == 200,
               timeout_s=30, poll_s=0.2)
    answered = time.monotonic() - killed
    for s in streams:
        s.join()
    for s in streams:
        if s.replica == victim:
            assert s.finish_reason is None, "a killed replica's stream finished"
            assert_openai_error(s.error)
            assert s.done, "an error event then [DONE], as the server ends a failed stream"
        else:  # untouched: to its last token, then [DONE]
            assert s.done and s.error is None and s.finish_reason == "length", s

    def replacement_answers() -> bool:  # a replica that was not there before the kill
        r = complete(url, prompt="hi", max_tokens=4)
        return r.status_code == 200 and r.headers[REPLICA_HEADER] not in by_replica

    wait_until("a replacement replica answering", replacement_answers, timeout_s=90, poll_s=0.2)
    replaced = time.monotonic() - killed
    assert running_replicas() == 2
    record_property("answers_again_after_kill_s", round(answered, 1))
    record_property("replica_replaced_s", round(replaced, 1))
    print(f"\nkilled replica: service answers after {answered:.1f} s, "
          f"replacement running after {replaced:.1f} s")


# ---- d. drain on stop ----------------------------------------------------------------------


def test_deleting_the_application_drains_in_flight_requests(two_replicas: Cluster) -> None:
    streams = [Stream(two_replicas.url, max_tokens=200).start() for _ in range(4)]
    for s in streams:
        assert s.started.wait(60)
    assert not any(s.done for s in streams)
    serve.delete(APP)  # returns once the replicas have drained and stopped
    for s in streams:
        s.join()
        assert s.done and s.error is None and s.finish_reason == "length", s
    gone = complete(two_replicas.url, prompt="hi", max_tokens=4)
    assert gone.status_code in (404, 503)
    assert_openai_error(gone.json()["error"])
