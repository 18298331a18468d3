"""The `idp` command: one subcommand per module, each exposing add_arguments() and run()."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help). Modules import heavy libraries only when run.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.__main__", "serve the OpenAI-compatible HTTP API"),
    "loadgen": ("idp_core.lab.loadgen", "closed-loop streaming load against running servers"),
    "soak": ("idp_core.lab.soak", "bounded load/soak test past capacity: errors, latency, leaks"),
    "bench": ("idp_core.lab.bench",
              "latency, selection, prefix, served, memory, profile benchmarks"),
    "compress": ("idp_core.lab.compress", "GPTQ / SparseGPT compression with llm-compressor"),
    "train-prompts": ("idp_core.lab.train", "train a bank of soft prompts on a compressed model"),
    "train-lora": ("idp_core.lab.train", "train the LoRA baseline adapter on a compressed model"),
    "evaluate": ("idp_core.lab.evaluate", "WikiText-2 perplexity through the serving engine"),
    "eval": ("idp_core.lab.report", "task suite (ARC, PIQA, HellaSwag, ...) through the engine"),
    "report": ("idp_core.lab.report", "recovery grid: Table 1 Markdown, JSON and PNGs with CIs"),
    "build-default": ("idp_core.lab.artefacts",
                      "rebuild the default compressed model into .cache/"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idp", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
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
