"""The teacher's outputs on a training set, computed once and kept on disk.

Distillation runs the uncompressed teacher on every batch; when several methods (or a resumed
run) train on the same chunks, that forward is repeated for nothing. A cache keeps, for every
position of every chunk, the teacher's top-k log-probabilities, their token ids and the log of
the probability mass left over (one file, written beside its final name and renamed). Training
against it optimises the KL between the teacher's and the student's distributions coarsened to
those k tokens plus one bucket for the rest (`objective.TopK`): the full KL when k is the
vocabulary size, a lower bound of it otherwise.

The file records what made it (teacher fingerprint, vocabulary, the chunks' hash, k); a cache
made from other data, another teacher or another k is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from idp_core.lab.objective import TopK, teacher_logprobs
from idp_core.model import LoadedModel

log = logging.getLogger(__name__)


class TeacherCacheError(ValueError):
    """A cache that does not belong to this run: the message names the file and the mismatch."""


def chunks_hash(chunks: Tensor) -> str:
    """sha256 of the token ids [N, T] (int64, row-major)."""
    return hashlib.sha256(chunks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def made_by(teacher: LoadedModel, chunks: Tensor, top_k: int) -> dict[str, Any]:
    """What a cache for `teacher` on `chunks` with `top_k` must record (the fingerprint is
    one for float32 and bfloat16 loads, so the dtype too)."""
    return {"teacher": teacher.fingerprint.to_dict(),
            "dtype": str(teacher.dtype).removeprefix("torch."),
            "vocab_size": int(teacher.model.config.vocab_size),
            "chunks": {"sha256": chunks_hash(chunks), "shape": list(chunks.shape)},
            "top_k": top_k}


@torch.no_grad()
def top_k_targets(teacher: torch.nn.Module, ids: Tensor, k: int) -> TopK:
    """The teacher's top-k log-probabilities for x_1..x_{T-1} of `ids` [B, T] and the log of
    the mass outside them."""
    logp = teacher_logprobs(teacher, ids)  # [B, T-1, V]
    top, idx = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)  # [B, T-1]
    return TopK(top, idx, rest)


class TeacherCache:
    """Top-k teacher targets for every chunk; `lookup(ids)` returns them for a batch of chunks
    (found by their token ids, so the training loop needs no change)."""

    def __init__(self, targets: TopK, chunks: Tensor, meta: dict[str, Any]) -> None:
        self.targets, self.meta = targets, meta
        self._row = {row.numpy().tobytes(): i for i, row in enumerate(chunks.to(torch.int64))}

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    def lookup(self, ids: Tensor) -> TopK:
        rows = [self._row.get(r.numpy().tobytes()) for r in ids.to(torch.int64).cpu()]
        if None in rows:
            raise KeyError("a batch row is not one of the cached chunks")
        i = torch.tensor(rows)
        return TopK(self.targets.logp[i].to(ids.device),
                    self.targets.ids[i].to(ids.device, torch.int64),
                    self.targets.rest[i].to(ids.device))


def build(teacher: LoadedModel, chunks: Tensor, top_k: int, *, batch_size: int = 8) -> TopK:
    """Run the teacher over `chunks` [N, T] once; float32 log-probs, int32 ids, on CPU."""
    if not 1 <= top_k <= teacher.model.config.vocab_size:
        raise ValueError(f"top_k must be in 1..{teacher.model.config.vocab_size}, got {top_k}")
    parts = [top_k_targets(teacher.model, b.to(teacher.device), top_k)
             for b in tqdm(chunks.split(batch_size), desc="teacher cache", unit="batch")]
    return TopK(torch.cat([p.logp.cpu() for p in parts]),
                torch.cat([p.ids.to(torch.int32).cpu() for p in parts]),
                torch.cat([p.rest.cpu() for p in parts]))


def ensure(path: Path, teacher: LoadedModel, chunks: Tensor, top_k: int, *,
           batch_size: int = 8) -> TeacherCache:
    """The cache at `path`, built (and saved) if absent; refused if made otherwise."""
    want = made_by(teacher, chunks, top_k)
    if path.is_file():
        return load(path, chunks, want)
    log.info("teacher cache: %d chunks x %d top-k into %s", len(chunks), top_k, path)
    targets = build(teacher, chunks, top_k, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"logp": targets.logp.contiguous(), "ids": targets.ids.contiguous(),
               "rest": targets.rest.contiguous()}, str(tmp),
              metadata={"made_by": json.dumps(want, sort_keys=True)})
    tmp.replace(path)
    return TeacherCache(targets, chunks, want)


def load(path: Path, chunks: Tensor, want: dict[str, Any]) -> TeacherCache:
    """Read `path`; refuse it unless it records `want` (teacher, vocabulary, chunks, k)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "made_by" not in meta:
        raise TeacherCacheError(f"{path}: not a teacher cache (no made_by record)")
    have = json.loads(meta["made_by"])
    differ = sorted(k for k in {*have, *want} if have.get(k) != want.get(k))
    if differ:
        what = {"teacher": "another teacher", "chunks": "other data", "top_k": "another top-k",
                "vocab_size": "another vocabulary", "dtype": "another dtype"}
        raise TeacherCacheError(f"{path}: made from {', '.join(what.get(k, k) for k in differ)}"
                                f"; delete it or use another path")
    t = load_file(str(path))
    return TeacherCache(TopK(t["logp"], t["ids"], t["rest"]), chunks, have)
