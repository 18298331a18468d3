"""Split prefix attention (prefix part + causal part, merged by log-sum-exp) against the
dense-masked softmax, and the engine on it against each row run alone without a cache."""

import pytest
import torch
from reference import assert_matches_alone, generate_alone
from tiny import random_bank, tiny_llama
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from idp_core.attention import (
    PREFIX_ATTENTION,
    decode_attention,
    dense_mask,
    is_prefix_mask,
    prefix_attention_forward,
    prefix_attention_mask,
    split_prefix_attention,
)
from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import precompute_prompt_kv


def naive_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale, masked) v in float64, K/V heads repeated for grouped queries."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v


def random_case(*, batch=4, heads=6, kv_heads=2, width=5, seq=9, dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, seq, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, width + seq, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, width + seq, dim, generator=g).to(dtype)
    valid = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate([width, 2, 0, 1][:batch]):  # left-padded prefixes; row 2 has none
        if n:
            valid[b, width - n:] = 1
    return q, k, v, valid


@pytest.mark.parametrize("width", [5, 0])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_split_equals_dense_masked_softmax(width, dtype, atol):
    q, k, v, valid = random_case(width=width, dtype=dtype)
    mask = prefix_attention_mask(valid)
    got = split_prefix_attention(q, k, v, mask, scale=0.25)
    want = naive_attention(q, k, v, dense_mask(valid, q.shape[2]), 0.25)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


def test_attention_function_splits_prefix_masks_and_defers_the_rest():
    q, k, v, valid = random_case()
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    mask = prefix_attention_mask(valid)
    assert is_prefix_mask(mask, q, k)
    out, _ = prefix_attention_forward(module, q, k, v, mask, scaling=0.25)  # [B, T, H, D]
    want = naive_attention(q, k, v, dense_mask(valid, q.shape[2]), 0.25).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    # A transformers-style dense mask (covering every key) goes to SDPA unchanged.
    dense = dense_mask(valid, q.shape[2])
    assert not is_prefix_mask(dense, q, k)
    out, _ = prefix_attention_forward(module, q, k, v, dense, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, dense, scaling=0.25)
    assert torch.equal(out, ref)
    # A decode step's mask covers every key; a one-token prefill's prefix mask does not.
    one = k[:, :, : valid.shape[1] + 1]
    assert not is_prefix_mask(dense[:, :, -1:, : one.shape[2]], q[:, :, :1], one)
    assert is_prefix_mask(mask, q[:, :, :1], one)


@pytest.mark.parametrize("kind", ["bool", "additive", "none"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_equals_masked_softmax(kind, dtype, atol):
    q, k, v, valid = random_case(seq=1, dtype=dtype)
    visible = torch.cat([valid.bool(), torch.ones(len(valid), 1, dtype=torch.bool)], 1)
    visible = visible[:, None, None, :]  # [B, 1, 1, S]: prefix pads hidden, the token itself seen
    mask = {"bool": visible, "none": None,
            "additive": torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))}[kind]
    got = decode_attention(q, k, v, mask, scale=0.25)
    want = naive_attention(q, k, v, visible if mask is not None else torch.ones_like(visible),
                           0.25)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def sdpa_tiny():
    lm = tiny_llama(attn="sdpa", seed=5)
    bank = random_bank(lm, (3, 7, 5))
    return lm, bank, precompute_prompt_kv(lm.model, bank)


def test_engine_uses_split_prefill_and_matches_each_row_alone(sdpa_tiny):
    lm, bank, store = sdpa_tiny
    engine = Engine(lm, store)
    assert engine.split_prefill and lm.model.config._attn_implementation == PREFIX_ATTENTION
    inputs = [[5, 9, 23, 42, 7], [100, 3], [17, 17, 60, 61], [200], [8, 9, 10, 11, 12, 13, 14]]
    selections = ["p1", "none", "concat", "p0", "auto"]
    reqs = [GenRequest(ids, GenConfig(max_tokens=6, logprobs=1, echo=True), sel)
            for ids, sel in zip(inputs, selections, strict=True)]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert_matches_alone(lm, bank, req.input_ids, res, 6)


def test_one_token_inputs_on_a_prefix(sdpa_tiny):
    """A batch whose inputs are all one token long (the server's warm-up) prefills one query."""
    lm, bank, store = sdpa_tiny
    reqs = [GenRequest([7], GenConfig(max_tokens=3), sel) for sel in ("p1", "none", "p0")]
    for req, res in zip(reqs, Engine(lm, store).generate(reqs), strict=True):
        prefix = None if req.selection == "none" else bank.prompts[bank.index(req.selection)]
        assert res.output_ids == generate_alone(lm, prefix, req.input_ids, 3)[0]


def test_eager_models_keep_their_attention(tiny, tiny_store):
    assert not Engine(tiny, tiny_store).split_prefill
    assert tiny.model.config._attn_implementation == "eager"
