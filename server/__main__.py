"""`python -m server` / `idp serve`: Settings (env IDP_* or flags) -> uvicorn.run(build_app())."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import uvicorn

from server.settings import Settings

log = logging.getLogger("server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (--max-batch-size ...); unset flags fall back to IDP_* / defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=field.description)
        else:
            parser.add_argument(flag, dest=name, default=None, help=field.description)


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /health and new requests get 503 while in-flight ones finish."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        serving = self.config.app.state.serving
        if serving is not None:
            serving.scheduler.draining = True
        super().handle_exit(sig, frame)


def run(args: argparse.Namespace) -> int:
    fields = Settings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    settings = Settings(**overrides)
    from server.app import build_app, resolve_sources

    try:
        resolve_sources(settings)  # fail fast, with one line, on paths that do not exist
    except FileNotFoundError as e:
        log.error("cannot start: %s", e)
        return 2
    app = build_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=int(settings.drain_timeout_s))
    # uvicorn re-raises the captured signal after its graceful shutdown; with this handler in
    # place that is a no-op, so a drained SIGTERM exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    _DrainingServer(config).run()
    log.info("drained and stopped")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
