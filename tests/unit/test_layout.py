"""The package layout the README promises: the server never imports the lab."""

import ast
import subprocess
import sys

from idp_core import paths
from idp_core.lab.artefacts import DEFAULT_COMPRESS


def test_server_imports_no_lab_module():
    code = ("import sys, server.app, server.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('idp_core.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=paths.REPO).stdout.strip()
    assert out == "[]"


def test_no_server_module_has_a_lab_import_statement():
    for path in sorted((paths.REPO / "server").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith("idp_core.lab")], path


def test_default_model_name_matches_the_recipe():
    assert paths.DEFAULT_MODEL_NAME == f"SmolLM2-135M-Instruct-{DEFAULT_COMPRESS.label()}"


def test_cli_eval_verbs_and_their_old_spellings():
    from idp_core.lab.cli import canonical

    assert canonical(["eval", "tasks", "--limit", "2"]) == ["eval-tasks", "--limit", "2"]
    assert canonical(["-v", "eval", "ppl", "--bank", "b"]) == ["-v", "eval-ppl", "--bank", "b"]
    assert canonical(["eval", "--tasks", "arc"]) == ["eval-tasks", "--tasks", "arc"]
    assert canonical(["evaluate", "--max-windows", "2"]) == ["eval-ppl", "--max-windows", "2"]
    assert canonical(["bench", "latency", "--out", "eval"]) == ["bench", "latency", "--out", "eval"]
