"""The OpenAI-compatible API against a real uvicorn process (tiny random model + bank)."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from servers import metric, wait_until

from idp_core.bank import PromptBank
from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import precompute_prompt_kv
from idp_core.model import load_model

ERROR_KEYS = {"message", "type", "param", "code"}


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_health_models_prompts(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["mode"] == "idp"
    loaded = models["data"][0]["loaded"]
    assert loaded["kind"] == "hf" and loaded["weights"] == "dense"  # a dense checkpoint
    assert loaded["weight_bytes"] > 0 and not loaded["dequantized"]
    bank = httpx.get(server.url + "/v1/prompts").json()["data"]
    assert [(p["name"], p["length"]) for p in bank] == [("p0", 3), ("p1", 7), ("p2", 5)]


def test_openai_client_completion_stream_and_chat(server):
    c = client(server)
    out = c.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    choice = out.choices[0]
    assert out.usage.completion_tokens == 5 and choice.finish_reason == "length"
    assert choice.model_extra["prompt_used"] in {"p0", "p1", "p2"}
    assert set(choice.model_extra["selection_scores"]) == {"p0", "p1", "p2"}
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="hello", max_tokens=5, temperature=0, stream=True))
    assert streamed == choice.text
    chat = c.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                     messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    chunks = list(c.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                            stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == (
        chat.choices[0].message.content)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "abc", "max_tokens": 3, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    assert all(x.startswith("data: ") for x in lines)


def test_prompt_forms_and_selection_modes(server):
    for prompt in ["abc", ["abc", "de"], [97, 98, 99], [[97, 98], [100]]]:
        r = httpx.post(server.url + "/v1/completions",
                       json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        n = 2 if isinstance(prompt[0], (str, list)) and not isinstance(prompt, str) else 1
        assert len(r.json()["choices"]) == n
    for sel in ["none", "concat", "p2"]:
        r = httpx.post(server.url + "/v1/completions",
                       json={"prompt": "abc", "max_tokens": 2, "prompt_selection": sel})
        assert r.json()["choices"][0]["prompt_used"] == sel


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "prompt_selection": "nope"}, 400, "prompt_selection"),
    ({"prompt": "x", "model": "gpt-5"}, 404, "model"),
    ({"prompt": "x" * 600}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": [300]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x", "stop": ["a"] * 100}, 400, "stop"),
    ({"prompt": "x", "n": 2}, 400, "n"),
])
def test_bad_input_gets_openai_error(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["param"] == param and err["message"]


def test_context_error_says_how_long(server):
    err = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 600}).json()["error"]
    assert "600" in err["message"] and "512" in err["message"]


def test_oversized_body_is_413(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{" + b" " * 3_000_000 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_echo_logprobs_equal_engine_in_process(server, artefacts):
    """What lm-eval's local-completions reads: echo + logprobs + max_tokens 1."""
    lm = load_model(artefacts["model"], dtype="float32")
    engine = Engine(lm, precompute_prompt_kv(lm.model, PromptBank.load(artefacts["bank"])))
    ids = [104, 101, 108, 108, 111, 32, 119]
    ref = engine.generate([GenRequest(ids, GenConfig(max_tokens=1, echo=True, logprobs=1),
                                      "p1")])[0]
    r = httpx.post(server.url + "/v1/completions", json={
        "prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
        "prompt_selection": "p1"}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [e.logprob for e in ref.prompt_logprobs[1:]] + [ref.output_logprobs[0].logprob]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), torch.tensor(want),
                               atol=1e-5, rtol=0)
    assert len(lp["tokens"]) == len(ids) + 1


def test_concurrent_requests_share_decode_steps(server):
    """A request that arrives mid-generation finishes before the long running ones."""
    finished = {}

    def run(name, max_tokens):
        httpx.post(server.url + "/v1/completions", timeout=600, json={
            "prompt": "abc", "max_tokens": max_tokens, "ignore_eos": True})
        finished[name] = time.monotonic()

    threads = [threading.Thread(target=run, args=(f"long{i}", 300)) for i in range(3)]
    for t in threads:
        t.start()
    wait_until("the long requests to run", lambda: metric(
        server.url, "idp_num_requests_running{") >= 3, timeout_s=60)
    threads.append(threading.Thread(target=run, args=("short", 3)))
    threads[-1].start()
    for t in threads:
        t.join()
    assert finished["short"] < min(finished[f"long{i}"] for i in range(3))
    text = httpx.get(server.url + "/metrics").text
    buckets = {line.split("le=\"")[1].split("\"")[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("idp_batch_size_bucket")}
    assert buckets["+Inf"] - buckets["1.0"] > 0  # some steps ran more than one row


METRICS = ["idp_time_to_first_token_seconds", "idp_inter_token_latency_seconds",
           "idp_e2e_request_latency_seconds", "idp_request_queue_time_seconds",
           "idp_prompt_selection_seconds", "idp_batch_size", "idp_num_requests_running",
           "idp_num_requests_waiting", "idp_prompt_tokens_total", "idp_generation_tokens_total",
           "idp_prompt_selected_total", "idp_request_success_total", "idp_request_errors_total"]


def test_every_metric_exported_with_labels(server):
    httpx.post(server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    httpx.post(server.url + "/v1/completions", json={"prompt": "abc", "bogus": 1})
    text = httpx.get(server.url + "/metrics").text
    for name in METRICS:
        samples = [x for x in text.splitlines() if x.startswith(name) and not x.startswith("#")]
        assert samples, f"{name} missing"
        assert all('model="tiny"' in x and 'method="' in x for x in samples), name
    assert 'idp_prompt_selected_total{method="idp",model="tiny",prompt="p' in text
    assert 'finished_reason="length"' in text and 'type="validation"' in text


def test_tokenizer_endpoints(server):
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "hey"}).json()
    assert tok["count"] == 3 and len(tok["tokens"]) == 3
    assert httpx.post(server.url + "/detokenize",
                      json={"tokens": tok["tokens"]}).json()["prompt"] == "hey"
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>" and info["model_max_length"] == 512


def test_client_disconnect_mid_stream_frees_slot(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": "abc", "max_tokens": 500, "stream": True, "ignore_eos": True}) as r:
        for _ in zip(range(3), r.iter_lines(), strict=False):
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the row is retired at a later step
        text = httpx.get(server.url + "/metrics").text
        running = [x for x in text.splitlines() if x.startswith("idp_num_requests_running{")]
        if running and float(running[0].rsplit(" ", 1)[1]) == 0 and \
                'type="client_disconnected"' in text:
            break
        time.sleep(0.1)
    assert 'type="client_disconnected"' in text
    assert float(running[0].rsplit(" ", 1)[1]) == 0


def test_lora_mode_serves_same_api(lora_server):
    r = httpx.post(lora_server.url + "/v1/completions",
                   json={"prompt": "abc", "max_tokens": 3}).json()
    assert r["choices"][0]["prompt_used"] == "none"
    assert httpx.get(lora_server.url + "/v1/models").json()["data"][0]["mode"] == "lora"
    assert 'method="lora"' in httpx.get(lora_server.url + "/metrics").text
    r = httpx.post(lora_server.url + "/v1/completions",
                   json={"prompt": "abc", "prompt_selection": "p0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_selection"


def test_sse_json_is_valid(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
            "stream": True}) as r:
        events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        assert json.loads(e)["object"] == "chat.completion.chunk"
