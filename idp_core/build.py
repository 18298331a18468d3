"""build_engine(): the one way to make an Engine from a model plus a prompt bank, a LoRA
adapter, or neither (the serving modes idp, lora and none)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from idp_core.bank import BankError, PromptBank
from idp_core.config import SelectConfig
from idp_core.generate import Engine
from idp_core.kv import precompute_prompt_kv
from idp_core.model import LoadedModel, attach_lora

log = logging.getLogger(__name__)


def build_engine(
    lm: LoadedModel,
    *,
    bank: PromptBank | None = None,
    lora: str | Path | Any | None = None,
    select_config: SelectConfig = SelectConfig(),
    check_fingerprint: bool = True,
    strict_fingerprint: bool = False,
    origin: str = "bank",
    adapter_fp32: bool = False,
    batch_invariant: bool = True,
) -> Engine:
    """An engine serving `lm` with a prompt bank (its KV computed once), a LoRA adapter, or
    neither.

    Args:
        lm: the loaded model; a LoRA adapter replaces `lm.model` by the peft wrapper.
        bank: soft prompts; checked against the model's fingerprint unless
            `check_fingerprint` is False (synthetic banks, or a caller that checked already).
        lora: an adapter folder or a peft `LoraConfig` (see `idp_core.model.attach_lora`).
        select_config: the IDP scoring rule for selection "auto".
        strict_fingerprint: refuse a bank trained on other weights instead of warning.
        origin: how the bank is named in fingerprint messages (its folder).
        adapter_fp32: keep peft's float32 adapter weights (LoRA only).
        batch_invariant: attention computes each row on its own keys (CPU), so a request's
            output does not depend on its batch; False: batched kernels, faster per step.

    Returns:
        The engine; requests without a bank are counted under method "lora" in LoRA mode.
    """
    if bank is not None and lora is not None:
        raise ValueError("give a prompt bank or a LoRA adapter, not both")
    if lora is not None:
        attach_lora(lm, lora, adapter_fp32=adapter_fp32)  # unmerged
        return Engine(lm, None, select_config=select_config, method_without_bank="lora",
                      batch_invariant=batch_invariant)
    if bank is None:
        return Engine(lm, None, select_config=select_config, batch_invariant=batch_invariant)
    if check_fingerprint:
        bank.check_model(lm.fingerprint, strict=strict_fingerprint, origin=origin)
    if select_config.rule in ("centroid", "linear") and select_config.rule not in bank.routers:
        raise BankError(f"{origin}: selection rule {select_config.rule!r} needs a bank with its "
                        f"routing data (made by `idp train-bank`)")
    for rule, r in bank.routers.items():
        if r.center.shape[0] != lm.fingerprint.hidden_size:
            raise BankError(f"{origin}: {rule} routing data of size {r.center.shape[0]}, the "
                            f"model's embeddings have {lm.fingerprint.hidden_size}")
    t0 = time.perf_counter()
    store = precompute_prompt_kv(lm.model, bank)
    log.info("pinned KV of %d prompts (%s tokens, %.1f MB) in %.2f s", len(bank.names),
             bank.lengths, store.num_bytes() / 1e6, time.perf_counter() - t0)
    return Engine(lm, store, select_config=select_config, batch_invariant=batch_invariant)
