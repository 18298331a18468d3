"""Routing: the centroid and linear rules against the obvious computation, routing data in the
bank (and its refusals), and routing-key training that makes the first-layer attention pass
route."""

import json

import pytest
import torch
from tiny import random_bank, random_deep_bank

from idp_core.bank import BankError, PromptBank, Router
from idp_core.build import build_engine
from idp_core.config import SelectConfig
from idp_core.kv import precompute_prompt_kv
from idp_core.lab.routing import (
    RouteConfig,
    choose_rule,
    fit_centroids,
    fit_linear,
    fit_routing_keys,
    own_pick_rate,
)
from idp_core.select import attention_scores, select_prompts


def router_reference(lm, router, row):
    """(mean embedding of the row's tokens - centre), normalised for the centroid rule, dotted
    with each prompt's row plus its bias, row by row."""
    embed = lm.model.get_input_embeddings().weight.detach().float()
    feat = sum(embed[t] for t in row) / len(row) - router.center
    if router.normalize:
        feat = feat / feat.norm()
    return torch.stack([feat @ w + b for w, b in zip(router.weight, router.bias, strict=True)])


def two_domains(seq=48, n=24, seed=0):
    """Two kinds of text of the byte model: low bytes vs high bytes (random, separable)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(10, 80, (n, seq), generator=g)
    high = torch.randint(150, 250, (n, seq), generator=g)
    return [low, high]


def with_routers(bank, routers, rule="centroid"):
    return PromptBank(bank.names, bank.prompts, bank.fingerprint, bank.training, kind=bank.kind,
                      rule=rule, routers=routers, routing={"feature": "test"})


@pytest.mark.parametrize("rule", ["centroid", "linear"])
def test_router_rules_equal_reference(tiny, tiny_bank, rule):
    g = torch.Generator().manual_seed(4)
    d = tiny.model.config.hidden_size
    routers = {r: Router(torch.randn(d, generator=g) * 0.01, torch.randn(3, d, generator=g),
                         torch.randn(3, generator=g), normalize=r == "centroid")
               for r in ("centroid", "linear")}
    bank = with_routers(tiny_bank, routers, rule)
    store = precompute_prompt_kv(tiny.model, bank)
    rows = [[5, 9, 23, 42, 7], [100, 3], [200]]
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    sel = select_prompts(tiny.model, store, ids, mask)  # rule "bank" -> the bank's
    want = torch.stack([router_reference(tiny, routers[rule], r) for r in rows])
    torch.testing.assert_close(sel.scores, want, atol=1e-5, rtol=1e-4)
    assert sel.indices.tolist() == want.argmax(-1).tolist()
    # the same store read by the attention rule gives the attention pass's scores
    att = select_prompts(tiny.model, store, ids, mask, SelectConfig(rule="attention"))
    plain = select_prompts(tiny.model, precompute_prompt_kv(tiny.model, tiny_bank), ids, mask)
    torch.testing.assert_close(att.scores, plain.scores)


def test_routing_data_round_trips_and_is_checked(tiny, tiny_bank, tmp_path):
    chunks = two_domains() + [two_domains(seed=1)[0]]
    routers = {"centroid": fit_centroids(tiny.model, chunks),
               "linear": fit_linear(tiny.model, chunks, lengths=(8, 48), steps=20)}
    bank = with_routers(tiny_bank, routers, "linear")
    bank.save(tmp_path / "b")
    back = PromptBank.load(tmp_path / "b")
    assert back.rule == "linear" and back.routing == {"feature": "test"}
    for rule, r in routers.items():
        for part in ("center", "weight", "bias"):
            torch.testing.assert_close(getattr(back.routers[rule], part), getattr(r, part))
        assert back.routers[rule].normalize == r.normalize

    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["routing"]["names"] = ["p0", "p1", "other"]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="routing data is for prompts"):
        PromptBank.load(tmp_path / "b")
    manifest["routing"]["names"] = bank.names
    manifest["routing"]["fingerprint"] = {**bank.fingerprint, "weights_sha256": "0" * 64}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BankError, match="made for another model"):
        PromptBank.load(tmp_path / "b")

    c = routers["centroid"]
    with pytest.raises(BankError, match="does not fit 3 prompts"):
        with_routers(tiny_bank, {"centroid": Router(c.center, c.weight[:2], c.bias[:2], True)})
    with pytest.raises(BankError, match="needs its routing data"):
        with_routers(tiny_bank, {"centroid": c}, "linear")
    with pytest.raises(BankError, match="needs a bank with its routing data"):
        build_engine(tiny, bank=tiny_bank, select_config=SelectConfig(rule="centroid"))


def test_a_bank_of_one_prompt_is_always_picked(tiny):
    bank = random_bank(tiny, (4,))
    store = precompute_prompt_kv(tiny.model, bank)
    ids = torch.tensor([[1, 2, 3], [250, 251, 252]])
    assert select_prompts(tiny.model, store, ids, torch.ones_like(ids)).indices.tolist() == [0, 0]


def test_routing_keys_make_the_attention_pass_route(tiny):
    lm = tiny
    train = two_domains(seed=0)
    held = two_domains(seed=1)
    bank = random_deep_bank(lm, (4, 4), seed=5)
    before = own_pick_rate(lm.model, bank, held, "attention")
    routed, losses = fit_routing_keys(lm.model, bank, train, RouteConfig(steps=150, lr=5e-2,
                                                                         lengths=(8, 48)))
    after = own_pick_rate(lm.model, routed, held, "attention")
    assert sum(losses[-5:]) < sum(losses[:5])
    assert after >= 0.95 > before or after == 1.0
    # only the layer-0 keys moved
    for old, new in zip(bank.prompts, routed.prompts, strict=True):
        assert not torch.equal(old[0, 0], new[0, 0])
        torch.testing.assert_close(old[1], new[1])
        torch.testing.assert_close(old[0, 1:], new[0, 1:])
    # the trained scores are the served selection's
    store = precompute_prompt_kv(lm.model, routed)
    ids = held[1][:3]
    keys = torch.cat([p[0, 0] for p in routed.prompts], dim=1)
    torch.testing.assert_close(
        select_prompts(lm.model, store, ids, torch.ones_like(ids),
                       SelectConfig(rule="attention")).scores,
        attention_scores(lm.model, keys, routed.lengths, ids, torch.ones_like(ids)).detach())


def test_choose_rule_measures_every_rule(tiny):
    bank = random_deep_bank(tiny, (4, 4), seed=5)
    chunks = two_domains(seed=2)
    bank = with_routers(bank, {"centroid": fit_centroids(tiny.model, chunks),
                               "linear": fit_linear(tiny.model, chunks, lengths=(8, 48))},
                        rule="attention")
    rule, rates = choose_rule(tiny.model, bank, two_domains(seed=3))
    assert set(rates) == {"attention", "centroid", "linear"}
    assert rates["centroid"] == rates["linear"] == 1.0  # two separable kinds of bytes
    order = ["attention", "centroid", "linear"]
    assert rule == max(order, key=lambda r: (rates[r], -order.index(r)))


def test_train_bank_specialises_and_stores_its_routing(tiny, tmp_path):
    """`idp train-bank`'s steps on a tiny model: one prompt per domain continuing from a given
    prompt, then centroids, routing keys and the measured rule, all surviving save/load."""
    from idp_core.config import TrainConfig
    from idp_core.lab.specialise import add_routing, train_domain_prompts

    start = random_deep_bank(tiny, (4,), seed=7).prompts[0]
    low, high = two_domains(seq=24, n=20, seed=6)
    config = TrainConfig(kind="deep", total_tokens=2 * 4 * 24, seq_len=24, batch_size=4,
                         warmup=1)
    bank = train_domain_prompts(tiny, {"low": low, "high": high}, config, length=4, start=start)
    assert bank.names == ["low", "high"] and bank.kind == "deep"
    assert [p["steps"] for p in bank.training["prompts"]] == [2, 2]
    assert not torch.equal(bank.prompts[0], start) and not torch.equal(bank.prompts[0],
                                                                       bank.prompts[1])
    routed = add_routing(tiny, bank, [low, high], RouteConfig(steps=20, lengths=(8, 24)))
    assert routed.routing["held_chunks"] == [4, 4]
    rates = routed.routing["validation_own_pick"]
    order = ["attention", "centroid", "linear"]
    assert list(rates) == order and set(routed.routers) == {"centroid", "linear"}
    assert routed.rule == max(order, key=lambda r: (rates[r], -order.index(r)))
    routed.save(tmp_path / "b")
    back = PromptBank.load(tmp_path / "b")
    assert back.rule == routed.rule and back.routing["keys"]["steps"] == 20
    torch.testing.assert_close(back.prompts[1], routed.prompts[1])
