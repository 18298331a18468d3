"""PromptBank: m named soft prompts [n_i, d], stored as bank.safetensors + manifest.json."""

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
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class BankError(ValueError):
    """A bank that cannot be used: the message names the file and the problem."""


@dataclass
class PromptBank:
    """Soft prompts in input-embedding space; prompt i is a float tensor [n_i, d].

    Attributes:
        names: unique prompt names (never one of the reserved selections).
        prompts: one [n_i, d] tensor per name.
        fingerprint: the model the prompts were trained on, as a dict (None if unknown).
        training: free-form training metadata (data, tokens, steps, lr, loss curve, ...).
    """

    names: list[str]
    prompts: list[Tensor]
    fingerprint: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.prompts):
            raise BankError(f"{len(self.names)} names for {len(self.prompts)} prompts")
        if not self.names:
            raise BankError("a bank needs at least one prompt")
        if len(set(self.names)) != len(self.names):
            raise BankError(f"duplicate prompt names: {self.names}")
        for name, p in zip(self.names, self.prompts, strict=True):
            if name in RESERVED_SELECTIONS or not _NAME.match(name):
                raise BankError(
                    f"bad prompt name {name!r}: use [A-Za-z0-9_.-], at most 64 characters, "
                    f"not one of {RESERVED_SELECTIONS}"
                )
            if p.ndim != 2 or p.shape[0] < 1:
                raise BankError(f"prompt {name!r} must be [n, d] with n >= 1, got {list(p.shape)}")
        dims = {p.shape[1] for p in self.prompts}
        if len(dims) != 1:
            raise BankError(f"prompts have different hidden sizes: {sorted(dims)}")

    @property
    def hidden_size(self) -> int:
        return int(self.prompts[0].shape[1])

    @property
    def lengths(self) -> list[int]:
        return [int(p.shape[0]) for p in self.prompts]

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
            "names": self.names,
            "lengths": self.lengths,
            "hidden_size": self.hidden_size,
            "num_parameters": self.num_parameters,
            "fingerprint": self.fingerprint,
            "training": self.training,
        }

    def save(self, folder: str | Path) -> Path:
        """Write bank.safetensors and manifest.json into `folder` (created if missing)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"prompt.{n}": p.detach().to("cpu", torch.float32).contiguous()
            for n, p in zip(self.names, self.prompts, strict=True)
        }
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "idp-bank"})
        (folder / MANIFEST_FILE).write_text(json.dumps(self.manifest(), indent=2) + "\n")
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
            hidden = int(manifest["hidden_size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
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
            if tuple(p.shape) != (n, hidden):
                raise BankError(
                    f"{weights_path}: prompt {name!r} has shape {list(p.shape)}, "
                    f"manifest says [{n}, {hidden}]"
                )
            prompts.append(p)
        try:
            return cls(names, prompts, manifest.get("fingerprint"), manifest.get("training", {}))
        except BankError as e:
            raise BankError(f"{manifest_path}: {e}") from e

    def check_model(self, fp: Fingerprint, *, strict: bool = False, origin: str = "bank") -> None:
        """Refuse a model of another hidden size; warn (or refuse if strict) on other weights."""
        if self.hidden_size != fp.hidden_size:
            raise BankError(
                f"{origin}: prompts have hidden size {self.hidden_size}, "
                f"the model has {fp.hidden_size}"
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
