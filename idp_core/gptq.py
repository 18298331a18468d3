"""GPTQ-format checkpoints (GPTQModel / AutoGPTQ, `quant_method: gptq`) read straight into
packed int4 layers, without the GPTQ libraries.

The format, per quantized Linear (K inputs, N outputs, group size G, 4 bits):
`qweight` int32 [K/8, N] (eight codes along K per word, lowest bits first), `qzeros` int32
[K/G, N/8] (eight zero points along N per word; format v1 stores zero - 1), `scales`
[K/G, N], `g_idx` int32 [K] (the group of each input column: act-order permutes it), optional
`bias`. W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idp_core.packed import PackedInt4Linear, unsupported_reason

log = logging.getLogger(__name__)


def gptq_reason(config: dict[str, Any]) -> str | None:
    """Why a GPTQ `quantization_config` has no int4 kernel here, or None."""
    bits, group = config.get("bits"), config.get("group_size")
    fmt = config.get("checkpoint_format", "gptq")
    if bits != 4:
        return f"{bits}-bit GPTQ words (the reader takes 4-bit)"
    if fmt not in ("gptq", "gptq_v2"):
        return f"GPTQ checkpoint format {fmt!r}"
    if group in (None, -1):
        return "per-channel GPTQ (group size -1)"
    return None


def unpack_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, *,
                v1: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(codes [N, K] in 0..15 with groups contiguous, scale [N, K/G], zero [N, K/G] for the
    int4 kernel's (u - 8) * s + z, perm [K] or None) of one GPTQ layer."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])
    zeros = ((qzeros[:, :, None] >> shifts[None, None, :]) & 15).reshape(qzeros.shape[0], -1)
    if v1:
        zeros = (zeros + 1) & 15
    k = codes.shape[0]
    group = k // scales.shape[0]
    g_idx = g_idx.long()
    perm = None
    if not torch.equal(g_idx, torch.arange(k) // group):
        perm = torch.argsort(g_idx, stable=True)
        codes = codes[perm]
    scale = scales.float().t()  # [N, K/G]
    # s * (u - zero) = (u - 8) * s + (8 - zero) * s
    zero = (8 - zeros.float().t()) * scale
    return codes.t().contiguous(), scale, zero, perm


def load_gptq_packed(folder: Path, *, dtype: torch.dtype, device: torch.device,
                     attn_implementation: str | None = None) -> nn.Module:
    """The model of a GPTQ-format folder with every quantized Linear a PackedInt4Linear."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    del config.quantization_config
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)  # linears: below
    state: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    v1 = qc.get("checkpoint_format", "gptq") == "gptq"
    packed = sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight"))
    for prefix in packed:
        n, k = state[f"{prefix}.qweight"].shape[1], state[f"{prefix}.qweight"].shape[0] * 8
        group = k // state[f"{prefix}.scales"].shape[0]
        reason = unsupported_reason(n, k, group, 4, device)
        if reason is not None:
            raise ValueError(f"{prefix}: {reason}")
        codes, scale, zero, perm = unpack_gptq(
            state.pop(f"{prefix}.qweight"), state.pop(f"{prefix}.qzeros"),
            state.pop(f"{prefix}.scales"), state.pop(f"{prefix}.g_idx"), v1=v1)
        model.set_submodule(prefix, PackedInt4Linear(
            codes, scale, zero, group_size=group, bias=state.pop(f"{prefix}.bias", None),
            perm=perm, dtype=dtype, device=device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = config.tie_word_embeddings  # the head is the embedding: not stored
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight"))
               and m.rsplit(".", 1)[0] not in packed]  # packed layers: set above
    if missing or unexpected:
        raise ValueError(f"{folder}: GPTQ checkpoint does not match its config: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    return model.to(device, dtype)
