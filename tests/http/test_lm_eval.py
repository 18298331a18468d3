"""lm-evaluation-harness's `local-completions` model against the real server: its per-item
log-likelihoods equal the engine's in-process scores for the same items."""

import math
from pathlib import Path

import torch
from lmeval import run_local_completions

from idp_core.bank import PromptBank
from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import precompute_prompt_kv
from idp_core.lab.tasks import encode_pair
from idp_core.model import load_model

ITEMS = [
    {"query": "What is the sky?", "choices": ["blue", "green", "a cat"], "gold": 0},
    {"query": "2 + 2 =", "choices": ["4", "five"], "gold": 0},
    {"query": "Water boils at", "choices": ["100 C", "zero", "night", "ten"], "gold": 0},
]


def test_local_completions_matches_engine(server, artefacts, tmp_path):
    yaml = (Path(__file__).parent / "lmeval_task" / "idp_mc.yaml").read_text()
    out = run_local_completions(server.url, ITEMS, yaml.replace("PLACEHOLDER", "{data}"),
                                "idp_mc", tmp_path)
    samples = out["samples"]["idp_mc"]

    lm = load_model(artefacts["model"], dtype="float32")
    engine = Engine(lm, precompute_prompt_kv(lm.model, PromptBank.load(artefacts["bank"])))
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"],
                                                 strict=True):
            ctx, cont = encode_pair(lm.tokenizer, context, continuation)
            res = engine.generate([GenRequest(ctx + cont, GenConfig(
                max_tokens=0, echo=True, logprobs=1))])[0]
            want = sum(e.logprob for e in res.prompt_logprobs[len(ctx):])
            got = resp[0][0]
            assert math.isclose(got, want, abs_tol=1e-4), (context, continuation, got, want)
            greedy = all(e.logprob == e.top[0][1] for e in res.prompt_logprobs[len(ctx):])
            assert resp[0][1] == greedy
            checked += 1
    assert checked == sum(len(x["choices"]) for x in ITEMS)
    assert torch.isfinite(torch.tensor(out["results"]["idp_mc"]["acc,none"]))
