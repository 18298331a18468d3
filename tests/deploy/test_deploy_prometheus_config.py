"""deploy/prometheus: promtool's config, rules and rule unit tests; names match the server."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    COMPOSE,
    PROMETHEUS_CONFIG,
    PROMETHEUS_RULES,
    RULES_TEST,
    base_metric,
    exported_sample_names,
    load_compose,
    metric_names,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)


def _promtool(*args: str | Path) -> str:
    out = subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{out.stdout}{out.stderr}"
    return out.stdout


@needs_promtool
def test_promtool_check_config() -> None:
    assert "SUCCESS" in _promtool("check", "config", PROMETHEUS_CONFIG)


@needs_promtool
def test_promtool_check_rules() -> None:
    assert "SUCCESS" in _promtool("check", "rules", PROMETHEUS_RULES)


@needs_promtool
def test_alerts_fire_on_synthetic_series() -> None:
    """tests/deploy/rules_test.yml: each alert fires for the bad method only."""
    assert "SUCCESS" in _promtool("test", "rules", RULES_TEST)


def _rules() -> list[dict]:
    groups = yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def test_alerts_cover_ttft_errors_queue_and_down() -> None:
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert set(alerts) == {"IDPHighTTFTp99", "IDPHighErrorRate", "IDPQueueGrowing", "IDPServerDown"}
    assert "idp_time_to_first_token_seconds" in alerts["IDPHighTTFTp99"]["expr"]
    assert "error_ratio" in alerts["IDPHighErrorRate"]["expr"]
    assert "idp_num_requests_waiting" in alerts["IDPQueueGrowing"]["expr"]
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
        assert rule["for"]  # no alert on a single bad evaluation


def test_recording_rules_follow_level_metric_operation() -> None:
    records = [r["record"] for r in _rules() if "record" in r]
    assert records
    for name in records:
        level, metric, op = name.split(":")
        assert level and metric.startswith("idp_") and op, name


def test_rules_read_only_exported_metrics() -> None:
    exported = exported_sample_names()
    for rule in _rules():
        for name in metric_names(rule["expr"]):
            assert name in exported, f"{rule.get('record') or rule['alert']} reads unknown {name}"
    read = {base_metric(n) for r in _rules() for n in metric_names(r["expr"])}
    assert {"idp_time_to_first_token_seconds", "idp_num_requests_waiting"} <= read


def test_scrape_jobs_match_the_compose_services() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"idp", "lora", "prometheus"}
    services = load_compose(COMPOSE)["services"]
    for name in ("idp", "lora"):
        (static,) = jobs[name]["static_configs"]
        assert static["targets"] == [f"{name}:8000"]
        assert services[name]["environment"]["IDP_PORT"] == "8000"
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == ["rules.yml"]
    assert (PROMETHEUS_CONFIG.parent / "rules.yml").is_file()
