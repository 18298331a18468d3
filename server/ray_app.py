"""The server as a Ray Serve deployment: each replica loads the model and bank once, pins the
prompt KV and serves the same FastAPI app (server/app.py) behind Serve's HTTP proxy.

Imports Ray: only `idp serve-ray` (server/ray_cli.py) and Serve config files load this module.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve import metrics as ray_metrics
from ray.serve.deployment import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.app import build_app, load_state, resolve_sources
from server.metrics import Metrics
from server.settings import ReplicaSettings, Settings

DEPLOYMENT = "IDPServer"
REPLICA_HEADER = "x-idp-replica"


class ReplicaMetrics(Metrics):
    """The server's metrics, each also recorded as a Ray Serve metric of the same name.

    Ray's per-node metrics agent exports the Ray twins to Prometheus with the labels
    `application`, `deployment` and `replica` added by Serve, so every replica's `idp_*` series
    reach one scrape target per node (deploy/ray/prometheus.yml). The replica's own /metrics
    keeps the prometheus-client registry, as in the plain server.
    """

    def __init__(self, model: str, default_method: str, registry: Any = None) -> None:
        super().__init__(model, default_method, registry)
        for attr, metric in list(vars(self).items()):
            twin = _ray_twin(metric)
            if twin is not None:
                setattr(self, attr, _Both(metric, twin))
        self.running.labels(model, default_method).set(0)
        self.waiting.labels(model, default_method).set(0)


def _ray_twin(metric: Any) -> Any:
    """A Ray Serve Counter / Gauge / Histogram named and labelled like a prometheus-client
    metric (whose label names and buckets prometheus-client keeps in `_labelnames` and
    `_upper_bounds`); None for anything else."""
    kind = type(metric).__name__
    if kind not in ("Counter", "Gauge", "Histogram"):
        return None
    name, doc, labels = metric._name, metric._documentation, tuple(metric._labelnames)
    if kind == "Histogram":
        bounds = [b for b in metric._upper_bounds if b != float("inf")]
        return ray_metrics.Histogram(name, doc, boundaries=bounds, tag_keys=labels)
    return getattr(ray_metrics, kind)(name, doc, tag_keys=labels)


class _Both:
    """prometheus-client's `metric.labels(...).observe/inc/set` API, writing to both metrics."""

    def __init__(self, prom: Any, twin: Any) -> None:
        self.prom, self.twin, self.names = prom, twin, tuple(prom._labelnames)

    def labels(self, *values: str) -> _BothChild:
        return _BothChild(self.prom.labels(*values), self.twin,
                          dict(zip(self.names, values, strict=True)))


class _BothChild:
    def __init__(self, prom: Any, twin: Any, tags: dict[str, str]) -> None:
        self.prom, self.twin, self.tags = prom, twin, tags

    def observe(self, value: float) -> None:
        self.prom.observe(value)
        self.twin.observe(value, tags=self.tags)

    def inc(self, value: float = 1.0) -> None:
        self.prom.inc(value)
        self.twin.inc(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.prom.set(value)
        self.twin.set(value, tags=self.tags)


class ReplicaHeader:
    """Adds `x-idp-replica: <Serve replica id>` to every response: which replica answered."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, send_tagged if scope["type"] == "http" else send)


@serve.ingress()
class IDPServer:
    """One replica: the model, bank and prompt KV loaded before Serve routes it any request."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        # Off the replica's event loop; an error here fails the replica's start (Serve reports
        # it and retries), where the plain server would exit.
        self.state = await asyncio.to_thread(load_state, self.settings,
                                             metrics_class=ReplicaMetrics)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app = build_app(self.settings, state=self.state)
        replica = serve.get_replica_context().replica_id.unique_id
        app.add_middleware(ReplicaHeader, replica=replica)  # type: ignore[arg-type]
        return app


def deployment_options(settings: Settings, replicas: ReplicaSettings) -> dict[str, Any]:
    """Serve's options for the deployment: autoscaling, per-replica concurrency, resources and
    the drain on shutdown (Serve stops routing to a stopping replica and waits for its
    in-flight requests up to graceful_shutdown_timeout_s)."""
    gpus = replicas.gpus_per_replica
    if gpus < 0:
        gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    return {
        "name": DEPLOYMENT,
        "max_ongoing_requests": replicas.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": replicas.min_replicas,
            "max_replicas": replicas.max_replicas,
            "target_ongoing_requests": replicas.target_ongoing_requests,
            "upscale_delay_s": replicas.upscale_delay_s,
            "downscale_delay_s": replicas.downscale_delay_s,
            "look_back_period_s": replicas.look_back_period_s,
            "metrics_interval_s": replicas.metrics_interval_s,
        },
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "ray_actor_options": {"num_cpus": replicas.cpus_per_replica, "num_gpus": gpus},
    }


def build(settings: Settings, replicas: ReplicaSettings) -> Application:
    """The Serve application; ValueError / FileNotFoundError (one line) for settings that
    cannot work, before anything starts."""
    replicas.check()
    resolve_sources(settings)
    deployment = serve.deployment(IDPServer).options(**deployment_options(settings, replicas))
    return deployment.bind(settings.model_dump())


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder (`import_path: server.ray_app:app_builder` in a Serve config
    file, deploy/ray/serve_config.yaml): `args` holds fields of Settings and ReplicaSettings;
    IDP_* and IDP_RAY_* variables fill the rest."""
    server_fields, replica_fields = Settings.model_fields, ReplicaSettings.model_fields
    unknown = sorted(set(args) - set(server_fields) - set(replica_fields))
    if unknown:
        raise ValueError(f"unknown args {unknown}: expected fields of server.settings.Settings "
                         "or ReplicaSettings")
    settings = Settings(**{k: v for k, v in args.items() if k in server_fields})
    replicas = ReplicaSettings(**{k: v for k, v in args.items() if k in replica_fields})
    return build(settings, replicas)
