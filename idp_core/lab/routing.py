"""Routing data for a bank whose prompts specialise (`idp train-bank`): what `auto` reads to send
each input to the prompt made for it.

Two rules, fitted on labelled training text (chunk -> the prompt it belongs to):
- "attention" (the paper's rule, the served design): the first-layer attention the input pays
  to each prompt. Training prompts for language modelling hardly moves their layer-0 keys, so
  the rule reads what is left of their initialisation. `fit_routing_keys` trains the layer-0
  keys of deep prompts (free parameters there) with the cross-entropy of the selection scores
  against the labels, through the same `select.attention_scores` the server runs.
- "centroid": the cosine of the input's mean embedding to each prompt's centroid
  (`fit_centroids`; stored in the bank).

`choose_rule` measures both on held-back labelled chunks and the bank declares the better one.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from idp_core.bank import Centroids, PromptBank
from idp_core.config import SelectConfig
from idp_core.kv import precompute_prompt_kv
from idp_core.select import attention_scores, routing_features, select_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteConfig:
    """Routing-key training.

    Attributes:
        steps: optimiser steps (0: keep the keys as trained).
        lr: Adam learning rate on the layer-0 keys.
        per_prompt: chunks of each prompt's text per step.
        lengths: input lengths sampled per step (a prefix of each chunk), so short requests
            route too.
        anchor: weight of the squared distance of the keys to where they started, relative to
            their squared norm (keeps what layer 0 does when serving close to what was trained).
        seed: seeds chunk and length sampling.
    """

    steps: int = 300
    lr: float = 3e-2
    per_prompt: int = 4
    lengths: tuple[int, ...] = (32, 64, 128, 256)
    anchor: float = 0.0
    seed: int = 0


@torch.no_grad()
def fit_centroids(model: PreTrainedModel, chunks: list[Tensor], *, batch: int = 16) -> Centroids:
    """Centroids of the centroid rule from labelled text: `chunks[i]` [N_i, T] is prompt i's.

    The centre is the mean over prompts of their chunks' mean embeddings (each prompt weighs the
    same); prompt i's vector is the normalised mean of its chunks' features.
    """
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()

    def means(ids: Tensor) -> Tensor:
        return torch.cat([embed(b.to(device)).float().mean(1) for b in ids.split(batch)])

    center = torch.stack([means(c).mean(0) for c in chunks]).mean(0)  # [d]
    vectors = []
    for c in chunks:
        feats = torch.cat([routing_features(model, b.to(device), torch.ones_like(b), center)
                           for b in c.split(batch)])
        vectors.append(torch.nn.functional.normalize(feats.mean(0), dim=-1))
    return Centroids(center.cpu(), torch.stack(vectors).cpu())


def fit_routing_keys(model: PreTrainedModel, bank: PromptBank, chunks: list[Tensor],
                     config: RouteConfig = RouteConfig(),
                     select: SelectConfig = SelectConfig()) -> tuple[PromptBank, list[float]]:
    """Train the layer-0 keys of a deep bank so that `attention_scores` ranks each chunk's own
    prompt first (cross-entropy of the log of the normalised scores against the labels).

    Args:
        chunks: `chunks[i]` [N_i, T]: text of prompt i.

    Returns:
        (a copy of the bank with the new layer-0 keys, the loss per step).
    """
    if bank.kind != "deep":
        raise ValueError("routing keys are trained for deep banks (shallow prompts' keys are "
                         "computed by the model); use the centroid rule")
    if len(chunks) != len(bank.names):
        raise ValueError(f"{len(chunks)} groups of routing text for {len(bank.names)} prompts")
    device = next(model.parameters()).device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients reach the keys only; restored below
        p.requires_grad_(False)
    try:
        return _fit_keys(model, bank, chunks, config, select, device)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _fit_keys(model: PreTrainedModel, bank: PromptBank, chunks: list[Tensor],
              config: RouteConfig, select: SelectConfig,
              device: torch.device) -> tuple[PromptBank, list[float]]:
    start = [p[0, 0].float().to(device) for p in bank.prompts]  # [Hkv, n, D] each
    keys = [torch.nn.Parameter(k.clone()) for k in start]
    opt = torch.optim.Adam(keys, lr=config.lr)
    rng = random.Random(config.seed)
    lengths = bank.lengths
    losses = []
    bar = tqdm(range(config.steps), desc="routing keys", mininterval=5)
    for _ in bar:
        seq = rng.choice(config.lengths)
        ids, labels = [], []
        for i, c in enumerate(chunks):
            rows = rng.sample(range(len(c)), min(config.per_prompt, len(c)))
            ids.append(c[rows, :seq])
            labels += [i] * len(rows)
        ids_t = torch.cat(ids).to(device)
        target = torch.tensor(labels, device=device)
        scores = attention_scores(model, torch.cat(keys, dim=1), lengths, ids_t,
                                  torch.ones_like(ids_t), select)
        logp = torch.log_softmax(torch.log(scores.clamp(min=1e-30)), dim=-1)
        loss = torch.nn.functional.nll_loss(logp, target)
        if config.anchor:
            loss = loss + config.anchor * sum(((k - s) ** 2).sum() / (s ** 2).sum()
                                              for k, s in zip(keys, start, strict=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=losses[-1], refresh=False)
    prompts = []
    for p, k in zip(bank.prompts, keys, strict=True):
        p = p.clone()
        p[0, 0] = k.detach().to(p.dtype).cpu()
        prompts.append(p)
    moved = [float((k.detach() - s).norm() / s.norm()) for k, s in zip(keys, start, strict=True)]
    log.info("routing keys: loss %.3f -> %.3f, keys moved %s", losses[0], losses[-1],
             [round(m, 3) for m in moved])
    routed = PromptBank(bank.names, prompts, bank.fingerprint, bank.training, kind=bank.kind,
                        rule=bank.rule, centroids=bank.centroids,
                        routing={**bank.routing, "keys": {
                            "steps": config.steps, "lr": config.lr, "anchor": config.anchor,
                            "per_prompt": config.per_prompt, "lengths": list(config.lengths),
                            "loss_first": losses[0] if losses else None,
                            "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
                            "moved": [round(m, 4) for m in moved]}})
    return routed, losses


@torch.no_grad()
def own_pick_rate(model: PreTrainedModel, bank: PromptBank, chunks: list[Tensor], rule: str,
                  select: SelectConfig = SelectConfig(), *, batch: int = 8) -> float:
    """Share of chunks whose own prompt (`chunks[i]` -> i) `rule` picks, through the served
    selection (`select.select_prompts` on the bank's resident KV)."""
    device = next(model.parameters()).device
    store = precompute_prompt_kv(model, bank)
    config = replace(select, rule=rule)
    hits = total = 0
    for i, c in enumerate(chunks):
        for b in c.split(batch):
            b = b.to(device)
            hits += int((select_prompts(model, store, b, torch.ones_like(b), config).indices
                         == i).sum())
            total += len(b)
    return hits / max(1, total)


def choose_rule(model: PreTrainedModel, bank: PromptBank, chunks: list[Tensor],
                select: SelectConfig = SelectConfig()) -> tuple[str, dict[str, float]]:
    """The rule that picks each chunk's own prompt more often (ties: the paper's attention),
    and both rates."""
    rules = ["attention", "centroid"]
    rates = {r: round(own_pick_rate(model, bank, chunks, r, select), 4) for r in rules}
    best = max(rules, key=lambda r: (rates[r], r == "attention"))
    return best, rates
