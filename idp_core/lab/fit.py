"""A resumable training loop: AdamW with linear warm-up over fixed batches of chunks.

Everything a step depends on is a function of the step index (the batch order comes from a
seeded permutation per epoch, the learning rate from the schedule), so a run resumed from its
checkpoint continues exactly as the uninterrupted run would. Checkpoints are written beside
their final name and renamed into place; one made under other settings is refused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from idp_core.config import LR_SCHEDULES


@dataclass(frozen=True)
class FitConfig:
    """Optimiser and schedule of one run.

    Attributes:
        steps: optimiser steps in all.
        batch_size: chunks per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup: steps of linear warm-up from lr / warmup to lr.
        schedule: after warm-up, "constant" (lr to the end; a run may be extended to more
            steps) or "cosine" (half a cosine from lr down to 0 at `steps`; `steps` is then part
            of the run, and a checkpoint cannot be extended past it).
        seed: seeds the batch order.
        checkpoint_every_s: wall seconds between checkpoints (the last step always writes one).
    """

    steps: int
    batch_size: int = 8
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup: int = 5
    schedule: str = "constant"
    seed: int = 0
    checkpoint_every_s: float = 120.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"FitConfig.steps/batch_size must be >= 1, got "
                             f"{self.steps}/{self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError(f"FitConfig lr > 0, weight_decay >= 0, warmup >= 0 needed, got "
                             f"{self.lr}/{self.weight_decay}/{self.warmup}")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"FitConfig.schedule must be one of {LR_SCHEDULES}, got "
                             f"{self.schedule!r}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class FitState:
    """Where a run stands: steps done, tokens seen, per-step losses, wall time."""

    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def batch_order(num: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Index tensors [batch_size] over a shuffled pool, reshuffled each epoch (deterministic);
    a batch that crosses an epoch's end takes the rest of it and the start of the next (of
    several, for a pool smaller than a batch)."""
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(num, generator=g), 0
    while True:
        parts, need = [], batch_size
        while need:
            if pos == num:
                order, pos = torch.randperm(num, generator=g), 0
            parts.append(order[pos : pos + need])
            pos += len(parts[-1])
            need -= len(parts[-1])
        yield torch.cat(parts)


class CheckpointError(ValueError):
    """A checkpoint that cannot resume this run: the message names the file and the mismatch."""


def save_checkpoint(path: Path, params: list[Tensor], opt: torch.optim.Optimizer,
                    state: FitState, settings: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict(),
                "state": asdict(state), "settings": json.dumps(settings, sort_keys=True)}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, params: list[Tensor], opt: torch.optim.Optimizer,
                    settings: dict[str, Any]) -> FitState:
    """Restore params and optimiser in place from `path`; refuse one of other settings."""
    saved = torch.load(path, weights_only=True)
    theirs = json.loads(saved["settings"])
    if theirs != json.loads(json.dumps(settings, sort_keys=True)):
        diff = sorted(k for k in {*theirs, *settings} if theirs.get(k) != settings.get(k))
        raise CheckpointError(f"{path}: made by another configuration (differs in "
                              f"{', '.join(diff)}); delete it or use another folder")
    shapes = [tuple(p.shape) for p in saved["params"]]
    if shapes != [tuple(p.shape) for p in params]:
        raise CheckpointError(f"{path}: parameter shapes {shapes[:3]}... do not match this run")
    with torch.no_grad():
        for p, q in zip(params, saved["params"], strict=True):
            p.copy_(q)
    opt.load_state_dict(saved["optimizer"])
    return FitState(**saved["state"])


def fit(
    params: list[Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    chunks: Tensor,
    config: FitConfig,
    *,
    checkpoint: Path | None = None,
    settings: dict[str, Any] | None = None,
    until: int | None = None,
    desc: str = "train",
) -> FitState:
    """Train `params` on `chunks` [N, T] with AdamW, resuming from `checkpoint` if it exists.

    Args:
        params: the trainable tensors (requires_grad).
        loss_fn: ids [B, T] -> scalar loss.
        chunks: training token ids.
        config: optimiser and schedule.
        checkpoint: file to resume from and write to (None: no checkpoints).
        settings: what makes this run this run (method, data, model); a checkpoint saved under
            other settings is refused.
        until: stop after this step (an interruption, or a milestone), checkpointing there.
        desc: progress bar label.

    Returns:
        The state after the last step run.
    """
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    settings = {**(settings or {}), "fit": asdict(config)}
    settings["fit"].pop("checkpoint_every_s")
    if config.schedule == "constant":  # a run may be extended to more steps; checkpoints
        settings["fit"].pop("steps")      # from before `schedule` existed were all constant
        settings["fit"].pop("schedule")
    last = min(config.steps, until if until is not None else config.steps)
    state = FitState()
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, params, opt, settings)
        if state.step > last:  # it cannot be rewound: its params are those of a later step
            raise CheckpointError(f"{checkpoint}: trained to step {state.step}, past the "
                                  f"{last} steps asked for; delete it or use another folder")
    batches = batch_order(len(chunks), config.batch_size, config.seed)
    for _ in range(state.step):  # the batches already seen
        next(batches)
    saved_at = time.perf_counter()
    bar = tqdm(total=last, initial=state.step, desc=desc, unit="step")
    with torch.enable_grad():
        while state.step < last:
            t0 = time.perf_counter()
            ids = chunks[next(batches)]  # [B, T]
            for group in opt.param_groups:
                group["lr"] = config.lr_at(state.step)
            loss = loss_fn(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state.step += 1
            state.tokens += ids.numel()
            state.losses.append(round(loss.item(), 5))
            state.wall_s += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}", tok_s=f"{state.tokens_per_s():.0f}")
            if checkpoint is not None and (
                state.step == last or time.perf_counter() - saved_at > config.checkpoint_every_s
            ):
                save_checkpoint(checkpoint, params, opt, state, settings)
                saved_at = time.perf_counter()
    bar.close()
    return state
