"""IDP selection: score each prompt by first-layer attention from the input, pick the argmax.

Position layout (prompts computed alone): the input X sits at positions n_max..n_max+T-1, right
after the longest prompt, so every prompt precedes X. With `align="start"` prompt i keeps
positions 0..n_i-1, exactly as its KV was cached; with `align="end"` it sits at
n_max-n_i..n_max-1 (its cached layer-0 keys rotated by n_max-n_i), ending right before X as it
does when served. The input's queries attend to all prompts' layer-0 keys and causally to their
own keys; prompts never attend to each other. Prompt i's score is the attention the non-padding
input tokens pay to its tokens, averaged over tokens and heads: per prompt token ("mean", the
paper's rule) or in total ("sum").

A bank made by `idp train-bank` may name another rule and carry its data (bank.Router): the
"centroid" and "linear" rules score prompts from the input's mean embedding alone (one lookup
and a [d, P] product), because on the default model the attention pass does not route
(docs/routing.md).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    apply_rotary_pos_emb,
    repeat_kv,
    rotate_half,
)

from idp_core.bank import Router
from idp_core.config import SelectConfig
from idp_core.kv import PromptKVStore


@dataclass(frozen=True)
class Selection:
    """Result of one selection pass over a batch."""

    indices: Tensor  # [B] chosen prompt per row
    scores: Tensor  # [B, P] float32
    seconds: float  # wall time of the pass


@torch.inference_mode()
def select_prompts(
    model: PreTrainedModel,
    store: PromptKVStore,
    input_ids: Tensor,  # [B, T], right-padded
    attention_mask: Tensor,  # [B, T], 1 for real tokens
    config: SelectConfig = SelectConfig(),
) -> Selection:
    """Pick a prompt of `store` for every row by the configured rule.

    The rule is `config.rule`, or the bank's own (`store.rule`) when that is "bank":
    "attention" scores prompts with layer 0's attention (`attention_scores`); "centroid" and
    "linear" with the bank's stored router for that rule on the input's mean embedding
    (`router_scores`).

    Args:
        model: the served causal LM (Llama-family attention: q/k projections, RoPE, GQA).
        store: resident prompt KV (and the bank's routing data, for the centroid and linear
            rules).
        input_ids: [B, T] token ids, padding on the right.
        attention_mask: [B, T] 1 for tokens, 0 for padding; every row has at least one token.
        config: rule, scoring and query chunk size.

    Returns:
        Selection with the argmax prompt per row and the [B, P] scores.
    """
    start = time.perf_counter()
    rule = store.rule if config.rule == "bank" else config.rule
    if rule != "attention":
        if rule not in store.routers:
            raise ValueError(f"the {rule} rule needs a bank with its routing data "
                             f"(idp train-bank)")
        scores = router_scores(model, store.routers[rule], input_ids, attention_mask)
    else:
        scores = attention_scores(model, store.layer0_keys, store.lengths, input_ids,
                                  attention_mask, config)
    return Selection(scores.argmax(dim=-1), scores, time.perf_counter() - start)


def router_scores(model: PreTrainedModel, router: Router, input_ids: Tensor,
                  attention_mask: Tensor) -> Tensor:
    """[B, P] a stored router's scores for each row (see bank.Router)."""
    x = mean_embedding(model, input_ids, attention_mask) - router.center.to(input_ids.device)
    if router.normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return x @ router.weight.to(x.device).float().T + router.bias.to(x.device).float()


def mean_embedding(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, d] float32: the mean input embedding of each row's real tokens."""
    embeds = model.get_input_embeddings()(input_ids).float()  # [B, T, d]
    valid = attention_mask.to(embeds.device, embeds.dtype)[..., None]
    return (embeds * valid).sum(1) / valid.sum(1).clamp(min=1)


def attention_scores(
    model: PreTrainedModel,
    layer0_keys: Tensor,  # [Hkv, N, D], every prompt's layer-0 keys side by side
    lengths: list[int],
    input_ids: Tensor,
    attention_mask: Tensor,
    config: SelectConfig = SelectConfig(),
) -> Tensor:
    """[B, P] the paper's scores: the attention the input pays to each prompt in layer 0.

    Differentiable in `layer0_keys` (routing training fits them through this function).
    """
    base = model.base_model
    cfg = model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    batch, seq = input_ids.shape
    device = input_ids.device
    offset = max(lengths)  # the input sits right after the longest prompt (module docstring)
    q, k = layer0_qk(model, input_ids, offset)
    k_self = repeat_kv(k, groups)  # [B, Hq, T, D]
    lens = torch.tensor(lengths, device=device)
    k_prompts = layer0_keys[None].to(device).float()  # [1, Hkv, N, D] at 0..n_i-1
    if config.align == "end":  # rotate prompt i's keys by n_max - n_i (RoPE composes)
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        shift = (offset - lens)[segment][None]  # [1, N]
        cos_s, sin_s = base.rotary_emb(k_prompts, shift)  # [1, N, D]
        k_prompts = k_prompts * cos_s[:, None] + rotate_half(k_prompts) * sin_s[:, None]
    k_prompts = repeat_kv(k_prompts, groups)
    ends = list(itertools.accumulate(lengths))
    bounds = list(zip([0, *ends[:-1]], ends, strict=True))  # prompt i's columns in k_prompts
    valid = attention_mask.to(device).bool()  # [B, T]
    # Right padding: a real token t sees only keys <= t, all real, so plain causal is exact for
    # every row; padding queries are dropped by `valid` below.
    lse_self = causal_logsumexp(q.detach(), k_self.detach(), chunk=config.query_chunk)
    totals = []
    for t0 in range(0, seq, config.query_chunk):
        t1 = min(seq, t0 + config.query_chunk)
        to_prompts = q[:, :, t0:t1] @ k_prompts.transpose(-1, -2)  # [B, Hq, C, N]
        # log of the unnormalised attention mass on each prompt; one pass over the logits
        per_prompt = torch.stack([torch.logsumexp(to_prompts[..., a:b], dim=-1)
                                  for a, b in bounds], dim=-1)  # [B, Hq, C, P]
        lse = torch.logaddexp(torch.logsumexp(per_prompt, dim=-1), lse_self[:, :, t0:t1])
        per_prompt = torch.exp(per_prompt - lse[..., None])  # attention share of each prompt
        if config.score == "mean":
            per_prompt = per_prompt / lens.float()  # per prompt token
        per_prompt = per_prompt.mean(dim=1) * valid[:, t0:t1, None]  # [B, C, P]
        totals.append(per_prompt.sum(dim=1))
    return torch.stack(totals).sum(0) / valid.sum(dim=1, keepdim=True).clamp(min=1)


def layer0_qk(model: PreTrainedModel, input_ids: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """Layer 0's queries [B, Hq, T, D] (float32, attention scale folded in) and keys
    [B, Hkv, T, D] (float32) of the input at positions offset..offset+T-1, after RoPE."""
    base = model.base_model
    attn = base.layers[0].self_attn
    batch, seq = input_ids.shape
    hidden = base.layers[0].input_layernorm(base.embed_tokens(input_ids))  # [B, T, d]
    q = attn.q_proj(hidden).view(batch, seq, -1, attn.head_dim)
    k = attn.k_proj(hidden).view(batch, seq, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    positions = torch.arange(offset, offset + seq, device=input_ids.device).expand(batch, seq)
    cos, sin = base.rotary_emb(hidden, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q.float() * attn.scaling, k.float()


def causal_logsumexp(q: Tensor, k: Tensor, *, chunk: int, fused: bool | None = None) -> Tensor:
    """[B, H, T]: log sum_{j <= t} exp(q_t . k_j) for q, k [B, H, T, D] (scale already in q).

    On CPU the fused flash-attention kernel returns this row statistic without materialising
    the [T, T] logits and skips the masked half (O(T) memory); elsewhere (or with fused=False)
    the logits are built `chunk` queries at a time.
    """
    if fused is None:
        fused = q.device.type == "cpu"
    if fused:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(q, k, k, 0.0, True, scale=1.0)[1]
    seq = q.shape[2]
    out = []
    for t0 in range(0, seq, chunk):
        t1 = min(seq, t0 + chunk)
        logits = q[:, :, t0:t1] @ k[:, :, :t1].transpose(-1, -2)  # [B, H, C, t1]
        causal = torch.ones(t1 - t0, t1, dtype=torch.bool, device=q.device).tril(t0)
        out.append(torch.logsumexp(logits.masked_fill(~causal, float("-inf")), dim=-1))
    return torch.cat(out, dim=-1)
