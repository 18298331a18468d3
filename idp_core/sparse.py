"""2:4 sparse weights on CUDA through torch's semi-structured sparse tensors.

SparseGPT checkpoints hold dense tensors with zeros; at 2:4 (two of every four inputs zero)
a GPU from Ampere on multiplies them on its sparse tensor cores (`to_sparse_semi_structured`,
half the weight bytes plus metadata). Unstructured 50 % has no such kernel, on CPU or GPU:
it is served dense. Prepared here; checked on a GPU by `make gpu-check` when one is lent.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_2of4(weight: Tensor) -> bool:
    """Every group of four consecutive inputs of every output row holds at least two zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def sparse_2of4_reason(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the decoder's linear layers cannot run as 2:4 sparse here, or None."""
    if device.type != "cuda":
        return "2:4 sparse kernels run on CUDA only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "2:4 sparse tensor cores need a GPU of compute capability 8.0 or newer"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse kernels take float16 or bfloat16, not {dtype}"
    layers = _decoder_linears(model)
    if not layers:
        return "no linear layers"
    dense = [name for name, m in layers if not is_2of4(m.weight)]
    if dense:
        return f"{len(dense)} of {len(layers)} linear layers are not 2:4 sparse ({dense[0]})"
    return None


def sparsify_2of4(model: nn.Module) -> None:
    """Replace every decoder linear weight (on CUDA, 2:4 sparse) by its semi-structured form."""
    from torch.sparse import to_sparse_semi_structured

    for _, module in _decoder_linears(model):
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()),
                                     requires_grad=False)


def _decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head]
