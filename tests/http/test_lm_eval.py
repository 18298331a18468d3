"""lm-evaluation-harness's `local-completions` model against the real server, in one lm-eval run
of two tiny multiple-choice tasks:

- `idp_mc` ("Question: ...\\nAnswer:" contexts): each per-choice log-likelihood lm-eval gets
  over HTTP equals the engine's in-process echo log-probs for the same tokens;
- `idp_tasks_mc` (the task files' format): `idp eval tasks`'s scorer (`idp_core.lab.tasks`,
  IDP selection per request) gives the same per-choice log-likelihoods and per-item accuracy.
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from idp_core.bank import PromptBank
from idp_core.build import build_engine
from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.lab.tasks import (
    continuation_scores,
    encode_pair,
    load_task,
    run_requests,
    score_results,
    task_requests,
)
from idp_core.model import load_model

MC_ITEMS = [
    {"query": "What is the sky?", "choices": ["blue", "green", "a cat"], "gold": 0},
    {"query": "2 + 2 =", "choices": ["4", "five"], "gold": 0},
    {"query": "Water boils at", "choices": ["100 C", "zero", "night", "ten"], "gold": 0},
]

# The task files' format: the query is the whole context, choices follow after " ".
TASK_ITEMS = [
    {"query": "Question: What is the sky?", "choices": ["blue", "green", "a cat"], "gold": 0},
    {"query": "Question: dresser\n", "choices": ["a drawer", "wood grain  pins"], "gold": 1},
    {"query": "Water boils at", "choices": ["100 C", "zero", "night", "ten"], "gold": 0},
    {"query": "Question: Pick one. ", "choices": ["x", "yy"], "gold": 1},
]

TASK_YAML = """task: idp_tasks_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def run_local_completions(url: str, tasks: dict[str, tuple[list[dict[str, Any]], str]],
                          folder: Path) -> dict[str, Any]:
    """Write each task's items as JSONL and its YAML (with `{data}` for the file) into
    `folder`, run all tasks through the server in one lm-eval call, offline, and return
    lm-eval's output (samples logged)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task_dir = folder / "tasks"
    task_dir.mkdir(exist_ok=True)
    for task, (items, task_yaml) in tasks.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(x) + "\n" for x in items))
        (task_dir / f"{task}.yaml").write_text(task_yaml.replace("{data}", str(data)))
    return simple_evaluate(
        model="local-completions",
        model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=remote,"
                   "tokenized_requests=True,max_length=512,num_concurrent=1,max_retries=1",
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=4,
    )


@pytest.fixture(scope="module")
def lm_eval_run(server, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("lm_eval")
    mc_yaml = (Path(__file__).parent / "lmeval_task" / "idp_mc.yaml").read_text()
    out = run_local_completions(server.url, {
        "idp_mc": (MC_ITEMS, mc_yaml.replace("PLACEHOLDER", "{data}")),
        "idp_tasks_mc": (TASK_ITEMS, TASK_YAML),
    }, folder)
    return out, folder


@pytest.fixture(scope="module")
def engine(artefacts) -> Engine:
    lm = load_model(artefacts["model"], dtype="float32")
    return build_engine(lm, bank=PromptBank.load(artefacts["bank"]))


def test_local_completions_matches_engine(lm_eval_run, engine):
    out, _ = lm_eval_run
    tok = engine.lm.tokenizer
    checked = 0
    for sample in out["samples"]["idp_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"],
                                                 strict=True):
            ctx, cont = encode_pair(tok, context, continuation)
            res = engine.generate([GenRequest(ctx + cont, GenConfig(
                max_tokens=0, echo=True, logprobs=1))])[0]
            want = sum(e.logprob for e in res.prompt_logprobs[len(ctx):])
            got = resp[0][0]
            assert math.isclose(got, want, abs_tol=1e-4), (context, continuation, got, want)
            greedy = all(e.logprob == e.top[0][1] for e in res.prompt_logprobs[len(ctx):])
            assert resp[0][1] == greedy
            checked += 1
    assert checked == sum(len(x["choices"]) for x in MC_ITEMS)
    accs = [s["acc"] for s in out["samples"]["idp_mc"]]
    assert math.isclose(out["results"]["idp_mc"]["acc,none"], sum(accs) / len(accs))


def test_mc_scorer_matches_lm_eval(lm_eval_run, engine):
    out, folder = lm_eval_run
    samples = sorted(out["samples"]["idp_tasks_mc"], key=lambda s: s["doc_id"])
    task = load_task(folder / "idp_tasks_mc.jsonl")
    requests, owners = task_requests(engine, task, selection="auto")
    results = run_requests(engine, requests, batch_size=5, progress=False)
    ours: dict[tuple[int, int], tuple[float, bool]] = {
        (i, j): continuation_scores(res, n)
        for (i, j, n), res in zip(owners, results, strict=True)
    }
    per_item = score_results(task, owners, results)
    assert len(samples) == len(TASK_ITEMS)
    for sample in samples:
        i = sample["doc_id"]
        for j, resp in enumerate(sample["resps"]):
            loglik, greedy = ours[i, j]
            assert math.isclose(resp[0][0], loglik, abs_tol=1e-4), (i, j, resp, loglik)
            assert resp[0][1] == greedy
        assert sample["acc"] == per_item["acc"][i]
        assert sample["acc_norm"] == per_item["acc_norm"][i]
