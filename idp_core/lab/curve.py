"""`idp curve`: the recovery curve. Train each method (shallow or deep prompt, LoRA; LM loss,
distillation or both) on the compressed model and, at token milestones, score it on fixed
held-out text against the uncompressed teacher: perplexity, KL to the teacher, and the share of
each gap won back, with paired bootstrap CIs over windows.

Resumable: training checkpoints live in --work, the record (JSON) in --out is rewritten after
every milestone, and a rerun skips what is recorded and resumes what is not.

With --score-pool the training pool itself is scored too (set "pool", in-sample): trained for
many epochs on a small pool, a method's in-sample share is an estimate of what it can win back
at all, whatever the tokens (its capacity), beside what it wins back on text it never saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idp_core.config import DEFAULT_LR
from idp_core.lab.fit import FitConfig, fit
from idp_core.lab.objective import (
    check_teacher,
    student_logits,
    teacher_logprobs,
    token_kl,
    token_nll,
)
from idp_core.lab.teacher_cache import TeacherCache
from idp_core.lab.train import loss_function, make_student
from idp_core.model import LoadedModel, load_model

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^(shallow|deep|lora)(\d+)-(lm|kd|mix)(?:@([0-9.e-]+))?(?:/(text|vocab))?"
                   r"(\+mlp)?(\+cos)?$")


@dataclass(frozen=True)
class Method:
    """One trained recovery method, written `<family><size>-<loss>[@lr][/init][+mlp][+cos]`
    (e.g. deep16-kd, lora4-lm, shallow16-lm@0.1/vocab, deep16-kd@1e-2+cos): size is the prompt
    length in tokens, or the LoRA rank; init is how a prompt starts: from the embeddings (or KV)
    of real text, or from random vocabulary rows; `+mlp` trains a deep prompt through
    prefix-tuning's MLP (`lab/train.py` PrefixMLP; the export holds only the prompt); `+cos`
    decays the learning rate after warm-up along half a cosine to 0 at the curve's last
    milestone (else it stays constant)."""

    name: str
    family: str
    size: int
    loss: str
    lr: float
    init: str = "text"

    @property
    def schedule(self) -> str:  # in the name only, so records and checkpoints keep their form
        return "cosine" if self.name.endswith("+cos") else "constant"

    @property
    def reparam(self) -> str | None:  # in the name only, as the schedule
        return "mlp" if "+mlp" in self.name else None

    @classmethod
    def parse(cls, spec: str, lr: float | None = None) -> Method:
        m = _SPEC.match(spec)
        if m is None:
            raise ValueError(f"method {spec!r}: write <shallow|deep|lora><size>-<lm|kd|mix>"
                             f"[@lr][/text|/vocab][+mlp][+cos], e.g. deep16-kd or "
                             f"deep16-kd@3e-3")
        family, size, loss = m.group(1), int(m.group(2)), m.group(3)
        if m.group(6) and family != "deep":
            raise ValueError(f"method {spec!r}: +mlp reparameterises a deep prompt only")
        rate = float(m.group(4)) if m.group(4) else lr or DEFAULT_LR[family]
        return cls(spec, family, size, loss, rate, m.group(5) or "text")


# ---- data ---------------------------------------------------------------------------------
def _records(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [t for line in f if line.strip() and (t := json.loads(line)["text"]).strip()]


def _tokens(tokenizer: Any, texts: list[str], need: int) -> list[int]:
    """EOS-separated token ids of texts in order, stopping once `need` ids are there."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= need:
            break
    return ids


def split_sources(data_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per source, (training records, held-out records): the last tenth of each file is held
    out. Sources: every domain file plus the C4 sample."""
    files = sorted((data_dir / "domains").glob("*.jsonl")) + [data_dir / "calib" /
                                                              "c4_sample.jsonl"]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"recovery data missing under {data_dir}: "
                                f"{missing or 'domains/*.jsonl'}")
    out = {}
    for f in files:
        rows = _records(f)
        cut = len(rows) - max(1, len(rows) // 10)
        out[f.stem.removesuffix("_sample")] = (rows[:cut], rows[cut:])
    return out


def training_chunks(tokenizer: Any, sources: dict[str, tuple[list[str], list[str]]], *,
                    num_tokens: int, seq_len: int) -> Tensor:
    """[N, T] chunks, an equal share from each source's training records, interleaved."""
    per = math.ceil(num_tokens / len(sources) / seq_len)
    parts = []
    for train, _ in sources.values():
        ids = _tokens(tokenizer, train, per * seq_len)
        n = min(per, len(ids) // seq_len)
        parts.append(torch.tensor(ids[: n * seq_len]).view(n, seq_len))
    width = max(len(p) for p in parts)
    rows = [p[i] for i in range(width) for p in parts if i < len(p)]  # round robin
    return torch.stack(rows)


def eval_windows(tokenizer: Any, sources: dict[str, tuple[list[str], list[str]]],
                 wikitext: Path, *, per_source: int, wikitext_windows: int,
                 seq_len: int) -> dict[str, Tensor]:
    """Held-out windows [K, T] per source, plus the first windows of WikiText-2 test."""
    out = {}
    for name, (_, held) in sources.items():
        ids = _tokens(tokenizer, held, per_source * seq_len)
        n = min(per_source, len(ids) // seq_len)
        out[name] = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    with wikitext.open(encoding="utf-8") as f:
        text = "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: wikitext_windows * seq_len]
    out["wikitext2"] = torch.tensor(ids).view(wikitext_windows, seq_len)
    return out


# ---- scoring ------------------------------------------------------------------------------
@torch.no_grad()
def teacher_windows(teacher: torch.nn.Module, windows: dict[str, Tensor], *,
                    batch_size: int) -> dict[str, list[Tensor]]:
    """The teacher's log-probabilities [b, T-1, V] per batch of each set, computed once and
    kept in memory (every milestone of every method is scored against them)."""
    device = next(teacher.parameters()).device
    return {name: [teacher_logprobs(teacher, ids.to(device)) for ids in w.split(batch_size)]
            for name, w in windows.items()}


@torch.no_grad()
def score_all(model: torch.nn.Module, windows: dict[str, Tensor],
              teacher_logp: dict[str, list[Tensor]], prompt: Tensor | None, *,
              batch_size: int) -> dict[str, dict[str, list[float]]]:
    """Per set, per window: mean NLL of x_1.. and mean KL(teacher || model), in nats."""
    device = next(model.parameters()).device
    out = {}
    for name, w in windows.items():
        nll, kl = [], []
        for ids, t_logp in zip(w.split(batch_size), teacher_logp[name], strict=True):
            logits = student_logits(model, ids.to(device), prompt)
            nll += token_nll(logits, ids.to(device)).mean(-1).tolist()
            kl += token_kl(logits, t_logp).mean(-1).tolist()
        out[name] = {"nll": [round(x, 6) for x in nll], "kl": [round(x, 6) for x in kl]}
    return out


def slug(method: Method) -> str:
    """The method's name as a file and prompt name."""
    return method.name.replace("/", "-").replace("@", "-lr").replace("+", "-")


# ---- one method ---------------------------------------------------------------------------
def run_method(method: Method, lm: LoadedModel, teacher: LoadedModel, chunks: Tensor,
               windows: dict[str, Tensor], teacher_logp: dict[str, list[Tensor]],
               milestones: list[int], *, batch_size: int,
               work: Path, record: dict[str, Any], save: Any, settings: dict[str, Any],
               eval_batch: int, cache: TeacherCache | None = None) -> None:
    """Train `method` to each milestone (tokens), scoring it there; skips recorded ones.
    `cache`: the teacher's top-k targets on `chunks`, for kd/mix instead of a forward per step."""
    seq_len = chunks.shape[1]
    entry = record.setdefault("methods", {}).setdefault(method.name, {
        "family": method.family, "size": method.size, "loss": method.loss, "lr": method.lr,
        "init": method.init, "batch_size": batch_size, "milestones": []})
    if entry["batch_size"] != batch_size:
        raise SystemExit(f"idp curve: {method.name} was recorded with batch size "
                         f"{entry['batch_size']}, not {batch_size}; use another --out")
    done = {m["tokens"] for m in entry["milestones"]}
    todo = [t for t in milestones if t not in done]
    if not todo:
        return
    student = make_student(lm, method.family, method.size, chunks, init=method.init,
                           seed=settings["seed"], reparam=method.reparam)
    model, params = student.model, student.params
    entry["trainable_parameters"] = sum(p.numel() for p in params)
    steps_at = {t: max(1, t // (batch_size * seq_len)) for t in todo}
    horizon = max(1, max(milestones) // (batch_size * seq_len))
    if method.schedule != "constant" and entry.setdefault("schedule_steps", horizon) != horizon:
        raise SystemExit(f"idp curve: {method.name} decays to 0 at step "
                         f"{entry['schedule_steps']}, not {horizon}; a decayed run cannot be "
                         f"extended (use another --out)")
    config = FitConfig(steps=horizon, batch_size=batch_size, lr=method.lr,
                       schedule=method.schedule, seed=settings["seed"])
    loss_fn = loss_function(student, method.loss, teacher.model, lm.device, cache=cache)

    work.mkdir(parents=True, exist_ok=True)
    for tokens in todo:
        state = fit(params, loss_fn, chunks, config, checkpoint=work / f"{slug(method)}.pt",
                    settings={**settings, "method": asdict(method)}, until=steps_at[tokens],
                    desc=method.name)
        model.eval()
        with torch.no_grad():
            prompt = student.prompt()
        scores = score_all(model, windows, teacher_logp, prompt, batch_size=eval_batch)
        entry["milestones"].append({
            "tokens": tokens, "steps": state.step, "tokens_seen": state.tokens,
            "train_wall_s": round(state.wall_s, 1),
            "tokens_per_s": round(state.tokens_per_s(), 1),
            "train_loss_last10": round(sum(state.losses[-10:]) / len(state.losses[-10:]), 5),
            "commit": record["commit"],
            "scores": scores,
        })
        entry["milestones"].sort(key=lambda m: m["tokens"])
        save()
        log.info("%s at %d tokens: %s", method.name, tokens, summary_line(record, method.name))
    made = made_by(method, entry, record, settings)
    if student.encoder is not None:
        from idp_core.bank import PromptBank

        with torch.no_grad():
            prompt = student.prompt().float().cpu()
        PromptBank([slug(method)], [prompt], lm.fingerprint.to_dict(),
                   made, kind=method.family).save(work / f"{slug(method)}-bank")
    else:
        from idp_core.lab.train import LORA_TARGETS, write_train_json

        folder = work / f"{slug(method)}-adapter"
        model.save_pretrained(folder)  # adapter_model.safetensors + adapter_config.json
        (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        meta = {**made, "rank": method.size, "targets": list(LORA_TARGETS),
                "num_parameters": entry["trainable_parameters"],
                "fingerprint": lm.fingerprint.to_dict()}
        write_train_json(folder, meta)
        lm.model = model.unload()  # the next method starts from the bare compressed model


def made_by(method: Method, entry: dict[str, Any], record: dict[str, Any],
            settings: dict[str, Any]) -> dict[str, Any]:
    """How an exported bank or adapter was made: the method, its last milestone and the command
    and commit that trained it, so a copy of the export into prompts/ or adapters/ ships with
    its provenance."""
    last = entry["milestones"][-1]
    return {"method": method.name, "family": method.family, "loss": method.loss,
            "lr": method.lr, "init": method.init, "schedule": method.schedule,
            **({"reparam": method.reparam} if method.reparam else {}),
            "batch_size": entry["batch_size"],
            "tokens": last["tokens_seen"], "steps": last["steps"],
            "tokens_per_s": last["tokens_per_s"], "train_loss_last10": last["train_loss_last10"],
            "train_wall_s": last["train_wall_s"], **settings,
            "made_by": record["command"], "commit": last["commit"]}


# ---- summaries ----------------------------------------------------------------------------
def share(base: list[float], method: list[float], target: list[float], *,
          perplexity: bool) -> float:
    """Share of the gap won back: (base - method) / (base - target) of the set means (of
    perplexities exp(mean NLL) with `perplexity`)."""
    def agg(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return math.exp(m) if perplexity else m
    gap = agg(base) - agg(target)
    return (agg(base) - agg(method)) / gap if gap else float("nan")


def bootstrap(base: list[float], method: list[float], target: list[float], *, perplexity: bool,
              num: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, 2.5 %, 97.5 %) of `share`, resampling windows (paired)."""
    g = torch.Generator().manual_seed(seed)
    n = len(base)
    idx = torch.randint(0, n, (num, n), generator=g).tolist()
    draws = sorted(share([base[i] for i in r], [method[i] for i in r], [target[i] for i in r],
                         perplexity=perplexity) for r in idx)
    return (share(base, method, target, perplexity=perplexity),
            draws[int(0.025 * num)], draws[int(0.975 * num) - 1])


def bootstrap_difference(base: list[float], a: list[float], b: list[float], target: list[float],
                         *, perplexity: bool, num: int = 1000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(estimate, 2.5 %, 97.5 %) of share(a) - share(b), the same windows resampled for both."""
    g = torch.Generator().manual_seed(seed)
    n = len(base)
    idx = torch.randint(0, n, (num, n), generator=g).tolist()

    def diff(r: list[int]) -> float:
        pick = lambda xs: [xs[i] for i in r]  # noqa: E731
        return (share(pick(base), pick(a), pick(target), perplexity=perplexity)
                - share(pick(base), pick(b), pick(target), perplexity=perplexity))
    draws = sorted(diff(r) for r in idx)
    return diff(list(range(n))), draws[int(0.025 * num)], draws[int(0.975 * num) - 1]


def comparisons(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Each prompt method against each LoRA method of the same loss and schedule, each
    decayed method (`+cos`) against its constant-rate twin, and each reparameterised prompt
    (`+mlp`) against each plain one of the same size, loss, init and schedule, at their last
    common milestone: differences of gap shares (a - b) with paired bootstrap CIs."""
    base, teacher = record["baselines"]["compressed"], record["baselines"]["teacher"]
    mixed = held_out_sources(base)
    methods = record.get("methods", {})
    out = []
    for a, ea in methods.items():
        for b, eb in methods.items():
            spec_a, spec_b = Method.parse(a), Method.parse(b)
            prompt_vs_lora = (ea["family"] != "lora" and eb["family"] == "lora"
                              and ea["loss"] == eb["loss"] and spec_a.schedule == spec_b.schedule)
            twins = ((spec_a.family, spec_a.size, spec_a.loss, spec_a.init, spec_a.schedule)
                     == (spec_b.family, spec_b.size, spec_b.loss, spec_b.init, spec_b.schedule))
            mlp_vs_plain = twins and spec_a.reparam == "mlp" and spec_b.reparam is None
            if not (prompt_vs_lora or a == f"{b}+cos" or mlp_vs_plain):
                continue
            common = sorted({m["tokens"] for m in ea["milestones"]} &
                            {m["tokens"] for m in eb["milestones"]})
            if not common:
                continue
            ma = next(m for m in ea["milestones"] if m["tokens"] == common[-1])["scores"]
            mb = next(m for m in eb["milestones"] if m["tokens"] == common[-1])["scores"]
            row = {"a": a, "b": b, "tokens": common[-1]}
            for label, group in (("wikitext2", ["wikitext2"]), ("mixed", mixed)):
                for key, ppl in (("nll", True), ("kl", False)):
                    target = (pooled(teacher, "nll", group) if ppl
                              else [0.0] * len(pooled(base, "kl", group)))
                    row[f"{label}_{'ppl' if ppl else 'kl'}"] = bootstrap_difference(
                        pooled(base, key, group), pooled(ma, key, group),
                        pooled(mb, key, group), target, perplexity=ppl)
            out.append(row)
    return out


def pooled(scores: dict[str, dict[str, list[float]]], key: str, sets: list[str]) -> list[float]:
    return [x for s in sets for x in scores[s][key]]


POOL = "pool"  # the in-sample set (--score-pool): the training chunks themselves
MAX_SCORED_POOL = 64  # chunks; the teacher's log-probabilities on them stay in memory


def held_out_sources(scores: dict[str, Any]) -> list[str]:
    """The held-out sets pooled as 'mixed': every scored set but WikiText-2 and the pool."""
    return [s for s in scores if s not in ("wikitext2", POOL)]


def summarise(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, milestone): perplexities and gap shares with CIs, per set."""
    base, teacher = record["baselines"]["compressed"], record["baselines"]["teacher"]
    sets = {"wikitext2": ["wikitext2"], "mixed": held_out_sources(base),
            **({POOL: [POOL]} if POOL in base else {})}
    rows = []
    for name, entry in record.get("methods", {}).items():
        for m in entry["milestones"]:
            row = {"method": name, "tokens": m["tokens_seen"],
                   "trainable_parameters": entry.get("trainable_parameters"),
                   "tokens_per_s": m["tokens_per_s"]}
            for label, group in sets.items():
                b, t, x = (pooled(s, "nll", group) for s in (base, teacher, m["scores"]))
                row[f"{label}_ppl"] = math.exp(sum(x) / len(x))
                row[f"{label}_ppl_share"] = bootstrap(b, x, t, perplexity=True)
                kb, kx = pooled(base, "kl", group), pooled(m["scores"], "kl", group)
                row[f"{label}_kl"] = sum(kx) / len(kx)
                row[f"{label}_kl_share"] = bootstrap(kb, kx, [0.0] * len(kx), perplexity=False)
            rows.append(row)
    return rows


def summary_line(record: dict[str, Any], name: str) -> str:
    rows = [r for r in summarise({**record, "methods": {name: record["methods"][name]}})]
    r = rows[-1]
    return (f"WikiText-2 PPL {r['wikitext2_ppl']:.2f} (gap {100 * r['wikitext2_ppl_share'][0]:.0f}"
            f" %), KL gap {100 * r['wikitext2_kl_share'][0]:.0f} %; mixed PPL gap "
            f"{100 * r['mixed_ppl_share'][0]:.0f} %, KL gap {100 * r['mixed_kl_share'][0]:.0f} %")


def render(record: dict[str, Any], out: Path) -> None:
    """curve.md (tables) and curve.png (recovery against tokens and parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(record)
    base, teacher = record["baselines"]["compressed"], record["baselines"]["teacher"]
    mixed = held_out_sources(base)

    def ppl(scores: dict[str, Any], group: list[str]) -> float:
        x = pooled(scores, "nll", group)
        return math.exp(sum(x) / len(x))

    def pct(t: tuple[float, float, float]) -> str:
        return f"{100 * t[0]:.0f} [{100 * t[1]:.0f}, {100 * t[2]:.0f}]"

    lines = [
        "# Recovery curve", "",
        "Recorded by " + "; ".join(f"`{r['command']}` at commit {r['commit']}"
                                   for r in record.get("runs", [record])) + " "
        f"({record['machine']['processor'] or record['machine']['machine']}, "
        f"{record['machine']['cpu_count']} threads, torch {record['machine']['torch']}).", "",
        f"Held-out text: WikiText-2 test ({len(base['wikitext2']['nll'])} windows) and the "
        f"held-out tenth of each source ({', '.join(mixed)}; "
        f"{sum(len(base[s]['nll']) for s in mixed)} windows together, 'mixed'), "
        f"{record['seq_len']} tokens a window. Teacher (uncompressed) perplexity: WikiText-2 "
        f"{ppl(teacher, ['wikitext2']):.2f}, mixed {ppl(teacher, mixed):.2f}; compressed: "
        f"{ppl(base, ['wikitext2']):.2f} / {ppl(base, mixed):.2f}. Gap shares are "
        f"(compressed - method) / (compressed - teacher) of perplexity and of the mean KL to "
        f"the teacher (teacher: 0), with paired bootstrap 95 % CIs over windows. Training "
        f"pool: {record['settings']['data']['train_chunks']:,} chunks "
        f"({record['settings']['data']['train_chunks'] * record['seq_len']:,} tokens); "
        f"milestones past it see its chunks again.", "",
        "| method | params | tokens | tok/s | WT2 PPL | WT2 PPL gap % | WT2 KL gap % | "
        "mixed PPL | mixed PPL gap % | mixed KL gap % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_parameters']:,} | {r['tokens']:,} | "
            f"{r['tokens_per_s']:.0f} | {r['wikitext2_ppl']:.2f} | "
            f"{pct(r['wikitext2_ppl_share'])} | {pct(r['wikitext2_kl_share'])} | "
            f"{r['mixed_ppl']:.2f} | {pct(r['mixed_ppl_share'])} | {pct(r['mixed_kl_share'])} |")
    if POOL in base:
        lines += ["", f"In-sample: the training pool itself ({len(base[POOL]['nll'])} chunks, "
                  f"--score-pool; teacher / compressed perplexity {ppl(teacher, [POOL]):.2f} / "
                  f"{ppl(base, [POOL]):.2f}), beside WikiText-2; a method that wins back little "
                  f"of a gap even on text it has seen many times is short of capacity, not of "
                  f"tokens:", "",
                  "| method | params | tokens | epochs | pool PPL | pool PPL gap % | "
                  "pool KL gap % | WT2 KL gap % |", "|---|---|---|---|---|---|---|---|"]
        pool_tokens = len(base[POOL]["nll"]) * record["seq_len"]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['trainable_parameters']:,} | {r['tokens']:,} | "
                f"{r['tokens'] / pool_tokens:.0f} | {r[POOL + '_ppl']:.2f} | "
                f"{pct(r[POOL + '_ppl_share'])} | {pct(r[POOL + '_kl_share'])} | "
                f"{pct(r['wikitext2_kl_share'])} |")
    pairs = comparisons(record)
    if pairs:
        lines += ["", "Differences at equal objective and tokens, a - b (prompt - LoRA, "
                  "decayed - constant learning rate, or reparameterised (+mlp) - plain prompt; "
                  "percentage points of each gap; paired bootstrap 95 % CI over windows):", "",
                  "| a | b | tokens | WT2 PPL gap | WT2 KL gap | mixed PPL gap | "
                  "mixed KL gap |", "|---|---|---|---|---|---|---|"]
        for r in pairs:
            lines.append(f"| {r['a']} | {r['b']} | {r['tokens']:,} | {pct(r['wikitext2_ppl'])} "
                         f"| {pct(r['wikitext2_kl'])} | {pct(r['mixed_ppl'])} | "
                         f"{pct(r['mixed_kl'])} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in record.get("methods", {}):
        mine = [r for r in rows if r["method"] == name]
        style = "-" if "deep" in name else "--" if "shallow" in name else ":"
        for ax, key in zip(axes[:2], ("wikitext2_ppl_share", "mixed_kl_share"), strict=True):
            ax.plot([r["tokens"] for r in mine], [100 * r[key][0] for r in mine], style,
                    marker="o", label=name)
        last = mine[-1]
        axes[2].scatter(last["trainable_parameters"], 100 * last["wikitext2_ppl_share"][0])
        axes[2].annotate(name, (last["trainable_parameters"],
                                100 * last["wikitext2_ppl_share"][0]), fontsize=8)
    for ax, title in zip(axes, ("WikiText-2 perplexity gap recovered (%)",
                                "mixed held-out KL gap recovered (%)",
                                "WikiText-2 gap at the last milestone vs parameters"),
                         strict=True):
        ax.set_title(title, fontsize=10)
        ax.axhline(100, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("training tokens")
    axes[2].set_xlabel("trainable parameters")
    axes[2].set_xscale("log")
    if record.get("methods"):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="deep16-kd,deep16-lm,shallow16-lm,shallow16-kd,"
                        "lora4-kd,lora4-lm", help="comma list of <shallow|deep|lora><size>-"
                        "<lm|kd|mix>[@lr][/text|/vocab][+mlp][+cos] (see Method)")
    parser.add_argument("--milestones", default="25000,50000,100000",
                        help="training tokens at which each method is scored")
    parser.add_argument("--model", default=None, help="compressed model (default: the default)")
    parser.add_argument("--teacher", default=None,
                        help="uncompressed teacher (default: the embedded GGUF original)")
    parser.add_argument("--data", default=None, help="data folder (default: ../shared/data)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--pool-tokens", type=int, default=None,
                        help="training chunks drawn, in tokens (default: the recorded curve's "
                             "pool, else the last milestone); milestones past it cycle over it")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="override every method's lr")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows per source")
    parser.add_argument("--wikitext-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-pool", action="store_true",
                        help=f"score the training pool itself too (set {POOL!r}, in-sample; at "
                             f"most {MAX_SCORED_POOL} chunks, as the teacher's outputs on it are "
                             f"kept in memory)")
    parser.add_argument("--teacher-top-k", type=int, default=None,
                        help="distil against the teacher's top-k outputs, computed once into "
                             "--work (default: the full distribution, a forward per step)")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                        help="bfloat16 trains 1.9x faster on CPUs with AVX-512 BF16, to the "
                             "same shares; ~5x slower on CPUs without (docs/curve-sweep)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (results never depend "
                        "on it beyond rounding)")
    parser.add_argument("--out", default="docs/curve", help="record, table and plot folder")
    parser.add_argument("--work", default=".cache/curve", help="checkpoints and exports")
    parser.add_argument("--render-only", action="store_true")


def run(args: argparse.Namespace) -> int:
    from idp_core.lab.artefacts import ensure_default_model
    from idp_core.lab.data import DATA_DIR, WIKITEXT2_TEST
    from idp_core.lab.provenance import machine

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if args.render_only:
        render(record, out)
        return 0
    methods = [Method.parse(s, args.lr) for s in args.methods.split(",")]
    milestones = sorted(int(x) for x in args.milestones.split(","))
    data_dir = Path(args.data) if args.data else DATA_DIR
    wikitext = data_dir / "eval" / WIKITEXT2_TEST.name
    if not wikitext.is_file():
        raise SystemExit(f"idp curve: {wikitext} not found (pass --data)")

    lm = load_model(Path(args.model) if args.model else ensure_default_model(), dtype=args.dtype,
                    device=args.device, weights="dense")  # trained through: dense
    teacher = load_model(args.teacher, dtype=args.dtype, device=args.device)
    check_teacher(lm, teacher)
    sources = split_sources(data_dir)
    # The training pool is fixed when a curve starts (the batch order depends on its size), so
    # a curve extended past its first run's last milestone resumes exactly, cycling over the pool.
    recorded = record.get("settings", {}).get("data", {}).get("train_chunks")
    pool = args.pool_tokens or (recorded * args.seq_len if recorded else max(milestones))
    chunks = training_chunks(lm.tokenizer, sources, num_tokens=pool, seq_len=args.seq_len)
    windows = eval_windows(lm.tokenizer, sources, wikitext, per_source=args.windows,
                           wikitext_windows=args.wikitext_windows, seq_len=args.seq_len)
    if args.score_pool:
        if len(chunks) > MAX_SCORED_POOL:
            raise SystemExit(f"idp curve: --score-pool scores at most {MAX_SCORED_POOL} chunks; "
                             f"the pool has {len(chunks)} (lower --pool-tokens)")
        windows[POOL] = chunks
    settings = {"model": lm.fingerprint.to_dict(), "teacher": teacher.source,
                "seq_len": args.seq_len, "seed": args.seed, "dtype": args.dtype,
                "data": {"sources": sorted(sources), "held_out": "last tenth of each file",
                         "train_chunks": len(chunks),
                         **({"scored_in_sample": True} if args.score_pool else {})},
                **({} if args.teacher_top_k is None else {"teacher_top_k": args.teacher_top_k})}
    if record.get("settings") not in (None, settings):
        differ = sorted(k for k in {*settings, *record["settings"]}
                        if settings.get(k) != record["settings"].get(k))
        raise SystemExit(f"idp curve: {path} was recorded with other settings ({', '.join(differ)}"
                         f"); use another --out")
    for entry in record.get("methods", {}).values():  # records from before per-method sizes
        entry.setdefault("batch_size", record["batch_size"])
    command = "idp curve " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items() if v not in (None, False) and k not in ("command", "func"))
    runs = record.get("runs") or ([{"command": record["command"], "commit": record["commit"]}]
                                  if "command" in record else [])
    commit = machine()["git_commit"]
    if runs[-1:] != [{"command": command, "commit": commit}]:
        runs.append({"command": command, "commit": commit})
    record.update({"settings": settings, "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "command": command, "commit": commit, "runs": runs, "machine": machine()})

    def save() -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(path)
        render(record, out)

    t0 = time.perf_counter()
    teacher_logp = teacher_windows(teacher.model, windows, batch_size=8)
    if "baselines" not in record:
        record["baselines"] = {
            "teacher": score_all(teacher.model, windows, teacher_logp, None, batch_size=8),
            "compressed": score_all(lm.model, windows, teacher_logp, None, batch_size=8),
        }
        record["baselines_wall_s"] = round(time.perf_counter() - t0, 1)
        save()
    cache = None
    if args.teacher_top_k is not None and any(m.loss != "lm" for m in methods):
        from idp_core.lab import teacher_cache

        t1 = time.perf_counter()
        cache = teacher_cache.ensure(work / f"teacher-top{args.teacher_top_k}.safetensors",
                                     teacher, chunks, args.teacher_top_k)
        record.setdefault("teacher_cache_wall_s", round(time.perf_counter() - t1, 1))
    for method in methods:
        run_method(method, lm, teacher, chunks, windows, teacher_logp, milestones,
                   batch_size=args.batch_size, work=work, record=record, save=save,
                   settings=settings, eval_batch=8, cache=cache)
    save()
    print(out / "curve.md")
    return 0
