"""Task scorers on hand-made items with known answers, and the engine-batched scorer against a
slow per-item reference on a tiny random model."""

import json
import math

import numpy as np
import pytest
import torch
from reference import generate_alone, prompt_logprobs_alone

from idp_core.generate import Engine, GenResult, TokenLogprob
from idp_core.lab.tasks import (
    STOP,
    Item,
    Task,
    bootstrap_ci,
    continuation_scores,
    encode_pair,
    evaluate_task,
    exact_match,
    lambada_perplexity,
    load_task,
    normalize_answer,
    parse_record,
    score_choices,
    score_logliks,
)


# ---- exact match normalisation ------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("The Beatles!", "beatles"),
    ("  an   Apple, a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),  # "the" inside a word is not an article
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_any_alias():
    assert exact_match(" the Onion", ("Allium cepa", "Onion")) == 1.0
    assert exact_match("ONIONS.", ("Onion",)) == 0.0  # no stemming
    assert exact_match("Onion soup", ("Onion",)) == 0.0  # whole answer, not a substring


# ---- multiple choice, partial scoring, LAMBADA ------------------------------------------------
def test_acc_and_acc_norm_differ_by_length():
    # choice 0 has the higher summed log-prob; per character choice 1 wins
    out = score_choices([-4.0, -6.0], (2, 10), gold=1)
    assert out == {"acc": 0.0, "acc_norm": 1.0}
    assert score_choices([-1.0, -3.0, -2.0], (5, 5, 5), gold=0) == {"acc": 1.0, "acc_norm": 1.0}


def test_partial_scoring_compares_the_shared_continuation():
    kind, item = parse_record({
        "context_options": ["Sarah was better than Maria so Sarah",
                            "Sarah was better than Maria so Maria"],
        "continuation": "got the easier cases.", "gold": 1,
    })
    assert kind == "partial"
    assert item.pairs[0][1] == item.pairs[1][1] == " got the easier cases."
    assert [c for c, _ in item.pairs] == ["Sarah was better than Maria so Sarah",
                                         "Sarah was better than Maria so Maria"]
    task = Task("winogrande", kind, (item,), "-", 1)
    # only the continuation's log-prob counts, unnormalised: option 1 wins
    assert score_logliks(task, [[(-9.0, False), (-3.0, False)]]) == {"acc": [1.0]}
    assert score_logliks(task, [[(-2.0, True), (-3.0, False)]]) == {"acc": [0.0]}


def _result(ids, entries):
    return GenResult("", "none", "none", None, ids, [], "", "length", entries, None, 0.0, 0.0, [])


def test_lambada_greedy_needs_every_target_token_argmax():
    ok = [None, TokenLogprob(5, -0.5, [(5, -0.5)]), TokenLogprob(6, -0.1, [(6, -0.1)])]
    miss = [None, TokenLogprob(5, -0.5, [(5, -0.5)]), TokenLogprob(6, -2.0, [(7, -0.2)])]
    ll, greedy = continuation_scores(_result([1, 5, 6], ok), 1)
    assert greedy and math.isclose(ll, -0.6)
    ll, greedy = continuation_scores(_result([1, 5, 6], miss), 1)
    assert not greedy and math.isclose(ll, -2.5)
    # the context's own tokens are not scored: a non-argmax context token does not matter
    assert continuation_scores(_result([1, 5, 6], miss), 2) == (-2.0, False)
    task = Task("lambada_openai", "last_word", (Item(pairs=(("a", " b"),)),) * 2, "-", 2)
    per_item = score_logliks(task, [[(-0.6, True)], [(-2.5, False)]])
    assert per_item == {"acc": [1.0, 0.0], "loglik": [-0.6, -2.5]}
    assert math.isclose(lambada_perplexity(per_item["loglik"]), math.exp(1.55))


# ---- formats, subsets, tokenisation -----------------------------------------------------------
def test_parse_every_format():
    kind, item = parse_record({"query": "Question: Q?", "choices": ["ab", "c"], "gold": 1})
    assert kind == "multiple_choice" and item.pairs[1] == ("Question: Q?", " c")
    assert item.choice_chars == (2, 1) and item.gold == 1
    kind, item = parse_record({"idx": 0, "query": "ctx", "endings": ["x", "yy"], "label": 0})
    assert kind == "multiple_choice" and item.choice_chars == (1, 2)
    kind, item = parse_record({"context": "He said", "continuation": "hello"})
    assert kind == "last_word" and item.pairs == (("He said", " hello"),)
    kind, item = parse_record({"context": "Question: Q\nAnswer:", "answer": "A",
                               "aliases": ["A", "Ay"]})
    assert kind == "exact_match" and item.answers == ("A", "A", "Ay")
    kind, item = parse_record({"qId": "x", "qText": "who?", "answers": ["Bob"]})
    assert kind == "exact_match" and item.prompt == "Question: who?\nAnswer:"
    kind, item = parse_record({"question": "Q?", "correct_answer": "gold", "distractor1": "a",
                               "distractor2": "bb", "distractor3": "c", "support": " S."})
    assert kind == "multiple_choice" and item.gold == 3  # lm-eval's SciQ: the answer last
    assert item.pairs[3] == ("S.\nQuestion: Q?\nAnswer:", " gold")
    assert item.choice_chars == (1, 2, 1, 4)
    with pytest.raises(ValueError, match="unrecognised"):
        parse_record({"foo": 1})


def test_limit_is_a_fixed_subset(tmp_path):
    path = tmp_path / "arc_easy.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "choices": ["a", "b"], "gold": 0}) + "\n"
                            for i in range(50)))
    a, b = load_task(path, limit=10), load_task(path, limit=10)
    assert a.items == b.items and len(a.items) == 10 and a.num_total == 50
    assert load_task(path, limit=10, seed=7).items != a.items
    assert len(load_task(path, limit=500).items) == 50
    sample = tmp_path / "webquestions.sample.json"
    sample.write_text(json.dumps([{"qId": "1", "qText": "q", "answers": ["a"]}]))
    assert load_task(sample).name == "webquestions"


def test_encode_pair_moves_trailing_space(tiny):
    tok = tiny.tokenizer
    ctx, cont = encode_pair(tok, "abc ", "d")
    assert tok.decode(ctx) == "abc" and tok.decode(cont) == " d"
    ctx, cont = encode_pair(tok, "Question: x\n", " yes")
    assert tok.decode(ctx) == "Question: x" and tok.decode(cont) == "\n yes"


def test_bootstrap_ci_brackets_the_mean():
    values = [1.0] * 60 + [0.0] * 40
    lo, hi = bootstrap_ci(values)
    assert lo < 0.6 < hi and 0.45 < lo and hi < 0.75
    assert bootstrap_ci(values) == (lo, hi)  # fixed seed
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)


# ---- engine-batched == slow per-item reference ---------------------------------------------------
ITEMS_MC = [
    {"query": "Question: what is red?", "choices": ["a rose", "grass", "the sky at noon"],
     "gold": 0},
    {"query": "Question: 2 + 2 =\n", "choices": ["4", "five"], "gold": 1},
    {"query": "Bees make", "choices": ["honey", "milk", "steel", "bread"], "gold": 0},
]
ITEMS_WINO = [{"context_options": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"],
               "continuation": "cried.", "gold": 1}]
ITEMS_LAMBADA = [{"context": "the cat sat on the", "continuation": "mat"},
                 {"context": "aaaa", "continuation": "aa"}]
ITEMS_GEN = [{"qId": "1", "qText": "who?", "answers": ["x"]},
             {"qId": "2", "qText": "where is it?", "answers": ["here"]}]


def _task(tmp_path, name, records):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_task(path)


def _prefix(bank, selection):
    if selection == "none":
        return None
    if selection == "concat":
        return torch.cat(bank.prompts)
    return bank.prompts[bank.index(selection)]


def _reference_loglik(lm, prefix, context, continuation):
    ctx, cont = encode_pair(lm.tokenizer, context, continuation)
    ids = ctx + cont
    logp = prompt_logprobs_alone(lm, prefix, ids)[len(ctx) - 1:]  # [len(cont)]
    # greedy: recompute the argmax at every continuation position
    x = lm.model.get_input_embeddings()(torch.tensor(ids))
    if prefix is not None:
        x = torch.cat([prefix, x])
    n = 0 if prefix is None else prefix.shape[0]
    with torch.no_grad():
        logits = lm.model(inputs_embeds=x[None]).logits[0]
    argmax = logits[n + len(ctx) - 1: n + len(ids) - 1].argmax(-1).tolist()
    return float(logp.sum()), argmax == cont


def _reference_per_item(lm, bank, task, selection):
    prefix = _prefix(bank, selection)
    if task.kind == "exact_match":
        out = []
        for item in task.items:
            ids = lm.tokenizer(item.prompt, add_special_tokens=False).input_ids
            tokens, _ = generate_alone(lm, prefix, ids, 16)
            text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min([i for i in (text.find(s) for s in STOP) if i >= 0], default=len(text))
            out.append(exact_match(text[:cut], item.answers))
        return {"exact_match": out}, None
    scored = [[_reference_loglik(lm, prefix, c, k) for c, k in item.pairs] for item in task.items]
    return score_logliks(task, scored), scored


@pytest.mark.parametrize("selection", ["none", "p1", "concat"])
def test_batched_scorer_equals_per_item_reference(tiny, tiny_bank, tiny_store, tmp_path,
                                                  selection):
    engine = Engine(tiny, tiny_store)
    for name, records in [("arc_easy", ITEMS_MC), ("winogrande", ITEMS_WINO),
                          ("lambada_openai", ITEMS_LAMBADA), ("webquestions", ITEMS_GEN)]:
        task = _task(tmp_path, name, records)
        got = evaluate_task(engine, task, selection=selection, batch_size=3, progress=False)
        want, scored = _reference_per_item(tiny, tiny_bank, task, selection)
        assert got.per_item.keys() == want.keys()
        for key in want:
            if key == "loglik":
                torch.testing.assert_close(torch.tensor(got.per_item[key], dtype=torch.float64),
                                           torch.tensor(want[key], dtype=torch.float64),
                                           atol=1e-4, rtol=0)
            else:
                assert got.per_item[key] == want[key], (name, key)
        assert sum(got.prefix_used.values()) == (
            len(task.items) if task.kind == "exact_match"
            else sum(len(i.pairs) for i in task.items))


def test_batched_loglik_matches_reference_per_option(tiny, tiny_bank, tiny_store, tmp_path):
    """The summed continuation log-probs themselves (not only the argmax) agree."""
    from idp_core.lab.tasks import _SCORE, GenRequest

    engine = Engine(tiny, tiny_store)
    task = _task(tmp_path, "arc_easy", ITEMS_MC)
    requests, want = [], []
    for item in task.items:
        for context, continuation in item.pairs:
            ctx, cont = encode_pair(tiny.tokenizer, context, continuation)
            requests.append((GenRequest(ctx + cont, _SCORE, "p2"), len(ctx)))
            want.append(_reference_loglik(tiny, tiny_bank.prompts[2], context, continuation)[0])
    results = engine.generate([r for r, _ in requests])
    got = [continuation_scores(res, n)[0] for res, (_, n) in zip(results, requests, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_idp_per_item_uses_one_prompt_chosen_on_the_shared_context(tiny, tiny_store, tmp_path):
    from idp_core.lab.tasks import select_per_item, task_requests
    from idp_core.select import select_prompts

    engine = Engine(tiny, tiny_store)
    for name, records in [("arc_easy", ITEMS_MC), ("winogrande", ITEMS_WINO)]:
        task = _task(tmp_path, name, records)
        requests, owners = task_requests(engine, task, selection="auto-item")
        fixed = select_per_item(engine, requests, owners, batch_size=2)
        for item_idx in range(len(task.items)):
            names = {r.selection for r, o in zip(fixed, owners, strict=True) if o[0] == item_idx}
            assert len(names) == 1
            ctx = [r.input_ids[: o[2]] for r, o in zip(requests, owners, strict=True)
                   if o[0] == item_idx]
            n = 0
            while all(len(c) > n and c[n] == ctx[0][n] for c in ctx):
                n += 1
            sel = select_prompts(tiny.model, tiny_store, torch.tensor([ctx[0][:n]]),
                                 torch.ones(1, n, dtype=torch.long))
            assert names == {tiny_store.names[int(sel.indices[0])]}
        got = evaluate_task(engine, task, selection="auto-item", progress=False)
        assert sum(got.prefix_used.values()) == len(requests)
