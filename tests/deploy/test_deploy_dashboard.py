"""The Grafana dashboard and its provisioning, checked without Grafana: structure, datasource,
variables, and that every query parses (promtool) and reads only metrics the server exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    COMPOSE,
    DASHBOARD,
    GRAFANA,
    HISTOGRAMS,
    PROMETHEUS_CONFIG,
    all_panels,
    base_metric,
    exported_sample_names,
    load_compose,
    load_dashboard,
    metric_names,
    panel_queries,
    substitute,
    variable_queries,
)

ANY = {"model": ".*", "instance": ".*", "method": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def datasource() -> dict:
    (ds,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    return ds


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def test_every_panel_has_a_datasource_and_a_query(dashboard: dict, datasource: dict) -> None:
    panels = _panels(dashboard)
    assert len(panels) >= 15
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t.get("datasource", p["datasource"]) == p["datasource"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        assert p.get("description"), f"{p['title']}: say what the panel means"


def test_ids_unique_and_grid_without_overlap(dashboard: dict) -> None:
    panels = all_panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_template_variables(dashboard: dict, datasource: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"model", "instance", "method"}
    for v in variables.values():
        assert v["type"] == "query"
        assert v["datasource"]["uid"] == datasource["uid"]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*"
    # Each query filters by every variable, so the selectors at the top apply to all panels.
    for q in panel_queries(dashboard):
        for name in variables:
            assert f'{name}=~"${name}"' in q.expr, f"{q.where} ignores ${name}"


def test_rates_use_rate_interval(dashboard: dict) -> None:
    for q in panel_queries(dashboard):
        windows = re.findall(r"\b(rate|irate|increase)\([^\[]*\[([^\]]+)\]", q.expr)
        assert windows or "rate(" not in q.expr, q.where
        for fn, window in windows:
            allowed = {"$__rate_interval"} | ({"$__range"} if fn == "increase" else set())
            assert window in allowed, f"{q.where}: {fn}(...[{window}])"


def test_quantiles_come_from_buckets_by_le(dashboard: dict) -> None:
    for q in panel_queries(dashboard):
        if "histogram_quantile" in q.expr:
            assert re.search(r"by \([^)]*\ble\b[^)]*\) \(rate\(idp_\w+_bucket\{", q.expr), q.where


def test_queries_read_only_exported_metrics(dashboard: dict) -> None:
    exported = exported_sample_names()
    for q in [*panel_queries(dashboard), *variable_queries(dashboard)]:
        names = metric_names(q.expr)
        assert names, f"{q.where} reads no idp_* metric"
        unknown = names - exported
        assert not unknown, f"{q.where} reads metrics the server does not export: {unknown}"


def test_the_panels_the_issue_asks_for(dashboard: dict) -> None:
    read = {
        base_metric(n): p["title"]
        for p in _panels(dashboard)
        for t in p["targets"]
        for n in metric_names(t["expr"])
    }
    assert set(read) >= set(HISTOGRAMS) | {
        "idp_num_requests_running",
        "idp_num_requests_waiting",
        "idp_generation_tokens_total",
        "idp_request_errors_total",
        "idp_prompt_selected_total",
    }
    by_title = {p["title"]: p for p in _panels(dashboard)}
    for title in ("Time to first token", "Inter-token latency", "End-to-end request latency"):
        quantiles = sorted(
            re.search(r"histogram_quantile\(([\d.]+)", t["expr"]).group(1)
            for t in by_title[title]["targets"]
        )
        assert quantiles == ["0.5", "0.95", "0.99"], title
    # Every series is split by method: IDP and LoRA side by side in each panel.
    for q in panel_queries(dashboard):
        assert re.search(r"by \([^)]*\bmethod\b", q.expr), f"{q.where} not split by method"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_every_query_parses(dashboard: dict, tmp_path: Path) -> None:
    """promtool parses each query (variables substituted) as a recording rule."""
    queries = [*panel_queries(dashboard), *variable_queries(dashboard)]
    rules = [
        {"record": f"dashboard:query_{i}:test", "expr": substitute(q.expr, ANY)}
        for i, q in enumerate(queries)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_provisioning_matches_compose_and_prometheus(dashboard: dict, datasource: dict) -> None:
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape  # basis of $__rate_interval
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/idp.yml").read_text())[
        "providers"
    ]
    grafana = load_compose(COMPOSE)["services"]["grafana"]
    mounts = dict(v.rsplit(":", 2)[:2][::-1] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    assert dashboard["uid"] == "idp-vs-lora"


def test_substitute_leaves_no_variable() -> None:
    expr = 'rate(x{a=~"$model",b=~"${method}",c=~"[[instance]]"}[$__rate_interval])'
    assert substitute(expr, {"model": "m", "method": "idp|lora", "instance": ".*"}) == (
        'rate(x{a=~"m",b=~"idp|lora",c=~".*"}[1m])'
    )
    with pytest.raises(KeyError):
        substitute("rate(x[$nope])", {})


def test_docs_explain_every_panel_and_port(dashboard: dict) -> None:
    docs = (DASHBOARD.parents[3] / "docs" / "deploy.md").read_text()
    assert docs.startswith("## Deploy on a GPU host")
    for p in _panels(dashboard):
        assert f"| {p['title'].split(' (')[0]} " in docs, f"docs/deploy.md: explain {p['title']!r}"
    for port in ("8000", "8001", "9090", "3000"):
        assert port in docs
    assert "docker compose -f deploy/docker-compose.yml up -d --build" in docs
    assert "docker compose -f deploy/docker-compose.yml -f deploy/docker-compose.cpu.yml" in docs
