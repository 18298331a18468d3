"""PromptBank: m named prompts, stored as bank.safetensors + manifest.json.

Two kinds: "shallow" prompts live in input-embedding space ([n, d], the paper's soft prompts;
their KV is computed by running them through the model at load), "deep" prompts are every
layer's keys and values themselves ([2, layers, Hkv, n, D], prefix-tuning / P-tuning v2; keys
stored after RoPE at positions 0..n-1, exactly as served).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from idp_core.config import RESERVED_SELECTIONS
from idp_core.model import Fingerprint

log = logging.getLogger(__name__)

WEIGHTS_FILE = "bank.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2 added `kind`; format-1 banks are shallow and keep loading
KINDS = ("shallow", "deep")
RULES = ("attention", "centroid", "linear")  # how `auto` picks a prompt (idp_core/select.py)
ROUTER_RULES = ("centroid", "linear")  # rules that read a Router stored in the bank
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class BankError(ValueError):
    """A bank that cannot be used: the message names the file and the problem."""


@dataclass(frozen=True)
class Router:
    """A rule on the input's mean embedding x (select.router_scores): scores =
    f(x - center) @ weight.T + bias, with f the L2 normalisation (`normalize`; the centroid
    rule: unit centroid rows, zero bias, so scores are cosines) or the identity (the linear
    rule: a probe trained by cross-entropy on the prompts' own text)."""

    center: Tensor  # [d]
    weight: Tensor  # [P, d]
    bias: Tensor  # [P]
    normalize: bool


@dataclass
class PromptBank:
    """Named prompts of one kind: shallow [n_i, d] or deep [2, layers, Hkv, n_i, D] tensors.

    Attributes:
        names: unique prompt names (never one of the reserved selections).
        prompts: one tensor per name (shape by kind, see the module docstring).
        fingerprint: the model the prompts were trained on, as a dict (None if unknown).
        training: free-form training metadata (data, tokens, steps, lr, loss curve, ...).
        kind: "shallow" or "deep".
        source: where the bank was loaded from (for error messages; "" if built in memory).
        rule: the selection rule `auto` uses on this bank: "attention" (the paper's), or
            "centroid" / "linear", which read `routers[rule]`.
        routers: routing data per rule (empty if the bank has none).
        routing: how the routing data was made (free-form, kept in the manifest).
    """

    names: list[str]
    prompts: list[Tensor]
    fingerprint: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    kind: str = "shallow"
    source: str = ""
    rule: str = "attention"
    routers: dict[str, Router] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BankError(f"unknown bank kind {self.kind!r}; known kinds are {KINDS}")
        if len(self.names) != len(self.prompts):
            raise BankError(f"{len(self.names)} names for {len(self.prompts)} prompts")
        if not self.names:
            raise BankError("a bank needs at least one prompt")
        if self.rule not in RULES:
            raise BankError(f"unknown selection rule {self.rule!r}; known rules are {RULES}")
        if self.rule != "attention" and self.rule not in self.routers:
            raise BankError(f"selection rule {self.rule!r} needs its routing data")
        for rule, r in self.routers.items():
            if rule not in ROUTER_RULES:
                raise BankError(f"routing data for unknown rule {rule!r}; known: {ROUTER_RULES}")
            if r.weight.ndim != 2 or r.weight.shape[0] != len(self.names) or \
                    r.center.shape != r.weight.shape[1:] or r.bias.shape != r.weight.shape[:1]:
                raise BankError(f"{rule} routing data of shape {list(r.weight.shape)} (center "
                                f"{list(r.center.shape)}, bias {list(r.bias.shape)}) does not "
                                f"fit {len(self.names)} prompts")
        if len(set(self.names)) != len(self.names):
            raise BankError(f"duplicate prompt names: {self.names}")
        for name, p in zip(self.names, self.prompts, strict=True):
            if name in RESERVED_SELECTIONS or not _NAME.match(name):
                raise BankError(
                    f"bad prompt name {name!r}: use [A-Za-z0-9_.-], at most 64 characters, "
                    f"not one of {RESERVED_SELECTIONS}"
                )
            if self.kind == "shallow" and (p.ndim != 2 or p.shape[0] < 1):
                raise BankError(f"prompt {name!r} must be [n, d] with n >= 1, got {list(p.shape)}")
            if self.kind == "deep" and (p.ndim != 5 or p.shape[0] != 2 or p.shape[3] < 1):
                raise BankError(
                    f"deep prompt {name!r} must be [2, layers, kv_heads, n, head_dim] with "
                    f"n >= 1, got {list(p.shape)}"
                )
        layouts = {self._layout_of(p) for p in self.prompts}
        if len(layouts) != 1:
            what = "hidden sizes" if self.kind == "shallow" else "layers, KV heads or head sizes"
            raise BankError(f"prompts have different {what}: {sorted(layouts)}")

    def _layout_of(self, p: Tensor) -> tuple[int, ...]:
        return (int(p.shape[1]),) if self.kind == "shallow" else (*map(int, p.shape[1:3]),
                                                                  int(p.shape[4]))

    @property
    def layout(self) -> dict[str, int]:
        """The shape every prompt shares besides its length (what the model must match)."""
        shape = self._layout_of(self.prompts[0])
        if self.kind == "shallow":
            return {"hidden_size": shape[0]}
        return dict(zip(("num_layers", "num_kv_heads", "head_dim"), shape, strict=True))

    @property
    def hidden_size(self) -> int | None:
        return self.layout.get("hidden_size")

    @property
    def lengths(self) -> list[int]:
        return [int(p.shape[0] if self.kind == "shallow" else p.shape[3]) for p in self.prompts]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.prompts)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown prompt {name!r}; the bank has {self.names}") from None

    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "names": self.names,
            "lengths": self.lengths,
            **self.layout,
            "num_parameters": self.num_parameters,
            "fingerprint": self.fingerprint,
            "rule": self.rule,
            "routing": {**self.routing, "names": self.names, "fingerprint": self.fingerprint,
                        "rules": {k: {"normalize": r.normalize} for k, r in self.routers.items()}}
            if self.routers else None,
            "training": self.training,
        }

    def save(self, folder: str | Path) -> Path:
        """Write bank.safetensors and manifest.json into `folder` (created if missing).

        Each file is written beside its final name and renamed into place, so a crash never
        leaves a half-written file under the real name.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"prompt.{n}": p.detach().to("cpu", torch.float32).contiguous()
            for n, p in zip(self.names, self.prompts, strict=True)
        }
        for rule, r in self.routers.items():
            for part in ("center", "weight", "bias"):
                tensors[f"routing.{rule}.{part}"] = getattr(r, part).to("cpu", torch.float32)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "idp-bank"})
        tmp.replace(folder / WEIGHTS_FILE)
        tmp = folder / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        tmp.replace(folder / MANIFEST_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> PromptBank:
        """Read a bank written by `save`; every problem raises BankError naming the file."""
        folder = Path(folder)
        manifest_path, weights_path = folder / MANIFEST_FILE, folder / WEIGHTS_FILE
        if not folder.is_dir():
            raise BankError(f"{folder}: bank folder not found")
        if not manifest_path.is_file():
            raise BankError(f"{manifest_path}: manifest missing")
        if not weights_path.is_file():
            raise BankError(f"{weights_path}: prompt weights missing")
        try:
            manifest = json.loads(manifest_path.read_text())
            names, lengths = list(manifest["names"]), list(manifest["lengths"])
            kind = manifest.get("kind", "shallow")  # format 1 had shallow prompts only
            if kind == "shallow":
                layout: tuple[int, ...] = (int(manifest["hidden_size"]),)
            elif kind == "deep":
                layout = tuple(int(manifest[k]) for k in ("num_layers", "num_kv_heads",
                                                          "head_dim"))
            else:
                raise BankError(f"{manifest_path}: unknown bank kind {kind!r}; known: {KINDS}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if isinstance(e, BankError):
                raise
            raise BankError(f"{manifest_path}: invalid manifest ({type(e).__name__}: {e})") from e
        try:
            tensors = load_file(str(weights_path))  # safetensors only: nothing is unpickled
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BankError(f"{weights_path}: corrupt or truncated safetensors file ({e})") from e
        if len(names) != len(lengths):
            raise BankError(f"{manifest_path}: {len(names)} names but {len(lengths)} lengths")
        prompts = []
        for name, n in zip(names, lengths, strict=True):
            p = tensors.get(f"prompt.{name}")
            if p is None:
                raise BankError(f"{weights_path}: no tensor for prompt {name!r}")
            want = (n, *layout) if kind == "shallow" else (2, *layout[:2], n, layout[2])
            if tuple(p.shape) != want:
                raise BankError(
                    f"{weights_path}: prompt {name!r} has shape {list(p.shape)}, "
                    f"manifest says {list(want)}"
                )
            prompts.append(p)
        routers, routing = {}, dict(manifest.get("routing") or {})
        if routing:
            # Routing data made for other prompts or another model is refused, not guessed at.
            if routing.get("names") != names:
                raise BankError(f"{manifest_path}: routing data is for prompts "
                                f"{routing.get('names')}, the bank has {names}")
            if routing.get("fingerprint") != manifest.get("fingerprint"):
                raise BankError(f"{manifest_path}: routing data was made for another model")
            for rule, spec in (routing.pop("rules", None) or {}).items():
                parts = [tensors.get(f"routing.{rule}.{p}") for p in ("center", "weight", "bias")]
                if any(p is None for p in parts):
                    raise BankError(f"{weights_path}: routing tensors of rule {rule!r} missing")
                routers[rule] = Router(*parts, normalize=bool(spec.get("normalize")))
        try:
            return cls(names, prompts, manifest.get("fingerprint"), manifest.get("training", {}),
                       kind=kind, source=str(folder), rule=manifest.get("rule", "attention"),
                       routers=routers,
                       routing={k: v for k, v in routing.items()
                                if k not in ("names", "fingerprint")})
        except BankError as e:
            raise BankError(f"{manifest_path}: {e}") from e

    def check_model(self, fp: Fingerprint, *, strict: bool = False, origin: str = "bank") -> None:
        """Refuse a model of another shape; warn (or refuse if strict) on other weights.

        Deep prompts' heads and head size are checked against the model's config when their
        KV is stored (`kv.precompute_prompt_kv`).
        """
        if self.kind == "shallow" and self.hidden_size != fp.hidden_size:
            raise BankError(
                f"{origin}: prompts have hidden size {self.hidden_size}, "
                f"the model has {fp.hidden_size}"
            )
        if self.kind == "deep" and self.layout["num_layers"] != fp.num_layers:
            raise BankError(
                f"{origin}: deep prompts have {self.layout['num_layers']} layers, "
                f"the model has {fp.num_layers}"
            )
        if self.fingerprint is None:
            msg = f"{origin}: no model fingerprint recorded; cannot check it matches the model"
        elif self.fingerprint != fp.to_dict():
            diff = sorted(
                k for k, v in fp.to_dict().items() if (self.fingerprint or {}).get(k) != v
            )
            msg = f"{origin}: trained on other model weights (differs in {', '.join(diff)})"
        else:
            return
        if strict:
            raise BankError(msg)
        log.warning("WARNING %s", msg)
