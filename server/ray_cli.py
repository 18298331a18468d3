"""`idp serve-ray`: the server as replicas on Ray Serve (server/ray_app.py), autoscaled on load.

Every flag of `idp serve` (each replica's model, bank and batching) plus the replica flags of
ReplicaSettings. Starts a local one-node Ray unless --address names a cluster; SIGTERM or
SIGINT drains in-flight requests (graceful_shutdown_timeout_s = --drain-timeout-s) and stops.
Ray is imported only here and in server/ray_app.py, never by `idp serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from pydantic import ValidationError

from server.__main__ import add_arguments as add_server_arguments
from server.settings import ReplicaSettings, Settings

log = logging.getLogger("server.ray")

INSTALL_HINT = "Ray is not installed: install the extra, pip install -e '.[ray]'"
PROXY_CALLBACK = "server.ray_proxy:middlewares"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    for name, field in ReplicaSettings.model_fields.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            help=field.description)


def settings_from(args: argparse.Namespace) -> tuple[Settings, ReplicaSettings]:
    given = {k: v for k, v in vars(args).items() if v is not None}
    return (Settings(**{k: v for k, v in given.items() if k in Settings.model_fields}),
            ReplicaSettings(**{k: v for k, v in given.items()
                               if k in ReplicaSettings.model_fields}))


def one_line(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())


def start(settings: Settings, replicas: ReplicaSettings) -> Any:
    """Ray (local or joined), Serve's proxy on settings.host:port, and the application;
    returns once every initial replica has loaded."""
    import ray
    from ray import serve

    from server.ray_app import build

    app = build(settings, replicas)  # refuses bad settings before Ray starts
    # Ray's proxy hook: OpenAI-shaped errors from the proxy (workers inherit this variable
    # from a local Ray; on a cluster, set it where `ray start` runs).
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    if replicas.address:
        ray.init(address=replicas.address)
    else:
        ray.init(_metrics_export_port=replicas.metrics_export_port)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(app, name=replicas.app_name, route_prefix="/")


def run(args: argparse.Namespace) -> int:
    try:
        settings, replicas = settings_from(args)
        replicas.check()  # before Ray: bad settings are refused in a second, with one line
        from server.app import resolve_sources

        resolve_sources(settings)
    except ValidationError as e:
        log.error("cannot start: %s", one_line(e))
        return 2
    except (ValueError, FileNotFoundError) as e:
        log.error("cannot start: %s", e)
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        log.error("cannot start: %s", INSTALL_HINT)
        return 2
    from ray import serve

    try:
        start(settings, replicas)
    except (ValueError, FileNotFoundError) as e:
        log.error("cannot start: %s", e)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    log.info("serving %s on http://%s:%d with %d-%d replicas", replicas.app_name, settings.host,
             settings.port, replicas.min_replicas, replicas.max_replicas)
    stop.wait()
    log.info("draining: in-flight requests finish (up to %.0f s), then Serve stops",
             settings.drain_timeout_s)
    # Delete the application first: its replicas stop taking requests and finish their
    # in-flight ones while the proxy still streams them back (serve.shutdown alone stops the
    # proxy at once and cuts open streams).
    serve.delete(replicas.app_name)
    serve.shutdown()
    log.info("drained and stopped")
    return 0
