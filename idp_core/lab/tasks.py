"""Zero-shot task suite of Hoang et al. scored through the serving engine, the way lm-eval does.

Multiple choice (ARC, PIQA, HellaSwag, SciQ) and WinoGrande (partial scoring) by summed
continuation log-likelihood; LAMBADA by greedy last-word match plus perplexity; TriviaQA and
WebQuestions by greedy generation and normalised exact match. Every request of a task goes
through `Engine.generate` in length-sorted batches, so the served code path is what is measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest, GenResult
from idp_core.lab.data import DATA_DIR
from idp_core.select import select_prompts

TASKS_DIR = DATA_DIR / "tasks"
SCIQ_FILE = DATA_DIR / "sciq" / "sciq_test.json"  # the ninth task, kept beside tasks/
TARGET_DELIMITER = " "  # lm-eval's default between context and continuation / choice
STOP = ("\n", ".", ",")  # lm-eval's triviaqa `until`
MAX_GEN_TOKENS = 16  # TriviaQA answers here are clipped to 10 tokens

# Paper (Table 1) grouping; tasks not listed fall under "other".
GROUPS = {
    "arc_easy": "World knowledge", "arc_challenge": "World knowledge", "sciq": "World knowledge",
    "webquestions": "World knowledge", "triviaqa": "World knowledge",
    "piqa": "Common reasoning",
    "hellaswag": "Language understanding", "lambada_openai": "Language understanding",
    "winogrande": "Language understanding",
}
GROUP_ORDER = ("World knowledge", "Common reasoning", "Language understanding")


@dataclass(frozen=True)
class Item:
    """One evaluation item.

    Attributes:
        pairs: (context, continuation) strings scored by log-likelihood, one per option
            (multiple choice, WinoGrande, LAMBADA); empty for generation items.
        gold: index of the right option.
        choice_chars: characters of each choice, for acc_norm (multiple choice only).
        prompt: the generation prompt (TriviaQA, WebQuestions).
        answers: accepted answers for exact match.
    """

    pairs: tuple[tuple[str, str], ...] = ()
    gold: int = 0
    choice_chars: tuple[int, ...] = ()
    prompt: str = ""
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    name: str  # file stem without ".sample"
    kind: str  # "multiple_choice" | "partial" | "last_word" | "exact_match"
    items: tuple[Item, ...]
    source: str
    num_total: int  # items in the file before --limit

    @property
    def group(self) -> str:
        return GROUPS.get(self.name, "other")


@dataclass
class TaskResult:
    """Per-item outcomes of one task under one method (lists, so they JSON-dump as-is)."""

    task: str
    kind: str
    num_items: int
    per_item: dict[str, list[float]]  # metric -> one value per item (acc 0/1, loglik, ...)
    prefix_used: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self.per_item.items() if k in SCORE_METRICS}
        if "loglik" in self.per_item:
            out["perplexity"] = lambada_perplexity(self.per_item["loglik"])
        return out


SCORE_METRICS = ("acc", "acc_norm", "exact_match")
PRIMARY = {"multiple_choice": "acc", "partial": "acc", "last_word": "acc",
           "exact_match": "exact_match"}


# ---- loading ------------------------------------------------------------------------------
def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        return list(json.loads(path.read_text(encoding="utf-8")))
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_name(path: Path) -> str:
    # "winogrande.sample.jsonl" -> "winogrande", "sciq_test.json" -> "sciq"
    return path.name.split(".")[0].removesuffix("_test")


def parse_record(record: dict[str, Any]) -> tuple[str, Item]:
    """Recognise a record's format by its fields; returns (kind, item)."""
    if "context_options" in record:  # WinoGrande: shared continuation after each option
        cont = TARGET_DELIMITER + record["continuation"]
        pairs = tuple((ctx, cont) for ctx in record["context_options"])
        return "partial", Item(pairs=pairs, gold=int(record["gold"]))
    if "distractor1" in record:  # SciQ, as lm-evaluation-harness scores it
        query = f"{record['support'].lstrip()}\nQuestion: {record['question']}\nAnswer:"
        choices = [record["distractor1"], record["distractor2"], record["distractor3"],
                   record["correct_answer"]]
        pairs = tuple((query, TARGET_DELIMITER + c) for c in choices)
        return "multiple_choice", Item(pairs=pairs, gold=3,
                                       choice_chars=tuple(len(c) for c in choices))
    if "choices" in record or "endings" in record:  # ARC, PIQA / HellaSwag
        choices = record.get("choices", record.get("endings"))
        gold = record.get("gold", record.get("label"))
        pairs = tuple((record["query"], TARGET_DELIMITER + c) for c in choices)
        return "multiple_choice", Item(pairs=pairs, gold=int(gold),
                                       choice_chars=tuple(len(c) for c in choices))
    if "aliases" in record:  # TriviaQA
        answers = (record["answer"], *record["aliases"])
        return "exact_match", Item(prompt=record["context"], answers=tuple(answers))
    if "qText" in record:  # WebQuestions
        prompt = f"Question: {record['qText']}\nAnswer:"
        return "exact_match", Item(prompt=prompt, answers=tuple(record["answers"]))
    if "context" in record and "continuation" in record:  # LAMBADA
        pairs = ((record["context"], TARGET_DELIMITER + record["continuation"]),)
        return "last_word", Item(pairs=pairs)
    raise ValueError(f"unrecognised task record with fields {sorted(record)}")


def load_task(path: str | Path, *, limit: int | None = None, seed: int = 1234) -> Task:
    """Read a task file; with `limit`, a fixed random subset (same for every method).

    Args:
        path: a `.jsonl` (one record per line) or `.json` (a list) task file.
        limit: keep this many items, drawn with `random.Random(seed)`, in file order.
        seed: subset seed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    parsed = [parse_record(r) for r in records]
    kinds = {k for k, _ in parsed}
    if len(kinds) != 1:
        raise ValueError(f"{path}: mixed record formats {sorted(kinds)}")
    keep = range(len(parsed))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if limit < len(parsed):
            keep = sorted(random.Random(seed).sample(range(len(parsed)), limit))
    items = tuple(parsed[i][1] for i in keep)
    return Task(task_name(path), kinds.pop(), items, str(path), len(parsed))


def task_files(folder: str | Path = TASKS_DIR) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jsonl", ".json"))
    if folder == TASKS_DIR and SCIQ_FILE.is_file():
        files = sorted([*files, SCIQ_FILE], key=task_name)
    if not files:
        raise FileNotFoundError(f"no .jsonl/.json task files in {folder}")
    return files


# ---- tokenisation (lm-eval's rules) --------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation;
    the continuation's tokens are those of context+continuation after the context's tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


# ---- scorers (pure) -------------------------------------------------------------------------
def score_choices(logliks: list[float], choice_chars: tuple[int, ...], gold: int
                  ) -> dict[str, float]:
    """acc: argmax of summed log-likelihood; acc_norm: argmax of loglik / choice characters."""
    acc = float(int(np.argmax(logliks)) == gold)
    out = {"acc": acc}
    if choice_chars:
        norm = [ll / max(n, 1) for ll, n in zip(logliks, choice_chars, strict=True)]
        out["acc_norm"] = float(int(np.argmax(norm)) == gold)
    return out


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lowercase, drop punctuation and articles, squash spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: tuple[str, ...]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def lambada_perplexity(logliks: list[float]) -> float:
    """lm-eval's LAMBADA perplexity: exp(-mean over items of the target's summed log-prob)."""
    return math.exp(-float(np.mean(logliks)))


# ---- running through the engine --------------------------------------------------------------
_SCORE = GenConfig(max_tokens=0, echo=True, logprobs=1)


def _batches(lengths: list[int], *, batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, so rows of a batch have similar lengths (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and \
                (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _run(engine: Engine, requests: list[GenRequest], *, batch_size: int, max_batch_tokens: int,
         bar: tqdm) -> list[GenResult]:
    results: list[GenResult | None] = [None] * len(requests)
    lengths = [len(r.input_ids) + r.config.max_tokens for r in requests]
    for idx in _batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens):
        for i, res in zip(idx, engine.generate([requests[i] for i in idx]), strict=True):
            results[i] = res
        bar.update(len(idx))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def continuation_scores(res: GenResult, num_context: int) -> tuple[float, bool]:
    """(summed log-prob of the continuation tokens, every one of them is the argmax)."""
    cont = (res.prompt_logprobs or [])[num_context:]
    assert cont and all(e is not None for e in cont)
    loglik = math.fsum(e.logprob for e in cont)  # type: ignore[union-attr]
    greedy = all(e.logprob >= e.top[0][1] for e in cont)  # type: ignore[union-attr]
    return loglik, greedy


def task_requests(engine: Engine, task: Task, *, selection: str
                  ) -> tuple[list[GenRequest], list[tuple[int, int, int]]]:
    """The engine requests of a task and, per request, (item, option, context tokens)."""
    tok = engine.lm.tokenizer
    requests: list[GenRequest] = []
    owners: list[tuple[int, int, int]] = []
    if task.kind == "exact_match":
        config = GenConfig(max_tokens=MAX_GEN_TOKENS, stop=STOP)
        for i, item in enumerate(task.items):
            ids = tok(item.prompt, add_special_tokens=False).input_ids
            requests.append(GenRequest(ids, config, selection))
            owners.append((i, 0, len(ids)))
        return requests, owners
    for i, item in enumerate(task.items):
        for j, (context, continuation) in enumerate(item.pairs):
            ctx, cont = encode_pair(tok, context, continuation)
            requests.append(GenRequest(ctx + cont, _SCORE, selection))
            owners.append((i, j, len(ctx)))
    return requests, owners


def run_requests(engine: Engine, requests: list[GenRequest], *, batch_size: int = 32,
                 max_batch_tokens: int = 4096, desc: str = "", progress: bool = True
                 ) -> list[GenResult]:
    """Results in request order; requests go to the engine in length-sorted batches."""
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
    results = _run(engine, requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                   bar=bar)
    bar.close()
    return results


AUTO_PER_ITEM = "auto-item"  # IDP chosen once per item, on the text its options share


def select_per_item(engine: Engine, requests: list[GenRequest], owners: list[tuple[int, int, int]],
                    *, batch_size: int = 32) -> list[GenRequest]:
    """Requests with IDP's choice fixed per item, so all options of an item use one prompt.

    The server selects per request, so a question's choices may get different prompts; here the
    engine's own selection pass runs once on the context tokens every option of the item shares
    (the query for multiple choice, the sentence up to the blank for WinoGrande, the context
    for LAMBADA and generation).
    """
    if engine.store is None:
        raise ValueError(f"selection {AUTO_PER_ITEM!r} needs a prompt bank")
    shared: dict[int, list[int]] = {}
    for (i, _, num_ctx), req in zip(owners, requests, strict=True):
        ctx = list(req.input_ids[:num_ctx])
        shared[i] = ctx if i not in shared else _common_prefix(shared[i], ctx)
    items = sorted(shared)
    chosen: dict[int, str] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(shared[i]) for i in chunk)
        ids = torch.full((len(chunk), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, i in enumerate(chunk):
            ids[b, : len(shared[i])] = torch.tensor(shared[i])
            mask[b, : len(shared[i])] = 1
        sel = select_prompts(engine.lm.model, engine.store, ids.to(engine.device),
                             mask.to(engine.device), engine.select_config)
        for i, idx in zip(chunk, sel.indices.tolist(), strict=True):
            chosen[i] = engine.store.names[idx]
    return [replace(req, selection=chosen[i]) for (i, _, _), req in zip(owners, requests,
                                                                         strict=True)]


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[: max(n, 1)]  # the selection pass needs at least one token


def evaluate_task(
    engine: Engine,
    task: Task,
    *,
    selection: str,
    batch_size: int = 32,
    max_batch_tokens: int = 4096,
    progress: bool = True,
) -> TaskResult:
    """Score every item of a task through the engine (many items' options per engine call).

    Args:
        engine: the serving engine (a bank, none, or a LoRA-wrapped model).
        task: a loaded task.
        selection: "none", "auto" (IDP, chosen per request as the server does), "auto-item"
            (IDP chosen once per item), "concat" or a prompt name.
        batch_size: requests per `engine.generate` call.
        max_batch_tokens: bound on rows x longest row per call.
        progress: show a progress bar.

    Returns:
        Per-item metrics: acc (and acc_norm for multiple choice), loglik for LAMBADA,
        exact_match for generation tasks.
    """
    requests, owners = task_requests(engine, task, selection=selection)
    if selection == AUTO_PER_ITEM:
        requests = select_per_item(engine, requests, owners, batch_size=batch_size)
    results = run_requests(engine, requests, batch_size=batch_size,
                           max_batch_tokens=max_batch_tokens, desc=f"{task.name} [{selection}]",
                           progress=progress)
    used: dict[str, int] = {}
    for res in results:
        used[res.prompt_used] = used.get(res.prompt_used, 0) + 1
    per_item = score_results(task, owners, results)
    return TaskResult(task.name, task.kind, len(task.items), per_item, used)


def score_results(task: Task, owners: list[tuple[int, int, int]], results: list[GenResult]
                  ) -> dict[str, list[float]]:
    """Turn engine results, owned by (item, option, context tokens), into per-item metrics."""
    if task.kind == "exact_match":
        return {"exact_match": [exact_match(r.text, task.items[i].answers)
                                for (i, _, _), r in zip(owners, results, strict=True)]}
    scored: list[list[tuple[float, bool]]] = [[] for _ in task.items]
    for (i, j, num_ctx), res in zip(owners, results, strict=True):
        assert len(scored[i]) == j
        scored[i].append(continuation_scores(res, num_ctx))
    return score_logliks(task, scored)


def score_logliks(task: Task, scored: list[list[tuple[float, bool]]]) -> dict[str, list[float]]:
    """Per-item metrics from (loglik, greedy) per option, by the task's rule."""
    per_item: dict[str, list[float]] = {}

    def add(metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            per_item.setdefault(k, []).append(v)

    for item, options in zip(task.items, scored, strict=True):
        logliks = [ll for ll, _ in options]
        if task.kind == "last_word":
            add({"acc": float(options[0][1]), "loglik": logliks[0]})
        elif task.kind == "partial":
            add(score_choices(logliks, (), item.gold))
        else:
            add(score_choices(logliks, item.choice_chars, item.gold))
    return per_item


# ---- bootstrap confidence intervals -----------------------------------------------------------
def bootstrap_indices(num_items: int, *, num: int = 1000, seed: int = 0,
                      key: str = "") -> np.ndarray:
    """[num, num_items] resampled item indices: the same for every method (a paired bootstrap),
    independent across keys (tasks: two tasks of one size must not share their resampling)."""
    rng = np.random.default_rng([seed, num_items, *hashlib.sha256(key.encode()).digest()[:8]])
    return rng.integers(0, num_items, size=(num, num_items))


def bootstrap_ci(values: list[float], *, stat: Callable[[np.ndarray], np.ndarray] | None = None,
                 num: int = 1000, seed: int = 0, key: str = "",
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat` (default: the mean) over items."""
    x = np.asarray(values, dtype=np.float64)
    samples = x[bootstrap_indices(len(x), num=num, seed=seed, key=key)]  # [num, N]
    stats = samples.mean(axis=1) if stat is None else stat(samples)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_means(values: list[float], *, num: int = 1000, seed: int = 0,
                    key: str = "") -> np.ndarray:
    """[num] bootstrap replicates of the mean (paired across methods by `bootstrap_indices`)."""
    x = np.asarray(values, dtype=np.float64)
    return x[bootstrap_indices(len(x), num=num, seed=seed, key=key)].mean(axis=1)
