#!/usr/bin/env bash
# Distillation with a teacher forward per step against the teacher's cached top-64 outputs,
# side by side in one run: the same deep 16-token prompt, data, seed and steps (8 x 8 x 256
# tokens of C4), three runs in turn: live teacher, cache built on first use, cache reused.
# Each prompt is then scored on the first 16 WikiText-2 test windows of 256 tokens (NLL and
# the full-vocabulary KL to the teacher), so the record says whether top-64 trains as well.
# Writes docs/bench/teacher-cache/teacher_cache.json (tokens/s, loss curves, walls, scores).
#   bash docs/bench/teacher-cache/measure.sh [MODEL]   # about 10 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/bench/teacher-cache
MODEL=${1:-.cache/models/SmolLM2-135M-Instruct-gptq-w4g64}
WORK=$(mktemp -d /tmp/idp-teacher-cache.XXXX)
COMMON=(--model "$MODEL" --kind deep --loss kd --lengths 16 --total-tokens 16384 --seq-len 256
        --batch-size 8 --dtype float32 --data ../shared/data/calib/c4_sample.jsonl)
run() {  # name, extra args...
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  .venv/bin/idp train-prompts "${COMMON[@]}" --out "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1
  echo "$name $(echo "$(date +%s.%N) - $t0" | bc)" >> "$WORK/walls"
}
run live
run cache-build --teacher-cache "$WORK/teacher.safetensors"
run cache-reuse --teacher-cache "$WORK/teacher.safetensors"
.venv/bin/python - "$WORK" "$OUT" "$MODEL" <<'PY'
import json, sys
from pathlib import Path
from idp_core.lab.provenance import machine
work, out, model = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
walls = dict(line.split() for line in (work / "walls").read_text().splitlines())
runs = {}
for name, wall in walls.items():
    p = json.loads((work / name / "manifest.json").read_text())["training"]["prompts"][0]
    runs[name] = {"command_wall_s": round(float(wall), 1), "train_wall_s": p["wall_s"],
                  "tokens_per_s": p["tokens_per_s"], "tokens": p["tokens"],
                  "loss_curve": p["loss_curve"]}
import torch
from idp_core.bank import PromptBank
from idp_core.lab.curve import score_all, teacher_windows
from idp_core.lab.data import DATA_DIR, WIKITEXT2_TEST
from idp_core.model import load_model
lm, teacher = load_model(model, dtype="float32"), load_model(None, dtype="float32")
with (DATA_DIR / "eval" / WIKITEXT2_TEST.name).open() as f:
    text = "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: 16 * 256]
windows = {"wikitext2": torch.tensor(ids).view(16, 256)}
t_logp = teacher_windows(teacher.model, windows, batch_size=8)
def mean(xs): return round(sum(xs) / len(xs), 5)
for name, prompt in [("none", None)] + [(n, PromptBank.load(work / n).prompts[0]) for n in runs]:
    s = score_all(lm.model, windows, t_logp, prompt, batch_size=8)["wikitext2"]
    runs.setdefault(name, {})["wikitext2_16x256"] = {"nll": mean(s["nll"]), "kl": mean(s["kl"])}
live, reuse = runs["live"], runs["cache-reuse"]
record = {"model": model, "runs": runs, "top_k": 64,
          "cache_bytes": (work / "teacher.safetensors").stat().st_size,
          "speedup_tokens_per_s": round(reuse["tokens_per_s"] / live["tokens_per_s"], 3),
          "machine": machine()}
(out / "teacher_cache.json").write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1)[:2000])
PY
