"""What the engine knows about each row of the forward in flight, for kernels that must treat
every row alone (batch invariance: a row's result must not depend on the rows beside it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Rows:
    """Per row of a [B, T] forward: its real tokens in this call and, for a decode step, how
    many tokens it generated before (the last segment of its cache). `exact` asks attention
    to compute every row on its own keys only."""

    tokens: list[int]
    generated: list[int] | None = None
    exact: bool = False


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
