"""`python -m idp_core.lab.gpu_check OUT`: packed vs dense on a CUDA GPU, one JSON record.

Run by `make gpu-check OUT=dir` (scripts/gpu_check.sh) after the CUDA tests. The model is the
default compressed checkpoint where this host has it (IDP_GPU_CHECK_MODEL or the cache folder),
else a random-weight model of SmolLM2-135M's shape with every linear layer quantised here
(round to nearest, W4 g64): timings do not depend on the weight values, and the record says
which it was. Measures: packed and dense prefill (16 x 512) and decode tokens/s (batch 1 and
16, 128 prompt tokens, 64 new), IDP (a deep 16-token prompt) and LoRA r4 (unmerged) over
the packed base at 16 x 1024, and packed vs dense logits on one batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from idp_core.bank import PromptBank
from idp_core.build import build_engine
from idp_core.config import GenConfig
from idp_core.generate import GenRequest
from idp_core.kv import kv_layout
from idp_core.lab.provenance import machine
from idp_core.lab.train import LORA_TARGETS as LINEARS
from idp_core.model import LoadedModel, load_model, wrap_model
from idp_core.packed import PackedInt4Linear, quantize_rtn, weight_bytes
from idp_core.paths import DEFAULT_MODEL_DIR, default_model_built


def models(device: str) -> tuple[LoadedModel, LoadedModel, str]:
    """(packed, dense, what they are) on `device`, bf16."""
    source = os.environ.get("IDP_GPU_CHECK_MODEL") or (
        str(DEFAULT_MODEL_DIR) if default_model_built() else "")
    if source:
        return (load_model(source, device=device, weights="packed"),
                load_model(source, device=device, weights="dense"), source)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True)
    dense_model = LlamaForCausalLM(config).to(torch.bfloat16)
    packed_model = copy.deepcopy(dense_model)
    for name, module in dense_model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            codes, scale = quantize_rtn(module.weight, group_size=64)
            layer = PackedInt4Linear(codes, scale, None, group_size=64, device=device)
            packed_model.set_submodule(name, layer)
            module.weight.data = layer.dequantize().cpu()
    # Timing only: random ids in, no text out, so a stand-in tokenizer (pad 0, no EOS).
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None, decode=lambda ids, **_: "")
    packed = wrap_model(packed_model.to(device), tok, name="random-smollm2-shape")
    dense = wrap_model(dense_model.to(device), tok, name="random-smollm2-shape")
    packed.weights = "packed-int4"
    return packed, dense, "random weights, SmolLM2-135M shape, RTN W4 g64"


def timed(fn: Any, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def rows(batch: int, length: int, vocab: int) -> list[list[int]]:
    return torch.randint(0, vocab, (batch, length),
                         generator=torch.Generator().manual_seed(0)).tolist()


def deep_bank(lm: LoadedModel) -> PromptBank:
    shape = kv_layout(lm.model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randn(2, shape["num_layers"], shape["num_kv_heads"], 16, shape["head_dim"],
                         generator=g) * 0.1
    return PromptBank(["p0"], [prompt], lm.fingerprint.to_dict(), {"note": "gpu check"},
                      kind="deep")


def check(out_dir: Path, repeats: int, device: str = "cuda") -> dict[str, Any]:
    from peft import LoraConfig

    packed, dense, what = models(device)
    vocab = int(packed.model.config.vocab_size)
    record: dict[str, Any] = {"env": machine(), "model": what,
                              "weight_bytes": {"packed": weight_bytes(packed.model),
                                               "dense": weight_bytes(dense.model)},
                              "kernel": next(m.kernel for m in packed.model.modules()
                                             if isinstance(m, PackedInt4Linear))}
    ids = torch.tensor(rows(4, 64, vocab), device=device)
    with torch.no_grad():
        a, b = packed.model(ids).logits.float(), dense.model(ids).logits.float()
    record["logits_max_abs_diff"] = float((a - b).abs().max())
    record["logits_top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    timings: dict[str, float] = {}
    for form, lm in (("packed", packed), ("dense", dense)):
        engine = build_engine(lm)
        prefill = [GenRequest(r, GenConfig(max_tokens=1)) for r in rows(16, 512, vocab)]
        timings[f"prefill_16x512_s_{form}"] = timed(lambda e=engine, p=prefill: e.generate(p),
                                                    repeats)
        for batch in (1, 16):
            reqs = [GenRequest(r, GenConfig(max_tokens=64, ignore_eos=True))
                    for r in rows(batch, 128, vocab)]
            start = [GenRequest(r, GenConfig(max_tokens=1)) for r in rows(batch, 128, vocab)]
            total = timed(lambda e=engine, q=reqs: e.generate(q), repeats)
            first = timed(lambda e=engine, q=start: e.generate(q), repeats)
            timings[f"decode_b{batch}_tok_s_{form}"] = batch * 63 / (total - first)
    long_rows = rows(16, 1024, vocab)
    idp = build_engine(packed, bank=deep_bank(packed), check_fingerprint=False)
    timings["idp_16x1024_forward_s_packed"] = timed(
        lambda: idp.generate([GenRequest(r, GenConfig(max_tokens=1)) for r in long_rows]),
        repeats)
    lora_lm = copy.copy(packed)
    lora_lm.model = copy.deepcopy(packed.model)
    lora = build_engine(lora_lm, lora=LoraConfig(r=4, target_modules=list(LINEARS)))
    timings["lora_r4_16x1024_forward_s_packed"] = timed(
        lambda: lora.generate([GenRequest(r, GenConfig(max_tokens=1)) for r in long_rows]),
        repeats)
    record["timings"] = timings
    record["ratios"] = {
        "prefill_packed_over_dense": timings["prefill_16x512_s_packed"]
        / timings["prefill_16x512_s_dense"],
        "decode_b1_packed_over_dense": timings["decode_b1_tok_s_packed"]
        / timings["decode_b1_tok_s_dense"],
        "decode_b16_packed_over_dense": timings["decode_b16_tok_s_packed"]
        / timings["decode_b16_tok_s_dense"],
        "idp_over_lora_16x1024_packed": timings["idp_16x1024_forward_s_packed"]
        / timings["lora_r4_16x1024_forward_s_packed"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-check.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu-check.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: torch sees no CUDA GPU here")
    print(json.dumps(check(args.out, args.repeats, args.device)["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
