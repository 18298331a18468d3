"""Bank save/load round trip and clear errors for bad banks."""

import json
import logging

import pytest
import torch

from idp_core.bank import MANIFEST_FILE, WEIGHTS_FILE, BankError, PromptBank
from idp_core.config import GenConfig, TrainConfig
from idp_core.model import Fingerprint


def test_round_trip(tmp_path, tiny_bank):
    tiny_bank.save(tmp_path / "b")
    loaded = PromptBank.load(tmp_path / "b")
    assert loaded.names == tiny_bank.names
    for a, b in zip(loaded.prompts, tiny_bank.prompts, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert loaded.fingerprint == tiny_bank.fingerprint
    assert loaded.training == tiny_bank.training
    manifest = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    assert manifest["lengths"] == [3, 7, 5] and manifest["num_parameters"] == 15 * 64


def test_missing_manifest_names_the_file(tmp_path, tiny_bank):
    tiny_bank.save(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(BankError, match=f"{MANIFEST_FILE}: manifest missing"):
        PromptBank.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_name_the_file(tmp_path, tiny_bank, damage):
    tiny_bank.save(tmp_path)
    path = tmp_path / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(BankError, match=f"{WEIGHTS_FILE}: corrupt or truncated"):
        PromptBank.load(tmp_path)


def test_manifest_shape_mismatch(tmp_path, tiny_bank):
    tiny_bank.save(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["lengths"][0] = 4
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    msg = r"prompt 'p0' has shape \[3, 64\], manifest says \[4, 64\]"
    with pytest.raises(BankError, match=msg):
        PromptBank.load(tmp_path)


def test_wrong_hidden_size_is_an_error(tiny, tiny_bank):
    fp = Fingerprint(**{**tiny.fingerprint.to_dict(), "hidden_size": 128})
    with pytest.raises(BankError, match="hidden size 64, the model has 128"):
        tiny_bank.check_model(fp, origin="prompts/x")


def test_fingerprint_mismatch_warns_or_refuses(tiny, tiny_bank, caplog):
    fp = Fingerprint(**{**tiny.fingerprint.to_dict(), "weights_sha256": "0" * 64})
    with caplog.at_level(logging.WARNING):
        tiny_bank.check_model(fp)
    assert "differs in weights_sha256" in caplog.text
    with pytest.raises(BankError, match="other model weights"):
        tiny_bank.check_model(fp, strict=True)
    tiny_bank.check_model(tiny.fingerprint, strict=True)  # the right model passes


def test_bad_names_and_shapes():
    with pytest.raises(BankError, match="reserved|bad prompt name"):
        PromptBank(["auto"], [torch.zeros(2, 4)])
    with pytest.raises(BankError, match="duplicate"):
        PromptBank(["a", "a"], [torch.zeros(2, 4), torch.zeros(2, 4)])
    with pytest.raises(BankError, match="different hidden sizes"):
        PromptBank(["a", "b"], [torch.zeros(2, 4), torch.zeros(2, 5)])


def test_config_errors():
    with pytest.raises(ValueError, match="max_tokens"):
        GenConfig(max_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        GenConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenConfig(temperature=-0.1)
    with pytest.raises(ValueError, match="prompt_lengths"):
        TrainConfig(prompt_lengths=(0,))
