"""`idp bench weights`: packed int4 vs dense weights of one checkpoint, side by side.

Resident bytes (whole model, linear layers, embedding), decode tokens/s at batch 1 and 16,
prefill time of 16 x 512, each with exact (batch-invariant) and batched attention, and the
process RSS after warm-up of each form in a fresh process. Variants run interleaved
(A B C D A B C D ...); figures are medians over repeats. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from idp_core.bank import PromptBank
from idp_core.build import build_engine
from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.model import LoadedModel, load_model
from idp_core.packed import PackedInt4Linear, weight_bytes

log = logging.getLogger(__name__)


def layer_bytes(lm: LoadedModel) -> dict[str, int]:
    """Resident bytes: all, the decoder's linear layers, the (tied) embedding."""
    linear = sum(weight_bytes(m) for m in lm.model.modules()
                 if isinstance(m, PackedInt4Linear | torch.nn.Linear)
                 and m is not lm.model.get_output_embeddings())
    embed = weight_bytes(lm.model.get_input_embeddings())
    return {"all": weight_bytes(lm.model), "linear": linear, "embedding": embed}


def _rows(lm: LoadedModel, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = int(lm.model.config.vocab_size)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def decode_run(engine: Engine, rows: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s over the new_tokens - 1 decode steps)."""
    config = GenConfig(max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    batch = engine.start([GenRequest(r, config, "auto") for r in rows])
    t1 = time.perf_counter()
    steps = 0
    while batch is not None:
        batch, _ = engine.retire(batch)
        if batch is not None:
            engine.step(batch)
            steps += 1
    t2 = time.perf_counter()
    return t1 - t0, len(rows) * steps / (t2 - t1)


def rss_after_warmup(model: str, weights: str, dtype: str, bank: str) -> dict[str, float]:
    """Load, pin the bank, run a 16 x 128 batch with 8 new tokens; VmRSS and VmHWM in MB."""
    lm = load_model(model, dtype=dtype, weights=weights)
    engine = build_engine(lm, bank=PromptBank.load(bank), check_fingerprint=False)
    decode_run(engine, _rows(lm, 16, 128), 8)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def run_weights(lm: LoadedModel, bank: PromptBank, args: argparse.Namespace) -> dict[str, Any]:
    """`lm` is the packed load; the dense one is loaded beside it from the same checkpoint."""
    if lm.weights != "packed-int4":
        raise SystemExit("idp bench weights: the model did not load packed "
                         f"(weights {lm.weights!r}); see the log line that says why")
    dense = load_model(lm.source, dtype=args.dtype, device=args.device, weights="dense")
    forms = {"packed": lm, "dense": dense}
    engines = {f"{form}-{mode}": build_engine(m, bank=bank, check_fingerprint=False,
                                              batch_invariant=mode == "exact")
               for form, m in forms.items() for mode in ("exact", "batched")}
    records: list[dict[str, Any]] = []
    for batch in (1, 16):
        rows = _rows(lm, batch, 128)
        rates = interleaved(engines, lambda e, rows=rows: decode_run(e, rows, 128)[1], args,
                            f"decode B={batch}")
        records += [{"task": "decode", "batch": batch, "prompt": 128, "new_tokens": 128,
                     "variant": name, "tokens_per_s": statistics.median(xs), "all": xs}
                    for name, xs in rates.items()]
    rows = _rows(lm, 16, 512)
    seconds = interleaved(engines, lambda e: decode_run(e, rows, 1)[0], args, "prefill 16x512")
    records += [{"task": "prefill", "batch": 16, "prompt": 512, "variant": name,
                 "seconds": statistics.median(xs), "all": xs} for name, xs in seconds.items()]
    rss = {form: _rss_in_fresh_process(lm.source, form, args) for form in forms}
    return {"bytes": {form: layer_bytes(m) for form, m in forms.items()}, "rss_mb": rss,
            "records": records, "ratios": ratios(records)}


def interleaved(engines: dict[str, Engine], measure: Callable[[Engine], float],
                args: argparse.Namespace, what: str) -> dict[str, list[float]]:
    """`measure` of every engine, A B C D A B C D ..., warm-up repeats dropped."""
    out: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(args.warmup + args.repeats):
        for name, engine in engines.items():
            value = measure(engine)
            if rep >= args.warmup:
                out[name].append(value)
            log.info("%s %s rep %d: %.3f", what, name, rep, value)
    return out


def ratios(records: list[dict[str, Any]]) -> dict[str, float]:
    """packed / dense (same attention mode) and exact / batched (same weights)."""
    def get(task: str, batch: int, variant: str) -> float:
        r = next(r for r in records if (r["task"], r["batch"], r["variant"]) ==
                 (task, batch, variant))
        return r["tokens_per_s"] if task == "decode" else r["seconds"]

    out = {}
    for mode in ("exact", "batched"):
        for b in (1, 16):
            out[f"decode_b{b}_packed_over_dense_{mode}"] = (
                get("decode", b, f"packed-{mode}") / get("decode", b, f"dense-{mode}"))
        out[f"prefill_16x512_packed_over_dense_{mode}"] = (
            get("prefill", 16, f"packed-{mode}") / get("prefill", 16, f"dense-{mode}"))
    for form in ("packed", "dense"):
        for b in (1, 16):
            out[f"decode_b{b}_{form}_exact_over_batched"] = (
                get("decode", b, f"{form}-exact") / get("decode", b, f"{form}-batched"))
    return out


def _rss_in_fresh_process(model: str, weights: str, args: argparse.Namespace) -> dict[str, float]:
    code = ("import json, sys; from idp_core.lab.bench_weights import rss_after_warmup; "
            "print(json.dumps(rss_after_warmup(*sys.argv[1:])))")
    from idp_core.paths import DEFAULT_BANK

    out = subprocess.run([sys.executable, "-c", code, model, weights, args.dtype,
                          str(args.bank or DEFAULT_BANK)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def weights_table(result: dict[str, Any]) -> str:
    b, rss = result["bytes"], result["rss_mb"]
    lines = ["| | packed | dense | packed / dense |", "|---|---|---|---|"]
    for key in ("all", "linear", "embedding"):
        p, d = b["packed"][key], b["dense"][key]
        lines.append(f"| resident bytes, {key} | {p / 1e6:.1f} MB | {d / 1e6:.1f} MB | "
                     f"{p / d:.3f} |")
    for key in ("VmRSS", "VmHWM"):
        p, d = rss["packed"][key], rss["dense"][key]
        lines.append(f"| process {key} after warm-up | {p:.0f} MB | {d:.0f} MB | {p / d:.2f} |")
    lines += ["", "| task | variant | median |", "|---|---|---|"]
    for r in result["records"]:
        value = (f"{r['tokens_per_s']:.1f} tok/s" if r["task"] == "decode"
                 else f"{r['seconds']:.2f} s")
        lines.append(f"| {r['task']} B={r['batch']} x {r['prompt']} | {r['variant']} | "
                     f"{value} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines)


# ---- accuracy: `idp bench weights-ppl` -----------------------------------------------------
def run_weights_ppl(lm: LoadedModel, bank: PromptBank,
                    args: argparse.Namespace) -> dict[str, Any]:
    """WikiText-2 perplexity (max_windows x seq_len) packed vs dense, with no prompt and with
    the bank's first prompt, and the prompt's share of the gap to the original (GGUF) in
    each form, with paired bootstrap CIs over windows."""
    import math

    from idp_core.lab.curve import bootstrap
    from idp_core.lab.data import load_wikitext2
    from idp_core.lab.evaluate import windows
    from idp_core.lab.oracle import engine_scorer

    if lm.weights != "packed-int4":
        raise SystemExit(f"idp bench weights-ppl: the model loaded {lm.weights!r}, not packed")
    wins = windows(load_wikitext2(lm.tokenizer), seq_len=args.seq_len,
                   max_windows=args.max_windows).tolist()
    prompt = bank.names[0]
    nll = {}
    original = build_engine(load_model(None, dtype=args.dtype, device=args.device))
    nll["original"] = engine_scorer(original)(wins, "none")[0]
    del original
    for form in ("packed", "dense"):
        m = lm if form == "packed" else load_model(lm.source, dtype=args.dtype,
                                                   device=args.device, weights="dense")
        engine = build_engine(m, bank=bank, check_fingerprint=False)
        for sel in ("none", prompt):
            key = f"{form}:{'prompt' if sel == prompt else 'none'}"
            nll[key] = engine_scorer(engine)(wins, sel)[0]
            log.info("%s: perplexity %.3f", key, math.exp(statistics.fmean(nll[key])))
    ppl = {k: math.exp(statistics.fmean(v)) for k, v in nll.items()}
    shares = {form: bootstrap(nll[f"{form}:none"], nll[f"{form}:prompt"], nll["original"],
                              perplexity=True) for form in ("packed", "dense")}
    return {"prompt": prompt, "seq_len": args.seq_len, "windows": len(nll["original"]),
            "perplexity": ppl,
            "packed_over_dense": {s: ppl[f"packed:{s}"] / ppl[f"dense:{s}"]
                                  for s in ("none", "prompt")},
            "prompt_share_of_ppl_gap": {f: list(v) for f, v in shares.items()},
            "share_packed_minus_dense": share_difference(nll),
            "window_nll": nll}


def share_difference(nll: dict[str, list[float]], *, num: int = 1000,
                     seed: int = 0) -> list[float]:
    """(estimate, 2.5 %, 97.5 %) of the prompt's gap share packed minus dense, each form
    against its own no-prompt base, the same windows resampled for both (paired)."""
    from idp_core.lab.curve import share

    def diff(r: list[int]) -> float:
        pick = {k: [v[i] for i in r] for k, v in nll.items()}
        return (share(pick["packed:none"], pick["packed:prompt"], pick["original"],
                      perplexity=True)
                - share(pick["dense:none"], pick["dense:prompt"], pick["original"],
                        perplexity=True))

    n = len(nll["original"])
    g = torch.Generator().manual_seed(seed)
    draws = sorted(diff(r) for r in torch.randint(0, n, (num, n), generator=g).tolist())
    return [diff(list(range(n))), draws[int(0.025 * num)], draws[int(0.975 * num) - 1]]


def weights_ppl_table(result: dict[str, Any]) -> str:
    p, s = result["perplexity"], result["prompt_share_of_ppl_gap"]
    lines = [f"WikiText-2, {result['windows']} x {result['seq_len']} tokens; prompt "
             f"`{result['prompt']}`; original (GGUF) {p['original']:.3f}", "",
             "| weights | no prompt | prompt | prompt's share of the gap [95 % CI] |",
             "|---|---|---|---|"]
    for f in ("packed", "dense"):
        lo, hi = s[f][1], s[f][2]
        lines.append(f"| {f} | {p[f + ':none']:.3f} | {p[f + ':prompt']:.3f} | "
                     f"{100 * s[f][0]:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] |")
    d = result["share_packed_minus_dense"]
    r = result["packed_over_dense"]
    lines += ["", f"packed / dense perplexity: no prompt {r['none']:.4f}, prompt "
              f"{r['prompt']:.4f}; share packed - dense {100 * d[0]:+.1f} points "
              f"[{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] (paired, same windows)"]
    return "\n".join(lines)
