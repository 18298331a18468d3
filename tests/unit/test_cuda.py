"""The engine on a CUDA device against the uncached reference on CPU (skipped without a GPU).

On CUDA the split prefill and the decode matmuls are not used (they are CPU kernels); the
attention function falls back to transformers' SDPA with a dense mask. These tests pin that
path: same weights, float32, tokens equal and log-probabilities within 1e-4 of the CPU
reference, with prompts, concat and IDP selection mixed in one batch.
"""

import pytest
import torch
from reference import assert_matches_alone, select_reference
from tiny import random_bank, tiny_llama

from idp_core.config import GenConfig, SelectConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import precompute_prompt_kv
from idp_core.select import select_prompts

pytestmark = pytest.mark.cuda

INPUTS = [[5, 9, 23, 42, 7], [100, 3], [17, 17, 60, 61], [200], [8, 9, 10, 11, 12, 13, 14]]
SELECTIONS = ["p1", "none", "concat", "p0", "auto"]


@pytest.fixture(scope="module")
def pair():
    """The same tiny Llama twice: one on CUDA (served), one on CPU (reference)."""
    cpu = tiny_llama(attn="sdpa", seed=5)
    gpu = tiny_llama(attn="sdpa", seed=5)
    gpu.model.to("cuda")
    bank = random_bank(cpu, (3, 7, 5))
    return cpu, gpu, bank


def test_cuda_engine_matches_cpu_reference(pair):
    cpu, gpu, bank = pair
    engine = Engine(gpu, precompute_prompt_kv(gpu.model, bank))
    reqs = [GenRequest(ids, GenConfig(max_tokens=6, logprobs=1, echo=True), sel)
            for ids, sel in zip(INPUTS, SELECTIONS, strict=True)]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert_matches_alone(cpu, bank, req.input_ids, res, 6)


@pytest.mark.parametrize("score", ["mean", "sum"])
def test_cuda_selection_matches_cpu_reference(score):
    cpu = tiny_llama(attn="eager", seed=5)
    gpu = tiny_llama(attn="eager", seed=5)
    gpu.model.to("cuda")
    bank = random_bank(cpu, (3, 7, 5))
    rows = INPUTS[:4]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    store = precompute_prompt_kv(gpu.model, bank)
    sel = select_prompts(gpu.model, store, ids.cuda(), mask.cuda(), SelectConfig(score=score))
    want = torch.stack([select_reference(cpu, bank, r, score) for r in rows])
    torch.testing.assert_close(sel.scores.cpu(), want, atol=1e-5, rtol=1e-4)
    assert sel.indices.tolist() == want.argmax(-1).tolist()

