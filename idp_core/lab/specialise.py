"""`idp train-bank`: a bank that specialises. One prompt per domain of the training text, each
trained alone on its domain's training part (the last tenth of every file is held out, as in
`idp curve`), optionally continuing from a trained general prompt; then the routing data the
selection reads (lab/routing.py) is fitted on the same training chunks and stored in the bank.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from torch import Tensor

from idp_core.bank import PromptBank
from idp_core.config import TrainConfig
from idp_core.lab.curve import split_sources, training_chunks
from idp_core.lab.routing import (
    RouteConfig,
    choose_rule,
    fit_centroids,
    fit_linear,
    fit_routing_keys,
)
from idp_core.lab.train import load_models, train_each
from idp_core.model import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("code", "dialogue", "fiction", "science", "news", "encyclopedic")


def domain_chunks(lm: LoadedModel, data_dir: Path, domains: list[str], *, num_tokens: int,
                  seq_len: int) -> dict[str, Tensor]:
    """[N, T] training chunks of each domain (its training part only)."""
    sources = split_sources(data_dir)
    unknown = [d for d in domains if d not in sources]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; {data_dir} has {sorted(sources)}")
    return {d: training_chunks(lm.tokenizer, {d: sources[d]}, num_tokens=num_tokens,
                               seq_len=seq_len) for d in domains}


def train_domain_prompts(
    lm: LoadedModel, chunks: dict[str, Tensor], config: TrainConfig, *, length: int,
    start: Tensor | None = None, teacher: LoadedModel | None = None,
    checkpoint_dir: Path | None = None,
) -> PromptBank:
    """One prompt per domain (named after it), each trained alone on its domain's chunks.

    Args:
        chunks: domain -> [N, T] training token ids.
        config: training settings (kind, loss, lr, budget per prompt in total_tokens, ...).
        length: prompt length in tokens.
        start: a trained prompt every domain prompt continues from (None: fresh prompts).
        checkpoint_dir: where each prompt's run checkpoints (and resumes from).
    """
    bank = train_each(lm, [(d, length, c) for d, c in chunks.items()], config, teacher=teacher,
                      checkpoint_dir=checkpoint_dir, start=start)
    bank.training["method"] = f"{config.kind} prompt tuning, one prompt per domain"
    return bank


def add_routing(lm: LoadedModel, bank: PromptBank, chunks: list[Tensor], config: RouteConfig,
                *, rule: str = "measure") -> PromptBank:
    """The bank with the centroid and linear routers and (deep banks, config.steps > 0)
    routing-trained layer-0 keys, all fitted on the first four fifths of each prompt's chunks;
    its rule is `rule`, or with "measure" the rule that picks the own prompt most often on the
    last fifth."""
    fit_part = [c[: len(c) - max(1, len(c) // 5)] for c in chunks]
    held = [c[len(c) - max(1, len(c) // 5):] for c in chunks]
    routers = {"centroid": fit_centroids(lm.model, fit_part),
               "linear": fit_linear(lm.model, fit_part, seed=config.seed)}
    bank = PromptBank(bank.names, bank.prompts, bank.fingerprint, bank.training, kind=bank.kind,
                      routers=routers,
                      routing={"feature": "mean input embedding",
                               "centroid": "cosine to each prompt's mean (centred) feature",
                               "linear": "logistic regression on the standardised feature of "
                                         "prefixes of 32, 64, 128 and 256 tokens",
                               "fit_chunks": [len(c) for c in fit_part],
                               "held_chunks": [len(c) for c in held]})
    if bank.kind == "deep" and config.steps > 0:
        bank, _ = fit_routing_keys(lm.model, bank, fit_part, config)
    best, rates = choose_rule(lm.model, bank, held)
    bank.rule = best if rule == "measure" else rule
    bank.routing["validation_own_pick"] = rates
    return bank


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--model", default=None,
                        help="compressed checkpoint folder (default: the default compressed model)")
    parser.add_argument("--data-dir", default="../shared/data",
                        help="folder with domains/*.jsonl and calib/c4_sample.jsonl")
    parser.add_argument("--domains", default=",".join(DEFAULT_DOMAINS),
                        help="comma list: one prompt per domain file")
    parser.add_argument("--out", required=True, help="output bank folder")
    parser.add_argument("--kind", default="deep", choices=["shallow", "deep"])
    parser.add_argument("--length", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--start-bank", default=None,
                        help="continue every domain prompt from this bank's first prompt")
    parser.add_argument("--loss", default="lm", choices=["lm", "kd", "mix"])
    parser.add_argument("--teacher", default=None,
                        help="uncompressed teacher for kd/mix (default: the embedded original)")
    parser.add_argument("--total-tokens", type=int, default=24_576,
                        help="training tokens per domain prompt")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=None, help="default: deep 1e-2, shallow 3e-2")
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint here every few minutes; a rerun resumes")
    r = RouteConfig()
    parser.add_argument("--route-steps", type=int, default=r.steps,
                        help="steps training the deep prompts' layer-0 keys to route (0: none)")
    parser.add_argument("--route-lr", type=float, default=r.lr)
    parser.add_argument("--route-anchor", type=float, default=r.anchor,
                        help="pull of the layer-0 keys towards where they started")
    parser.add_argument("--rule", default="measure",
                        choices=["measure", "attention", "centroid", "linear"],
                        help="the bank's selection rule (measure: the one that picks the own "
                             "prompt more often on held-back training chunks)")


def run(args: argparse.Namespace) -> int:
    from idp_core.lab.artefacts import ensure_default_model

    config = TrainConfig(kind=args.kind, loss=args.loss, lr=args.lr, warmup=args.warmup,
                         total_tokens=args.total_tokens, seq_len=args.seq_len,
                         batch_size=args.batch_size, prompt_lengths=(args.length,),
                         seed=args.seed, dtype=args.dtype)
    source = Path(args.model) if args.model else ensure_default_model()
    lm, teacher = load_models(source, args.teacher, config, device=args.device)
    start = None
    if args.start_bank:
        base = PromptBank.load(args.start_bank)
        base.check_model(lm.fingerprint, strict=True, origin=args.start_bank)
        if base.kind != config.kind or base.prompts[0].shape[-2] != args.length:
            raise SystemExit(f"idp train-bank: {args.start_bank} holds a {base.kind} prompt of "
                             f"shape {list(base.prompts[0].shape)}, not a {config.kind} prompt "
                             f"of {args.length} tokens")
        start = base.prompts[0]
    domains = [d for d in args.domains.split(",") if d]
    chunks = domain_chunks(lm, Path(args.data_dir), domains, num_tokens=config.total_tokens,
                           seq_len=config.seq_len)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
    bank = train_domain_prompts(lm, chunks, config, length=args.length, start=start,
                                teacher=teacher, checkpoint_dir=checkpoints)
    bank.training["data"] = {"data_dir": str(args.data_dir), "domains": domains,
                             "held_out": "last tenth of every file",
                             "start_bank": args.start_bank}
    bank = add_routing(lm, bank, list(chunks.values()),
                       RouteConfig(steps=args.route_steps, lr=args.route_lr,
                                   anchor=args.route_anchor, seed=args.seed), rule=args.rule)
    bank.save(Path(args.out))
    print(f"selection rule {bank.rule}; own-prompt picks on held-back training chunks: "
          f"{bank.routing['validation_own_pick']}")
    for p in bank.training["prompts"]:
        print(f"{p['name']}: loss {p['initial_loss']:.3f} -> {p['final_loss']:.3f} "
              f"({p['tokens']} tokens, {p['tokens_per_s']} tokens/s, {p['wall_s']} s)")
    print(f"{bank.num_parameters} prompt parameters -> {args.out}")
    return 0
