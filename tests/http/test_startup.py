"""Start-up failures, API keys and SIGTERM draining, each on its own server process."""

import threading

import httpx
from servers import RemoteServer, metric, wait_until


def test_missing_model_refuses_to_start(tmp_path):
    srv = RemoteServer("--model", str(tmp_path / "nope"), wait_ready=False)
    assert srv.proc.wait(60) != 0
    assert "cannot start: model not found" in srv.output()


def test_corrupt_bank_refuses_to_start(tmp_path, artefacts):
    import shutil
    bank = tmp_path / "bank"
    shutil.copytree(artefacts["bank"], bank)
    (bank / "bank.safetensors").write_bytes(b"\x00" * 10)
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(bank), wait_ready=False)
    assert srv.proc.wait(120) != 0
    out = srv.output()
    assert "cannot start" in out and "bank.safetensors: corrupt or truncated" in out


def test_api_key_required_except_health(artefacts):
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", "none",
                       "--api-key", "s3cret")
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/v1/prompts"), ("POST", "/tokenize")]:
            r = httpx.request(method, srv.url + path, json={"prompt": "a"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/metrics").status_code == 200  # open unless configured
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1},
                        headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_requests(artefacts):
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(artefacts["bank"]))
    result = {}

    def long_request():
        result["r"] = httpx.post(srv.url + "/v1/completions", timeout=600, json={
            "prompt": "abc", "max_tokens": 200, "ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    wait_until("the request to run", lambda: metric(srv.url, "idp_num_requests_running{") >= 1)
    code = srv.stop()
    t.join()
    assert code == 0
    assert result["r"].status_code == 200
    assert result["r"].json()["usage"]["completion_tokens"] == 200


def test_a_deep_bank_is_served_and_listed(tmp_path, artefacts):
    """A deep bank (per-layer keys and values) starts like a shallow one: /v1/prompts lists it,
    IDP picks from it, and a named prompt answers what the engine in-process answers."""
    from tiny import random_deep_bank

    from idp_core.build import build_engine
    from idp_core.config import GenConfig
    from idp_core.generate import GenRequest
    from idp_core.model import load_model

    lm = load_model(artefacts["model"], dtype="float32")
    bank = random_deep_bank(lm, (4, 6))
    bank.save(tmp_path / "deep")
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(tmp_path / "deep"))
    try:
        listed = httpx.get(srv.url + "/v1/prompts").json()
        assert [(p["name"], p["kind"]) for p in listed["data"]] == [("d0", "deep"), ("d1", "deep")]
        ids = lm.tokenizer("hello deep", add_special_tokens=False)["input_ids"]
        body = {"prompt": ids, "max_tokens": 6, "temperature": 0}
        auto = httpx.post(srv.url + "/v1/completions", json=body).json()["choices"][0]
        assert auto["prompt_used"] in ("d0", "d1")
        named = httpx.post(srv.url + "/v1/completions",
                           json={**body, "prompt_selection": "d1"}).json()["choices"][0]
        want = build_engine(lm, bank=bank).generate(
            [GenRequest(ids, GenConfig(max_tokens=6), "d1")])[0]
        assert named["text"] == want.text and named["prompt_used"] == "d1"
    finally:
        srv.stop()
