"""What the engine knows about each row of the forward in flight, for kernels that must treat
every row alone (batch invariance: a row's result must not depend on the rows beside it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

# Exact decode attention reduces over keys in blocks of this many (attention.py): a row's
# blocks are the same alone or in any batch.
KEY_BLOCK = 64


@dataclass(frozen=True)
class Rows:
    """Per row of a [B, T] forward: its real tokens in this call; `exact` asks attention to
    compute every row as it would alone. For a decode step, `key_index` [B, S'] lists each
    row's real cache columns in order, left-aligned and padded (`key_valid` False) to a
    multiple of KEY_BLOCK: the canonical layout exact decode attention gathers."""

    tokens: list[int]
    exact: bool = False
    key_index: Tensor | None = None
    key_valid: Tensor | None = None


def decode_rows(mask: Tensor, *, exact: bool) -> Rows:
    """Rows of a decode step over a cache whose real columns are `mask` [B, S] (1: real)."""
    if not exact:
        return Rows([1] * mask.shape[0])
    valid = mask.bool()
    counts = valid.sum(dim=-1)  # [B]
    width = -(-int(counts.max()) // KEY_BLOCK) * KEY_BLOCK
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # real columns first
    index = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    keep = min(width, mask.shape[1])
    index[:, :keep] = order[:, :keep]
    positions = torch.arange(width, device=mask.device)
    return Rows([1] * mask.shape[0], exact=True, key_index=index,
                key_valid=positions[None] < counts[:, None])


_rows: ContextVar[Rows | None] = ContextVar("idp_rows", default=None)


@contextmanager
def forward_rows(rows: Rows) -> Iterator[None]:
    """Within the block, `current_rows()` describes the rows of the forward being run."""
    token = _rows.set(rows)
    try:
        yield
    finally:
        _rows.reset(token)


def current_rows() -> Rows | None:
    return _rows.get()
