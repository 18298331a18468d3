"""`idp bench latency|selection|prefix|served|memory|profile`: timings, JSON + PNG.

Variants run A B C A B C ... so drift on a shared machine hits all alike; each figure is the
median over repeats with the 10th-90th percentile spread. Nothing here asserts a timing.
`served` compares the HTTP server (its own process) with in-process batched generation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idp_core.bank import PromptBank, Router
from idp_core.build import build_engine
from idp_core.config import AUTO, CONCAT, NONE, GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import compute_prefix_kv
from idp_core.lab.bench_render import TABLES, plot
from idp_core.lab.bench_weights import (
    run_weights,
    run_weights_ppl,
    weights_ppl_table,
    weights_table,
)
from idp_core.lab.data import load_wikitext2
from idp_core.lab.provenance import machine
from idp_core.lab.servers import ServerProcess
from idp_core.lab.train import LORA_TARGETS
from idp_core.model import LoadedModel, load_model, resolve_device, resolve_dtype, wrap_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One way of serving a request: an engine plus the selection each request asks for."""

    name: str
    engine: Engine
    selection: str


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def spread(xs: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles (min/max for fewer than 10 samples)."""
    qs = statistics.quantiles(xs, n=10) if len(xs) >= 10 else [min(xs)] * 9
    return {"median": statistics.median(xs), "p10": qs[0] if len(xs) >= 10 else min(xs),
            "p90": qs[8] if len(xs) >= 10 else max(xs), "n": len(xs)}


def input_rows(lm: LoadedModel, batch: int, seq_len: int) -> list[list[int]]:
    """`batch` distinct WikiText-2 windows of exactly `seq_len` tokens."""
    ids = load_wikitext2(lm.tokenizer)
    if ids.numel() < batch * seq_len:
        raise ValueError(f"WikiText-2 has {ids.numel()} tokens, need {batch * seq_len}")
    return ids[: batch * seq_len].view(batch, seq_len).tolist()


def lora_variant(lm: LoadedModel, rank: int, *, adapter_fp32: bool = False) -> Engine:
    """The same weights with an unmerged rank-r LoRA on q,k,v,o,gate,up,down (peft).

    Adapter weights are in the model's dtype, as `attach_lora` serves them; `adapter_fp32`
    keeps peft's default instead (float32 adapters on a bfloat16 model).
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS),
                        init_lora_weights=False)
    copy_of_lm = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    return build_engine(copy_of_lm, lora=config, adapter_fp32=adapter_fp32)


def build_variants(lm: LoadedModel, bank: PromptBank, lora_ranks: list[int],
                   lora_fp32_ranks: list[int]) -> list[Variant]:
    engine = build_engine(lm, bank=bank, check_fingerprint=False)  # run() checked it
    longest = bank.names[max(range(len(bank.names)), key=lambda i: bank.lengths[i])]
    variants = [Variant("none", engine, NONE), Variant(f"prompt:{longest}", engine, longest),
                Variant("idp", engine, AUTO), Variant("concat", engine, CONCAT)]
    variants += [Variant(f"lora-r{r}", lora_variant(lm, r), NONE) for r in lora_ranks]
    variants += [Variant(f"lora-r{r}-fp32", lora_variant(lm, r, adapter_fp32=True), NONE)
                 for r in lora_fp32_ranks]
    return variants


def deep_variant(lm: LoadedModel, bank: PromptBank) -> Variant:
    """The bank's longest prompt served as a deep prompt of the same length: its KV as a deep
    bank (a shallow bank), or the prompt itself (a deep bank)."""
    i = max(range(len(bank.names)), key=lambda j: bank.lengths[j])
    name, prompt = bank.names[i], bank.prompts[i]
    if bank.kind == "shallow":
        kv = compute_prefix_kv(lm.model, prompt, name=name)
        prompt = torch.stack([torch.stack(kv.keys), torch.stack(kv.values)]).float()
    deep = PromptBank([name], [prompt], kind="deep")
    return Variant(f"deep:{name}", build_engine(lm, bank=deep, check_fingerprint=False), name)


def run_latency(lm: LoadedModel, bank: PromptBank, args: argparse.Namespace) -> dict[str, Any]:
    """Forward (selection + prefill of B x L) and generation of N new tokens, per variant."""
    variants = build_variants(lm, bank, args.lora_ranks, args.lora_fp32_ranks)
    variants.append(deep_variant(lm, bank))
    records: list[dict[str, Any]] = []
    for seq_len in args.lengths:
        rows = input_rows(lm, args.batch, seq_len)
        for task, max_tokens in (("forward", 1), ("generate", args.new_tokens)):
            if task == "generate" and seq_len not in args.generate_lengths:
                continue
            config = GenConfig(max_tokens=max_tokens, ignore_eos=True)
            times: dict[str, list[float]] = {v.name: [] for v in variants}
            selection: list[float] = []
            for rep in range(args.warmup + args.repeats):
                for v in variants:  # interleaved: A B C A B C ...
                    reqs = [GenRequest(r, config, v.selection) for r in rows]
                    call = (lambda v=v, reqs=reqs: v.engine.start(reqs)) if task == "forward" \
                        else (lambda v=v, reqs=reqs: v.engine.generate(reqs))
                    seconds, out = timed(call, lm.device)
                    if rep >= args.warmup:
                        times[v.name].append(seconds)
                        if v.name == "idp":
                            seqs = out.seqs if task == "forward" else out
                            selection.append(seqs[0].selection_s)
                    log.info("%s L=%d %s rep %d: %.3f s", task, seq_len, v.name, rep, seconds)
            base = statistics.median(times["none"])
            for name, xs in times.items():
                records.append({"task": task, "seq_len": seq_len, "batch": args.batch,
                                "new_tokens": max_tokens, "variant": name, **spread(xs),
                                "ratio_to_none": statistics.median(xs) / base})
            idp = statistics.median(times["idp"])
            records.append({"task": task, "seq_len": seq_len, "variant": "idp-selection-pass",
                            **spread(selection),
                            "fraction_of_request": statistics.median(selection) / idp})
    return {"records": records, "idp_over_lora": _idp_over_lora(records)}


def _idp_over_lora(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        if r["variant"] == "idp":
            for q in records:
                if (q["task"], q["seq_len"]) == (r["task"], r["seq_len"]) and \
                        q["variant"].startswith("lora"):
                    out.append({"task": r["task"], "seq_len": r["seq_len"], "lora": q["variant"],
                                "idp_over_lora": r["median"] / q["median"]})
    return out


def synthetic_bank(lm: LoadedModel, lengths: list[int], seed: int = 0,
                   rule: str = "attention") -> PromptBank:
    """Prompts made of random vocabulary embeddings, and random routing data for the
    centroid and linear rules (timing does not depend on their values)."""
    emb = lm.model.get_input_embeddings().weight.detach().float()
    g = torch.Generator().manual_seed(seed)
    prompts = [emb[torch.randint(0, emb.shape[0], (n,), generator=g)] for n in lengths]
    vectors = torch.nn.functional.normalize(torch.randn(len(lengths), emb.shape[1], generator=g),
                                            dim=-1)
    return PromptBank([f"s{i}" for i in range(len(lengths))], prompts, rule=rule,
                      routers={r: Router(emb.mean(0), vectors, torch.zeros(len(lengths)),
                                         normalize=r == "centroid")
                               for r in ("centroid", "linear")})


def run_selection(lm: LoadedModel, bank: PromptBank, args: argparse.Namespace) -> dict[str, Any]:
    """Selection pass alone vs the whole request (selection + prefill), over B and m."""
    records = []
    for m in args.bank_sizes:
        lengths = [bank.lengths[i % len(bank.lengths)] for i in range(m)]
        engine = build_engine(lm, bank=synthetic_bank(lm, lengths, rule=args.rule),
                              check_fingerprint=False)
        for batch in args.batch_sizes:
            rows = input_rows(lm, batch, args.seq_len)
            reqs = [GenRequest(r, GenConfig(max_tokens=1)) for r in rows]
            sel, total = [], []
            for rep in range(args.warmup + args.repeats):
                seconds, out = timed(lambda reqs=reqs, e=engine: e.start(reqs), lm.device)
                if rep >= args.warmup:
                    total.append(seconds)
                    sel.append(out.seqs[0].selection_s)
            records.append({"bank_size": m, "batch": batch, "seq_len": args.seq_len,
                            "rule": args.rule,
                            "selection_s": spread(sel), "request_s": spread(total),
                            "fraction": statistics.median(sel) / statistics.median(total)})
            log.info("m=%d B=%d: selection %.4f s of %.3f s", m, batch,
                     statistics.median(sel), statistics.median(total))
    return {"records": records}


def run_prefix(lm: LoadedModel, bank: PromptBank, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill on cached prompt KV vs recomputing [P; X] from embeddings for every request."""
    if bank.kind != "shallow":
        raise SystemExit(f"idp bench prefix: a {bank.kind} bank's prompts are KV, with no "
                         f"embeddings to recompute [P; X] from; use a shallow bank")
    engine = build_engine(lm, bank=bank, check_fingerprint=False)  # run() checked it
    store = engine.store
    rows = input_rows(lm, args.batch, args.seq_len)
    records = []
    for name, prompt in zip(bank.names, bank.prompts, strict=True):
        reqs = [GenRequest(r, GenConfig(max_tokens=1), name) for r in rows]
        ids = torch.tensor(rows, device=lm.device)
        p = prompt.to(lm.device, lm.dtype)

        @torch.inference_mode()
        def recompute(ids: Tensor = ids, p: Tensor = p) -> Tensor:
            x = torch.cat([p.expand(ids.shape[0], -1, -1), lm.model.get_input_embeddings()(ids)], 1)
            return lm.model(inputs_embeds=x, logits_to_keep=1).logits

        cached, fresh = [], []
        for rep in range(args.warmup + args.repeats):
            t_cached, _ = timed(lambda reqs=reqs: engine.start(reqs), lm.device)
            t_fresh, _ = timed(recompute, lm.device)
            if rep >= args.warmup:
                cached.append(t_cached)
                fresh.append(t_fresh)
        entry = store.entry(name)
        kv_bytes = sum(t.numel() * t.element_size() for t in (*entry.keys, *entry.values))
        records.append({"prompt": name, "prompt_len": prompt.shape[0], "batch": args.batch,
                        "seq_len": args.seq_len, "cached_s": spread(cached),
                        "recomputed_s": spread(fresh), "resident_kv_bytes": kv_bytes,
                        "speedup": statistics.median(fresh) / statistics.median(cached)})
    return {"records": records}


OP_GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_cudnn_attention_forward",
                           "aten::_scaled_dot_product_efficient_attention",
                           "aten::_scaled_dot_product_flash_attention",
                           "aten::_softmax", "aten::lerp"),
             "copy": ("aten::copy_",)}

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def run_profile(lm: LoadedModel, bank: PromptBank, args: argparse.Namespace) -> dict[str, Any]:
    """Where one forward of B x seq_len goes (torch.profiler, self CPU time by operator): no
    recovery, the longest prompt as cached KV, IDP, and the largest LoRA rank unmerged. On a
    GPU also the kernels' own time and the number of kernel launches (small models are
    launch-bound there)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    rank = max(args.lora_ranks)
    variants = [v for v in build_variants(lm, bank, [rank], []) if v.name != "concat"]
    rows = input_rows(lm, args.batch, args.seq_len)
    on_gpu = lm.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    records = []
    for v in variants:
        reqs = [GenRequest(r, GenConfig(max_tokens=1), v.selection) for r in rows]
        for _ in range(args.warmup):
            v.engine.start(reqs)
        with profile(activities=activities) as prof:
            seconds, _ = timed(lambda v=v, reqs=reqs: v.engine.start(reqs), lm.device)
        events = prof.key_averages()
        ops = {e.key: e.self_cpu_time_total / 1e6 for e in events}
        groups = {g: sum(ops.get(k, 0.0) for k in keys) for g, keys in OP_GROUPS.items()}
        groups["other"] = sum(ops.values()) - sum(groups.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
        record = {"variant": v.name, "batch": args.batch, "seq_len": args.seq_len,
                  "wall_s": seconds, "self_cpu_s": groups,
                  "top_ops": [{"op": k, "self_cpu_s": t} for k, t in top]}
        if on_gpu:
            # operators' device time (their kernels' time attributed to them; the kernel
            # events themselves would count it twice), as the profiler's own table sums it
            record["gpu_kernel_s"] = sum(e.self_device_time_total for e in events
                                         if e.device_type == DeviceType.CPU) / 1e6
            record["kernel_launches"] = sum(e.count for e in events if e.key in LAUNCHES)
        records.append(record)
        log.info("%s: %.2f s %s", v.name, seconds, groups)
    return {"records": records}


def burst(url: str, rows: list[list[int]], new_tokens: int) -> list[int]:
    """All rows as concurrent non-streaming completions; returns the tokens each one got."""
    import asyncio

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request

    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(ids: list[int]) -> int:
                r = await client.post(url + "/v1/completions", json={
                    "prompt": ids, "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True, "prompt_selection": AUTO})
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

            return list(await asyncio.gather(*(one(ids) for ids in rows)))

    return asyncio.run(go())


def run_served(lm: LoadedModel, bank: PromptBank, args: argparse.Namespace) -> dict[str, Any]:
    """The same B requests (B x seq_len token ids, N new tokens, IDP): in-process
    `Engine.generate` vs a burst of B concurrent HTTP requests to a server process running the
    same model and bank with max batch B. Throughput ratio served / in-process."""
    engine = build_engine(lm, bank=bank, check_fingerprint=False)  # run() checked it
    rows = input_rows(lm, args.batch, args.seq_len)
    reqs = [GenRequest(r, GenConfig(max_tokens=args.new_tokens, ignore_eos=True), AUTO)
            for r in rows]
    tokens = args.batch * args.new_tokens
    inproc, served = [], []
    with ServerProcess("--dtype", args.dtype, "--device", args.device,
                       "--max-batch-size", str(args.batch),
                       *(["--model", args.model] if args.model else []),
                       *(["--bank", args.bank] if args.bank else []),
                       timeout_s=900.0, keep_log=True) as server:
        for rep in range(args.warmup + args.repeats):
            t_in, out = timed(lambda: engine.generate(reqs), lm.device)
            t_srv, got = timed(lambda: burst(server.url, rows, args.new_tokens), lm.device)
            made = sum(len(r.output_ids) for r in out)
            if sum(got) != tokens or made != tokens:
                raise RuntimeError(f"expected {tokens} tokens: in-process {made}, "
                                   f"served {sum(got)}")
            if rep >= args.warmup:
                inproc.append(t_in)
                served.append(t_srv)
            log.info("rep %d: in-process %.3f s, served %.3f s", rep, t_in, t_srv)
    ratio = statistics.median(inproc) / statistics.median(served)
    return {"records": [{"variant": name, "batch": args.batch, "seq_len": args.seq_len,
                         "new_tokens": args.new_tokens, **spread(xs),
                         "tokens_per_s": tokens / statistics.median(xs)}
                        for name, xs in (("in-process", inproc), ("served", served))],
            "served_over_inprocess": ratio}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _live_tensor_mb() -> float:
    import gc

    return sum(o.numel() * o.element_size() for o in gc.get_objects()
               if isinstance(o, Tensor)) / 2**20


def run_memory(lm: LoadedModel, bank: PromptBank, args: argparse.Namespace) -> dict[str, Any]:
    """Resident memory vs bytes in live tensors while the engine runs batches of random shapes
    (1..batch requests, 10..seq_len input tokens, 1..new_tokens new ones), then after one
    glibc malloc_trim(0): separates a leak (live bytes grow) from allocator retention."""
    import ctypes
    import random

    engine = build_engine(lm, bank=bank, check_fingerprint=False)  # run() checked it
    rng = random.Random(0)
    vocab = int(lm.model.config.vocab_size)
    records = [{"batches": 0, "rss_mb": _rss_mb(), "live_tensor_mb": _live_tensor_mb()}]
    for i in range(1, args.repeats + 1):
        reqs = [GenRequest([rng.randrange(vocab) for _ in range(rng.randint(10, args.seq_len))],
                           GenConfig(max_tokens=rng.randint(1, args.new_tokens), ignore_eos=True))
                for _ in range(rng.randint(1, args.batch))]
        engine.generate(reqs)
        records.append({"batches": i, "rss_mb": _rss_mb(), "live_tensor_mb": _live_tensor_mb()})
        log.info("batch %d: %s", i, records[-1])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    records.append({"batches": "after malloc_trim", "rss_mb": _rss_mb(),
                    "live_tensor_mb": _live_tensor_mb()})
    return {"records": records}


def random_model(folder: str | Path, *, dtype: str, device: str, seed: int = 0) -> LoadedModel:
    """The checkpoint's architecture and tokenizer with random dense weights.

    Latency depends on shapes, not on weight values; this times a model on a machine its
    weights cannot reach (the GPU machine lent to development sessions takes 64 MiB, the
    compressed default checkpoint is 173 MB). Any quantization config is dropped.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    model.to(resolve_device(device))
    return wrap_model(model, AutoTokenizer.from_pretrained(folder),
                      name=f"{Path(folder).name} (random weights)")


def environment(lm: LoadedModel) -> dict[str, Any]:
    device = lm.device
    return {**machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(lm.dtype).removeprefix("torch."), "model": lm.name}


RUNNERS = {"latency": run_latency, "selection": run_selection, "prefix": run_prefix,
           "served": run_served, "memory": run_memory, "profile": run_profile,
           "weights": run_weights, "weights-ppl": run_weights_ppl}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=sorted(RUNNERS))
    parser.add_argument("--model", default=None, help="checkpoint; default: the default model")
    parser.add_argument("--bank", default=None, help="prompt bank; default: the shipped bank")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="auto", choices=["auto", "packed", "dense"],
                        help="GPTQ layers packed on the int4 kernel or dense (load_model)")
    parser.add_argument("--random-weights", action="store_true",
                        help="--model's architecture with random weights (timing only)")
    parser.add_argument("--out", default="docs/bench", help="folder for JSON, table and PNG")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--generate-lengths", type=int, nargs="*", default=[128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lora-ranks", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--lora-fp32-ranks", type=int, nargs="*", default=[4],
                        help="LoRA ranks also timed with peft's default float32 adapter weights")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=32,
                        help="weights-ppl: WikiText-2 windows of --seq-len tokens")
    parser.add_argument("--rule", default="attention",
                        choices=["attention", "centroid", "linear"],
                        help="selection rule timed by `selection`")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from idp_core.lab.artefacts import ensure_default_model
    from idp_core.paths import DEFAULT_BANK

    model = args.model or ensure_default_model()
    if args.random_weights:
        lm = random_model(model, dtype=args.dtype, device=args.device)
    else:
        lm = load_model(model, dtype=args.dtype, device=args.device, weights=args.weights)
    bank = PromptBank.load(args.bank or DEFAULT_BANK)
    bank.check_model(lm.fingerprint)
    runner = RUNNERS[args.which]
    result = {"benchmark": args.which, "env": environment(lm),
              "args": {k: v for k, v in vars(args).items() if k != "func"},
              **runner(lm, bank, args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.which}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = {**TABLES, "weights": weights_table, "weights-ppl": weights_ppl_table}[args.which](
        result)
    (out / f"{args.which}.md").write_text(text + "\n")
    plotted = not args.which.startswith("weights")  # tables of two forms: no plot
    if plotted:
        plot(args.which, result, out / f"{args.which}.png")
    print(text)
    print(f"\nwrote {out}/{args.which}.json, .md{' and .png' if plotted else ''}")
    return 0
