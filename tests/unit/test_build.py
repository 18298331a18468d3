"""build_engine(): the three serving modes from one function."""

import pytest
import torch
from tiny import random_bank, tiny_llama

from idp_core.bank import BankError
from idp_core.build import build_engine
from idp_core.config import GenConfig
from idp_core.generate import GenRequest


def test_no_bank_no_adapter_serves_the_plain_model():
    engine = build_engine(tiny_llama(seed=0))
    assert engine.store is None and engine.method_without_bank == "none"
    assert engine.generate([GenRequest([1, 2, 3], GenConfig(max_tokens=2))])[0].method == "none"


def test_bank_pins_its_prompt_kv():
    lm = tiny_llama(seed=0)
    bank = random_bank(lm)
    engine = build_engine(lm, bank=bank, check_fingerprint=False)
    assert engine.store is not None and list(engine.store.names) == list(bank.names)


def test_strict_fingerprint_refuses_a_bank_of_other_weights():
    other = random_bank(tiny_llama(seed=1))
    with pytest.raises(BankError, match="b: trained on other model weights"):
        build_engine(tiny_llama(seed=0), bank=other, strict_fingerprint=True, origin="b")


def test_lora_config_attaches_a_new_adapter_in_the_model_dtype():
    from peft import LoraConfig

    lm = tiny_llama(seed=0)
    lm.model.to(torch.bfloat16)
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    engine = build_engine(lm, lora=config)
    assert engine.method_without_bank == "lora"
    lora = [p for n, p in lm.model.named_parameters() if "lora_" in n]
    assert lora and {p.dtype for p in lora} == {torch.bfloat16}


def test_bank_and_adapter_together_are_refused():
    from peft import LoraConfig

    lm = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="not both"):
        build_engine(lm, bank=random_bank(lm), lora=LoraConfig(r=2, target_modules=["q_proj"]))
