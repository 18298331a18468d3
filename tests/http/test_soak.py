"""A short soak past capacity (the long one is `idp soak`, see docs/reliability.md)."""

import argparse
import asyncio

from servers import RemoteServer

from idp_core.lab.soak import add_arguments, soak


def test_short_soak_past_capacity(artefacts):
    srv = RemoteServer("--model", str(artefacts["model"]), "--bank", str(artefacts["bank"]),
                       "--max-batch-size", "4", "--max-queue", "4")
    try:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--url", srv.url, "--clients", "24", "--duration-s", "10",
                                  "--max-tokens", "1", "8", "24", "--max-prompt-chars", "200",
                                  "--server-pid", str(srv.proc.pid), "--warmup-s", "3",
                                  "--sample-every-s", "1", "--timeout-s", "60"])
        summary = asyncio.run(soak(args))
    finally:
        srv.stop()
    assert summary["sent"] > 24
    assert summary["server_errors"] == 0 and summary["transport_errors"] == 0
    assert summary["completed"] + summary["refused"] == summary["sent"]
    assert summary["refused"] > 0  # past capacity: the bounded queue pushes back
    assert summary["refused_without_retry_after"] == 0
    proc = summary["process"]
    assert proc["fd_growth"] <= 2 and proc["thread_growth"] <= 2, proc
