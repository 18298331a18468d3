"""Prompt KV: computed once per prompt at load, kept resident, stacked into per-batch prefixes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.models.llama.modeling_llama import rotate_half

from idp_core.bank import BankError, PromptBank, Router
from idp_core.config import AUTO, CONCAT, NONE


@dataclass(frozen=True)
class PrefixKV:
    """Every layer's keys and values of one prompt run alone at positions 0..n-1."""

    name: str
    keys: tuple[Tensor, ...]  # per layer [Hkv, n, D], RoPE applied
    values: tuple[Tensor, ...]  # per layer [Hkv, n, D]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1])


@dataclass(frozen=True)
class PromptKVStore:
    """The resident KV of every prompt in a bank, plus the concatenation of all of them.

    Attributes:
        names: prompt names in bank order.
        prompts: one PrefixKV per prompt, bank order.
        concat: KV of [P_1; ...; P_m] run as one prompt (the paper's concat baseline).
        layer0_keys: all prompts' layer-0 keys side by side, for the selection pass.
        segment: [N] index of the prompt each column of layer0_keys belongs to.
        rule: the bank's selection rule ("attention", "centroid" or "linear").
        routers: the bank's routing data per rule ("centroid", "linear"; may be empty).
    """

    names: tuple[str, ...]
    prompts: tuple[PrefixKV, ...]
    concat: PrefixKV
    layer0_keys: Tensor  # [Hkv, N, D], N = sum n_i
    segment: Tensor  # [N]
    rule: str = "attention"
    routers: dict[str, Router] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return [p.length for p in self.prompts]

    def num_bytes(self) -> int:
        entries = (*self.prompts, self.concat)
        return sum(t.numel() * t.element_size() for e in entries for t in (*e.keys, *e.values))

    def entry(self, selection: str) -> PrefixKV | None:
        """The prefix for a fixed selection: a prompt name, "concat", or "none" (no prefix)."""
        if selection == NONE:
            return None
        if selection == CONCAT:
            return self.concat
        if selection == AUTO:
            raise ValueError("'auto' is resolved by the selection pass, not by name")
        try:
            return self.prompts[self.names.index(selection)]
        except ValueError:
            raise KeyError(
                f"unknown prompt {selection!r}; the bank has {list(self.names)}"
            ) from None


@torch.inference_mode()
def compute_prefix_kv(model: PreTrainedModel, embeds: Tensor, *, name: str) -> PrefixKV:
    """Run the decoder once on `embeds` [n, d] at positions 0..n-1; keep every layer's K, V."""
    param = next(model.parameters())
    out = model.base_model(
        inputs_embeds=embeds[None].to(param.device, param.dtype), use_cache=True
    )
    layers = out.past_key_values.layers
    keys = tuple(layer.keys[0].contiguous() for layer in layers)
    values = tuple(layer.values[0].contiguous() for layer in layers)
    if param.device.type == "cpu" and torch.cuda.is_available():
        # CPU-offloaded model on a GPU host: pinned pages make the per-batch copy asynchronous.
        keys = tuple(k.pin_memory() for k in keys)
        values = tuple(v.pin_memory() for v in values)
    return PrefixKV(name, keys, values)


def kv_layout(model: PreTrainedModel) -> dict[str, int]:
    """The per-layer KV shape of `model`, named as a deep bank's layout."""
    cfg = model.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": dim}


def deep_prefix_kv(model: PreTrainedModel, prompt: Tensor, *, name: str) -> PrefixKV:
    """A deep prompt [2, layers, Hkv, n, D] as resident KV in the model's dtype and device."""
    param = next(model.parameters())
    kv = prompt.to(param.device, param.dtype)
    keys, values = tuple(k.contiguous() for k in kv[0]), tuple(v.contiguous() for v in kv[1])
    if param.device.type == "cpu" and torch.cuda.is_available():  # as compute_prefix_kv
        keys, values = tuple(k.pin_memory() for k in keys), tuple(v.pin_memory() for v in values)
    return PrefixKV(name, keys, values)


def rotate_keys(model: PreTrainedModel, keys: Tensor, shift: int) -> Tensor:
    """Keys [Hkv, n, D] cached after RoPE at positions p, moved to positions p + shift.

    RoPE rotations compose, so rotating by `shift` is exact (Llama-family rotary embedding).
    """
    pos = torch.full((1, keys.shape[1]), shift, device=keys.device)
    cos, sin = model.base_model.rotary_emb(keys.float(), pos)  # [1, n, D]
    out = keys.float() * cos + rotate_half(keys.float()) * sin
    return out.to(keys.dtype)


def concat_deep(model: PreTrainedModel, prompts: tuple[PrefixKV, ...]) -> PrefixKV:
    """Deep prompts side by side: prompt j's keys moved behind prompts 1..j-1 (values as is).

    Deep prompts are never computed, so they cannot attend to each other; their concatenation
    is exactly their KV at consecutive positions.
    """
    offsets = [0]
    for p in prompts[:-1]:
        offsets.append(offsets[-1] + p.length)
    keys = tuple(
        torch.cat([rotate_keys(model, p.keys[i], o) for p, o in zip(prompts, offsets,
                                                                     strict=True)], dim=1)
        for i in range(len(prompts[0].keys))
    )
    values = tuple(torch.cat([p.values[i] for p in prompts], dim=1)
                   for i in range(len(prompts[0].values)))
    return PrefixKV(CONCAT, keys, values)


def precompute_prompt_kv(model: PreTrainedModel, bank: PromptBank) -> PromptKVStore:
    """Compute, once, the KV of every prompt alone and of their concatenation.

    Prompts never attend to each other (each is run alone), which is what lets the server
    keep one KV per prompt and pick among them per request. Deep prompts are their KV already.
    """
    if bank.kind == "deep":
        if bank.layout != kv_layout(model):
            raise BankError(
                f"{bank.source or 'bank'}: deep prompts have layout {bank.layout}, "
                f"the model has {kv_layout(model)}"
            )
        prompts = tuple(deep_prefix_kv(model, p, name=n)
                        for n, p in zip(bank.names, bank.prompts, strict=True))
        concat = concat_deep(model, prompts)
    else:
        prompts = tuple(compute_prefix_kv(model, p, name=n)
                        for n, p in zip(bank.names, bank.prompts, strict=True))
        concat = compute_prefix_kv(model, torch.cat(bank.prompts), name=CONCAT)
    layer0 = torch.cat([p.keys[0] for p in prompts], dim=1)  # [Hkv, N, D]
    segment = torch.repeat_interleave(
        torch.arange(len(prompts)), torch.tensor([p.length for p in prompts])
    ).to(layer0.device)
    return PromptKVStore(tuple(bank.names), prompts, concat, layer0, segment, bank.rule,
                         bank.routers)


def stack_prefixes(
    entries: list[PrefixKV | None],
    *,
    model: PreTrainedModel,
    reserve: int,
) -> tuple[DynamicCache, Tensor]:
    """Left-pad each row's prefix to the longest one and stack them into a fresh cache.

    Row b holds [pad ... pad, prompt_b]; pads are zero and masked out, so a row never sees a
    prompt other than its own. The stored prompt tensors are copied, never modified.

    Args:
        entries: one prefix per row (None: no prefix).
        model: the served model (gives layer count, KV heads, head size, dtype, device).
        reserve: extra positions to allocate up front for the tokens that follow.

    Returns:
        (cache holding [B, Hkv, Lmax, D] per layer, prefix mask [B, Lmax] of 0/1).
    """
    cfg = model.config
    param = next(model.parameters())
    heads, dim = cfg.num_key_value_heads, kv_layout(model)["head_dim"]
    lengths = [0 if e is None else e.length for e in entries]
    batch, width = len(entries), max(lengths)
    # One copy per distinct prefix and layer, broadcast over its rows (a per-row loop was
    # 2 x layers x B small copies: ~1000 kernel launches per batch on a GPU).
    rows: dict[int, list[int]] = {}
    for b, e in enumerate(entries):
        if e is not None:
            rows.setdefault(id(e), []).append(b)
    groups = [(entries[r[0]], torch.tensor(r, device=param.device)) for r in rows.values()]
    mask = torch.zeros(batch, width, dtype=torch.long, device=param.device)
    for e, idx in groups:
        mask[idx, width - e.length :] = 1
    layers = []
    for i in range(cfg.num_hidden_layers):
        layer = GrowingLayer(batch, heads, width + reserve, dim, dtype=param.dtype,
                             device=param.device)
        k, v = layer.append_empty(width)
        for e, idx in groups:
            k[idx, :, width - e.length :] = e.keys[i].to(param.device, non_blocking=True)
            v[idx, :, width - e.length :] = e.values[i].to(param.device, non_blocking=True)
        layers.append(layer)
    return make_cache(layers), mask


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare capacity instead of `torch.cat` on every step.

    HF's DynamicLayer copies the whole cache per decode step; here `keys`/`values` are views
    [B, Hkv, S, D] into a buffer that doubles when full, so a step writes only the new token.
    """

    def __init__(
        self, batch: int, heads: int, capacity: int, dim: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self._k = torch.zeros(batch, heads, max(capacity, 1), dim, dtype=dtype, device=device)
        self._v = torch.zeros_like(self._k)
        self.dtype, self.device = dtype, device
        self.is_initialized = True
        self._set_length(0)

    def _set_length(self, n: int) -> None:
        self.length = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def append_empty(self, n: int) -> tuple[Tensor, Tensor]:
        """Grow by n positions; returns views of them to fill."""
        start = self.length
        if start + n > self._k.shape[2]:
            capacity = max(start + n, 2 * self._k.shape[2])
            grown_k = self._k.new_zeros(*self._k.shape[:2], capacity, self._k.shape[3])
            grown_v = torch.zeros_like(grown_k)
            grown_k[:, :, :start], grown_v[:, :, :start] = self.keys, self.values
            self._k, self._v = grown_k, grown_v
        self._set_length(start + n)
        return self._k[:, :, start : start + n], self._v[:, :, start : start + n]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        k, v = self.append_empty(key_states.shape[2])
        k.copy_(key_states)
        v.copy_(value_states)
        return self.keys, self.values


def make_cache(layers: list[GrowingLayer]) -> DynamicCache:
    """Wrap layers in a DynamicCache, the type transformers' decoders expect."""
    cache = DynamicCache()
    cache.layers = list(layers)
    cache.layer_class_to_replicate = None
    return cache


def select_rows(cache: DynamicCache, rows: Tensor, *, start: int, reserve: int) -> DynamicCache:
    """A new cache of the given batch rows, dropping positions before `start`."""
    layers = []
    for old in cache.layers:
        k, v = old.keys[rows, :, start:], old.values[rows, :, start:]
        layers.append(_layer_from(k, v, reserve))
    return make_cache(layers)


def concat_rows(a: DynamicCache, b: DynamicCache, *, reserve: int) -> DynamicCache:
    """Stack two caches along the batch, left-padding the shorter one in time with zeros."""
    layers = []
    for la, lb in zip(a.layers, b.layers, strict=True):
        width = max(la.keys.shape[2], lb.keys.shape[2])
        k = torch.cat([_left_pad(la.keys, width), _left_pad(lb.keys, width)])
        v = torch.cat([_left_pad(la.values, width), _left_pad(lb.values, width)])
        layers.append(_layer_from(k, v, reserve))
    return make_cache(layers)


def _left_pad(x: Tensor, width: int) -> Tensor:  # [B, H, S, D] -> [B, H, width, D]
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))


def _layer_from(k: Tensor, v: Tensor, reserve: int) -> GrowingLayer:
    batch, heads, seq, dim = k.shape
    layer = GrowingLayer(batch, heads, seq + reserve, dim, dtype=k.dtype, device=k.device)
    nk, nv = layer.append_empty(seq)
    nk.copy_(k)
    nv.copy_(v)
    return layer
