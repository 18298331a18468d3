"""The fast selection pass against the full block-masked attention matrix."""

import pytest
import torch
from reference import select_reference

from idp_core.config import SelectConfig
from idp_core.select import causal_logsumexp, select_prompts

ROWS = [[5, 9, 23, 42, 7, 1, 2], [100, 3], [17, 17, 60, 61], [200]]


@pytest.mark.parametrize("score", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [256, 2])
@pytest.mark.parametrize("align", ["start", "end"])
def test_fast_selection_equals_reference(tiny, tiny_bank, tiny_store, score, chunk, align):
    width = max(map(len, ROWS))
    ids = torch.zeros(len(ROWS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(ROWS):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    config = SelectConfig(score=score, align=align, query_chunk=chunk)
    sel = select_prompts(tiny.model, tiny_store, ids, mask, config)
    want = torch.stack([select_reference(tiny, tiny_bank, r, score, align) for r in ROWS])
    torch.testing.assert_close(sel.scores, want, atol=1e-5, rtol=1e-4)
    assert sel.indices.tolist() == want.argmax(-1).tolist()


def test_selection_handles_mha_and_gqa():
    from reference import select_reference as ref
    from tiny import random_bank, tiny_llama

    from idp_core.kv import precompute_prompt_kv

    for heads, kv in [(4, 4), (4, 1)]:
        lm = tiny_llama(heads=heads, kv_heads=kv, attn="eager", seed=3)
        bank = random_bank(lm, (2, 9))
        store = precompute_prompt_kv(lm.model, bank)
        ids = torch.tensor([[3, 1, 4, 1, 5]])
        sel = select_prompts(lm.model, store, ids, torch.ones_like(ids))
        torch.testing.assert_close(sel.scores[0], ref(lm, bank, ids[0].tolist(), "mean"),
                                   atol=1e-5, rtol=1e-4)


def test_select_config_errors():
    with pytest.raises(ValueError, match="score"):
        SelectConfig(score="max")
    with pytest.raises(ValueError, match="query_chunk"):
        SelectConfig(query_chunk=0)
    with pytest.raises(ValueError, match="align"):
        SelectConfig(align="middle")


@pytest.mark.parametrize("fused", [True, False])
def test_causal_logsumexp_equals_naive(fused):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    logits = q @ k.transpose(-1, -2)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    want = torch.logsumexp(logits.masked_fill(~causal, float("-inf")), dim=-1)
    got = causal_logsumexp(q, k, chunk=4, fused=fused)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
