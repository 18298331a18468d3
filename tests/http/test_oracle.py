"""`idp oracle`'s scorers: in-process through the engine and against a running server agree on
every window's loss under every prompt and on what `auto` picks (a routing bank served with its
own rule)."""

import pytest
import torch
from servers import RemoteServer
from tiny import random_deep_bank

from idp_core.bank import PromptBank
from idp_core.build import build_engine
from idp_core.lab.oracle import analyse, engine_scorer, http_scorer, in_process_picks
from idp_core.lab.routing import fit_centroids, fit_linear
from idp_core.model import load_model


def test_in_process_and_server_oracles_agree(tmp_path, artefacts):
    lm = load_model(str(artefacts["model"]), dtype="float32")
    g = torch.Generator().manual_seed(0)
    low, high = torch.randint(10, 80, (6, 24), generator=g), torch.randint(150, 250, (6, 24),
                                                                            generator=g)
    bank = random_deep_bank(lm, (4, 6))
    bank = PromptBank(["low", "high"], bank.prompts, bank.fingerprint, bank.training,
                      kind="deep", rule="linear",
                      routers={"centroid": fit_centroids(lm.model, [low, high]),
                               "linear": fit_linear(lm.model, [low, high], lengths=(8, 24))})
    bank.save(tmp_path / "routing")
    windows = {"low": low[:3], "high": high[:3]}

    engine = build_engine(lm, bank=bank)
    local = analyse(engine_scorer(engine, batch_size=4), bank.names, windows,
                    in_process_picks(engine, ["attention", "centroid", "linear"]))
    assert local["auto_equals_picked_prompt_max_abs_diff"] < 1e-4
    assert local["per_window"]["picks"]["served"] == local["per_window"]["picks"]["linear"]
    assert local["own_domain_pick"]["centroid"] == local["own_domain_pick"]["linear"] == 1.0

    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(tmp_path / "routing"))
    try:
        import httpx

        assert httpx.get(srv.url + "/v1/prompts").json()["rule"] == "linear"
        remote = analyse(http_scorer(srv.url), bank.names, windows, None)
    finally:
        srv.stop()
    for sel, losses in local["per_window"]["losses"].items():
        assert remote["per_window"]["losses"][sel] == pytest.approx(losses, abs=1e-4)
    assert remote["per_window"]["picks"]["served"] == local["per_window"]["picks"]["served"]
