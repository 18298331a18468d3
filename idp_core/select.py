"""IDP selection: score each prompt by first-layer attention from the input, pick the argmax.

Position layout (Hoang et al., Fig. 3, with prompts computed alone): prompt i keeps positions
0..n_i-1, exactly as its KV was cached and as it is served; the input X sits at positions
n_max..n_max+T-1, right after the longest prompt, so every prompt precedes X. The input's
queries attend to all prompts' layer-0 keys and causally to their own keys; prompts never attend
to each other. Prompt i's score is the attention the non-padding input tokens pay to its tokens,
averaged over tokens and heads: per prompt token ("mean", the paper's rule) or in total ("sum").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from idp_core.config import SelectConfig
from idp_core.kv import PromptKVStore


@dataclass(frozen=True)
class Selection:
    """Result of one selection pass over a batch."""

    indices: Tensor  # [B] chosen prompt per row
    scores: Tensor  # [B, P] float32
    seconds: float  # wall time of the pass


def position_offset(store: PromptKVStore) -> int:
    """First position of the input in the selection pass (see module docstring)."""
    return max(store.lengths)


@torch.inference_mode()
def select_prompts(
    model: PreTrainedModel,
    store: PromptKVStore,
    input_ids: Tensor,  # [B, T], right-padded
    attention_mask: Tensor,  # [B, T], 1 for real tokens
    config: SelectConfig = SelectConfig(),
) -> Selection:
    """Score every prompt of `store` for every row with layer 0's attention only.

    Args:
        model: the served causal LM (Llama-family attention: q/k projections, RoPE, GQA).
        store: resident prompt KV; only its layer-0 keys are read.
        input_ids: [B, T] token ids, padding on the right.
        attention_mask: [B, T] 1 for tokens, 0 for padding; every row has at least one token.
        config: scoring rule and query chunk size.

    Returns:
        Selection with the argmax prompt per row and the [B, P] scores.
    """
    start = time.perf_counter()
    base = model.base_model
    layer = base.layers[0]
    attn = layer.self_attn
    cfg = model.config
    num_heads, num_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = attn.head_dim
    batch, seq = input_ids.shape
    device = input_ids.device

    hidden = layer.input_layernorm(base.embed_tokens(input_ids))  # [B, T, d]
    q = attn.q_proj(hidden).view(batch, seq, -1, head_dim)
    k = attn.k_proj(hidden).view(batch, seq, -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, Hq, T, D], [B, Hkv, T, D]
    offset = position_offset(store)
    positions = torch.arange(offset, offset + seq, device=device).expand(batch, seq)
    cos, sin = base.rotary_emb(hidden, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q = q.float() * attn.scaling
    k_self = repeat_kv(k.float(), num_heads // num_kv)  # [B, Hq, T, D]
    k_prompts = repeat_kv(store.layer0_keys[None].to(device).float(), num_heads // num_kv)

    num_prompts = len(store.prompts)
    lengths = torch.tensor(store.lengths, device=device, dtype=torch.float32)
    onehot = torch.nn.functional.one_hot(store.segment.to(device), num_prompts).float()  # [N, P]
    if config.score == "mean":
        onehot = onehot / lengths  # mean over each prompt's tokens
    valid = attention_mask.to(device).bool()  # [B, T]
    totals = torch.zeros(batch, num_prompts, device=device)
    for t0 in range(0, seq, config.query_chunk):
        t1 = min(seq, t0 + config.query_chunk)
        qc = q[:, :, t0:t1]  # [B, Hq, C, D]
        to_prompts = qc @ k_prompts.transpose(-1, -2)  # [B, Hq, C, N]
        to_self = qc @ k_self[:, :, :t1].transpose(-1, -2)  # [B, Hq, C, t1]
        causal = torch.ones(t1 - t0, t1, dtype=torch.bool, device=device).tril(t0)
        allowed = causal[None] & valid[:, None, :t1]  # [B, C, t1]
        to_self = to_self.masked_fill(~allowed[:, None], float("-inf"))
        lse = torch.logsumexp(torch.cat([to_prompts, to_self], dim=-1), dim=-1, keepdim=True)
        per_prompt = torch.exp(to_prompts - lse) @ onehot  # [B, Hq, C, P]
        per_prompt = per_prompt.mean(dim=1) * valid[:, t0:t1, None]  # [B, C, P]
        totals += per_prompt.sum(dim=1)
    scores = totals / valid.sum(dim=1, keepdim=True).clamp(min=1)
    return Selection(scores.argmax(dim=-1), scores, time.perf_counter() - start)
