"""Deep prompts (per-layer keys and values) served by the same engine, against references."""

import pytest
import torch
from reference import assert_matches_alone, select_reference_deep
from tiny import random_deep_bank, tiny_llama

from idp_core.bank import BankError, PromptBank
from idp_core.config import GenConfig, SelectConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import precompute_prompt_kv
from idp_core.select import select_prompts

INPUTS = [[5, 9, 23, 42, 7], [100, 3], [17, 17, 60, 61], [200], [8, 9, 10, 11, 12, 13, 14]]
SELECTIONS = ["d1", "none", "concat", "d0", "d2"]


@pytest.fixture(scope="module")
def deep(tiny):
    bank = random_deep_bank(tiny)
    return bank, precompute_prompt_kv(tiny.model, bank)


def test_mixed_deep_prompts_batch_equals_each_row_alone(tiny, deep):
    bank, store = deep
    engine = Engine(tiny, store)
    reqs = [GenRequest(ids, GenConfig(max_tokens=5 + i, logprobs=1, echo=True), sel)
            for i, (ids, sel) in enumerate(zip(INPUTS, SELECTIONS, strict=True))]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert res.prompt_used == req.selection
        assert_matches_alone(tiny, bank, req.input_ids, res, req.config.max_tokens)


def test_auto_selection_on_a_deep_bank(tiny, deep):
    bank, store = deep
    engine = Engine(tiny, store)
    reqs = [GenRequest(ids, GenConfig(max_tokens=4, logprobs=1, echo=True)) for ids in INPUTS]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert res.method == "idp" and res.prompt_used in bank.names
        assert_matches_alone(tiny, bank, req.input_ids, res, 4)


@pytest.mark.parametrize("score", ["mean", "sum"])
@pytest.mark.parametrize("align", ["start", "end"])
def test_selection_reads_the_deep_layer0_keys(tiny, deep, score, align):
    bank, store = deep
    rows = INPUTS[:4]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    sel = select_prompts(tiny.model, store, ids, mask, SelectConfig(score=score, align=align))
    want = torch.stack([select_reference_deep(tiny, bank, r, score, align) for r in rows])
    torch.testing.assert_close(sel.scores, want, atol=1e-5, rtol=1e-4)


def test_deep_bank_round_trip_and_format1_still_loads(tmp_path, tiny, deep, tiny_bank):
    bank, _ = deep
    bank.save(tmp_path / "deep")
    loaded = PromptBank.load(tmp_path / "deep")
    assert loaded.kind == "deep" and loaded.names == bank.names
    assert loaded.lengths == bank.lengths == [3, 7, 5]
    for a, b in zip(loaded.prompts, bank.prompts, strict=True):
        torch.testing.assert_close(a, b)
    loaded.check_model(tiny.fingerprint, strict=True)
    # a format-1 manifest (no kind, format_version 1) is a shallow bank
    import json

    tiny_bank.save(tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    manifest.pop("kind")
    manifest["format_version"] = 1
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    assert PromptBank.load(tmp_path / "old").kind == "shallow"


def test_deep_bank_of_another_shape_is_refused(tmp_path, tiny, deep):
    bank, _ = deep
    other = tiny_llama(layers=3, attn="eager")
    with pytest.raises(BankError, match="3 layers|layers"):
        bank.check_model(other.fingerprint)
    bank.save(tmp_path / "deep")
    narrow = tiny_llama(kv_heads=1, attn="eager")
    with pytest.raises(BankError, match=r"deep.*layout.*num_kv_heads': 1"):
        precompute_prompt_kv(narrow.model, PromptBank.load(tmp_path / "deep"))
    manifest = tmp_path / "deep" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"deep"', '"wide"'))
    with pytest.raises(BankError, match="manifest.json: unknown bank kind 'wide'"):
        PromptBank.load(tmp_path / "deep")


def test_deep_prompt_shapes_are_validated():
    with pytest.raises(BankError, match="must be \\[2, layers"):
        PromptBank(["a"], [torch.zeros(3, 2, 2, 4, 8)], kind="deep")
    with pytest.raises(BankError, match="unknown bank kind"):
        PromptBank(["a"], [torch.zeros(2, 4)], kind="medium")
