"""Prefill attention over a cached prompt prefix that keeps the fused kernel's causal skip.

With a cached prefix, transformers' SDPA path must pass a dense [B, 1, T, W+T] mask, and the
fused CPU kernel then computes the whole T x (W+T) rectangle instead of the causal triangle
(profiled at 16 x 1024 with a 100-token prefix: attention 6.4 s -> 9.6 s). Here the prefill
attention is split, as cascade / flash-decoding kernels do: the input's queries attend

- to the W prefix keys, non-causally, under a [B, W] padding mask (cheap: W << T), and
- to their own T keys, causally (`is_causal`, no mask: the kernel skips the upper triangle),

and the two partial outputs are merged by their log-sum-exps. The engine asks for it by
passing a *prefix mask* [B, 1, 1, W] (W = key length - query length) as `attention_mask`;
transformers hands 4-D masks to the attention function untouched. Decode steps (one query per
row) run as batched matmuls on CPU, where the fused kernel is slow for that shape. When the
engine asks for batch invariance (`idp_core.rows`, the default), the prefill runs this row by
row on each row's own keys and a decode step reduces each row's keys in a canonical layout
(`exact_prefix_attention`, `exact_decode_attention`). Everything else goes to transformers'
own SDPA function, so a model switched to this implementation computes what it did before
(training, reference forwards).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from idp_core.rows import KEY_BLOCK, current_rows

PREFIX_ATTENTION = "idp_prefix_sdpa"


def prefix_attention_mask(valid: Tensor) -> Tensor:
    """[B, W] 0/1 prefix padding mask -> the [B, 1, 1, W] bool prefix mask the prefill passes.

    Contract: the queries' own keys follow the W prefix keys, and the queries are right-padded
    (a real token never sits after a pad), so causal attention among them needs no mask.
    """
    return valid.bool()[:, None, None, :]


def is_prefix_mask(mask: Tensor | None, query: Tensor, key: Tensor) -> bool:
    """True for a prefix mask: [B, 1, 1, W] bool with W = keys - queries.

    No transformers mask has this shape (theirs cover every key, a decode step's too), so it
    cannot be taken for one.
    """
    if mask is None or mask.dim() != 4 or mask.dtype != torch.bool:
        return False
    width = key.shape[2] - query.shape[2]
    return mask.shape[1:3] == (1, 1) and mask.shape[3] == width


def dense_mask(valid: Tensor, num_queries: int) -> Tensor:
    """The equivalent dense mask [B, 1, T, W+T]: every real prefix key, then causal.

    This is what transformers builds from the 2-D mask [prefix | input]; it is the reference
    for the split computation and the fallback where the fused CPU kernel is not available.
    """
    batch, width = valid.shape[0], valid.shape[-1]
    causal = torch.ones(num_queries, num_queries, dtype=torch.bool, device=valid.device).tril()
    prefix = valid.bool().reshape(batch, 1, 1, width).expand(batch, 1, num_queries, width)
    return torch.cat([prefix, causal.expand(batch, 1, -1, -1)], dim=-1)


def split_prefix_attention(
    query: Tensor,  # [B, H, T, D]
    key: Tensor,  # [B, Hkv, W+T, D]
    value: Tensor,  # [B, Hkv, W+T, D]
    valid: Tensor,  # [B, 1, 1, W] bool prefix mask
    *,
    scale: float,
) -> Tensor:
    """softmax(q k^T * scale + mask) v for the prefix mask, without a dense mask: [B, H, T, D].

    Prefix part and causal part each come from the fused CPU flash-attention kernel (which
    takes grouped-query K/V as they are) with their row log-sum-exps lse_p, lse_c; the merged
    output is out_c + w (out_p - out_c) with w = exp(lse_p - logaddexp(lse_p, lse_c))
    = sigmoid(lse_p - lse_c), i.e. one `lerp`. A row with no real prefix key gets w = 0.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    width = valid.shape[-1]
    out_c, lse_c = flash(query, key[:, :, width:], value[:, :, width:], 0.0, True, scale=scale)
    if width == 0:
        return out_c
    bias = torch.zeros(valid.shape, dtype=query.dtype, device=query.device)
    bias.masked_fill_(~valid, float("-inf"))
    out_p, lse_p = flash(query, key[:, :, :width], value[:, :, :width], 0.0, False,
                         attn_mask=bias, scale=scale)  # [B, H, T, D], [B, H, T] float32
    weight = torch.sigmoid(lse_p - lse_c)
    # The kernel returns lse 0 and output 0 for a row whose keys are all masked: drop it.
    weight = weight.masked_fill(~valid.any(dim=-1), 0.0)  # [B, 1, 1] broadcasts over H, T
    return torch.lerp(out_c, out_p, weight[..., None].to(out_c.dtype))


def decode_attention(
    query: Tensor,  # [B, H, 1, D]
    key: Tensor,  # [B, Hkv, S, D]
    value: Tensor,  # [B, Hkv, S, D]
    mask: Tensor | None,  # [B, 1, 1, S] bool (True: attend) or additive, or None
    *,
    scale: float,
) -> Tensor:
    """Attention of one query per row, as batched float32 matmuls: [B, H, 1, D].

    The query heads sharing a K/V head become the rows of one matmul against that head's keys
    (no K/V repeat). On CPU this beats the fused flash kernel, which is built for blocks of
    queries, for one query per row (measurements: docs/benchmarks.md).
    """
    batch, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    q = query.reshape(batch, key.shape[1], groups, dim).float()  # [B, Hkv, G, D]
    logits = (q @ key.float().transpose(-1, -2)) * scale  # [B, Hkv, G, S]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else logits + mask
    out = torch.softmax(logits, dim=-1) @ value.float()  # [B, Hkv, G, D]
    return out.to(query.dtype).reshape(batch, heads, 1, dim)


def _flash_merge(query: Tensor, parts: list[tuple[Tensor, Tensor, bool]], *,
                 scale: float) -> Tensor:
    """Attention of `query` [1, H, T, D] over key/value segments [(k, v, causal)], each on the
    fused CPU kernel without a mask, merged by their log-sum-exps: [1, H, T, D]."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(query, parts[0][0], parts[0][1], 0.0, parts[0][2], scale=scale)
    for key, value, causal in parts[1:]:
        out_b, lse_b = flash(query, key, value, 0.0, causal, scale=scale)
        weight = torch.sigmoid(lse_b - lse)  # share of the new segment
        out = torch.lerp(out, out_b, weight[..., None].to(out.dtype))
        lse = torch.logaddexp(lse, lse_b)
    return out


def exact_prefix_attention(
    query: Tensor,  # [B, H, T, D]
    key: Tensor,  # [B, Hkv, W+T, D]
    value: Tensor,  # [B, Hkv, W+T, D]
    valid: Tensor,  # [B, 1, 1, W] bool prefix mask (left-padded)
    tokens: list[int],  # real input tokens of each row (right-padded)
    *,
    scale: float,
) -> Tensor:
    """`split_prefix_attention`, one row at a time on its own keys only: [B, H, T, D].

    Row b attends non-causally to its n_b prompt keys and causally to its first tokens[b]
    input keys, the shapes it has alone, so neither the batch nor its padding changes a bit
    of its result (batch invariance). Pad queries get zeros.
    """
    width = valid.shape[-1]
    out = torch.zeros_like(query)
    for b, (n, t) in enumerate(zip(valid.sum(dim=-1).flatten().tolist(), tokens, strict=True)):
        q = query[b : b + 1, :, :t]
        parts = [(key[b : b + 1, :, width : width + t], value[b : b + 1, :, width : width + t],
                  True)]
        if n:
            parts.append((key[b : b + 1, :, width - n : width],
                          value[b : b + 1, :, width - n : width], False))
        out[b : b + 1, :, :t] = _flash_merge(q, parts, scale=scale)
    return out


def exact_decode_attention(
    query: Tensor,  # [B, H, 1, D]
    key: Tensor,  # [B, Hkv, S, D]
    value: Tensor,  # [B, Hkv, S, D]
    index: Tensor,  # [B, S'] each row's real columns in order, S' a multiple of KEY_BLOCK
    valid: Tensor,  # [B, S'] bool
    *,
    scale: float,
) -> Tensor:
    """Decode attention whose every reduction has a fixed length and order: [B, H, 1, D].

    Each row's real keys are gathered to 0..n_b-1 (a canonical layout, whatever padding the
    batch put around them), padded to blocks of KEY_BLOCK. Logits are float32 dot products
    over D (each its own reduction); within a block: max, exp and sum over the block, and
    probabilities @ values over the block; across blocks the running max is exact and the
    weighted sums are sequential (`cumsum`), so the blocks a longer batch adds after a row's
    last key contribute exact zeros. Alone or in any batch, a row's result is the same to the
    bit, at a few batched ops per layer.
    """
    batch, heads, _, dim = query.shape
    kv_heads, width = key.shape[1], index.shape[1]
    blocks, groups = width // KEY_BLOCK, heads // kv_heads

    # The cache is a view of a larger buffer (kv.GrowingLayer, keys and values alike): index
    # its D-vectors in place, as rows of that buffer, whole vectors copied per key.
    if key.stride() != value.stride() or key.stride(-1) != 1 or key.stride(2) != dim:
        key, value = key.contiguous(), value.contiguous()
    s0, s1 = key.stride(0) // dim, key.stride(1) // dim
    first = (torch.arange(batch, device=key.device)[:, None] * s0
             + torch.arange(kv_heads, device=key.device)[None, :] * s1)  # [B, Hkv]
    flat = (first[..., None] + index[:, None, :]).flatten()  # [B * Hkv * S']
    rows = (batch - 1) * s0 + (kv_heads - 1) * s1 + key.shape[2]  # rows the view spans

    def canonical(x: Tensor) -> Tensor:  # [B, Hkv, S, D] -> [B, Hkv, S', D] float32
        buffer = x.as_strided((rows, dim), (dim, 1))
        return buffer.index_select(0, flat).view(batch, kv_heads, width, dim).float()

    k, v = canonical(key), canonical(value)
    q = query.reshape(batch, kv_heads, groups, dim).float()  # [B, Hkv, G, D]
    logits = (q @ k.transpose(-1, -2)) * scale  # [B, Hkv, G, S']
    # A large finite floor instead of -inf: an all-padding block then gets weight exp(-huge)
    # = 0 below instead of NaN.
    logits = logits.masked_fill(~valid[:, None, None, :], -1e30)
    logits = logits.view(batch, kv_heads, groups, blocks, KEY_BLOCK).transpose(2, 3)
    peak = logits.amax(dim=-1, keepdim=True)  # [B, Hkv, nb, G, 1]
    probs = torch.exp(logits - peak)  # [B, Hkv, nb, G, KEY_BLOCK]
    total = probs.sum(dim=-1, keepdim=True)
    out = probs @ v.view(batch, kv_heads, blocks, KEY_BLOCK, dim)  # [B, Hkv, nb, G, D]
    weight = torch.exp(peak - peak.amax(dim=2, keepdim=True))  # [B, Hkv, nb, G, 1]
    num = (weight * out).cumsum(dim=2)[:, :, -1]  # [B, Hkv, G, D]
    den = (weight * total).cumsum(dim=2)[:, :, -1]  # [B, Hkv, G, 1]
    return (num / den).to(query.dtype).reshape(batch, heads, 1, dim)


def prefix_attention_forward(
    module: torch.nn.Module,
    query: Tensor,  # [B, H, T, D]
    key: Tensor,  # [B, Hkv, S, D]
    value: Tensor,  # [B, Hkv, S, D]
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[Tensor, None]:
    """transformers attention function. On CPU: split attention for a prefix mask, batched
    matmuls for a decode step; everything else (and off CPU) is transformers' SDPA function,
    a prefix mask turned into the equivalent dense one there."""
    prefix = is_prefix_mask(attention_mask, query, key)
    if dropout == 0 and query.device.type == "cpu" and (prefix or query.shape[2] == 1):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        rows = current_rows()
        exact = rows is not None and rows.exact and len(rows.tokens) == query.shape[0]
        if exact and prefix:
            out = exact_prefix_attention(query, key, value, attention_mask, rows.tokens,
                                         scale=scale)
        elif exact and rows.key_index is not None:
            out = exact_decode_attention(query, key, value, rows.key_index, rows.key_valid,
                                         scale=scale)
        elif prefix:
            out = split_prefix_attention(query, key, value, attention_mask, scale=scale)
        else:
            out = decode_attention(query, key, value, attention_mask, scale=scale)
        return out.transpose(1, 2).contiguous(), None  # [B, T, H, D], as SDPA's function returns
    if prefix:  # TODO: split off CPU too (CUDA's flash / efficient kernels return the LSE)
        attention_mask = dense_mask(attention_mask[:, 0, 0], query.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, sdpa_mask)


def enable_prefix_attention(model: PreTrainedModel) -> bool:
    """Switch a model on SDPA to the split prefix attention; True if it now uses it.

    Models on another implementation (e.g. "eager" for a reference) are left as they are, and
    the engine then passes the ordinary 2-D mask.
    """
    impl = model.config._attn_implementation
    if impl == "sdpa":
        model.set_attn_implementation(PREFIX_ATTENTION)
        impl = model.config._attn_implementation
    return impl == PREFIX_ATTENTION
