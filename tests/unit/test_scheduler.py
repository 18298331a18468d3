"""The scheduler and the handlers in one process, on the tiny byte-level model: what a stream
sends against the result when a stop string is met, how many prompts one request may carry,
and that each failed request is counted once, as what it is."""

import itertools
import json
import time

import pytest
import torch
from prometheus_client import CollectorRegistry
from servers import write_tiny_artefacts
from starlette.testclient import TestClient
from tiny import tiny_llama

import idp_core.generate as generate
from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from server.app import build_app, load_state
from server.settings import Settings
from server.state import ServingState


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    return write_tiny_artefacts(tmp_path_factory.mktemp("tiny"))


def serve(artefacts, **settings_kw) -> tuple:
    """(app, state) serving the tiny model and its bank, loaded as `idp serve` loads them."""
    settings = Settings(model=str(artefacts["model"]), bank=str(artefacts["bank"]),
                        dtype="float32", **settings_kw)
    state = load_state(settings, CollectorRegistry())
    return build_app(settings, state=state), state


def force_output(monkeypatch: pytest.MonkeyPatch, engine: Engine, text: str) -> None:
    """Every request generates the bytes of `text` (one token each), then what it samples."""
    ids = engine.lm.tokenizer(text, add_special_tokens=False).input_ids
    steps: dict[int, tuple[GenConfig, itertools.count]] = {}  # holds each config: ids stay unique
    real = generate.sample

    def sample(logits, configs, generators):
        tokens = real(logits, configs, generators)
        for b, config in enumerate(configs):
            i = next(steps.setdefault(id(config), (config, itertools.count()))[1])
            if i < len(ids):
                tokens[b] = ids[i]
        return tokens

    monkeypatch.setattr(generate, "sample", sample)


def samples(state: ServingState, name: str) -> dict[str, float]:
    """A metric's non-zero samples by their last label's value."""
    return {list(s.labels.values())[-1]: s.value
            for metric in state.scheduler.metrics.registry.collect()
            for s in metric.samples if s.name == name and s.value}


def errors(state: ServingState) -> dict[str, float]:
    return samples(state, "idp_request_errors_total")


@pytest.mark.parametrize("stop", ["\U0001f642" * 3, "\u4f60\u597d\u4e16\u754c\u5440"])
def test_a_stop_string_of_many_byte_tokens_is_found(monkeypatch, stop):
    # three emoji, five CJK characters: 12 and 15 one-byte tokens, more than len(stop) + 8
    lm = tiny_llama(attn="sdpa")
    engine = Engine(lm, None)
    force_output(monkeypatch, engine, "xy" + stop + "zw and on")
    res = engine.generate([GenRequest([5, 9], GenConfig(max_tokens=40, stop=(stop,)))])[0]
    assert (res.finish_reason, res.text) == ("stop", "xy")


def test_a_stream_never_sends_the_start_of_a_stop_string(monkeypatch, artefacts):
    # "é" is two byte tokens: after its first, the text ends in an incomplete character
    app, state = serve(artefacts)
    force_output(monkeypatch, state.engine, "abx\u00e9 yz")
    body = {"prompt": "hi", "max_tokens": 7, "stop": ["x\u00e9"], "temperature": 0}
    with TestClient(app) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events)
    assert whole == streamed == "ab"


def test_more_prompts_than_the_queue_holds_is_a_bad_request(artefacts):
    # before: 503 with Retry-After on an idle server, forever, its queued siblings counted as
    # disconnects
    app, state = serve(artefacts, max_queue=4)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": list("abcdefgh"), "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        ok = client.post("/v1/completions", json={"prompt": list("abcd"), "max_tokens": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    assert errors(state) == {"invalid_request_error": 1.0}


def test_out_of_memory_is_counted_once(monkeypatch, artefacts):
    app, state = serve(artefacts)

    def step(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(state.engine, "step", step)
    body = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}  # no EOS before the step
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory"
        text = client.post("/v1/completions", json={**body, "stream": True}).text
    assert '"code": "out_of_memory"' in text and text.endswith("data: [DONE]\n\n")
    assert errors(state) == {"out_of_memory": 2.0}


def test_a_timeout_is_not_a_disconnect(monkeypatch, artefacts):
    app, state = serve(artefacts, request_timeout_s=0.05)
    real = state.engine.step

    def slow_step(batch):
        time.sleep(0.02)
        return real(batch)

    monkeypatch.setattr(state.engine, "step", slow_step)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 200,
                                                 "ignore_eos": True})
        assert r.status_code == 504
        deadline = time.monotonic() + 10  # the two rows are aborted at the next steps
        while samples(state, "idp_num_requests_running") and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not samples(state, "idp_num_requests_running")
    assert errors(state) == {"request_timeout": 1.0}
