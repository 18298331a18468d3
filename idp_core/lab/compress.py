"""`idp compress`: GPTQ quantization or SparseGPT pruning with llm-compressor (the model is
always loaded on CPU; `compress.json` records "device": "cpu").

Writes a compressed-tensors checkpoint folder (loadable by `idp_core.model.load_model`,
transformers and vLLM) plus `compress.json`: method, settings, calibration data, library
version, wall time and WikiText-2 perplexity before and after, scored through the engine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from idp_core.build import build_engine
from idp_core.config import GenConfig
from idp_core.generate import GenRequest
from idp_core.lab.data import DEFAULT_CALIB, describe_data, load_chunks, load_wikitext2
from idp_core.model import LoadedModel, load_model
from idp_core.paths import CACHE_DIR, COMPRESS_REPORT_FILE

log = logging.getLogger(__name__)

REPORT_FILE = COMPRESS_REPORT_FILE
SELF_CALIB = "self"  # data-free calibration: text the model samples itself (no files needed)
Method = Literal["gptq", "sparsegpt"]
_MASKS = ("unstructured", "2:4")


@dataclass(frozen=True)
class CompressConfig:
    """One compression recipe and its calibration/evaluation settings.

    Attributes:
        method: "gptq" (weight-only integer quantization) or "sparsegpt" (pruning).
        bits: GPTQ weight bits (2-8).
        group_size: GPTQ quantization group along the input dimension (must divide it).
        symmetric: symmetric (no zero point) GPTQ grid.
        sparsity: SparseGPT fraction of weights set to zero (0.5 for 2:4).
        mask: SparseGPT mask structure: "unstructured" or "2:4".
        dampening_frac: Hessian dampening, as a fraction of its mean diagonal.
        num_samples: calibration chunks.
        seq_len: tokens per calibration chunk.
        calib: calibration data file (JSONL with `text`, or plain text), or "self": text the
            model generates itself (data-free; the default model needs nothing outside the
            repository).
        eval_windows: WikiText-2 windows scored before and after (0: skip perplexity).
        eval_seq_len: tokens per perplexity window.
    """

    method: Method = "gptq"
    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    sparsity: float = 0.5
    mask: str = "unstructured"
    dampening_frac: float = 0.01
    num_samples: int = 32
    seq_len: int = 512
    calib: str = str(DEFAULT_CALIB)
    eval_windows: int = 32
    eval_seq_len: int = 512

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "sparsegpt"):
            raise ValueError(
                f"CompressConfig.method must be 'gptq' or 'sparsegpt', got {self.method!r}"
            )
        if not 2 <= self.bits <= 8:
            raise ValueError(f"CompressConfig.bits must be in [2, 8], got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"CompressConfig.group_size must be >= 1, got {self.group_size}")
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"CompressConfig.sparsity must be in (0, 1), got {self.sparsity}")
        if self.mask not in _MASKS:
            raise ValueError(f"CompressConfig.mask must be one of {_MASKS}, got {self.mask!r}")
        if self.mask == "2:4" and self.sparsity != 0.5:
            raise ValueError(
                f"CompressConfig.sparsity must be 0.5 with a 2:4 mask, got {self.sparsity}"
            )
        if self.num_samples < 1 or self.seq_len < 2:
            raise ValueError(
                f"CompressConfig.num_samples/seq_len must be >= 1/2, "
                f"got {self.num_samples}/{self.seq_len}"
            )
        if self.eval_windows < 0 or self.eval_seq_len < 2:
            raise ValueError(
                f"CompressConfig.eval_windows/eval_seq_len must be >= 0/2, "
                f"got {self.eval_windows}/{self.eval_seq_len}"
            )

    def recipe_dict(self) -> dict[str, Any]:
        """The settings that determine the weights (evaluation settings excluded)."""
        d = asdict(self)
        d.pop("eval_windows")
        d.pop("eval_seq_len")
        if self.method == "gptq":
            for k in ("sparsity", "mask"):
                d.pop(k)
        else:
            for k in ("bits", "group_size", "symmetric"):
                d.pop(k)
        return d

    def label(self) -> str:
        if self.method == "gptq":
            return f"gptq-w{self.bits}g{self.group_size}"
        mask = "2of4" if self.mask == "2:4" else f"{round(self.sparsity * 100)}pct"
        return f"sparsegpt-{mask}"


def build_recipe(config: CompressConfig) -> Any:
    """The llm-compressor modifier for `config` (lm_head stays dense: it is the tied embedding)."""
    if config.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = {
            "num_bits": config.bits,
            "type": "int",
            "symmetric": config.symmetric,
            "strategy": "group",
            "group_size": config.group_size,
        }
        return GPTQModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
            ignore=["lm_head"],
            dampening_frac=config.dampening_frac,
        )
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return SparseGPTModifier(
        sparsity=config.sparsity,
        mask_structure="2:4" if config.mask == "2:4" else "0:0",
        targets=["Linear"],
        ignore=["lm_head"],
        dampening_frac=config.dampening_frac,
    )


def wikitext_perplexity(lm: LoadedModel, config: CompressConfig) -> float | None:
    """WikiText-2 perplexity of the plain model (selection "none") through the engine."""
    if config.eval_windows == 0:
        return None
    from idp_core.lab.evaluate import perplexity

    try:
        ids = load_wikitext2(lm.tokenizer)
    except FileNotFoundError as e:
        log.warning("WARNING skipping the perplexity check: %s", e)
        return None
    return perplexity(
        build_engine(lm), ids, selection="none", seq_len=config.eval_seq_len,
        max_windows=config.eval_windows, progress=True,
    )


def self_generated_chunks(
    lm: LoadedModel, *, num_samples: int, seq_len: int, seed: int = 0
) -> Tensor:
    """[N, T] token ids the model samples itself from BOS (temperature 1, seed + i for row i).

    Data-free calibration (as in LLM-QAT's self-generated data): the GPTQ Hessians are taken
    over the model's own distribution of inputs, so compressing needs no corpus.
    """
    bos = lm.tokenizer.bos_token_id
    if bos is None:
        raise ValueError(f"{lm.name}: the tokenizer has no BOS token to start generation from")
    config = [
        GenConfig(max_tokens=seq_len - 1, temperature=1.0, seed=seed + i, ignore_eos=True)
        for i in range(num_samples)
    ]
    results = build_engine(lm).generate([GenRequest([bos], c) for c in config])
    return torch.tensor([[bos, *r.output_ids] for r in results], dtype=torch.long)


def calibration_chunks(lm: LoadedModel, config: CompressConfig) -> Tensor:
    """[N, T] calibration token ids: from `config.calib`, or generated with "self"."""
    if config.calib == SELF_CALIB:
        log.info("generating %d x %d calibration tokens with the model itself",
                 config.num_samples, config.seq_len)
        return self_generated_chunks(lm, num_samples=config.num_samples, seq_len=config.seq_len)
    return load_chunks(
        lm.tokenizer, config.calib, num_samples=config.num_samples, seq_len=config.seq_len
    )


def describe_calibration(config: CompressConfig) -> dict[str, Any]:
    if config.calib != SELF_CALIB:
        return describe_data(config.calib, num_samples=config.num_samples, seq_len=config.seq_len)
    return {
        "path": SELF_CALIB,
        "num_samples": config.num_samples,
        "seq_len": config.seq_len,
        "num_tokens": config.num_samples * config.seq_len,
        "selection": "sampled by the model from BOS, temperature 1, seed i for sample i, EOS "
                     "ignored (data-free)",
    }


def is_done(out_dir: Path, config: CompressConfig, source: str) -> bool:
    """True if `out_dir` holds a finished run of this recipe on this source."""
    report = out_dir / REPORT_FILE
    if not report.is_file():
        return False
    try:
        done = json.loads(report.read_text())
    except json.JSONDecodeError:
        return False
    return done.get("recipe") == config.recipe_dict() and done.get("source") == source


def compress(
    source: str | Path | None,
    out_dir: str | Path,
    config: CompressConfig = CompressConfig(),
    *,
    force: bool = False,
) -> Path:
    """Compress a causal LM with llm-compressor `oneshot` and save a compressed-tensors folder.

    Restartable: the checkpoint is written to `<out_dir>.partial` and moved into place at the
    end; an `out_dir` whose compress.json records the same recipe and source is kept as is
    unless `force`.

    Args:
        source: HF checkpoint folder, `.gguf` file, or None for the embedded default GGUF.
        out_dir: output folder (created).
        config: recipe, calibration and evaluation settings.
        force: recompress even if `out_dir` already holds this result.

    Returns:
        `out_dir`.
    """
    from datasets import Dataset
    from llmcompressor import oneshot

    out_dir = Path(out_dir)
    source_name = "default:SmolLM2-135M-Instruct.Q4_1.gguf" if source is None else str(source)
    if not force and is_done(out_dir, config, source_name):
        log.info("%s already holds this compression (compress.json matches); skipping", out_dir)
        return out_dir
    start = time.perf_counter()
    torch.manual_seed(0)
    lm = load_model(source, dtype="float32")
    if lm.kind == "gguf":
        # GGUF-loaded models refuse to save until transformers' GGUF quantizer is detached.
        lm.model.hf_quantizer.remove_quantization_config(lm.model)
    ppl_before = wikitext_perplexity(lm, config)
    chunks = calibration_chunks(lm, config)  # [N, T]
    dataset = Dataset.from_dict(
        {"input_ids": chunks.tolist(), "attention_mask": torch.ones_like(chunks).tolist()}
    )
    log.info("compressing %s with %s on %d x %d calibration tokens",
             lm.name, config.label(), config.num_samples, config.seq_len)
    t0 = time.perf_counter()
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory() as config_dir, torch.enable_grad():
        # oneshot re-reads config.json from config.name_or_path, and saving copies any .py
        # files found there: point it at a folder holding only the config (a GGUF has none).
        lm.model.config.save_pretrained(config_dir)
        lm.model.config._name_or_path = config_dir
        oneshot(
            model=lm.model,
            tokenizer=lm.tokenizer,
            recipe=build_recipe(config),
            dataset=dataset,
            num_calibration_samples=config.num_samples,
            max_seq_length=config.seq_len,
            shuffle_calibration_samples=False,
            batch_size=min(8, config.num_samples),
        )
        compress_s = time.perf_counter() - t0
        lm.model.save_pretrained(partial, save_compressed=True)
        lm.tokenizer.save_pretrained(partial)
    del lm

    reloaded = load_model(partial, dtype="float32", weights="dense")
    ppl_after = wikitext_perplexity(reloaded, config)
    report = {
        "source": source_name,
        "method": config.method,
        "label": config.label(),
        "recipe": config.recipe_dict(),
        "bits": config.bits if config.method == "gptq" else None,
        "group_size": config.group_size if config.method == "gptq" else None,
        "sparsity": config.sparsity if config.method == "sparsegpt" else None,
        "mask": config.mask if config.method == "sparsegpt" else None,
        "calibration": describe_calibration(config),
        "library": {
            "llmcompressor": importlib.metadata.version("llmcompressor"),
            "compressed-tensors": importlib.metadata.version("compressed-tensors"),
            "transformers": importlib.metadata.version("transformers"),
            "torch": torch.__version__,
        },
        "device": "cpu",
        "compress_wall_s": round(compress_s, 1),
        "total_wall_s": round(time.perf_counter() - start, 1),
        "perplexity": {
            "data": "wikitext2_raw_test (rows joined with \\n\\n), selection none, float32",
            "seq_len": config.eval_seq_len,
            "windows": config.eval_windows,
            "tokens_scored": config.eval_windows * (config.eval_seq_len - 1),
            "before": ppl_before,
            "after": ppl_after,
        },
        # Dequantizing in bf16 rounds differently from fp32-then-cast, so the fingerprint
        # (which a bank records) depends on the load dtype: keep both.
        "fingerprint": {
            "float32": reloaded.fingerprint.to_dict(),
            "bfloat16": load_model(partial, dtype="bfloat16",
                                   weights="dense").fingerprint.to_dict(),
        },
    }
    (partial / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    log.info("compressed model written to %s", out_dir)
    return out_dir


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CompressConfig()
    parser.add_argument("--model", default=None,
                        help="HF checkpoint folder or .gguf (default: embedded SmolLM2-135M GGUF)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: .cache/models/<model>-<recipe>)")
    parser.add_argument("--method", choices=["gptq", "sparsegpt"], default=d.method)
    parser.add_argument("--bits", type=int, default=d.bits)
    parser.add_argument("--group-size", type=int, default=d.group_size)
    parser.add_argument("--asymmetric", action="store_true", help="GPTQ grid with zero point")
    parser.add_argument("--sparsity", type=float, default=d.sparsity)
    parser.add_argument("--mask", choices=list(_MASKS), default=d.mask)
    parser.add_argument("--num-samples", type=int, default=d.num_samples)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--calib", default=d.calib,
                        help="calibration JSONL (`text`), text file, or 'self' (data-free)")
    parser.add_argument("--eval-windows", type=int, default=d.eval_windows,
                        help="WikiText-2 windows for perplexity before/after (0: skip)")
    parser.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    parser.add_argument("--force", action="store_true", help="recompress even if done")


def run(args: argparse.Namespace) -> int:
    config = CompressConfig(
        method=args.method, bits=args.bits, group_size=args.group_size,
        symmetric=not args.asymmetric, sparsity=args.sparsity, mask=args.mask,
        num_samples=args.num_samples, seq_len=args.seq_len, calib=args.calib,
        eval_windows=args.eval_windows, eval_seq_len=args.eval_seq_len,
    )
    name = "SmolLM2-135M-Instruct" if args.model is None else Path(args.model).stem
    out = Path(args.out) if args.out else CACHE_DIR / f"{name}-{config.label()}"
    out = compress(args.model, out, config, force=args.force)
    print(json.dumps(json.loads((out / REPORT_FILE).read_text())["perplexity"], indent=2))
    print(out)
    return 0
