"""Training on a frozen compressed model: a bank of soft prompts (`idp train-prompts`) and the
LoRA baseline (`idp train-lora`), both with the language-modelling loss on calibration text.

Each prompt is trained alone (prompts never attend to each other, as when served), at
positions 0..L-1 before the text, initialised from randomly chosen vocabulary embeddings
(Hoang et al.; Lester et al. 2021).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from idp_core.bank import PromptBank
from idp_core.config import TrainConfig
from idp_core.lab.data import DEFAULT_CALIB, describe_data, read_texts, tokenize_chunks
from idp_core.model import LoadedModel, attach_lora, resolve_dtype

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_FILE = "train.json"


@dataclass
class TrainStats:
    """What one training run did: per-step losses and totals."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    num_sequences: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "num_sequences": self.num_sequences,
            "wall_s": round(self.wall_s, 1),
            "initial_loss": self.losses[0] if self.losses else None,
            "final_loss": final_loss(self.losses),
            "loss_curve": [round(x, 4) for x in self.losses],
        }


def final_loss(losses: list[float], *, window: int = 10) -> float | None:
    """Mean of the last `window` step losses (single steps are noisy)."""
    if not losses:
        return None
    tail = losses[-window:]
    return sum(tail) / len(tail)


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(input embedding, decoder, lm_head) of a causal LM or of a peft model wrapping one."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.get_input_embeddings(), causal.get_decoder(), causal.get_output_embeddings()


def lm_loss(model: torch.nn.Module, ids: Tensor, prompt: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy of `ids` [B, T], after an optional soft prompt [L, d].

    With a prompt the sequence is [P; x] at positions 0..L+T-1 and every x_t is scored
    (x_0 given P alone), as the engine serves it; without one, x_1.. are scored.
    """
    embed, decoder, lm_head = _parts(model)
    x = embed(ids)  # [B, T, d]
    if prompt is not None:
        x = torch.cat([prompt.to(x.dtype).expand(ids.shape[0], -1, -1), x], dim=1)  # [B, L+T, d]
    hidden = decoder(inputs_embeds=x, use_cache=False).last_hidden_state  # [B, L+T, d]
    if prompt is not None:
        n = prompt.shape[0]
        hidden, targets = hidden[:, n - 1 : -1], ids  # [B, T, d], [B, T]
    else:
        hidden, targets = hidden[:, :-1], ids[:, 1:]
    logits = lm_head(hidden).float()  # [B, T', V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def init_prompt(embedding: Tensor, length: int, *, generator: torch.Generator) -> Tensor:
    """[length, d] float32 copy of the embeddings of `length` random vocabulary tokens."""
    ids = torch.randint(0, embedding.shape[0], (length,), generator=generator)
    return embedding[ids].detach().to(torch.float32).clone()


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
        feats = torch.cat([embed(c).float().mean(1) for c in chunks.split(64)])  # [N, d]
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


def _batches(num: int, config: TrainConfig, seed: int):
    """Yield index tensors [batch_size] over a shuffled pool, reshuffled every epoch."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num, generator=g)
    pos = 0
    while True:
        if pos + config.batch_size > num:
            take = order[pos:]
            order = torch.randperm(num, generator=g)
            pos = config.batch_size - len(take)
            yield torch.cat([take, order[:pos]])
        else:
            yield order[pos : pos + config.batch_size]
            pos += config.batch_size


def num_steps(config: TrainConfig) -> int:
    return config.total_tokens // (config.batch_size * config.seq_len)


def _optimise(
    loss_fn, params: list[Tensor], chunks: Tensor, config: TrainConfig, *, seed: int, desc: str
) -> TrainStats:
    """AdamW on `params` for the token budget; returns per-step losses."""
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    stats = TrainStats(num_sequences=len(chunks))
    steps = num_steps(config)
    start = time.perf_counter()
    batches = _batches(len(chunks), config, seed)
    bar = tqdm(range(steps), desc=desc, unit="step")
    with torch.enable_grad():
        for _ in bar:
            ids = chunks[next(batches)]  # [B, T]
            loss = loss_fn(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stats.losses.append(loss.item())
            stats.tokens += ids.numel()
            bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
    stats.steps = steps
    stats.wall_s = time.perf_counter() - start
    return stats


def train_prompt(
    lm: LoadedModel, chunks: Tensor, length: int, config: TrainConfig, *, seed: int,
    desc: str = "prompt",
) -> tuple[Tensor, TrainStats]:
    """Prompt-tune one soft prompt [length, d] alone on `chunks` [N, T]; the model stays frozen.

    Returns:
        (trained prompt [length, d] float32, training stats).
    """
    g = torch.Generator().manual_seed(seed)
    prompt = torch.nn.Parameter(init_prompt(lm.model.get_input_embeddings().weight, length,
                                            generator=g))
    stats = _optimise(lambda ids: lm_loss(lm.model, ids, prompt), [prompt], chunks, config,
                      seed=seed, desc=desc)
    return prompt.detach().clone(), stats


def train_prompts(
    lm: LoadedModel, chunks: Tensor, config: TrainConfig, *, data: dict[str, Any] | None = None
) -> PromptBank:
    """Train one prompt per entry of `config.prompt_lengths`, each alone, into a PromptBank.

    Args:
        lm: the frozen (compressed) model, loaded as it will be served.
        chunks: [N, T] training token ids (T = config.seq_len).
        config: training settings; with `clusters`, prompt i trains on k-means cluster i.
        data: description of the training data for the manifest.

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
    names, prompts, per_prompt = [], [], []
    start = time.perf_counter()
    for i, (length, group) in enumerate(zip(config.prompt_lengths, groups, strict=True)):
        name = f"{'c' if config.clusters else 'p'}{i}-L{length}"
        prompt, stats = train_prompt(lm, group, length, config, seed=config.seed + i, desc=name)
        names.append(name)
        prompts.append(prompt)
        per_prompt.append({"name": name, "length": length, **stats.to_dict()})
    training = {
        "method": "prompt-tuning",
        "config": config.to_dict(),
        "data": data,
        "clusters": cluster_sizes,
        "model": {"name": lm.name, "source": lm.source, "kind": lm.kind},
        "tokens_per_prompt": per_prompt[0]["tokens"],
        "total_tokens": sum(p["tokens"] for p in per_prompt),
        "steps_per_prompt": per_prompt[0]["steps"],
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "wall_s": round(time.perf_counter() - start, 1),
        "prompts": per_prompt,
        "library": {"torch": torch.__version__},
    }
    return PromptBank(names, prompts, lm.fingerprint.to_dict(), training)


def train_lora(
    lm: LoadedModel, chunks: Tensor, config: TrainConfig
) -> tuple[torch.nn.Module, TrainStats]:
    """Wrap `lm.model` in a peft LoRA (rank config.lora_rank on q,k,v,o,gate,up,down) and train it.

    The base weights stay frozen; adapter weights are float32 (peft upcasts them) whatever the
    base dtype. `lm.model` is replaced by the returned PeftModel.

    Returns:
        (the PeftModel, training stats).
    """
    from peft import LoraConfig

    torch.manual_seed(config.seed)  # LoRA A matrices are randomly initialised
    peft_config = LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM",
    )
    attach_lora(lm, peft_config, adapter_fp32=True)
    model = lm.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stats = _optimise(lambda ids: lm_loss(model, ids), params, chunks, config, seed=config.seed,
                      desc=f"lora-r{config.lora_rank}")
    model.eval()
    lm.model = model
    return model, stats


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


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--model", default=None,
                        help="compressed checkpoint folder (default: the default compressed model)")
    parser.add_argument("--data", default=str(DEFAULT_CALIB), help="JSONL (`text`) or text file")
    parser.add_argument("--out", required=True, help="output folder (bank or adapter)")
    parser.add_argument("--lengths", default=",".join(map(str, d.prompt_lengths)),
                        help="comma list of prompt lengths, one prompt each (train-prompts)")
    parser.add_argument("--rank", type=int, default=d.lora_rank, help="LoRA rank (train-lora)")
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--total-tokens", type=int, default=d.total_tokens,
                        help="training tokens per prompt (train-prompts) or for the adapter")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--clusters", action="store_true",
                        help="train prompt i on k-means cluster i of the data")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        lr=args.lr, weight_decay=args.weight_decay, total_tokens=args.total_tokens,
        seq_len=args.seq_len, batch_size=args.batch_size,
        prompt_lengths=tuple(int(x) for x in args.lengths.split(",")),
        lora_rank=args.rank, lora_alpha=args.lora_alpha, clusters=args.clusters, seed=args.seed,
        dtype=args.dtype,
    )


def run(args: argparse.Namespace) -> int:
    from idp_core.lab.artefacts import ensure_default_model
    from idp_core.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = _config(args)
    resolve_dtype(config.dtype)
    source = Path(args.model) if args.model else ensure_default_model()
    lm = load_model(source, dtype=config.dtype)
    out = Path(args.out)
    lora = args.command == "train-lora"
    num_runs = 1 if lora else len(config.prompt_lengths)
    chunks = training_chunks(lm.tokenizer, args.data, config, num_runs=num_runs)
    data = describe_data(args.data, num_samples=len(chunks), seq_len=config.seq_len)
    if not lora:
        bank = train_prompts(lm, chunks, config, data=data)
        bank.save(out)
        for p in bank.training["prompts"]:
            print(f"{p['name']}: loss {p['initial_loss']:.3f} -> {p['final_loss']:.3f} "
                  f"({p['tokens']} tokens, {p['wall_s']} s)")
        print(f"{bank.num_parameters} prompt parameters")
    else:
        fp = lm.fingerprint.to_dict()
        model, stats = train_lora(lm, chunks, config)
        model.save_pretrained(out)  # adapter_model.safetensors + adapter_config.json
        (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        num_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        meta = {
            "method": "lora",
            "config": config.to_dict(),
            "targets": list(LORA_TARGETS),
            "data": data,
            "model": {"name": lm.name, "source": str(source)},
            "fingerprint": fp,
            "num_parameters": num_params,
            "library": {"peft": importlib.metadata.version("peft"), "torch": torch.__version__},
            **stats.to_dict(),
        }
        (out / TRAIN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        print(f"lora r{config.lora_rank}: loss {meta['initial_loss']:.3f} -> "
              f"{meta['final_loss']:.3f} ({stats.tokens} tokens, {meta['wall_s']} s), "
              f"{num_params} adapter parameters")
    print(out)
    return 0
