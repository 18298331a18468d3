"""`idp eval`'s multiple-choice scorer against lm-evaluation-harness: the same items, run by
lm-eval's `local-completions` through the server (IDP selection per request) and by
`idp_core.lab.tasks` in-process, give the same per-choice log-likelihoods and per-item accuracy."""

import math

from lmeval import run_local_completions

from idp_core.bank import PromptBank
from idp_core.generate import Engine
from idp_core.kv import precompute_prompt_kv
from idp_core.lab.tasks import (
    continuation_scores,
    load_task,
    run_requests,
    score_results,
    task_requests,
)
from idp_core.model import load_model

# The task files' format: the query is the whole context, choices follow after " ".
ITEMS = [
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


def test_mc_scorer_matches_lm_eval(server, artefacts, tmp_path):
    out = run_local_completions(server.url, ITEMS, TASK_YAML, "idp_tasks_mc", tmp_path)
    data = tmp_path / "idp_tasks_mc.jsonl"
    samples = sorted(out["samples"]["idp_tasks_mc"], key=lambda s: s["doc_id"])

    lm = load_model(artefacts["model"], dtype="float32")
    engine = Engine(lm, precompute_prompt_kv(lm.model, PromptBank.load(artefacts["bank"])))
    task = load_task(data)
    requests, owners = task_requests(engine, task, selection="auto")
    results = run_requests(engine, requests, batch_size=5, progress=False)
    ours: dict[tuple[int, int], tuple[float, bool]] = {
        (i, j): continuation_scores(res, n)
        for (i, j, n), res in zip(owners, results, strict=True)
    }
    per_item = score_results(task, owners, results)
    for sample in samples:
        i = sample["doc_id"]
        for j, resp in enumerate(sample["resps"]):
            loglik, greedy = ours[i, j]
            assert math.isclose(resp[0][0], loglik, abs_tol=1e-4), (i, j, resp, loglik)
            assert resp[0][1] == greedy
        assert sample["acc"] == per_item["acc"][i]
        assert sample["acc_norm"] == per_item["acc_norm"][i]
