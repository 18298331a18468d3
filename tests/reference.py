"""Slow, obvious reference computations the engine is checked against."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from idp_core.bank import PromptBank
from idp_core.model import LoadedModel


@torch.no_grad()
def generate_alone(
    lm: LoadedModel, prefix: Tensor | None, ids: list[int], max_tokens: int
) -> tuple[list[int], list[Tensor]]:
    """Greedy decoding with no cache: re-run model(inputs_embeds=[P; embed(X + out)]) each step.

    Returns (new tokens, log-softmax row [V] for each of them).
    """
    emb = lm.model.get_input_embeddings()
    out: list[int] = []
    logps: list[Tensor] = []
    eos = lm.tokenizer.eos_token_id
    for _ in range(max_tokens):
        x = emb(torch.tensor(ids + out))
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x])
        logits = lm.model(inputs_embeds=x[None]).logits[0, -1].float()
        logps.append(torch.log_softmax(logits, -1))
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out, logps


@torch.no_grad()
def prompt_logprobs_alone(lm: LoadedModel, prefix: Tensor | None, ids: list[int]) -> Tensor:
    """[T-1] log p(x_t | P, x_<t) for t >= 1, without any cache."""
    x = lm.model.get_input_embeddings()(torch.tensor(ids))
    n = 0 if prefix is None else prefix.shape[0]
    if prefix is not None:
        x = torch.cat([prefix.to(x.dtype), x])
    logp = torch.log_softmax(lm.model(inputs_embeds=x[None]).logits[0].float(), -1)
    return logp[n : n + len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


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
        prefix = torch.cat(bank.prompts)
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
