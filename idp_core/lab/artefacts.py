"""The shipped default artefacts: the compressed default model (rebuilt on first use into
`.cache/models/`, too big to commit), its trained prompt bank and the LoRA baseline adapter.

How each was made is in docs/artefacts.md; `idp build-default` rebuilds the model. Where they
live is `idp_core/paths.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from idp_core.lab.compress import SELF_CALIB, CompressConfig, compress
from idp_core.paths import DEFAULT_BANK, DEFAULT_MODEL_DIR, default_model_built

log = logging.getLogger(__name__)

# GPTQ W4, group 64, chosen by WikiText-2 perplexity (docs/artefacts.md), calibrated on
# 16 x 512 tokens the model generates itself, so a clone needs no data outside the repository.
DEFAULT_COMPRESS = CompressConfig(
    method="gptq", bits=4, group_size=64, num_samples=16, seq_len=512, calib=SELF_CALIB,
    eval_windows=32,
)


def ensure_default_model(*, force: bool = False) -> Path:
    """The default compressed model folder, compressed from the embedded GGUF on first use.

    The first call runs GPTQ on CPU (minutes, with progress bars) into `.cache/models/`;
    later calls find the folder's compress.json and return at once.

    Args:
        force: rebuild even if the cached folder is complete.

    Returns:
        The compressed-tensors checkpoint folder (loadable with `idp_core.model.load_model`).
    """
    if not force and default_model_built():
        return DEFAULT_MODEL_DIR
    log.info("building the default compressed model into %s (once; cached afterwards)",
             DEFAULT_MODEL_DIR)
    out = compress(None, DEFAULT_MODEL_DIR, DEFAULT_COMPRESS, force=force)
    check_default_bank(out)
    return out


def check_default_bank(model_dir: Path = DEFAULT_MODEL_DIR, *, dtype: str = "bfloat16") -> bool:
    """Warn unless the shipped bank was trained on exactly these weights.

    Compressed checkpoints are dequantized in float32 and then rounded to `dtype`, so a float32
    and a bfloat16 load have one fingerprint.
    """
    from idp_core.model import load_model

    manifest = DEFAULT_BANK / "manifest.json"
    if not manifest.is_file():
        return False
    built = load_model(model_dir, dtype=dtype).fingerprint.to_dict()
    trained = json.loads(manifest.read_text()).get("fingerprint")
    if built != trained:
        log.warning("WARNING the default model's weights (%s load) differ from those the default "
                    "bank was trained on", dtype)
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")


def run(args: argparse.Namespace) -> int:
    out = ensure_default_model(force=args.force)
    print(json.dumps({"bank_matches": check_default_bank(out)}))
    print(out)
    return 0
