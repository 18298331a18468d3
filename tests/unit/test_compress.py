"""`idp compress` on a tiny random model: end to end, reload, quantization grid, sparsity; and
perplexity through the engine against a plain forward over each window."""

import json
import math

import pytest
import torch
from tiny import tiny_llama

from idp_core.generate import Engine
from idp_core.lab.compress import REPORT_FILE, CompressConfig, compress, is_done
from idp_core.lab.evaluate import perplexity, windows
from idp_core.model import load_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAST = {"num_samples": 4, "seq_len": 64, "eval_windows": 1, "eval_seq_len": 64}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    lm = tiny_llama(seed=3)
    folder = tmp_path_factory.mktemp("tiny-model")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def linear_weights(model):
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LINEARS
    }


@pytest.fixture(scope="module")
def gptq3(tiny_folder, tmp_path_factory):
    config = CompressConfig(method="gptq", bits=3, group_size=16, **FAST)
    return config, compress(tiny_folder, tmp_path_factory.mktemp("gptq") / "q", config)


def test_gptq_end_to_end_reloads_on_the_grid(tiny_folder, gptq3):
    config, out = gptq3
    lm = load_model(out, dtype="float32")
    assert lm.kind == "compressed-tensors" and lm.dequantized
    original = linear_weights(load_model(tiny_folder, dtype="float32").model)
    quantized = linear_weights(lm.model)
    assert quantized.keys() == original.keys() and len(quantized) == 2 * len(LINEARS)
    for name, w in quantized.items():
        assert not torch.equal(w, original[name]), name
        groups = w.reshape(w.shape[0], -1, 16)  # [out, in / group, group]
        distinct = torch.tensor([row.unique().numel() for row in groups.flatten(0, 1)])
        assert distinct.max() <= 2**3, name
        assert distinct.float().mean() > 4, name  # the grid is used, not collapsed
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == "gptq" and report["bits"] == 3
    assert report["group_size"] == 16
    assert report["calibration"]["num_tokens"] == 4 * 64
    assert report["library"]["llmcompressor"]
    assert math.isfinite(report["perplexity"]["before"])
    assert math.isfinite(report["perplexity"]["after"])
    assert report["fingerprint"]["float32"] == lm.fingerprint.to_dict()
    assert report["fingerprint"]["bfloat16"] == load_model(out).fingerprint.to_dict()
    # dequantized in float32 then rounded: one fingerprint whatever the load dtype
    assert report["fingerprint"]["bfloat16"] == report["fingerprint"]["float32"]


@pytest.mark.parametrize("mask", ["unstructured", "2:4"])
def test_sparsegpt_prunes_to_the_requested_sparsity(tiny_folder, tmp_path, mask):
    config = CompressConfig(method="sparsegpt", sparsity=0.5, mask=mask, **FAST)
    out = compress(tiny_folder, tmp_path / "s", config)
    lm = load_model(out, dtype="float32")
    for name, w in linear_weights(lm.model).items():
        zero = (w == 0).float()
        assert zero.mean().item() == pytest.approx(0.5, abs=0.01), name
        if mask == "2:4":
            assert (zero.reshape(w.shape[0], -1, 4).sum(-1) >= 2).all(), name


def test_compress_is_restartable(tiny_folder, gptq3):
    config, out = gptq3
    assert is_done(out, config, str(tiny_folder))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert compress(tiny_folder, out, config) == out  # skipped: same recipe and source
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not is_done(out, CompressConfig(bits=4, group_size=16, **FAST), str(tiny_folder))
    assert not is_done(out, config, "another-model")


def test_gptq_rebuild_is_bit_identical(tiny_folder, gptq3, tmp_path):
    """The default model is rebuilt on each machine: the same recipe must give the same weights."""
    config, out = gptq3
    again = compress(tiny_folder, tmp_path / "again", config)
    assert load_model(again).fingerprint == load_model(out).fingerprint


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"method": "awq"}, "method"), ({"bits": 1}, "bits"), ({"sparsity": 1.0}, "sparsity"),
     ({"mask": "2:4", "sparsity": 0.6}, "sparsity"), ({"mask": "4:8"}, "mask"),
     ({"num_samples": 0}, "num_samples")],
)
def test_compress_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompressConfig(**kwargs)


@torch.no_grad()
def reference_perplexity(lm, ids, *, seq_len, max_windows, prefix=None):
    """Plain model forward over each window ([prefix; window]), no engine, no cache."""
    nll, count = 0.0, 0
    emb = lm.model.get_input_embeddings()
    n = 0 if prefix is None else prefix.shape[0]
    for w in windows(ids, seq_len=seq_len, max_windows=max_windows):
        x = emb(w)
        if prefix is not None:
            x = torch.cat([prefix, x])
        logp = torch.log_softmax(lm.model(inputs_embeds=x[None]).logits[0].float(), -1)
        nll -= logp[n : n + seq_len - 1].gather(1, w[1:, None]).sum().item()
        count += seq_len - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("selection", ["none", "p1", "concat"])
def test_perplexity_through_engine_equals_plain_forward(tiny, tiny_bank, tiny_store, selection):
    ids = torch.randint(0, 256, (7 * 40 + 5,), generator=torch.Generator().manual_seed(0))
    engine = Engine(tiny, tiny_store)
    got = perplexity(engine, ids, selection=selection, seq_len=40, max_windows=6, batch_size=4)
    prefix = {"none": None, "p1": tiny_bank.prompts[1], "concat": torch.cat(tiny_bank.prompts)}
    want = reference_perplexity(tiny, ids, seq_len=40, max_windows=6, prefix=prefix[selection])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_self_generated_calibration_is_seeded_model_text():
    """Data-free calibration: rows start at BOS, are sampled by the model (seed per row), and
    the same call gives the same tokens; a tokenizer without BOS is refused."""
    from idp_core.lab.compress import self_generated_chunks

    lm = tiny_llama(seed=3)
    with pytest.raises(ValueError, match="no BOS token"):
        self_generated_chunks(lm, num_samples=2, seq_len=8)
    lm.tokenizer.bos_token = lm.tokenizer.eos_token
    chunks = self_generated_chunks(lm, num_samples=3, seq_len=8)
    assert chunks.shape == (3, 8) and chunks[:, 0].tolist() == [lm.tokenizer.bos_token_id] * 3
    assert torch.equal(chunks, self_generated_chunks(lm, num_samples=3, seq_len=8))
    assert len({tuple(r) for r in chunks[:, 1:].tolist()}) == 3  # one seed per row
