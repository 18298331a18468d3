"""Packed int4 weights (idp_core/packed.py) against the dense dequantised weights they hold:
the layer, a tiny random model quantised here (every engine path), a compressed-tensors
checkpoint made by `idp compress`, LoRA over packed layers, and batch invariance."""

import copy
import json

import pytest
import torch
from tiny import random_bank, random_deep_bank, tiny_llama

from idp_core.build import build_engine
from idp_core.config import GenConfig
from idp_core.generate import GenRequest
from idp_core.kv import precompute_prompt_kv
from idp_core.model import LoadedModel, attach_lora, fingerprint, load_model, wrap_model
from idp_core.packed import (
    DENSE_MIN_TOKENS,
    PackedInt4Linear,
    quantize_rtn,
    unsupported_reason,
    weight_bytes,
)
from idp_core.paths import default_model_built
from idp_core.rows import Rows, forward_rows

G = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUTS = [[5, 9, 23, 42, 7], [100, 3], [17, 17, 60, 61], [200], [8, 9, 10, 11, 12, 13, 14],
          list(range(30, 30 + DENSE_MIN_TOKENS + 6))]  # the last row is long: dense path
# bf16 activations: packed bf16 scales and a different summation order than the dense bf16
# matmul, through two layers; float32 activations leave only the summation order.
BF16_ATOL, FP32_ATOL = 0.15, 2e-4


def reference(weight, codes, scale, zero=None):
    w = (codes.float() - 8).view(weight.shape[0], -1, G) * scale[..., None]
    if zero is not None:
        w = w + zero[..., None]
    return w.view(weight.shape)


@pytest.mark.parametrize("n,k", [(128, 256), (192, 64)])
def test_layer_matches_its_dequantised_weights(n, k):
    torch.manual_seed(0)
    weight = torch.randn(n, k)
    codes, scale = quantize_rtn(weight, group_size=G)
    zero = torch.randn_like(scale) * 0.01
    perm = torch.randperm(k)  # act-order: column j of the codes is input column perm[j]
    layer = PackedInt4Linear(codes, scale, zero, group_size=G, perm=perm, dtype=torch.float32)
    dense = torch.empty(n, k).index_copy_(1, perm, reference(weight, codes, scale, zero))
    torch.testing.assert_close(layer.dequantize(), dense, atol=1e-6, rtol=0)
    x = torch.randn(3, 70, k)  # 70 tokens a row: the dense scratch path
    torch.testing.assert_close(layer(x), x @ dense.t(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x[:, :5]), x[:, :5] @ dense.t(), atol=1e-4, rtol=1e-4)
    bf16 = PackedInt4Linear(codes, scale, None, group_size=G)  # codes, bf16 scales and zeros
    assert weight_bytes(bf16) == n * k // 2 + (k // G) * n * 2 * 2  # vs 2 n k dense bf16


def test_each_row_takes_the_kernel_of_its_own_length():
    torch.manual_seed(1)
    codes, scale = quantize_rtn(torch.randn(128, 64), group_size=G)
    layer = PackedInt4Linear(codes, scale, None, group_size=G)
    x = torch.randn(3, DENSE_MIN_TOKENS + 1, 64, dtype=torch.bfloat16)
    with forward_rows(Rows([DENSE_MIN_TOKENS + 1, 4, 2])):
        mixed = layer(x)
    assert torch.equal(mixed[0], layer(x[:1])[0])  # long row alone: dense
    with forward_rows(Rows([4])):
        assert torch.equal(mixed[1], layer(x[1:2])[0])  # short row alone: kernel


@pytest.mark.parametrize("n,k", [(1536, 576), (576, 1536)])  # the default model's MLP shapes
def test_int4_kernel_computes_each_row_independently_of_the_batch(n, k):
    """What batch invariance rests on: a row's output bits do not depend on M."""
    torch.manual_seed(2)
    codes, scale = quantize_rtn(torch.randn(n, k), group_size=64)
    layer = PackedInt4Linear(codes, scale, None, group_size=64)
    x = torch.randn(300, k, dtype=torch.bfloat16)
    full = layer._int4(x)
    for m in (1, 2, 3, 7, 16, 63, 100, 299):
        assert torch.equal(layer._int4(x[:m]), full[:m]), m
        assert torch.equal(layer._int4(x[m : m + 1]), full[m : m + 1]), m


def test_shapes_no_kernel_takes_are_refused():
    assert "group size 16" in unsupported_reason(128, 64, 16, 4, torch.device("cpu"))
    assert "5-bit" in unsupported_reason(128, 64, 32, 5, torch.device("cpu"))
    assert "out_features 100" in unsupported_reason(100, 64, 32, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot pack a 100x64 layer"):
        PackedInt4Linear(torch.zeros(100, 64, dtype=torch.uint8), torch.ones(100, 2), None,
                         group_size=G)


def packed_pair(dtype: torch.dtype) -> tuple[LoadedModel, LoadedModel]:
    """A tiny model with every linear layer quantised (RTN, group 32) twice: packed on the int4
    kernel, and dense holding the same dequantised values (the reference)."""
    base = tiny_llama(seed=5, hidden=128, heads=4, kv_heads=2, attn="sdpa")
    packed_model = copy.deepcopy(base.model).to(dtype)
    dense_model = copy.deepcopy(base.model).to(dtype)
    for name, module in base.model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            codes, scale = quantize_rtn(module.weight, group_size=G)
            layer = PackedInt4Linear(codes, scale, None, group_size=G, dtype=dtype)
            packed_model.set_submodule(name, layer)
            dense_model.get_submodule(name).weight.copy_(layer.dequantize())
    packed = wrap_model(packed_model, base.tokenizer, name="tiny-packed")
    packed.weights = "packed-int4"
    return packed, wrap_model(dense_model, base.tokenizer, name="tiny-dense")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def pair(request):
    return (*packed_pair(request.param), request.param)


def requests(bank_names):
    sels = [bank_names[1], "none", "concat", bank_names[0], "auto", bank_names[2]]
    return [GenRequest(ids, GenConfig(max_tokens=6, logprobs=2, echo=True), sel)
            for ids, sel in zip(INPUTS, sels, strict=True)]


@pytest.mark.parametrize("kind", ["shallow", "deep"])
def test_packed_engine_matches_dense_dequantised(pair, kind):
    packed, dense, dtype = pair
    assert fingerprint(packed.model) == fingerprint(dense.model)  # a bank fits both
    make_bank = random_bank if kind == "shallow" else random_deep_bank
    bank = make_bank(dense)
    got = build_engine(packed, bank=bank).generate(requests(bank.names))
    want = build_engine(dense, bank=bank).generate(requests(bank.names))
    atol = FP32_ATOL if dtype == torch.float32 else BF16_ATOL
    for g, w in zip(got, want, strict=True):
        assert g.prompt_used == w.prompt_used  # the IDP selection picks the same prompt
        if dtype == torch.float32:
            assert g.output_ids == w.output_ids
        same = [a == b for a, b in zip(g.output_ids, w.output_ids, strict=True)]
        n = same.index(False) if False in same else len(same)  # bf16: up to a differing token
        torch.testing.assert_close(torch.tensor([x.logprob for x in g.output_logprobs[:n]]),
                                   torch.tensor([x.logprob for x in w.output_logprobs[:n]]),
                                   atol=atol, rtol=0)
        torch.testing.assert_close(torch.tensor([x.logprob for x in g.prompt_logprobs[1:]]),
                                   torch.tensor([x.logprob for x in w.prompt_logprobs[1:]]),
                                   atol=atol, rtol=0)
        torch.testing.assert_close(torch.tensor(list(g.scores.values())) if g.scores else
                                   torch.zeros(0), torch.tensor(list(w.scores.values()))
                                   if w.scores else torch.zeros(0), atol=1e-2, rtol=0)


def test_greedy_output_does_not_depend_on_the_batch():
    """The default configuration (packed weights, exact attention, bf16): a request alone and
    beside eight others, admitted together or into a running batch, gives the same tokens."""
    packed, _ = packed_pair(torch.bfloat16)
    bank = random_deep_bank(packed)
    engine = build_engine(packed, bank=bank)
    config = GenConfig(max_tokens=24, ignore_eos=True)
    others = [GenRequest(ids, config, sel) for ids, sel in zip(
        INPUTS + [[9, 9], [1, 2, 3]], ["none", *bank.names, "concat", *bank.names], strict=False)]
    for t in range(8):  # with batched kernels (batch_invariant=False) one of these differed
        ids = [72 + t, 101, 108, 108, 111][: 2 + t % 4] if t < 6 else list(range(t, t + 90))
        target = GenRequest(ids, config, bank.names[t % 3])  # 90 tokens: two key blocks
        alone = engine.generate([target])[0].output_ids
        assert engine.generate(others[:4] + [target] + others[4:8])[4].output_ids == alone
    batch = engine.start(others[:8])  # admitted mid-generation, merged into a running batch
    engine.step(batch)
    late = engine.start([target])
    batch = engine.merge(batch, late)
    while batch is not None:
        batch, _ = engine.retire(batch)
        if batch is not None:
            engine.step(batch)
    assert engine.result(late.seqs[0]).output_ids == alone


def test_lora_runs_unmerged_over_packed_layers():
    from peft import LoraConfig

    packed, dense = packed_pair(torch.float32)
    config = LoraConfig(r=4, target_modules=list(LINEARS), init_lora_weights=False)
    n_packed = attach_lora(packed, copy.deepcopy(config))
    torch.manual_seed(0)
    n_dense = attach_lora(dense, config)
    assert n_packed == n_dense
    packed.model.load_state_dict(dense.model.state_dict(), strict=False)  # same adapter
    assert all(p.dtype == torch.float32 for n, p in packed.model.named_parameters()
               if "lora_" in n)
    ids = torch.tensor([INPUTS[4]])
    torch.testing.assert_close(packed.model(ids).logits, dense.model(ids).logits,
                               atol=FP32_ATOL, rtol=0)


@pytest.fixture(scope="module", params=[4, 3], ids=["w4", "w3"])
def compressed(request, tmp_path_factory):
    """GPTQ W4 / W3 g32 of a tiny model whose layer shapes the kernel takes (`idp compress`);
    3-bit codes run in the same int4 container."""
    from idp_core.lab.compress import CompressConfig, compress

    lm = tiny_llama(seed=3, hidden=128, heads=4, kv_heads=2)
    folder = tmp_path_factory.mktemp("tiny128")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    config = CompressConfig(method="gptq", bits=request.param, group_size=G, num_samples=4,
                            seq_len=64, eval_windows=0)
    return compress(folder, tmp_path_factory.mktemp("gptq") / "q", config)


def test_compressed_tensors_checkpoint_loads_packed(compressed):
    packed = load_model(compressed, dtype="float32", weights="packed")
    dense = load_model(compressed, dtype="float32", weights="dense")
    assert packed.weights == "packed-int4" and not packed.dequantized
    assert dense.weights == "dense" and dense.dequantized
    assert packed.fingerprint == dense.fingerprint  # a bank trained on dense loads on packed
    assert packed.describe()["weight_bytes"] < dense.describe()["weight_bytes"]
    layers = [m for m in packed.model.modules() if isinstance(m, PackedInt4Linear)]
    assert len(layers) == 2 * len(LINEARS)
    for name, module in packed.model.named_modules():
        if isinstance(module, PackedInt4Linear):
            torch.testing.assert_close(module.dequantize(),
                                       dense.model.get_submodule(name).weight, atol=0, rtol=0)
    ids = torch.tensor([INPUTS[4]])
    torch.testing.assert_close(packed.model(ids).logits, dense.model(ids).logits,
                               atol=FP32_ATOL, rtol=0)
    bank = random_bank(dense)
    precompute_prompt_kv(packed.model, bank)  # the bank's fingerprint check passes in build
    build_engine(packed, bank=bank, strict_fingerprint=True)
    copy.deepcopy(packed.model)  # plain buffers (the LoRA benchmark copies the model)


def test_no_kernel_falls_back_dense_or_is_refused(tmp_path, caplog):
    from idp_core.lab.compress import CompressConfig, compress

    lm = tiny_llama(seed=3, hidden=128, heads=4, kv_heads=2)
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    config = CompressConfig(method="gptq", bits=4, group_size=16, num_samples=2, seq_len=32,
                            eval_windows=0)
    out = compress(tmp_path / "m", tmp_path / "q", config)
    with caplog.at_level("INFO"):
        auto = load_model(out, dtype="float32")
    assert auto.weights == "dense" and "group size 16" in caplog.text
    with pytest.raises(ValueError, match="weights 'packed' asked for.*group size 16"):
        load_model(out, dtype="float32", weights="packed")
    with pytest.raises(ValueError, match="weights 'packed' asked for.*not quantized"):
        load_model(tmp_path / "m", dtype="float32", weights="packed")


@pytest.mark.cuda
def test_cuda_packed_matches_dense_dequantised():
    """torch's CUDA int4 kernel (tinygemm) against the dense dequantised weights on the GPU."""
    packed, dense = packed_pair(torch.bfloat16)
    for name, module in list(packed.model.named_modules()):
        if isinstance(module, PackedInt4Linear):  # re-pack on the GPU from the same codes
            w = dense.model.get_submodule(name).weight.float()
            codes, scale = quantize_rtn(w, group_size=G)
            packed.model.set_submodule(name, PackedInt4Linear(codes, scale, None, group_size=G,
                                                              device="cuda"))
    packed.model.to("cuda")
    dense.model.to("cuda")
    for name, module in packed.model.named_modules():
        if isinstance(module, PackedInt4Linear):
            assert module.kernel == "aten._weight_int4pack_mm"
            torch.testing.assert_close(module.dequantize().float(),
                                       dense.model.get_submodule(name).weight.float(),
                                       atol=2e-2, rtol=1e-2)
    ids = torch.tensor([INPUTS[4]], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(packed.model(ids).logits.float(),
                                   dense.model(ids).logits.float(), atol=BF16_ATOL, rtol=0)
    bank = random_deep_bank(dense)
    got = build_engine(packed, bank=bank).generate(requests(bank.names))
    want = build_engine(dense, bank=bank).generate(requests(bank.names))
    for g, w in zip(got, want, strict=True):
        assert g.prompt_used == w.prompt_used
        torch.testing.assert_close(torch.tensor([x.logprob for x in g.prompt_logprobs[1:]]),
                                   torch.tensor([x.logprob for x in w.prompt_logprobs[1:]]),
                                   atol=BF16_ATOL, rtol=0)


@pytest.mark.real_model
@pytest.mark.skipif(not default_model_built(), reason="the default compressed model is not "
                    "built here (idp build-default; CI does not build it)")
def test_default_configuration_is_batch_invariant_on_the_real_model():
    """The issue's case: "Water boils at", 16 greedy tokens, alone and beside eight others,
    on the default compressed model as `make serve` loads it (packed, bf16, shipped bank)."""
    from idp_core.bank import PromptBank
    from idp_core.paths import DEFAULT_BANK, DEFAULT_MODEL_DIR

    lm = load_model(DEFAULT_MODEL_DIR)
    assert lm.weights == "packed-int4"
    engine = build_engine(lm, bank=PromptBank.load(DEFAULT_BANK), check_fingerprint=False)
    config = GenConfig(max_tokens=16, ignore_eos=True)
    ask = lambda text: GenRequest(lm.tokenizer(text)["input_ids"], config)  # noqa: E731
    others = ["The capital of France is", "Once upon a time, in a land far away,",
              "def fibonacci(n):", "Photosynthesis is the process by which",
              "In 1492, Columbus", "The best way to learn a language is",
              "Q: What is 2+2?\nA:", "Dear Sir or Madam, I am writing to"]
    alone = engine.generate([ask("Water boils at")])[0].output_ids
    batch = engine.generate([ask(t) for t in others[:4]] + [ask("Water boils at")]
                            + [ask(t) for t in others[4:]])
    assert batch[4].output_ids == alone


@pytest.mark.cuda
def test_cuda_2of4_sparse_checkpoint_runs_semi_structured(tmp_path):
    """A 2:4-pruned checkpoint loads onto torch's semi-structured sparse kernel on CUDA."""
    from idp_core.sparse import is_2of4

    lm = tiny_llama(seed=3, hidden=128, heads=4, kv_heads=2)
    with torch.no_grad():
        for name, module in lm.model.named_modules():
            if name.rsplit(".", 1)[-1] in LINEARS:  # keep the larger two of every four
                w = module.weight.view(module.weight.shape[0], -1, 4)
                drop = w.abs().argsort(dim=-1)[..., :2]
                w.scatter_(-1, drop, 0.0)
                assert is_2of4(module.weight)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    sparse = load_model(tmp_path, dtype="bfloat16", device="cuda")
    dense = load_model(tmp_path, dtype="bfloat16", device="cuda", weights="dense")
    assert sparse.weights == "sparse-2:4" and dense.weights == "dense"
    assert sparse.fingerprint == dense.fingerprint
    ids = torch.tensor([INPUTS[4]], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(sparse.model(ids).logits.float(),
                                   dense.model(ids).logits.float(), atol=BF16_ATOL, rtol=0)


def write_gptq(model, folder, *, act_order: bool) -> dict[str, torch.Tensor]:
    """Save `model` as a GPTQ-format (v1) W4 g32 checkpoint, the layout GPTQModel and AutoGPTQ
    write: qweight [K/8, N], qzeros [K/G, N/8] holding zero - 1, scales [K/G, N], g_idx [K].
    Returns the dense weights it stands for."""
    from safetensors.torch import save_file

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    state, dense = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, t in model.state_dict().items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in LINEARS:
            n, k = t.shape
            g_idx = torch.arange(k) // G
            if act_order:
                g_idx = g_idx[torch.randperm(k, generator=g)]
            scale = torch.rand(k // G, n, generator=g) * 0.02 + 0.01  # [K/G, N]
            zero = torch.randint(5, 11, (k // G, n), generator=g)  # asymmetric zero points
            q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)  # [K, N]
            state[prefix + ".qweight"] = (q.view(k // 8, 8, n) << shifts[None, :, None]).sum(1,
                                                                               dtype=torch.int32)
            z = (zero - 1).to(torch.int32).view(k // G, n // 8, 8)
            state[prefix + ".qzeros"] = (z << shifts).sum(-1, dtype=torch.int32)
            state[prefix + ".scales"] = scale.half()
            state[prefix + ".g_idx"] = g_idx.to(torch.int32)
            dense[name] = (scale.half().float()[g_idx] * (q - zero[g_idx])).t()  # [N, K]
        else:
            state[name] = t.contiguous()
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": G,
                                     "desc_act": act_order, "sym": False,
                                     "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps(config))
    return dense


@pytest.mark.parametrize("act_order", [False, True], ids=["static", "act-order"])
def test_gptq_format_checkpoint_loads_packed(tmp_path, act_order):
    lm = tiny_llama(seed=4, hidden=128, heads=4, kv_heads=2)
    dense_weights = write_gptq(lm.model, tmp_path, act_order=act_order)
    lm.tokenizer.save_pretrained(tmp_path)
    packed = load_model(tmp_path, dtype="float32")
    assert packed.kind == "gptq" and packed.weights == "packed-int4"
    reference = copy.deepcopy(lm.model)
    reference.load_state_dict(dense_weights, strict=False)
    for name, w in dense_weights.items():
        layer = packed.model.get_submodule(name.removesuffix(".weight"))
        torch.testing.assert_close(layer.dequantize(), w, atol=1e-6, rtol=0)
    ids = torch.tensor([INPUTS[4]])
    torch.testing.assert_close(packed.model(ids).logits, reference(ids).logits,
                               atol=FP32_ATOL, rtol=0)
