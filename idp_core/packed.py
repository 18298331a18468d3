"""Packed int4 linear layers: GPTQ weights served as 4-bit codes on torch's int4pack kernels.

A GPTQ weight is W[n, k] = (u[n, k] - 8) * scale[n, g] + zero[n, g], u in 0..15, g = k // G
(symmetric GPTQ: zero = 0; 3-bit codes fit the same container). That is exactly the layout of
torch's tinygemm int4 kernels (`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on
CUDA), so the codes are packed once at load, two per byte, with bf16 scales and zeros, and no
dense copy of the weight is kept (torchao wraps the same ops; its CPU layout did not load here,
NOTES.md). The CPU kernel is weak at large M (prefill), so rows of a long prompt run a dense
matmul on the layer's weights dequantised into a reused scratch buffer: which kernel a row takes
depends only on that row's own length (`idp_core.rows`), never on its batch, and both kernels
compute each row independently of the others, so a batch changes no row's result.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from idp_core.rows import current_rows

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Rows of at least this many tokens take the dense scratch path on CPU: the int4 kernel ran
# 2x slower than dense bf16 at M = 256 and level at M ~ 64 (docs/benchmarks.md, packed weights).
DENSE_MIN_TOKENS = 64

_scratch: dict[tuple, Tensor] = {}


def unsupported_reason(out_features: int, in_features: int, group_size: int, num_bits: int,
                       device: torch.device) -> str | None:
    """Why a layer cannot run on the int4 kernel here, or None if it can."""
    if num_bits > 4:
        return f"{num_bits}-bit codes do not fit the int4 kernel"
    if group_size not in KERNEL_GROUP_SIZES:
        return f"group size {group_size} (the int4 kernel takes {KERNEL_GROUP_SIZES})"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    if device.type == "cpu" and out_features % _cpu_block_n():
        return f"out_features {out_features} is not a multiple of {_cpu_block_n()} (CPU kernel)"
    if device.type == "cuda" and (out_features % 8 or in_features % 32):
        return f"shape {out_features}x{in_features} (the CUDA kernel needs N % 8, K % 32 == 0)"
    if device.type not in ("cpu", "cuda"):
        return f"no int4 kernel on {device.type}"
    return None


class PackedInt4Linear(nn.Module):
    """y = x W^T + b with W held as packed 4-bit codes, per-group scales and zeros.

    Buffers: `packed` (CPU: uint8 [N, K/2]; CUDA: the kernel's int32 tiles), `scales_zeros`
    [K/G, N, 2] in the activation dtype, optional `perm` [K] (GPTQ act-order: the input
    columns gathered so that groups are contiguous) and `bias` [N].
    """

    def __init__(
        self,
        codes: Tensor,  # [N, K] integers in 0..15
        scale: Tensor,  # [N, K/G]
        zero: Tensor | None,  # [N, K/G] or None (symmetric)
        *,
        group_size: int,
        bias: Tensor | None = None,
        perm: Tensor | None = None,  # [K]: column k of `codes` is input column perm[k]
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        reason = unsupported_reason(self.out_features, self.in_features, group_size, 4, device)
        if reason is not None:
            raise ValueError(f"cannot pack a {self.out_features}x{self.in_features} layer: "
                             f"{reason}")
        if codes.min() < 0 or codes.max() > 15:
            raise ValueError("codes must lie in 0..15")
        # Plain tensors, no autograd history (checkpoint scales arrive as Parameters).
        scale = scale.detach()
        zero = torch.zeros_like(scale) if zero is None else zero.detach()
        sz = torch.stack([scale.t(), zero.t()], dim=-1)  # [K/G, N, 2]
        self.register_buffer("scales_zeros", sz.to(device, dtype).contiguous())
        self.register_buffer("packed", _pack(codes.to(device), device))
        self.register_buffer("perm", None if perm is None else perm.to(device, torch.long))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, dtype))

    @property
    def qweight(self) -> Tensor:
        """The packed codes under GPTQ's name: peft looks for it to place a LoRA adapter."""
        return self.packed

    @property
    def kernel(self) -> str:
        if self.packed.device.type == "cpu":
            return "aten._weight_int4pack_mm_for_cpu"
        return "aten._weight_int4pack_mm"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={self.kernel}")

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N]
        x = x.to(self.scales_zeros.dtype)
        dense = self._dense_rows(x)
        if dense is None:
            y = self._int4(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], -1)
        elif bool(dense.all()) or x.dim() < 3:
            y = nn.functional.linear(x, self._scratch_weight())
        else:  # mixed: each row on the kernel its own length chose
            y = x.new_empty(*x.shape[:-1], self.out_features)
            y[dense] = nn.functional.linear(x[dense], self._scratch_weight())
            y[~dense] = self._int4(x[~dense].reshape(-1, self.in_features)).reshape(
                *x[~dense].shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def _dense_rows(self, x: Tensor) -> Tensor | None:
        """[B] bool rows for the dense path; None: every row on the int4 kernel."""
        if x.device.type != "cpu":
            return None
        given = current_rows()
        if given is not None and x.dim() == 3 and len(given.tokens) == x.shape[0]:
            if max(given.tokens) < DENSE_MIN_TOKENS:  # decode steps, short prompts
                return None
            rows = torch.tensor([n >= DENSE_MIN_TOKENS for n in given.tokens])
        else:
            # No row lengths given (reference forwards, training, decode): a row's width decides
            # ([B, T, K]: T; [M, K]: M), so one-token decode rows always take the kernel.
            width = x.shape[-2] if x.dim() >= 2 else 1
            rows = torch.full(x.shape[:1] if x.dim() == 3 else (1,), width >= DENSE_MIN_TOKENS)
        return rows if bool(rows.any()) else None

    def _int4(self, x: Tensor) -> Tensor:  # [M, K] -> [M, N]
        if self.perm is not None:  # the kernel's columns are grouped: gather the input's
            x = x.index_select(-1, self.perm)
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size,
                                                              self.scales_zeros)
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size,
                                                  self.scales_zeros)

    def _scratch_weight(self) -> Tensor:
        """The dequantised weight [N, K] in a buffer shared by every layer of this shape (the
        engine runs one forward at a time, on its one worker thread)."""
        key = (self.out_features, self.in_features, self.scales_zeros.dtype)
        buf = _scratch.get(key)
        if buf is None:
            buf = _scratch[key] = torch.empty(self.out_features, self.in_features,
                                              dtype=self.scales_zeros.dtype)
        return self.dequantize(out=buf)

    def dequantize(self, *, out: Tensor | None = None) -> Tensor:
        """W [N, K] in the activation dtype, columns in the layer's input order."""
        n, k, g = self.out_features, self.in_features, self.group_size
        dtype = self.scales_zeros.dtype
        if out is None:
            out = torch.empty(n, k, dtype=dtype, device=self.packed.device)
        w = out if self.perm is None else torch.empty_like(out)  # grouped column order
        if self.packed.device.type == "cpu":
            bn = _cpu_block_n()
            p = self.packed.view(n // bn, k, bn // 2)
            blocks = w.view(n // bn, 2, bn // 2, k)  # rows of a block: low nibbles, then high
            blocks[:, 0].copy_((p & 15).transpose(1, 2))
            blocks[:, 1].copy_((p >> 4).transpose(1, 2))
            w.sub_(8).view(n, k // g, g).mul_(self.scales_zeros[..., 0].t()[..., None])
            if bool(self.scales_zeros[..., 1].any()):
                w.view(n, k // g, g).add_(self.scales_zeros[..., 1].t()[..., None])
        else:  # identity through the kernel: exact, for tests and fingerprints only
            eye = torch.eye(k, dtype=dtype, device=self.packed.device)
            kernel = torch.ops.aten._weight_int4pack_mm
            w.copy_(kernel(eye, self.packed, self.group_size, self.scales_zeros).t())
        if self.perm is not None:
            out.index_copy_(1, self.perm, w)
        return out


def _cpu_block_n() -> int:
    """Rows per block of the CPU kernel's packed layout (64 with AVX-512, 32 otherwise)."""
    global _BLOCK_N
    if _BLOCK_N is None:
        probe = torch.randint(0, 16, (128, 32), dtype=torch.int32,
                              generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        found = [b for b in (64, 32, 16) if torch.equal(_unpack_cpu(packed, 128, 32, b), probe)]
        if not found:
            raise RuntimeError("unknown layout of torch's CPU int4pack weights")
        _BLOCK_N = found[0]
    return _BLOCK_N


_BLOCK_N: int | None = None


def _unpack_cpu(packed: Tensor, n: int, k: int, block_n: int | None = None) -> Tensor:
    """Codes [N, K] from the CPU layout: per block of `block_n` rows a [K, block_n/2] byte
    matrix whose low nibbles hold rows 0..block_n/2-1 and high nibbles the rest."""
    bn = block_n or _cpu_block_n()
    p = packed.view(n // bn, k, bn // 2)
    codes = torch.stack([p & 15, p >> 4], dim=2)  # [N/bn, K, 2, bn/2]
    return codes.view(n // bn, k, bn).transpose(1, 2).reshape(n, k)


def _pack(codes: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    u8 = (codes[:, ::2].to(torch.uint8) << 4) | codes[:, 1::2].to(torch.uint8)
    inner_k_tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (t * 16) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), inner_k_tiles)


def quantize_rtn(weight: Tensor, *, group_size: int, bits: int = 4) -> tuple[Tensor, Tensor]:
    """Round-to-nearest symmetric group quantisation (tests, probes): (codes [N, K] in 0..15
    offset by 8, scale [N, K/G]); W ~ (codes - 8) * scale."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(-1) / qmax).clamp(min=1e-8)  # [N, K/G]
    q = torch.clamp(torch.round(w / scale[..., None]), -qmax - 1, qmax)
    return (q + 8).to(torch.uint8).view(n, k), scale


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every parameter and buffer of `model` (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- compressed-tensors checkpoints ---------------------------------------------------------
def compressed_tensors_reason(config: dict) -> str | None:
    """Why a compressed-tensors `quantization_config` (config.json) has no int4 kernel here."""
    groups = config.get("config_groups") or {}
    if not groups:
        return "no quantization groups (a sparse-only or dense checkpoint)"
    for name, group in groups.items():
        w, fmt = group.get("weights") or {}, group.get("format") or config.get("format")
        if fmt != "pack-quantized":
            return f"format {fmt!r} of {name} (the int4 kernel takes pack-quantized)"
        if group.get("input_activations"):
            return f"{name} quantizes activations too (the int4 kernel is weight-only)"
        if w.get("type") != "int" or w.get("strategy") != "group":
            return f"{name}: {w.get('type')} weights by {w.get('strategy')} (need int by group)"
        if w.get("num_bits", 8) > 4:
            return f"{name}: {w.get('num_bits')}-bit weights do not fit the int4 kernel"
        if w.get("group_size") not in KERNEL_GROUP_SIZES:
            return f"{name}: group size {w.get('group_size')} (kernel: {KERNEL_GROUP_SIZES})"
    return None


def _compressed_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_packed")]


def _codes_and_scales(module: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(codes [N, K] in 0..15, scale [N, K/G] float32, zero or None, perm or None) of one
    compressed-tensors pack-quantized Linear."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    args = module.quantization_scheme.weights
    shape = torch.Size(module.weight_shape.tolist())
    codes = unpack_from_int32(module.weight_packed, args.num_bits, shape).to(torch.int16) + 8
    scale = module.weight_scale.float()
    zero = None
    zp = getattr(module, "weight_zero_point", None)
    if zp is not None and not args.symmetric:
        if zp.dtype == torch.int32 and zp.shape != scale.shape:
            zp = unpack_from_int32(zp, args.num_bits, scale.shape, packed_dim=0)
        zero = -zp.float() * scale  # (u - 8 - zp) * s = (u - 8) * s + (-zp * s)
    perm = None
    g_idx = getattr(module, "weight_g_idx", None)
    if g_idx is not None and not torch.equal(
            g_idx.long(), torch.arange(shape[1], device=g_idx.device) // args.group_size):
        perm = torch.argsort(g_idx.long(), stable=True)  # input columns, grouped
        codes = codes[:, perm]
    return codes, scale, zero, perm


def compressed_dense_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The state dict a dense (decompressed) load of this compressed-tensors model would have,
    in key order, each layer decompressed by compressed-tensors one at a time (fingerprints)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    packed = {f"{n}.": m for n, m in _compressed_linears(model)}
    state = model.state_dict()
    keys = {k.removesuffix("weight_packed") + "weight" if k.endswith(".weight_packed") else k
            for k in state}
    for key in sorted(keys):
        prefix = key.removesuffix("weight")
        if key.endswith(".weight") and prefix in packed and key not in state:
            module = packed[prefix]
            local = {k: v for k, v in module.state_dict().items()}
            yield key, PackedQuantizationCompressor.decompress(
                local, module.quantization_scheme)["weight"]
        else:
            yield key, state[key]


def pack_compressed_model(model: nn.Module, *, dtype: torch.dtype,
                          device: torch.device) -> list[str]:
    """Replace every pack-quantized Linear of a compressed-tensors model (loaded compressed) by
    a PackedInt4Linear on `device`; returns why any layer cannot be packed (then nothing is)."""
    layers = _compressed_linears(model)
    reasons = []
    for name, m in layers:
        n, k = (int(s) for s in m.weight_shape.tolist())
        bits = m.quantization_scheme.weights.num_bits
        reason = unsupported_reason(n, k, m.quantization_scheme.weights.group_size, bits, device)
        if reason is not None:
            reasons.append(f"{name}: {reason}")
    if reasons or not layers:
        return reasons or ["no pack-quantized layers"]
    for name, m in layers:
        codes, scale, zero, perm = _codes_and_scales(m)
        packed = PackedInt4Linear(codes, scale, zero, group_size=m.quantization_scheme.weights
                                  .group_size, bias=m.bias, perm=perm, dtype=dtype, device=device)
        model.set_submodule(name, packed)
    return []


def packed_dense_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The state dict of a model with PackedInt4Linear layers as if they were dense Linears
    (their dequantised weights), in key order (fingerprints of models packed in code)."""
    packed = {f"{n}.weight": m for n, m in model.named_modules()
              if isinstance(m, PackedInt4Linear)}
    own = {f"{w.removesuffix('weight')}{b}" for w in packed for b in ("packed", "scales_zeros",
                                                                       "perm")}
    state = {k: v for k, v in model.state_dict().items() if k not in own}
    for key in sorted([*state, *packed]):
        yield key, packed[key].dequantize() if key in packed else state[key]
