"""The `idp` command: one subcommand per module, each exposing add_arguments() and run()."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help). Modules import heavy libraries only when run.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.__main__", "serve the OpenAI-compatible HTTP API"),
    "serve-ray": ("server.ray_cli", "the same API as Ray Serve replicas, autoscaled (extra: ray)"),
    "loadgen": ("idp_core.lab.loadgen", "closed-loop streaming load against running servers"),
    "soak": ("idp_core.lab.soak", "bounded load/soak test past capacity: errors, latency, leaks"),
    "bench": ("idp_core.lab.bench",
              "latency, selection, prefix, served, memory, profile benchmarks"),
    "compress": ("idp_core.lab.compress", "GPTQ / SparseGPT compression with llm-compressor"),
    "train-prompts": ("idp_core.lab.train", "train a bank of soft prompts on a compressed model"),
    "train-lora": ("idp_core.lab.train", "train the LoRA baseline adapter on a compressed model"),
    "eval-ppl": ("idp_core.lab.evaluate",
                 "`idp eval ppl`: WikiText-2 perplexity through the serving engine"),
    "eval-tasks": ("idp_core.lab.report",
                   "`idp eval tasks`: task suite (ARC, PIQA, HellaSwag, ...) through the engine"),
    "report": ("idp_core.lab.report", "recovery grid: Table 1 Markdown, JSON and PNGs with CIs"),
    "compare": ("idp_core.lab.recovery",
                "paired differences between two saved report rows on the same items"),
    "curve": ("idp_core.lab.curve", "recovery curve: train methods, score them at milestones"),
    "oracle": ("idp_core.lab.oracle",
               "oracle analysis: each prompt on held-out text, headroom, what selection captures"),
    "train-bank": ("idp_core.lab.specialise",
                   "train a bank that specialises: one prompt per domain, plus routing data"),
    "build-default": ("idp_core.lab.artefacts",
                      "rebuild the default compressed model into .cache/"),
}

# Old spellings, kept: `idp eval` (no second word) is `idp eval tasks`, `idp evaluate` is
# `idp eval ppl`.
ALIASES = {"eval": "eval-tasks", "evaluate": "eval-ppl"}
EVAL_VERBS = ("tasks", "ppl")


def canonical(argv: list[str]) -> list[str]:
    """argv with `eval tasks` / `eval ppl` and the old verbs as one COMMANDS key."""
    i = next((i for i, a in enumerate(argv) if a in COMMANDS or a in ALIASES), None)
    if i is None:
        return argv
    if argv[i] == "eval" and i + 1 < len(argv) and argv[i + 1] in EVAL_VERBS:
        return [*argv[:i], f"eval-{argv[i + 1]}", *argv[i + 2:]]
    return [*argv[:i], ALIASES.get(argv[i], argv[i]), *argv[i + 1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="idp", description=__doc__,
        epilog="eval-tasks and eval-ppl are also spelled `idp eval tasks` and `idp eval ppl`; "
               "the old verbs `idp eval` (= eval tasks) and `idp evaluate` (= eval ppl) remain.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = canonical(sys.argv[1:] if argv is None else argv)
    # Only the chosen subcommand's module is imported (its arguments are defined there).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
