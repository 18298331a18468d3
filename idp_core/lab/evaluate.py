"""Evaluation through the serving engine: perplexity over non-overlapping windows (`idp evaluate`).

Every number goes through `Engine.generate` (echo + logprobs), so "none", a named prompt,
"concat", IDP ("auto") and a LoRA-mode engine are scored by exactly the code that serves them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from idp_core.config import GenConfig, SelectConfig
from idp_core.generate import Engine, GenRequest

SCORE_ONLY = GenConfig(max_tokens=0, echo=True, logprobs=0)


def windows(token_ids: Tensor, *, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Cut [T] ids into non-overlapping windows [W, seq_len] (a final partial window is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    num = token_ids.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        num = min(num, max_windows)
    if num == 0:
        raise ValueError(f"{token_ids.numel()} tokens make no window of {seq_len}")
    return token_ids[: num * seq_len].view(num, seq_len)  # [W, T]


def window_nll(
    engine: Engine,
    token_ids: Tensor,
    *,
    selection: str,
    seq_len: int,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[float, int, dict[str, int]]:
    """Summed negative log-likelihood of every window token but the first, through the engine.

    Returns:
        (total NLL in nats, number of scored tokens, how often each prefix was used).
    """
    wins = windows(token_ids, seq_len=seq_len, max_windows=max_windows)
    total, count, used = 0.0, 0, {}
    bar = tqdm(total=len(wins), desc=f"perplexity [{selection}]", unit="win", disable=not progress)
    for start in range(0, len(wins), batch_size):
        chunk = wins[start : start + batch_size].tolist()
        requests = [GenRequest(w, SCORE_ONLY, selection) for w in chunk]
        for res in engine.generate(requests):
            scored = [lp.logprob for lp in (res.prompt_logprobs or [])[1:] if lp is not None]
            total -= math.fsum(scored)
            count += len(scored)
            used[res.prompt_used] = used.get(res.prompt_used, 0) + 1
        bar.update(len(chunk))
    bar.close()
    return total, count, used


def perplexity(
    engine: Engine,
    token_ids: Tensor,
    *,
    selection: str,
    seq_len: int,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """exp(mean NLL) over non-overlapping windows scored through the serving engine.

    Each window is one request (echo, no new tokens); token t >= 1 of a window is scored given
    the window's earlier tokens and the request's prompt prefix.

    Args:
        engine: the serving engine (a prompt bank, none, or a LoRA-wrapped model).
        token_ids: [T] token ids of the evaluation text.
        selection: "none", "auto" (IDP), "concat" or a prompt name.
        seq_len: window length in tokens (without the prompt).
        max_windows: evaluate only the first windows (None: all).
        batch_size: windows per engine batch.
        progress: show a progress bar.

    Returns:
        The perplexity.
    """
    nll, count, _ = window_nll(
        engine, token_ids, selection=selection, seq_len=seq_len, max_windows=max_windows,
        batch_size=batch_size, progress=progress,
    )
    return math.exp(nll / count)


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or .gguf (default: the default compressed model)")
    parser.add_argument("--original", action="store_true",
                        help="evaluate the uncompressed default GGUF instead of --model")
    parser.add_argument("--bank", default=None, help="prompt bank folder (default: none)")
    parser.add_argument("--lora", default=None, help="peft LoRA adapter folder (unmerged)")
    parser.add_argument("--selections", default="none",
                        help="comma list of none, auto, concat, prompt names, or 'all'")
    parser.add_argument("--data", default=None, help="text/JSONL file (default: WikiText-2 test)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--weights", default="auto", choices=["auto", "packed", "dense"],
                        help="GPTQ layers packed on the int4 kernel or dense (load_model)")
    parser.add_argument("--score", default="mean", choices=["mean", "sum"],
                        help="IDP scoring rule for 'auto' (SelectConfig.score)")
    parser.add_argument("--align", default="end", choices=["start", "end"],
                        help="prompt positions in the IDP pass (SelectConfig.align)")
    parser.add_argument("--out", default=None, help="write the JSON result here too")


def run(args: argparse.Namespace) -> int:
    from idp_core.bank import PromptBank
    from idp_core.build import build_engine
    from idp_core.lab.artefacts import ensure_default_model
    from idp_core.lab.data import load_wikitext2, read_texts
    from idp_core.model import load_model

    if args.bank and args.lora:
        raise ValueError("--bank and --lora are separate modes: give one of them")
    if args.original:
        source = None
    else:
        source = Path(args.model) if args.model else ensure_default_model()
    lm = load_model(source, dtype=args.dtype, weights=args.weights)
    bank, method = None, "none"
    selections = args.selections.split(",")
    if args.bank:
        bank = PromptBank.load(args.bank)
        if selections == ["all"]:
            selections = ["none", *bank.names, "concat", "auto"]
    elif args.lora:
        method = "lora"
        selections = ["none"]
    engine = build_engine(lm, bank=bank, lora=args.lora or None, origin=args.bank or "bank",
                          select_config=SelectConfig(score=args.score, align=args.align))
    if args.data:
        ids = lm.tokenizer("\n\n".join(read_texts(args.data)), add_special_tokens=False)
        ids = torch.tensor(ids["input_ids"], dtype=torch.long)
    else:
        ids = load_wikitext2(lm.tokenizer)
    results: dict[str, Any] = {}
    for sel in selections:
        start = time.perf_counter()
        nll, count, used = window_nll(
            engine, ids, selection=sel, seq_len=args.seq_len, max_windows=args.max_windows,
            batch_size=args.batch_size, progress=True,
        )
        results[sel] = {
            "perplexity": math.exp(nll / count),
            "tokens_scored": count,
            "prefix_used": used,
            "wall_s": round(time.perf_counter() - start, 1),
        }
        print(f"{sel:>12}: perplexity {results[sel]['perplexity']:.3f}", flush=True)
    report = {
        "model": lm.describe(),
        "bank": args.bank,
        "lora": args.lora,
        "method": method if not args.bank else "bank",
        "data": args.data or "wikitext2_raw_test (rows joined with \\n\\n)",
        "seq_len": args.seq_len,
        "max_windows": args.max_windows,
        "dtype": args.dtype,
        "idp_score": args.score,
        "idp_align": args.align,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
