"""Slow, obvious reference computations the engine is checked against."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from idp_core.bank import PromptBank
from idp_core.model import LoadedModel


def rope_at(lm: LoadedModel, keys: Tensor, positions: list[int]) -> Tensor:
    """Raw keys [..., n, D] rotated by the model's RoPE at the given absolute positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    pos = torch.tensor(positions)[None]
    cos, sin = lm.model.base_model.rotary_emb(keys.float(), pos)  # [1, n, D]
    rotated, _ = apply_rotary_pos_emb(keys.float(), keys.float(), cos[0], sin[0], unsqueeze_dim=0)
    return rotated.to(keys.dtype)


def unrope(lm: LoadedModel, keys: Tensor) -> Tensor:
    """Keys [..., n, D] stored after RoPE at 0..n-1, back to raw (the inverse rotation)."""
    from transformers.models.llama.modeling_llama import rotate_half

    pos = torch.arange(keys.shape[-2])[None]
    cos, sin = lm.model.base_model.rotary_emb(keys.float(), pos)
    return keys * cos[0] - rotate_half(keys) * sin[0]


def deep_concat(lm: LoadedModel, prompts: list[Tensor]) -> Tensor:
    """Deep prompts [2, layers, Hkv, n_i, D] at consecutive positions: [2, layers, Hkv, N, D]."""
    out, start = [], 0
    for p in prompts:
        n = p.shape[3]
        keys = rope_at(lm, unrope(lm, p[0]), list(range(start, start + n)))
        out.append(torch.stack([keys, p[1]]))
        start += n
    return torch.cat(out, dim=3)


def logits_alone(lm: LoadedModel, prefix: Tensor | None, ids: list[int]) -> Tensor:
    """[T, V] logits of ids after a prefix, with no cache of the engine's.

    A shallow prefix [n, d] is prepended to the input embeddings; a deep one
    [2, layers, Hkv, n, D] is passed as a fresh DynamicCache, the input at positions n...
    """
    from transformers import DynamicCache

    x = lm.model.get_input_embeddings()(torch.tensor(ids))
    if prefix is None or prefix.ndim == 2:
        n = 0 if prefix is None else prefix.shape[0]
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x])
        return lm.model(inputs_embeds=x[None]).logits[0, n:].float()
    n = prefix.shape[3]
    cache = DynamicCache(ddp_cache_data=[(k[None].to(x.dtype), v[None].to(x.dtype))
                                         for k, v in zip(prefix[0], prefix[1], strict=True)])
    pos = torch.arange(n, n + len(ids))[None]
    return lm.model(inputs_embeds=x[None], past_key_values=cache, position_ids=pos,
                    attention_mask=torch.ones(1, n + len(ids), dtype=torch.long)
                    ).logits[0].float()


@torch.no_grad()
def generate_alone(
    lm: LoadedModel, prefix: Tensor | None, ids: list[int], max_tokens: int
) -> tuple[list[int], list[Tensor]]:
    """Greedy decoding with no cache: re-run the model on [prefix; X + out] each step.

    Returns (new tokens, log-softmax row [V] for each of them).
    """
    out: list[int] = []
    logps: list[Tensor] = []
    eos = lm.tokenizer.eos_token_id
    for _ in range(max_tokens):
        logits = logits_alone(lm, prefix, ids + out)[-1]
        logps.append(torch.log_softmax(logits, -1))
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out, logps


@torch.no_grad()
def prompt_logprobs_alone(lm: LoadedModel, prefix: Tensor | None, ids: list[int]) -> Tensor:
    """[T-1] log p(x_t | P, x_<t) for t >= 1, without any cache."""
    logp = torch.log_softmax(logits_alone(lm, prefix, ids), -1)
    return logp[: len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


@torch.no_grad()
def select_reference(lm: LoadedModel, bank: PromptBank, ids: list[int], score: str,
                     align: str = "end") -> Tensor:
    """IDP scores from the full layer-0 attention matrix over [P_1; ...; P_m; X] (one row).

    Prompts attend only within themselves, at positions 0..n_i-1 (align "start") or
    n_max-n_i..n_max-1 (align "end"); X sits at positions n_max.. and attends to every prompt
    token and causally to itself. Needs an eager-attention model so the attention weights are
    returned.
    """
    model = lm.model
    base = model.base_model
    layer = base.layers[0]
    x = base.embed_tokens(torch.tensor(ids))
    hidden = torch.cat([*bank.prompts, x])[None]  # [1, N+T, d]
    lengths = bank.lengths
    n, t = sum(lengths), len(ids)
    top = max(lengths)
    shift = {"start": lambda L: 0, "end": lambda L: top - L}[align]
    positions = [shift(L) + p for L in lengths for p in range(L)] + list(range(top, top + t))
    allowed = torch.zeros(n + t, n + t, dtype=torch.bool)
    start = 0
    for L in lengths:
        allowed[start : start + L, start : start + L] = torch.ones(L, L).tril().bool()
        start += L
    allowed[n:, :n] = True
    allowed[n:, n:] = torch.ones(t, t).tril().bool()
    mask = torch.zeros(n + t, n + t).masked_fill(~allowed, float("-inf"))[None, None]
    pos = torch.tensor(positions)[None]
    h = layer.input_layernorm(hidden)
    _, weights = layer.self_attn(
        h, position_embeddings=base.rotary_emb(h, pos), attention_mask=mask
    )  # weights [1, H, N+T, N+T]
    to_prompts = weights[0, :, n:, :n].mean(0)  # [T, N], mean over heads
    scores, start = [], 0
    for L in lengths:
        block = to_prompts[:, start : start + L].sum(-1)
        scores.append((block / L if score == "mean" else block).mean())
        start += L
    return torch.stack(scores)


def assert_matches_alone(ref: LoadedModel, bank: PromptBank, input_ids: list[int], res: Any,
                         max_tokens: int, *, atol: float = 1e-4) -> None:
    """An engine result (greedy, logprobs=1, echo=True) equals the uncached run on `ref` of
    [its prefix; input_ids]: same tokens, log-probabilities of outputs and echo within atol."""
    prefix = None
    if res.prompt_used == "concat":
        prefix = (deep_concat(ref, bank.prompts) if bank.kind == "deep"
                  else torch.cat(bank.prompts))
    elif res.prompt_used in bank.names:
        prefix = bank.prompts[bank.index(res.prompt_used)]
    tokens, logps = generate_alone(ref, prefix, input_ids, max_tokens)
    assert res.output_ids == tokens
    got = torch.tensor([lp.logprob for lp in res.output_logprobs])
    want = torch.stack([lp[t] for lp, t in zip(logps, tokens, strict=True)])
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    echo = torch.tensor([lp.logprob for lp in res.prompt_logprobs[1:]])
    torch.testing.assert_close(echo, prompt_logprobs_alone(ref, prefix, input_ids),
                               atol=atol, rtol=0)


@torch.no_grad()
def select_reference_deep(lm: LoadedModel, bank: PromptBank, ids: list[int], score: str,
                          align: str = "end") -> Tensor:
    """IDP scores of a deep bank: layer-0 queries of X over [all prompts' keys; X's keys].

    Prompt i's stored layer-0 keys are un-rotated and put through RoPE at the positions the
    layout gives it; X sits at n_max.. and attends causally to itself; a plain dense softmax.
    """
    from transformers.models.llama.modeling_llama import repeat_kv

    base = lm.model.base_model
    attn = base.layers[0].self_attn
    cfg = lm.model.config
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    lengths, top, t = bank.lengths, max(bank.lengths), len(ids)
    h = base.layers[0].input_layernorm(base.embed_tokens(torch.tensor(ids)))  # [T, d]
    q = attn.q_proj(h).view(t, -1, attn.head_dim).transpose(0, 1)  # [H, T, D]
    k = attn.k_proj(h).view(t, -1, attn.head_dim).transpose(0, 1)  # [Hkv, T, D]
    q, k = rope_at(lm, q, list(range(top, top + t))), rope_at(lm, k, list(range(top, top + t)))
    prompt_keys = []
    for p, n in zip(bank.prompts, lengths, strict=True):
        first = top - n if align == "end" else 0
        prompt_keys.append(rope_at(lm, unrope(lm, p[0, 0]), list(range(first, first + n))))
    keys = repeat_kv(torch.cat([*prompt_keys, k], dim=1)[None], groups)[0]  # [H, N+T, D]
    logits = q @ keys.transpose(-1, -2) * attn.scaling  # [H, T, N+T]
    n_all = sum(lengths)
    causal = torch.ones(t, t).tril().bool()
    logits[:, :, n_all:] = logits[:, :, n_all:].masked_fill(~causal, float("-inf"))
    weights = torch.softmax(logits, -1).mean(0)  # [T, N+T]
    scores, start = [], 0
    for n in lengths:
        block = weights[:, start : start + n].sum(-1)
        scores.append((block / n if score == "mean" else block).mean())
        start += n
    return torch.stack(scores)
