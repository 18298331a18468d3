"""Faults and bad input: each on a real server; the server keeps serving afterwards."""

import json
import threading

import httpx
import pytest
from servers import RemoteServer, metric, wait_until

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,status", [
    ({"prompt": "<|eos|><|eos|>", "max_tokens": 2}, 200),  # only special tokens
    ({"prompt": "x", "max_tokens": 2, "temperature": 0, "top_p": 0}, 200),
    ({"prompt": "x", "max_tokens": 10**12}, 400),
    ({"prompt": "x", "stop": [str(i) for i in range(1000)]}, 400),
    ({"prompt": [[1, 2], []]}, 400),
    ({"prompt": [2**40]}, 400),
    ({"prompt": "x", "seed": -1}, 400),
    ({"messages": []}, 400),
])
def test_hand_written_bad_input(server, body, status):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    if status != 200:
        assert set(r.json()["error"]) == ERROR_KEYS


@pytest.mark.parametrize("raw", [
    b'{"prompt": "\xff\xfe invalid utf-8"}',
    b"[" * 100_000 + b"]" * 100_000,  # deeply nested JSON
    b'{"prompt": ',
    b"",
])
def test_malformed_bodies_are_400(server, raw):
    r = httpx.post(server.url + "/v1/completions", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == ERROR_KEYS


def test_ten_megabyte_body_is_413(server):
    r = httpx.post(server.url + "/v1/completions", content=b"x" * 10_000_000,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.fixture(scope="module")
def fault_server(artefacts):
    """One server for the fault tests that need their own flags: a step holding token 255
    raises, one row per batch (requests queue behind a long one), prompts logged."""
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(artefacts["bank"]),
                       "--fault-token-id", "255", "--max-batch-size", "1", "--log-prompts")
    yield srv
    srv.stop()


def test_exception_in_a_step_fails_only_that_step(fault_server):
    srv = fault_server
    # past EOS: a row that drew EOS at prefill would finish before the failing step
    bad = httpx.post(srv.url + "/v1/completions", json={
        "prompt": [7, 255], "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert bad.status_code == 500
    assert "request id" in bad.json()["error"]["message"]
    assert bad.headers["x-request-id"] in bad.json()["error"]["message"]
    # greedy and past EOS, so the tiny random model's output is fixed (sampled, it sometimes
    # drew EOS early and returned fewer tokens)
    ok = httpx.post(srv.url + "/v1/completions", json={
        "prompt": [7, 8], "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    assert httpx.get(srv.url + "/health").status_code == 200
    assert 'type="engine_error"' in httpx.get(srv.url + "/metrics").text


def greedy(url: str, prompt: str) -> str:
    r = httpx.post(url + "/v1/completions", timeout=600, json={
        "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
        "prompt_selection": "p1"})
    return r.json()["choices"][0]["text"]


def test_disconnects_leave_other_outputs_byte_identical(server):
    prompts = ["alpha beta", "gamma", "delta epsilon zeta", "eta"]
    alone = [greedy(server.url, p) for p in prompts]

    def disconnecting_client():
        with httpx.stream("POST", server.url + "/v1/completions", timeout=600, json={
                "prompt": "drop me", "max_tokens": 200, "stream": True, "ignore_eos": True,
                "prompt_selection": "p1"}) as r:
            for _ in zip(range(3), r.iter_lines(), strict=False):
                pass

    got: dict[int, str] = {}
    threads = [threading.Thread(target=disconnecting_client) for _ in range(3)]
    threads += [threading.Thread(target=lambda i=i: got.__setitem__(i, greedy(server.url,
                                                                               prompts[i])))
                for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == alone


def test_request_cancelled_while_queued_never_runs(fault_server):
    srv = fault_server
    successes = metric(srv.url, "idp_request_success_total")
    errors = metric(srv.url, 'idp_request_errors_total{method="idp",model=')
    results = []

    def long_request():
        results.append(httpx.post(srv.url + "/v1/completions", timeout=600, json={
            "prompt": "abc", "max_tokens": 480, "ignore_eos": True}))

    threads = [threading.Thread(target=long_request) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until("one long request running, two queued behind it",
               lambda: metric(srv.url, "idp_num_requests_waiting") >= 2, timeout_s=30,
               poll_s=0.01)
    with pytest.raises(httpx.ReadTimeout):  # queued behind the long ones, then gone
        httpx.post(srv.url + "/v1/completions", timeout=0.3,
                   json={"prompt": "queued", "max_tokens": 5})
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200, 200, 200]
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "after", "max_tokens": 3})
    assert ok.status_code == 200
    # the queued one never ran: 3 long + 1 after succeeded, its disconnect was counted
    assert metric(srv.url, "idp_request_success_total") - successes == 4
    assert metric(srv.url, 'idp_request_errors_total{method="idp",model=') - errors >= 1


def test_bank_for_another_model_refuses_to_start(tmp_path, artefacts):
    import torch

    from idp_core.bank import PromptBank

    PromptBank(["a"], [torch.zeros(4, 32)]).save(tmp_path / "narrow")
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(tmp_path / "narrow"),
                       wait_ready=False)
    assert srv.proc.wait(120) != 0
    assert "hidden size 32, the model has 64" in srv.output()
    bank = PromptBank.load(artefacts["bank"])
    bank.fingerprint = {**bank.fingerprint, "weights_sha256": "0" * 64}
    bank.save(tmp_path / "other")
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(tmp_path / "other"),
                       "--strict-fingerprint", wait_ready=False)
    assert srv.proc.wait(120) != 0
    assert "trained on other model weights" in srv.output()


def test_logs_never_hold_prompt_text_unless_enabled(server, fault_server):
    secret = "SECRET-PROMPT-7f3a"
    for srv, expected in ((server, False), (fault_server, True)):  # --log-prompts: logged
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": secret, "max_tokens": 2})
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        wait_until("the request's log line", lambda srv=srv, rid=rid: rid in srv.log_text(),
                   timeout_s=10)
        assert (secret in srv.log_text()) is expected


def test_openapi_lists_the_api(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= set(spec["paths"])
    json.dumps(spec)


def test_chunked_oversized_body_is_413(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 100_000

    r = httpx.post(server.url + "/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_chunked_small_body_is_served(server):
    r = httpx.post(server.url + "/v1/completions", content=iter([b'{"prompt": "ab", ',
                                                               b'"max_tokens": 2, ',
                                                               b'"ignore_eos": true}']),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_echo_without_logprobs(server):
    r = httpx.post(server.url + "/v1/completions",
                   json={"prompt": "abc", "echo": True, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("abc") and choice["logprobs"] is None
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": "abc", "echo": True, "max_tokens": 3, "temperature": 0,
            "stream": True}) as s:
        texts = [json.loads(x[6:])["choices"][0]["text"] for x in s.iter_lines()
                 if x.startswith("data: {")]
    assert texts[0] == "abc" and "".join(texts) == choice["text"]
