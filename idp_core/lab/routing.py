"""Routing data for a bank whose prompts specialise (`idp train-bank`): what `auto` reads to send
each input to the prompt made for it.

Two rules, fitted on labelled training text (chunk -> the prompt it belongs to):
- "attention" (the paper's rule, the served design): the first-layer attention the input pays
  to each prompt. Training prompts for language modelling hardly moves their layer-0 keys, so
  the rule reads what is left of their initialisation. `fit_routing_keys` trains the layer-0
  keys of deep prompts (free parameters there) with the cross-entropy of the selection scores
  against the labels, through the same `select.attention_scores` the server runs.
- "centroid": the cosine of the input's mean embedding to each prompt's centroid
  (`fit_centroids`), what a user would try first.
- "linear": a logistic-regression probe on the same mean embedding (`fit_linear`): the
  centroid rule with weights fitted to separate the prompts' texts rather than average them.
Both are stored in the bank as a `Router`; their cost is one embedding lookup and a [d, P]
product per request.

`choose_rule` measures every rule on held-back labelled chunks and the bank declares the best.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from idp_core.bank import PromptBank, Router
from idp_core.config import SelectConfig
from idp_core.kv import precompute_prompt_kv
from idp_core.select import attention_scores, mean_embedding, select_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteConfig:
    """Routing-key training.

    Attributes:
        steps: optimiser steps (0, the default: keep the keys as trained; on the domain bank
            300 steps lifted the attention rule to 0.62 own-domain picks but made every
            prompt 0.01-0.03 nats worse, and the linear rule routes better: docs/routing.md).
        lr: Adam learning rate on the layer-0 keys.
        per_prompt: chunks of each prompt's text per step.
        lengths: input lengths sampled per step (a prefix of each chunk), so short requests
            route too.
        anchor: weight of the squared distance of the keys to where they started, relative to
            their squared norm (keeps what layer 0 does when serving close to what was trained).
        seed: seeds chunk and length sampling.
    """

    steps: int = 0
    lr: float = 3e-2
    per_prompt: int = 4
    lengths: tuple[int, ...] = (32, 64, 128, 256)
    anchor: float = 0.0
    seed: int = 0


@torch.no_grad()
def _features(model: PreTrainedModel, chunks: list[Tensor], lengths: tuple[int, ...],
              batch: int = 16) -> tuple[Tensor, Tensor]:
    """Mean embeddings [N, d] of every chunk's first `L` tokens for each L in `lengths`, and
    the prompt index [N] each belongs to."""
    device = next(model.parameters()).device
    feats, labels = [], []
    for i, c in enumerate(chunks):
        for n in lengths:
            for b in c[:, :n].split(batch):
                b = b.to(device)
                feats.append(mean_embedding(model, b, torch.ones_like(b)).cpu())
                labels += [i] * len(b)
    return torch.cat(feats), torch.tensor(labels)


def fit_centroids(model: PreTrainedModel, chunks: list[Tensor],
                  lengths: tuple[int, ...] = (256,)) -> Router:
    """The centroid rule from labelled text (`chunks[i]` [N_i, T] is prompt i's): the centre
    is the mean over prompts of their mean features (each prompt weighs the same); prompt i's
    row is the normalised mean of its chunks' centred, normalised features."""
    feats, labels = _features(model, chunks, lengths)
    center = torch.stack([feats[labels == i].mean(0) for i in range(len(chunks))]).mean(0)
    unit = torch.nn.functional.normalize(feats - center, dim=-1)
    weight = torch.stack([torch.nn.functional.normalize(unit[labels == i].mean(0), dim=-1)
                          for i in range(len(chunks))])
    return Router(center, weight, torch.zeros(len(chunks)), normalize=True)


def fit_linear(model: PreTrainedModel, chunks: list[Tensor], *,
               lengths: tuple[int, ...] = (32, 64, 128, 256), steps: int = 500,
               lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0) -> Router:
    """The linear rule: a multinomial logistic regression of the prompt index on the
    standardised mean embedding of prefixes of each prompt's chunks (full batch, Adam); the
    standardisation is folded into the stored weights."""
    feats, labels = _features(model, chunks, lengths)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    x = (feats - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], len(chunks))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(x), labels)
            loss.backward()
            opt.step()
    log.info("linear router: training cross-entropy %.4f", loss.item())
    return Router(mean, (probe.weight / std).detach(), probe.bias.detach(), normalize=False)


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
                         "computed by the model); use the centroid or linear rule")
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
                        rule=bank.rule, routers=bank.routers,
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
    """The rule that picks each chunk's own prompt most often (ties: the paper's attention,
    then the centroid rule), and every rule's rate."""
    rules = ["attention", *[r for r in ("centroid", "linear") if r in bank.routers]]
    rates = {r: round(own_pick_rate(model, bank, chunks, r, select), 4) for r in rules}
    best = max(rules, key=lambda r: (rates[r], -rules.index(r)))
    return best, rates
