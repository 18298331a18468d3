"""`idp bench` end to end on a tiny model: every benchmark runs and writes its JSON, table and
plot with the structure the docs read. No timing is asserted (benchmarks measure, tests don't)."""

import json

import pytest
from servers import write_tiny_artefacts

from idp_core.lab.cli import main


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    return write_tiny_artefacts(tmp_path_factory.mktemp("bench"))


@pytest.mark.parametrize("which,extra", [
    ("latency", ["--lengths", "8", "--generate-lengths", "8", "--new-tokens", "2",
                 "--lora-ranks", "2", "--lora-fp32-ranks", "2"]),
    ("selection", ["--seq-len", "8", "--batch-sizes", "1", "2", "--bank-sizes", "2", "3"]),
    ("selection", ["--seq-len", "8", "--batch-sizes", "2", "--bank-sizes", "3",
                   "--rule", "centroid"]),
    ("prefix", ["--seq-len", "8"]),
    ("profile", ["--seq-len", "8", "--lora-ranks", "2"]),
])
def test_bench_writes_json_table_and_plot(artefacts, tmp_path, which, extra):
    out = tmp_path / which
    code = main(["bench", which, "--model", str(artefacts["model"]), "--bank",
                 str(artefacts["bank"]), "--dtype", "float32", "--batch", "2", "--repeats", "1",
                 "--warmup", "0", "--out", str(out), *extra])
    assert code == 0
    result = json.loads((out / f"{which}.json").read_text())
    assert result["env"]["device"] == "cpu" and result["records"]
    assert (out / f"{which}.md").read_text().startswith("|")
    assert (out / f"{which}.png").stat().st_size > 1000
    if which == "selection":
        want = extra[extra.index("--rule") + 1] if "--rule" in extra else "attention"
        assert {r["rule"] for r in result["records"]} == {want}
    if which == "latency":
        base = [r for r in result["records"] if r["variant"] == "none"]
        assert all(r["ratio_to_none"] == 1.0 for r in base)
        assert {r["lora"] for r in result["idp_over_lora"]} == {"lora-r2", "lora-r2-fp32"}
        assert {r["variant"] for r in result["records"]} >= {"prompt:p1", "deep:p1"}
    if which == "profile":
        assert [r["variant"] for r in result["records"]] == ["none", "prompt:p1", "idp",
                                                             "lora-r2"]


def test_random_weights_keep_the_architecture_not_the_weights(artefacts, tmp_path):
    """--random-weights: the checkpoint's shapes and tokenizer, fresh weights (a GPU timing run
    where the checkpoint cannot travel); the bench runs on it as on the real one."""
    from idp_core.lab.bench import random_model
    from idp_core.model import load_model

    real = load_model(artefacts["model"], dtype="float32")
    fake = random_model(artefacts["model"], dtype="float32", device="cpu")
    shapes = {n: p.shape for n, p in real.model.named_parameters()}
    assert {n: p.shape for n, p in fake.model.named_parameters()} == shapes
    assert fake.fingerprint.weights_sha256 != real.fingerprint.weights_sha256
    assert fake.tokenizer("hello").input_ids == real.tokenizer("hello").input_ids
    out = tmp_path / "rw"
    assert main(["bench", "prefix", "--random-weights", "--model", str(artefacts["model"]),
                 "--bank", str(artefacts["bank"]), "--dtype", "float32", "--batch", "2",
                 "--repeats", "1", "--warmup", "0", "--seq-len", "8", "--out", str(out)]) == 0
    assert "random weights" in json.loads((out / "prefix.json").read_text())["env"]["model"]
