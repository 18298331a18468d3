"""Batched generation with per-row prompt KV against the uncached, one-row-at-a-time reference."""

import pytest
import torch
from reference import generate_alone, prompt_logprobs_alone

from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import stack_prefixes

INPUTS = [[5, 9, 23, 42, 7], [100, 3], [17, 17, 60, 61], [200], [8, 9, 10, 11, 12, 13, 14]]
SELECTIONS = ["p1", "none", "concat", "p0", "p2"]


def prefix_of(bank, selection):
    if selection == "none":
        return None
    if selection == "concat":
        return torch.cat(bank.prompts)
    return bank.prompts[bank.index(selection)]


def test_mixed_prompts_batch_equals_each_row_alone(tiny, tiny_bank, tiny_store):
    engine = Engine(tiny, tiny_store)
    reqs = [
        GenRequest(ids, GenConfig(max_tokens=6 + i, logprobs=3), sel)
        for i, (ids, sel) in enumerate(zip(INPUTS, SELECTIONS, strict=True))
    ]
    results = engine.generate(reqs)
    for req, res in zip(reqs, results, strict=True):
        ref_tokens, ref_logps = generate_alone(
            tiny, prefix_of(tiny_bank, req.selection), req.input_ids, req.config.max_tokens
        )
        assert res.prompt_used == req.selection
        assert res.output_ids == ref_tokens
        got = torch.tensor([lp.logprob for lp in res.output_logprobs])
        want = torch.stack([lp[t] for lp, t in zip(ref_logps, ref_tokens, strict=True)])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        # top alternatives are the reference's best tokens, best first
        top_ids = [i for i, _ in res.output_logprobs[0].top]
        assert top_ids == ref_logps[0].topk(3).indices.tolist()


def test_auto_selection_uses_the_selected_prompt(tiny, tiny_bank, tiny_store):
    engine = Engine(tiny, tiny_store)
    reqs = [GenRequest(ids, GenConfig(max_tokens=5)) for ids in INPUTS]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert res.method == "idp" and res.prompt_used in tiny_bank.names
        assert res.prompt_used == max(res.scores, key=res.scores.get)
        ref, _ = generate_alone(tiny, prefix_of(tiny_bank, res.prompt_used), req.input_ids, 5)
        assert res.output_ids == ref


def test_merge_mid_generation_matches_alone(tiny, tiny_bank, tiny_store):
    """A request admitted while others run (continuous batching) decodes as if alone."""
    engine = Engine(tiny, tiny_store)
    first = [GenRequest(INPUTS[0], GenConfig(max_tokens=10), "p1"),
             GenRequest(INPUTS[1], GenConfig(max_tokens=3), "none")]
    late = [GenRequest(INPUTS[4], GenConfig(max_tokens=6), "p2")]
    batch = engine.start(first)
    seqs = list(batch.seqs)
    for _ in range(2):
        engine.step(batch)
    batch, done = engine.retire(batch)
    assert [s.request for s in done] == [first[1]]
    newcomer = engine.start(late)
    seqs += newcomer.seqs
    batch = engine.merge(batch, newcomer)
    while batch is not None:
        batch, _ = engine.retire(batch)
        if batch is not None:
            engine.step(batch)
    for s in seqs:
        r = s.request
        ref, _ = generate_alone(tiny, prefix_of(tiny_bank, r.selection), r.input_ids,
                                r.config.max_tokens)
        assert s.output_ids == ref


def test_echo_prompt_logprobs_match_reference(tiny, tiny_bank, tiny_store):
    engine = Engine(tiny, tiny_store)
    reqs = [GenRequest(ids, GenConfig(max_tokens=0, echo=True, logprobs=1), sel)
            for ids, sel in zip(INPUTS, SELECTIONS, strict=True) if len(ids) > 1]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        assert res.output_ids == [] and res.finish_reason == "length"
        assert res.prompt_logprobs[0] is None
        got = torch.tensor([lp.logprob for lp in res.prompt_logprobs[1:]])
        want = prompt_logprobs_alone(tiny, prefix_of(tiny_bank, req.selection), req.input_ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert [lp.token_id for lp in res.prompt_logprobs[1:]] == req.input_ids[1:]


def test_stop_string_cuts_text(tiny, tiny_store):
    engine = Engine(tiny, tiny_store)
    free = engine.generate([GenRequest([5, 9, 23], GenConfig(max_tokens=12), "p0")])[0]
    assert len(free.text) >= 4
    stop = free.text[2:4]
    res = engine.generate([GenRequest([5, 9, 23], GenConfig(max_tokens=12, stop=(stop,)), "p0")])
    assert res[0].finish_reason == "stop"
    assert res[0].text == free.text[: free.text.find(stop)]


def test_seeded_sampling_is_reproducible_and_topk1_is_greedy(tiny, tiny_store):
    engine = Engine(tiny, tiny_store)
    hot = GenConfig(max_tokens=8, temperature=1.5, seed=7)
    a = engine.generate([GenRequest([1, 2, 3], hot, "p0"), GenRequest([4, 5], hot, "p1")])
    b = engine.generate([GenRequest([1, 2, 3], hot, "p0")])
    assert a[0].output_ids == b[0].output_ids
    greedy = engine.generate([GenRequest([1, 2, 3], GenConfig(max_tokens=8), "p0")])[0]
    for cfg in (GenConfig(max_tokens=8, temperature=1.0, top_k=1, seed=1),
                GenConfig(max_tokens=8, temperature=1.0, top_p=1e-6, seed=1)):
        assert engine.generate([GenRequest([1, 2, 3], cfg, "p0")])[0].output_ids == (
            greedy.output_ids
        )


def test_validation_errors(tiny, tiny_store):
    engine = Engine(tiny, tiny_store)
    with pytest.raises(ValueError, match="empty"):
        engine.validate(GenRequest([], GenConfig()))
    with pytest.raises(ValueError, match="out of the vocabulary"):
        engine.validate(GenRequest([1, 999], GenConfig()))
    with pytest.raises(ValueError, match="context is 512"):
        engine.validate(GenRequest([1] * 500, GenConfig(max_tokens=10), "p1"))
    with pytest.raises(KeyError, match="unknown prompt"):
        engine.validate(GenRequest([1], GenConfig(), "nope"))
    with pytest.raises(KeyError, match="needs a prompt bank"):
        Engine(tiny, None).validate(GenRequest([1], GenConfig(), "p0"))


def test_engine_without_bank_runs_plain(tiny):
    engine = Engine(tiny, None, method_without_bank="lora")
    res = engine.generate([GenRequest([5, 9], GenConfig(max_tokens=4))])[0]
    assert res.method == "lora" and res.prompt_used == "none"
    assert res.output_ids == generate_alone(tiny, None, [5, 9], 4)[0]


@pytest.mark.parametrize("top_p", [2.2250738585072014e-308, 1e-9, 0.5])
def test_top_p_keeps_the_top_token(top_p):
    """top_p below float32's smallest value (found by schemathesis) still samples the top token."""
    from idp_core.sampling import logits_to_probs

    logits = torch.tensor([0.5, 2.0, -1.0, 1.9])
    probs = logits_to_probs(logits, GenConfig(temperature=1.0, top_p=top_p))
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    assert probs[1] > 0 and (probs[1] == 1.0) == (top_p < 0.5)


def test_stack_prefixes_left_pads_each_rows_own_prompt(tiny, tiny_store):
    """Rows sharing a prompt (one broadcast copy per prompt) hold what a per-row copy would."""
    p0, p1 = tiny_store.prompts[0], tiny_store.prompts[1]
    entries = [p1, None, p0, p1, p1, tiny_store.concat, p0]
    cache, mask = stack_prefixes(entries, model=tiny.model, reserve=4)
    width = max(e.length for e in entries if e is not None)
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[2] == width
        for b, e in enumerate(entries):
            n = 0 if e is None else e.length
            assert mask[b].tolist() == [0] * (width - n) + [1] * n
            assert not layer.keys[b, :, : width - n].any()
            if e is not None:
                assert torch.equal(layer.keys[b, :, width - n :], e.keys[i])
                assert torch.equal(layer.values[b, :, width - n :], e.values[i])
