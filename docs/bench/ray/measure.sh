#!/usr/bin/env bash
# The plain server against Ray Serve with one and with two replicas, on the default model, on
# this machine, in one run: `idp loadgen` at concurrency 1 and 16 (plain and Serve interleaved
# per level), then the Ray tests' scale-up, scale-down and recovery times (their settings:
# tests/deploy/test_ray_serve.py FAST). Writes docs/bench/ray/: replicas-1/, replicas-2/
# (loadgen's serving.json/.md/.png), tests-junit.xml and ray_serve.json (the summary).
#   bash docs/bench/ray/measure.sh        # about 15 minutes on 2 cores
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/bench/ray
LOGS=$(mktemp -d /tmp/idp-ray-bench.XXXX)
IDP=.venv/bin/idp
LOADGEN=(--concurrency 1 16 --requests-per-level 32 --max-tokens 32 --duration-s 120)
free_port() { .venv/bin/python -c "from idp_core.lab.servers import free_port; print(free_port())"; }
wait_health() {
  for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done
  echo "not healthy: $1" >&2; return 1
}

PLAIN=$(free_port)
$IDP serve --port "$PLAIN" >"$LOGS/plain.log" 2>&1 &
PLAIN_PID=$!
trap 'kill -TERM $PLAIN_PID 2>/dev/null' EXIT
wait_health "http://127.0.0.1:$PLAIN" || exit 1
for n in 1 2; do
  SERVE=$(free_port)
  # The same CPUs either way: one replica with both cores (2 torch threads, as the plain
  # server), or two replicas with one core each.
  $IDP serve-ray --port "$SERVE" --min-replicas "$n" --max-replicas "$n" \
    --cpus-per-replica $((2 / n)) --metrics-export-port "$(free_port)" >"$LOGS/serve-$n.log" 2>&1 &
  SERVE_PID=$!
  wait_health "http://127.0.0.1:$SERVE" || exit 1
  $IDP loadgen --target plain="http://127.0.0.1:$PLAIN" --target "serve-$n=http://127.0.0.1:$SERVE" \
    "${LOADGEN[@]}" --out "$OUT/replicas-$n" || echo "loadgen reported failed requests" >&2
  kill -TERM "$SERVE_PID"; wait "$SERVE_PID"
done
kill -TERM "$PLAIN_PID"; wait "$PLAIN_PID"

.venv/bin/python -m pytest -q -s tests/deploy/test_ray_serve.py -o junit_family=legacy \
  --junitxml="$OUT/tests-junit.xml" | tee "$LOGS/tests.log"

.venv/bin/python - "$OUT" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
summary = {"command": "bash docs/bench/ray/measure.sh", "levels": {}, "throughput_ratio": {}}
for n in (1, 2):
    run = json.loads((out / f"replicas-{n}" / "serving.json").read_text())
    summary.setdefault("env", {k: v for k, v in run["env"].items() if k != "targets"})
    for r in run["results"]:
        summary["levels"].setdefault(f"replicas-{n}", []).append(
            {k: r[k] for k in ("target", "concurrency", "completed", "sent", "tokens_per_s",
                               "requests_per_s", "ttft_s", "itl_s")})
    by = {(r["target"], r["concurrency"]): r["tokens_per_s"] for r in run["results"]}
    for c in sorted({r["concurrency"] for r in run["results"]}):
        summary["throughput_ratio"][f"serve-{n}/plain at {c}"] = round(
            by[(f"serve-{n}", c)] / by[("plain", c)], 3)
props = {p.get("name"): float(p.get("value"))
         for p in ET.parse(out / "tests-junit.xml").iter("property")}
summary["tests"] = {"settings": "tests/deploy/test_ray_serve.py FAST: target_ongoing_requests 2, "
                    "upscale_delay_s 1, downscale_delay_s 3, look_back_period_s 2, "
                    "metrics_interval_s 0.5, tiny model", **props}
(out / "ray_serve.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["throughput_ratio"], indent=2), json.dumps(summary["tests"], indent=2))
PY
