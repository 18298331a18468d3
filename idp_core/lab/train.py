"""Training on a frozen compressed model: a bank of prompts (`idp train-prompts`, shallow or
deep) and the LoRA baseline (`idp train-lora`), with the language-modelling loss, distillation
from the uncompressed teacher, or both (`lab/objective.py`), in the resumable loop of
`lab/fit.py`. `idp curve` trains through the same functions.

Each prompt is trained alone (prompts never attend to each other, as when served) and starts
from real text: the embeddings (shallow) or the KV (deep) of the first tokens of a training
chunk; `init="vocab"` starts from random vocabulary rows instead.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from idp_core.bank import PromptBank
from idp_core.config import LR_SCHEDULES, TrainConfig
from idp_core.lab.data import DEFAULT_CALIB, describe_data, read_texts, tokenize_chunks
from idp_core.lab.fit import FitConfig, FitState, fit
from idp_core.lab.objective import (
    init_from_text,
    recovery_loss,
    student_logits,
    teacher_logprobs,
)
from idp_core.lab.teacher_cache import TeacherCache, chunks_hash
from idp_core.model import LoadedModel, attach_lora, lora_parameters, resolve_dtype

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_FILE = "train.json"
MLP_HIDDEN = 512  # PrefixMLP's width, as P-tuning v2's prefix encoder


@dataclass
class Student:
    """What one method trains on the frozen model: the module that runs, the trainable tensors
    and, for a prompt, the module that makes the prompt from them (None for LoRA)."""

    model: torch.nn.Module
    params: list[Tensor]
    encoder: torch.nn.Module | None = None

    def prompt(self) -> Tensor | None:
        """The prompt the model runs with now: [n, d] (shallow) or [2, layers, Hkv, n, D]."""
        return None if self.encoder is None else self.encoder()


class DirectPrompt(torch.nn.Module):
    """A prompt trained as itself: the tensor is the parameter."""

    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.prompt = torch.nn.Parameter(start.float().clone())

    def forward(self) -> Tensor:
        return self.prompt


class PrefixMLP(torch.nn.Module):
    """A deep prompt reparameterised for training, as prefix-tuning does (Li and Liang, 2021):
    for prompt token i, prompt[:, :, :, i] = start_i + W2 tanh(W1 e_i + b1) + b2, with e_i [d]
    trainable (from the token's embedding), `start` the fixed initial prompt, and W2, b2 zero
    at first, so training starts from `start`. The prompt is computed once after training and
    the MLP dropped: the bank holds only the prompt, served as any deep prompt.
    """

    def __init__(self, start: Tensor, embeds: Tensor, hidden: int) -> None:
        super().__init__()
        self.register_buffer("start", start.float().clone())  # [2, layers, Hkv, n, D]
        self.embeds = torch.nn.Parameter(embeds.float().clone())  # [n, d]
        two, layers, heads, _, dim = start.shape
        self.up = torch.nn.Linear(embeds.shape[1], hidden)
        self.down = torch.nn.Linear(hidden, two * layers * heads * dim)
        torch.nn.init.zeros_(self.down.weight)
        torch.nn.init.zeros_(self.down.bias)

    def forward(self) -> Tensor:
        two, layers, heads, n, dim = self.start.shape
        delta = self.down(torch.tanh(self.up(self.embeds)))  # [n, 2 * layers * Hkv * D]
        return self.start + delta.view(n, two, layers, heads, dim).permute(1, 2, 3, 0, 4)


def make_student(lm: LoadedModel, method: str, size: int, chunks: Tensor, *, init: str = "text",
                 seed: int = 0, lora_alpha: int | None = None, start: Tensor | None = None,
                 reparam: str | None = None) -> Student:
    """A fresh student: a shallow or deep prompt of `size` tokens, or a LoRA of rank `size`.

    A prompt starts from `start` (a trained prompt of that shape) if given, else from the first
    `size` tokens of a seeded-random training chunk (`init` "text") or from `size` random
    vocabulary ids ("vocab"); `reparam` "mlp" trains a fresh deep prompt through a `PrefixMLP`
    (width MLP_HIDDEN) fed those tokens' embeddings. A LoRA wraps `lm.model` (float32 adapter
    weights, peft's initialisation: B = 0, so it starts as the bare model).
    """
    if reparam is not None and (reparam != "mlp" or method != "deep" or start is not None):
        raise ValueError(f"reparameterisation {reparam!r}: only 'mlp', for a fresh deep prompt "
                         f"(this is a {method} one{', continued' if start is not None else ''})")
    if method == "lora":
        from peft import LoraConfig

        torch.manual_seed(seed)  # LoRA's A matrices are random
        attach_lora(lm, LoraConfig(r=size, lora_alpha=lora_alpha or 2 * size, lora_dropout=0.0,
                                   target_modules=list(LORA_TARGETS), bias="none",
                                   task_type="CAUSAL_LM"), adapter_fp32=True)
        return Student(lm.model, [p for p in lm.model.parameters() if p.requires_grad])
    if start is not None:
        encoder: torch.nn.Module = DirectPrompt(start)
    else:
        g = torch.Generator().manual_seed(seed)
        if init == "vocab":
            ids = torch.randint(0, lm.model.config.vocab_size, (size,), generator=g)
        elif size > chunks.shape[1]:
            raise ValueError(f"a {size}-token prompt cannot start from {chunks.shape[1]}-token "
                             f"training text: raise the sequence length or use init 'vocab'")
        else:
            ids = chunks[int(torch.randint(0, len(chunks), (1,), generator=g)), :size]
        first = init_from_text(lm, ids, method)
        if reparam == "mlp":
            with torch.no_grad():
                embeds = lm.model.get_input_embeddings()(ids.to(lm.device))
            torch.manual_seed(seed)  # the MLP's first layer starts random
            encoder = PrefixMLP(first, embeds, MLP_HIDDEN)
        else:
            encoder = DirectPrompt(first)
    encoder = encoder.to(lm.device)
    return Student(lm.model, list(encoder.parameters()), encoder)


def loss_function(student: Student, loss: str, teacher: torch.nn.Module | None,
                  device: torch.device, *,
                  cache: TeacherCache | None = None) -> Callable[[Tensor], Tensor]:
    """ids [B, T] -> the training loss of `student`. The teacher's targets come from `cache`
    (its top-k, computed once) if given, else from a teacher forward per batch."""
    if loss != "lm" and teacher is None and cache is None:
        raise ValueError(f"loss {loss!r} needs a teacher model")

    def loss_fn(ids: Tensor) -> Tensor:
        ids = ids.to(device)
        target = None
        if loss != "lm":
            target = cache.lookup(ids) if cache is not None else teacher_logprobs(teacher, ids)
        return recovery_loss(loss, student_logits(student.model, ids, student.prompt()), ids,
                             target)
    return loss_fn


def fit_config(config: TrainConfig, method: str) -> FitConfig:
    return FitConfig(steps=num_steps(config), batch_size=config.batch_size,
                     lr=config.rate(method), weight_decay=config.weight_decay,
                     warmup=config.warmup, schedule=config.schedule, seed=config.seed)


def num_steps(config: TrainConfig) -> int:
    return config.total_tokens // (config.batch_size * config.seq_len)


def stats_dict(state: FitState, num_sequences: int) -> dict[str, Any]:
    """A run's record for a manifest: steps, tokens, speed and the loss curve."""
    tail = state.losses[-10:]
    return {
        "steps": state.step,
        "tokens": state.tokens,
        "num_sequences": num_sequences,
        "wall_s": round(state.wall_s, 1),
        "tokens_per_s": round(state.tokens_per_s(), 1),
        "initial_loss": state.losses[0] if state.losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,  # mean of the last 10 steps
        "loss_curve": [round(x, 4) for x in state.losses],
    }


def _settings(lm: LoadedModel, config: TrainConfig, chunks: Tensor, teacher: LoadedModel | None,
              cache: TeacherCache | None, **extra: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (its training text included: the batch
    order depends on it)."""
    return {"model": lm.fingerprint.to_dict(), "config": config.to_dict(),
            "chunks": chunks_hash(chunks),
            "teacher": None if teacher is None else teacher.fingerprint.to_dict(),
            **({} if cache is None else {"teacher_top_k": cache.top_k}), **extra}


def cluster_chunks(lm: LoadedModel, chunks: Tensor, k: int, *, seed: int = 0) -> Tensor:
    """k-means (cosine, k-means++-style seeding) of chunks by their mean token embedding.

    Args:
        chunks: [N, T] token ids.

    Returns:
        [N] cluster index of each chunk; every cluster is non-empty.
    """
    if k > chunks.shape[0]:
        raise ValueError(f"cannot make {k} clusters of {chunks.shape[0]} sequences")
    embed = lm.model.get_input_embeddings()
    with torch.no_grad():
        feats = torch.cat([embed(c.to(lm.device)).float().mean(1).cpu()
                           for c in chunks.split(64)])  # [N, d]
    feats = torch.nn.functional.normalize(feats - feats.mean(0), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centres = feats[torch.randint(0, len(feats), (1,), generator=g)]
    while len(centres) < k:
        dist = (1 - feats @ centres.T).min(dim=1).values.clamp(min=0)  # [N]
        centres = torch.cat([centres, feats[torch.multinomial(dist + 1e-12, 1, generator=g)]])
    assign = torch.zeros(len(feats), dtype=torch.long)
    for _ in range(50):
        new = (feats @ centres.T).argmax(dim=1)
        if torch.equal(new, assign) and _ > 0:
            break
        assign = new
        for j in range(k):
            members = feats[assign == j]
            if len(members) == 0:  # re-seed an empty cluster with the worst-fitted point
                members = feats[(feats * centres[assign]).sum(-1).argmin()][None]
            centres[j] = torch.nn.functional.normalize(members.mean(0), dim=-1)
    assign = (feats @ centres.T).argmax(dim=1)
    if len(assign.unique()) < k:
        raise ValueError(f"k-means left a cluster empty (k={k}, {len(feats)} sequences)")
    return assign


def train_prompt(
    lm: LoadedModel, chunks: Tensor, length: int, config: TrainConfig, *, seed: int,
    teacher: LoadedModel | None = None, checkpoint: Path | None = None, desc: str = "prompt",
    start: Tensor | None = None, cache: TeacherCache | None = None,
) -> tuple[Tensor, FitState]:
    """Train one prompt of `config.kind` ([length, d] or [2, layers, Hkv, length, D]) alone on
    `chunks` [N, T]; the model stays frozen. Resumes from `checkpoint` if it exists. `start`:
    a trained prompt to continue from instead of a fresh one; `cache`: the teacher's cached
    top-k targets for `chunks` instead of a teacher forward per batch.

    Returns:
        (the trained prompt, float32 on CPU; the run's state).
    """
    student = make_student(lm, config.kind, length, chunks, init=config.init, seed=seed,
                           start=start)
    loss_fn = loss_function(student, config.loss, teacher and teacher.model, lm.device,
                            cache=cache)
    started = None if start is None else hashlib.sha256(
        start.float().cpu().numpy().tobytes()).hexdigest()
    state = fit(student.params, loss_fn, chunks, fit_config(config, config.kind),
                checkpoint=checkpoint, desc=desc,
                settings=_settings(lm, config, chunks, teacher, cache, length=length, seed=seed,
                                   **({} if started is None else {"start": started})))
    with torch.no_grad():
        return student.prompt().float().cpu().clone(), state


def train_prompts(
    lm: LoadedModel, chunks: Tensor, config: TrainConfig, *, data: dict[str, Any] | None = None,
    teacher: LoadedModel | None = None, checkpoint_dir: Path | None = None,
    cache: TeacherCache | None = None,
) -> PromptBank:
    """Train one prompt per entry of `config.prompt_lengths`, each alone, into a PromptBank.

    Args:
        lm: the frozen (compressed) model, loaded as it will be served.
        chunks: [N, T] training token ids (T = config.seq_len).
        config: training settings; with `clusters`, prompt i trains on k-means cluster i.
        data: description of the training data for the manifest.
        teacher: the uncompressed model, for the "kd" and "mix" losses.
        checkpoint_dir: where each prompt's run checkpoints (and resumes from).
        cache: the teacher's cached top-k targets for `chunks` (or for more chunks: rows
            are found by their token ids, so cluster subsets work too).

    Returns:
        The bank, with the model fingerprint and training metadata (loss curves) filled in.
    """
    m = len(config.prompt_lengths)
    groups = [chunks] * m
    cluster_sizes = None
    if config.clusters:
        assign = cluster_chunks(lm, chunks, m, seed=config.seed)
        groups = [chunks[assign == i] for i in range(m)]
        cluster_sizes = [len(g) for g in groups]
    prefix = ("c" if config.clusters else "p") + ("d" if config.kind == "deep" else "")
    named = [(f"{prefix}{i}-L{length}", length, group)
             for i, (length, group) in enumerate(zip(config.prompt_lengths, groups, strict=True))]
    bank = train_each(lm, named, config, teacher=teacher, checkpoint_dir=checkpoint_dir,
                      cache=cache)
    bank.training.update(data=data, clusters=cluster_sizes)
    return bank


def train_each(
    lm: LoadedModel, groups: list[tuple[str, int, Tensor]], config: TrainConfig, *,
    teacher: LoadedModel | None = None, checkpoint_dir: Path | None = None,
    start: Tensor | None = None, cache: TeacherCache | None = None,
) -> PromptBank:
    """Train one prompt per (name, length, chunks [N, T]) entry, each alone on its chunks
    (seed config.seed + i; checkpoint `<name>.pt` under `checkpoint_dir`), into a PromptBank
    whose training metadata holds every run's record. `start`: a trained prompt each one
    continues from instead of a fresh one."""
    names, prompts, per_prompt = [], [], []
    begin = time.perf_counter()
    for i, (name, length, group) in enumerate(groups):
        checkpoint = None if checkpoint_dir is None else checkpoint_dir / f"{name}.pt"
        prompt, state = train_prompt(lm, group, length, config, seed=config.seed + i,
                                     teacher=teacher, checkpoint=checkpoint, desc=name,
                                     start=start, cache=cache)
        names.append(name)
        prompts.append(prompt)
        per_prompt.append({"name": name, "length": length, **stats_dict(state, len(group))})
    training = {
        "method": f"{config.kind} prompt tuning",
        "kind": config.kind,
        "loss": config.loss,
        "init": "continued from a trained prompt" if start is not None else config.init,
        "teacher": None if teacher is None else {"source": teacher.source,
                                                 "fingerprint": teacher.fingerprint.to_dict()},
        "teacher_top_k": None if cache is None else cache.top_k,
        "config": config.to_dict(),
        "model": {"name": lm.name, "source": lm.source, "kind": lm.kind},
        "tokens_per_prompt": per_prompt[0]["tokens"],
        "total_tokens": sum(p["tokens"] for p in per_prompt),
        "steps_per_prompt": per_prompt[0]["steps"],
        "lr": config.rate(config.kind),
        "weight_decay": config.weight_decay,
        "wall_s": round(time.perf_counter() - begin, 1),
        "prompts": per_prompt,
        "library": {"torch": torch.__version__},
    }
    return PromptBank(names, prompts, lm.fingerprint.to_dict(), training, kind=config.kind)


def train_lora(
    lm: LoadedModel, chunks: Tensor, config: TrainConfig, *, teacher: LoadedModel | None = None,
    checkpoint: Path | None = None, cache: TeacherCache | None = None,
) -> tuple[torch.nn.Module, FitState]:
    """Wrap `lm.model` in a peft LoRA (rank config.lora_rank on q,k,v,o,gate,up,down) and train it
    with `config.loss`. The base weights stay frozen; adapter weights are float32 whatever the
    base dtype. `lm.model` is replaced by the returned PeftModel.
    """
    student = make_student(lm, "lora", config.lora_rank, chunks, seed=config.seed,
                           lora_alpha=config.lora_alpha)
    loss_fn = loss_function(student, config.loss, teacher and teacher.model, lm.device,
                            cache=cache)
    state = fit(student.params, loss_fn, chunks, fit_config(config, "lora"),
                checkpoint=checkpoint, desc=f"lora-r{config.lora_rank}",
                settings=_settings(lm, config, chunks, teacher, cache))
    student.model.eval()
    return student.model, state


def training_chunks(
    tokenizer: Any, path: str | Path, config: TrainConfig, *, num_runs: int
) -> Tensor:
    """[N, T] chunks covering `num_runs` budgets of config.total_tokens (fewer if the data ends)."""
    want = math.ceil(num_runs * config.total_tokens / config.seq_len)
    texts = read_texts(path)
    for n in (want, want // 2, want // 4, want // 8):
        try:
            return tokenize_chunks(tokenizer, texts, num_samples=max(n, 1), seq_len=config.seq_len)
        except ValueError:
            continue
    raise ValueError(f"{path} holds too little text for training chunks of {config.seq_len}")


def write_train_json(adapter: Path, meta: dict[str, Any]) -> None:
    """How an adapter was trained, beside its weights (write, then rename)."""
    tmp = adapter / (TRAIN_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(adapter / TRAIN_FILE)


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--model", default=None,
                        help="compressed checkpoint folder (default: the default compressed model)")
    parser.add_argument("--data", default=str(DEFAULT_CALIB), help="JSONL (`text`) or text file")
    parser.add_argument("--out", required=True, help="output folder (bank or adapter)")
    parser.add_argument("--kind", default=d.kind, choices=["shallow", "deep"],
                        help="prompt kind (train-prompts)")
    parser.add_argument("--loss", default=d.loss, choices=["lm", "kd", "mix"],
                        help="lm: next-token loss; kd: KL from the teacher; mix: both")
    parser.add_argument("--teacher", default=None,
                        help="uncompressed teacher for kd/mix (default: the embedded original)")
    parser.add_argument("--teacher-cache", default=None,
                        help="kd/mix: file of the teacher's top-k outputs on the training "
                             "chunks, made on first use (then no teacher forward per step)")
    parser.add_argument("--teacher-top-k", type=int, default=64,
                        help="tokens per position kept in --teacher-cache (the rest: one bucket)")
    parser.add_argument("--init", default=d.init, choices=["text", "vocab"])
    parser.add_argument("--lengths", default=",".join(map(str, d.prompt_lengths)),
                        help="comma list of prompt lengths, one prompt each (train-prompts)")
    parser.add_argument("--rank", type=int, default=d.lora_rank, help="LoRA rank (train-lora)")
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--total-tokens", type=int, default=d.total_tokens,
                        help="training tokens per prompt (train-prompts) or for the adapter")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=None,
                        help="default: shallow 3e-2, deep 1e-2, LoRA 2e-3")
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--schedule", default=d.schedule, choices=LR_SCHEDULES,
                        help="learning rate after warm-up (cosine: down to 0 at the last step)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--clusters", action="store_true",
                        help="train prompt i on k-means cluster i of the data")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"],
                        help="of the frozen model; bfloat16 trains 1.9x faster on CPUs with "
                             "AVX-512 BF16, ~5x slower without (docs/curve-sweep)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint here every few minutes; a rerun resumes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        kind=args.kind, loss=args.loss, init=args.init, lr=args.lr, warmup=args.warmup,
        schedule=args.schedule, weight_decay=args.weight_decay, total_tokens=args.total_tokens,
        seq_len=args.seq_len, batch_size=args.batch_size,
        prompt_lengths=tuple(int(x) for x in args.lengths.split(",")),
        lora_rank=args.rank, lora_alpha=args.lora_alpha, clusters=args.clusters, seed=args.seed,
        dtype=args.dtype,
    )


def load_models(source: str | Path, teacher: str | None, config: TrainConfig, *,
                device: str) -> tuple[LoadedModel, LoadedModel | None]:
    """The compressed student and, for the "kd" and "mix" losses, the uncompressed teacher
    (`teacher` None: the embedded original), checked to share the student's vocabulary."""
    from idp_core.lab.objective import check_teacher
    from idp_core.model import load_model

    # Training needs gradients through the base model: dense weights (the int4 kernel has none).
    lm = load_model(source, dtype=config.dtype, device=device, weights="dense")
    if config.loss == "lm":
        return lm, None
    original = load_model(teacher, dtype=config.dtype, device=device)
    check_teacher(lm, original)
    return lm, original


def run(args: argparse.Namespace) -> int:
    from idp_core.lab.artefacts import ensure_default_model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = _config(args)
    resolve_dtype(config.dtype)
    if not Path(args.data).is_file():
        raise SystemExit(f"idp {args.command}: training data {args.data} not found (pass --data)")
    source = Path(args.model) if args.model else ensure_default_model()
    lm, teacher = load_models(source, args.teacher, config, device=args.device)
    out = Path(args.out)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
    lora = args.command == "train-lora"
    num_runs = 1 if lora else len(config.prompt_lengths)
    chunks = training_chunks(lm.tokenizer, args.data, config, num_runs=num_runs)
    data = describe_data(args.data, num_samples=len(chunks), seq_len=config.seq_len)
    cache = None
    if args.teacher_cache and teacher is not None:
        from idp_core.lab import teacher_cache

        cache = teacher_cache.ensure(Path(args.teacher_cache), teacher, chunks,
                                     args.teacher_top_k)
    if not lora:
        bank = train_prompts(lm, chunks, config, data=data, teacher=teacher,
                             checkpoint_dir=checkpoints, cache=cache)
        bank.save(out)
        for p in bank.training["prompts"]:
            print(f"{p['name']}: loss {p['initial_loss']:.3f} -> {p['final_loss']:.3f} "
                  f"({p['tokens']} tokens, {p['tokens_per_s']} tokens/s, {p['wall_s']} s)")
        print(f"{bank.num_parameters} prompt parameters")
    else:
        fp = lm.fingerprint.to_dict()
        model, state = train_lora(lm, chunks, config, teacher=teacher, cache=cache,
                                  checkpoint=None if checkpoints is None
                                  else checkpoints / "lora.pt")
        model.save_pretrained(out)  # adapter_model.safetensors + adapter_config.json
        (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        num_params = lora_parameters(model)
        meta = {
            "method": "lora",
            "loss": config.loss,
            "teacher": None if teacher is None else teacher.source,
            "teacher_top_k": None if cache is None else cache.top_k,
            "config": config.to_dict(),
            "targets": list(LORA_TARGETS),
            "data": data,
            "model": {"name": lm.name, "source": str(source)},
            "fingerprint": fp,
            "num_parameters": num_params,
            "library": {"peft": importlib.metadata.version("peft"), "torch": torch.__version__},
            **stats_dict(state, len(chunks)),
        }
        write_train_json(out, meta)
        print(f"lora r{config.lora_rank}: loss {meta['initial_loss']:.3f} -> "
              f"{meta['final_loss']:.3f} ({state.tokens} tokens, {meta['tokens_per_s']} "
              f"tokens/s, {meta['wall_s']} s), {num_params} adapter parameters")
    print(out)
    return 0
