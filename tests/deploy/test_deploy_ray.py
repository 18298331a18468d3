"""deploy/ray/ checked offline: the Serve config against Serve's own schema and the builder's
fields, the KubeRay RayService against the CRD's schema kept in deploy/ray/schema/ (strict: an
unknown field fails, as `kubectl apply --validate=strict` would), and the Prometheus config.

The schema file is the v1 `openAPIV3Schema` of ray-operator/config/crd/bases/ray.io_rayservices.yaml
(github.com/ray-project/kuberay, commit in its `$comment`). To refresh it from a newer CRD
(then put the `$comment` back with the new commit):
    python -c "import json, sys, yaml; crd = yaml.safe_load(open(sys.argv[1]));
    v1 = next(v for v in crd['spec']['versions'] if v['name'] == 'v1');
    print(json.dumps(v1['schema']['openAPIV3Schema'], separators=(',', ':'), sort_keys=True))"
    ray.io_rayservices.yaml > deploy/ray/schema/rayservice-v1.json
kubernetes-validate knows only built-in kinds, so the CRD schema is applied with jsonschema.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from deploy_files import DEPLOY, REPO

from server.settings import ReplicaSettings, Settings

RAY = DEPLOY / "ray"
SERVE_CONFIG = RAY / "serve_config.yaml"
RAYSERVICE = RAY / "rayservice.yaml"
RAY_PROMETHEUS = RAY / "prometheus.yml"
CRD_SCHEMA = RAY / "schema" / "rayservice-v1.json"


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the fields of an object."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(manifest)]


def settings_of(args: dict[str, Any]) -> tuple[Settings, ReplicaSettings]:
    """What server.ray_app:app_builder makes of a config's args (without Ray)."""
    unknown = set(args) - set(Settings.model_fields) - set(ReplicaSettings.model_fields)
    assert not unknown, f"args the builder refuses: {unknown}"
    settings = Settings(**{k: v for k, v in args.items() if k in Settings.model_fields})
    replicas = ReplicaSettings(**{k: v for k, v in args.items()
                                  if k in ReplicaSettings.model_fields})
    replicas.check()
    return settings, replicas


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


def test_serve_config_is_valid_for_serve_and_the_builder(serve_config: dict[str, Any]) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "server.ray_app:app_builder" and app["route_prefix"] == "/"
    settings, replicas = settings_of(app["args"])
    # continuous batching needs room for a batch plus a queue in each replica
    assert replicas.max_ongoing_requests > settings.max_batch_size
    assert replicas.target_ongoing_requests <= settings.max_batch_size
    assert serve_config["http_options"]["request_timeout_s"] >= settings.request_timeout_s


def test_rayservice_matches_the_crd_schema(rayservice: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert crd_errors(rayservice) == []


def test_the_crd_check_catches_mistakes(rayservice: dict[str, Any]) -> None:
    typo = copy.deepcopy(rayservice)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop(
        "workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in crd_errors(typo))
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in crd_errors(wrong_type))


def test_rayservice_runs_the_serve_config_one_gpu_per_replica(
        rayservice: dict[str, Any], serve_config: dict[str, Any]) -> None:
    spec = rayservice["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(serve)
    assert serve["applications"] == serve_config["applications"]
    settings, replicas = settings_of(serve["applications"][0]["args"])
    assert settings.device == "cuda" and replicas.gpus_per_replica == 1

    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the head pod
    (gpu,) = cluster["workerGroupSpecs"]
    (worker,) = gpu["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert worker["resources"][kind]["nvidia.com/gpu"] == 1
    # one replica per GPU worker pod: the group can hold max_replicas of them
    assert gpu["maxReplicas"] >= replicas.max_replicas >= gpu["minReplicas"] >= 1
    assert float(worker["resources"]["limits"]["cpu"]) >= replicas.cpus_per_replica
    assert cluster["enableInTreeAutoscaling"] is True

    from server.ray_cli import PROXY_CALLBACK

    for container in [*head["template"]["spec"]["containers"], worker]:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000 and ports["metrics"] == 8080
    for group in (head, gpu):
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_the_worker_pods_share_a_cache_claim_they_can_write(rayservice: dict[str, Any]) -> None:
    # before: the manifest mounted a claim nothing created, so no worker pod could start
    (gpu,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = gpu["template"]["spec"]
    (volume,) = pod["volumes"]
    (worker,) = pod["containers"]
    assert {m["name"]: m["mountPath"] for m in worker["volumeMounts"]} == {volume["name"]:
                                                                           "/app/.cache"}
    pvc = yaml.safe_load((RAY / "idp-cache-pvc.yaml").read_text())
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes at once
    assert "kubectl apply -f deploy/ray/idp-cache-pvc.yaml" in RAYSERVICE.read_text()
    user = next(line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines()
                if line.startswith("USER "))
    assert pod["securityContext"]["fsGroup"] == int(user.split(":")[1])  # the image's group


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_ray_prometheus_config() -> None:
    out = subprocess.run(["promtool", "check", "config", str(RAY_PROMETHEUS)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    (ray_job,) = [j for j in yaml.safe_load(RAY_PROMETHEUS.read_text())["scrape_configs"]
                  if j["job_name"] == "ray"]
    assert ray_job["file_sd_configs"][0]["files"] == [
        "/tmp/ray/prom_metrics_service_discovery.json"]


def _serve_ray(*args: str, hide_ray: bool = False) -> subprocess.CompletedProcess[str]:
    """`idp serve-ray ARGS` in a subprocess; `hide_ray`: as if the extra were not installed."""
    import sys

    code = ("import sys; " + ("sys.modules['ray'] = None; " if hide_ray else "")
            + "from idp_core.lab.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "serve-ray", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "says"), [
    (("--min-replicas", "3", "--max-replicas", "2"), "max_replicas (2) is below min_replicas (3)"),
    (("--min-replicas", "0"), "min_replicas must be at least 1, got 0"),
    (("--target-ongoing-requests", "0"), "target_ongoing_requests must be above 0"),
    (("--max-ongoing-requests", "4", "--target-ongoing-requests", "8"),
     "max_ongoing_requests (4) is below target_ongoing_requests (8.0)"),
    (("--max-replicas", "many"), "max_replicas: Input should be a valid integer"),
    (("--model", "/nonexistent/model"), "model not found: /nonexistent/model"),
])
def test_settings_that_cannot_work_are_refused_with_one_line(args: tuple[str, ...],
                                                             says: str) -> None:
    out = _serve_ray(*args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and says in lines[0], out.stderr


def test_without_ray_one_line_names_the_extra_and_the_plain_server_needs_none() -> None:
    out = _serve_ray(hide_ray=True)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "pip install -e '.[ray]'" in lines[0]
    import sys

    plain = subprocess.run([sys.executable, "-c", (
        "import sys; sys.modules['ray'] = None; import server.__main__, server.app, "
        "server.routes, server.ray_proxy, server.ray_cli; from server.app import build_app; "
        "from server.settings import Settings; build_app(Settings())")],
        capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
