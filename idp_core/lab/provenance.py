"""Where a result came from: the git commit and the machine, recorded beside every benchmark,
load run and report."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from idp_core.paths import REPO


def git_commit(*, ignore: str | Path | None = None, repo: Path = REPO) -> str:
    """HEAD of this repository; the full hash gets "+uncommitted" when tracked files changed,
    other than under `ignore` (a run's own output folder, whose tracked records the run itself
    rewrites). "unknown" without git or outside a checkout."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, check=True,
                              cwd=repo).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        spec = ["--", "."]
        if ignore is not None and Path(ignore).resolve().is_relative_to(repo.resolve()):
            spec.append(f":(exclude){Path(ignore).resolve().relative_to(repo.resolve())}")
        if git("status", "--porcelain", "--untracked-files=no", *spec):
            commit += "+uncommitted"
        return commit
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """Date, machine, torch and the git commit a benchmark ran at."""
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": torch.get_num_threads(), "torch": torch.__version__,
            "git_commit": git_commit()}


def files_sha256(folder: str | Path, pattern: str = "*") -> str:
    """One hash of a folder's files (names and bytes) matching `pattern`, e.g. a prompt bank,
    a LoRA adapter or a checkpoint's weights, so a result made with other artefacts under the
    same path is told apart."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()
