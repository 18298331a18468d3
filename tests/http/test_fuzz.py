"""Schemathesis fuzzes the OpenAPI schema against a real server: no 5xx, no hang.

The suite runs a bounded number of cases; `make fuzz` runs a few thousand.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from servers import RemoteServer, write_tiny_artefacts

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def short_context_server(tmp_path_factory):
    """Context 48, so any max_tokens the fuzzer picks finishes quickly."""
    art = write_tiny_artefacts(tmp_path_factory.mktemp("fuzz"), max_context=48)
    srv = RemoteServer("--model", str(art["model"]), "--bank", str(art["bank"]),
                       "--served-model-name", "tiny")
    yield srv
    srv.stop()


def run_schemathesis(url: str, max_examples: int, workdir: Path) -> tuple[int, str]:
    cli = Path(sys.executable).with_name("schemathesis")
    proc = subprocess.run(
        [str(cli), "run", url + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", str(max_examples), "--request-timeout", "120", "--seed", "1",
         "--phases", "examples,coverage,fuzzing", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=workdir,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_fuzz_finds_no_server_errors(short_context_server, tmp_path, pytestconfig):
    examples = pytestconfig.getoption("--fuzz-examples")
    code, out = run_schemathesis(short_context_server.url, examples, tmp_path)
    print(out[-1500:])  # the summary: cases generated, failures
    assert code == 0, out[-4000:]
    generated = int(re.search(r"(\d+) generated", out).group(1))
    assert generated >= 300, out[-2000:]
    # still serving, and the server saw no unhandled error
    assert httpx.get(short_context_server.url + "/health").status_code == 200
    metrics = httpx.get(short_context_server.url + "/metrics").text
    assert 'type="internal"' not in metrics and 'type="engine_error"' not in metrics
