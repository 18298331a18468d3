"""Pure sampling: per-row temperature, top-k, top-p and seeded generators."""

from __future__ import annotations

import torch
from torch import Tensor

from idp_core.config import GenConfig


def logits_to_probs(logits: Tensor, config: GenConfig) -> Tensor:
    """Warp one row of logits [V] into sampling probabilities [V] (temperature, top-k, top-p)."""
    logits = logits.float() / max(config.temperature, 1e-5)
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop a token when the mass before it already reaches top_p. The top token always
        # stays, also when top_p underflows to 0 in float32 (a fuzzer found top_p = 2.2e-308).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= config.top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(
    logits: Tensor,  # [B, V]
    configs: list[GenConfig],
    generators: list[torch.Generator | None],
) -> Tensor:
    """Pick the next token of each row: argmax for greedy rows, else a draw from its generator.

    Returns:
        [B] token ids (long, on the logits' device).
    """
    tokens = logits.argmax(dim=-1)
    for b, (config, gen) in enumerate(zip(configs, generators, strict=True)):
        if not config.greedy:
            probs = logits_to_probs(logits[b], config)
            tokens[b] = torch.multinomial(probs.cpu(), 1, generator=gen)[0]
    return tokens


def make_generator(config: GenConfig) -> torch.Generator | None:
    """A CPU generator seeded from the request (None for greedy or unseeded requests)."""
    if config.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(config.seed if config.seed is not None else torch.seed())
    return gen
