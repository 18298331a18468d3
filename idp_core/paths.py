"""Where the shipped default artefacts live. Imports nothing from this project, so the server
and every lab tool can ask for a default path without pulling in the compressor."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache" / "models"
COMPRESS_REPORT_FILE = "compress.json"  # written last: its presence marks a finished build

# The compressed default model (rebuilt on first use, not committed): SmolLM2-135M-Instruct
# with `idp_core.lab.artefacts.DEFAULT_COMPRESS`, whose label() is the suffix.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-gptq-w4g64"
DEFAULT_MODEL_DIR = CACHE_DIR / DEFAULT_MODEL_NAME
DEFAULT_BANK = REPO / "prompts" / "smollm2-135m-gptq-w4g64"
DEFAULT_LORA = REPO / "adapters" / "smollm2-135m-gptq-w4g64-lora-r4"


def default_model_built() -> bool:
    """True once the default model's folder holds a finished build."""
    return (DEFAULT_MODEL_DIR / COMPRESS_REPORT_FILE).is_file()
