"""Prompt tuning and the LoRA baseline on a tiny random model: the loss falls, only the trained
parameters change, and banks/adapters round-trip through their files."""

import json

import pytest
import torch
from tiny import tiny_llama

from idp_core.bank import PromptBank
from idp_core.config import TrainConfig
from idp_core.lab.cli import main
from idp_core.lab.data import DEFAULT_CALIB, load_chunks
from idp_core.lab.objective import recovery_loss, student_logits
from idp_core.lab.train import (
    cluster_chunks,
    make_student,
    train_lora,
    train_prompt,
    train_prompts,
)

FAST = TrainConfig(lr=3e-2, warmup=0, total_tokens=8 * 4 * 32, seq_len=32, batch_size=4,
                   prompt_lengths=(3, 5), dtype="float32")


def lm_loss(model, ids, prompt=None):
    return recovery_loss("lm", student_logits(model, ids, prompt), ids, None)


@pytest.fixture(scope="module")
def chunks():
    return load_chunks(tiny_llama().tokenizer, DEFAULT_CALIB, num_samples=16, seq_len=32)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_prompt_training_lowers_loss_and_changes_only_the_prompt(chunks):
    lm = tiny_llama(seed=5)
    before = snapshot(lm.model)
    start = make_student(lm, "shallow", 4, chunks, seed=0).prompt().detach()
    prompt, stats = train_prompt(lm, chunks, 4, FAST, seed=0)
    assert prompt.shape == (4, lm.model.config.hidden_size) and not prompt.requires_grad
    assert stats.step == 8 and stats.tokens == 8 * 4 * 32 and len(stats.losses) == 8
    with torch.no_grad():
        assert lm_loss(lm.model, chunks, prompt) < lm_loss(lm.model, chunks, start) - 0.05
    after = snapshot(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in lm.model.parameters())


def test_lm_loss_matches_the_models_own_loss(chunks):
    lm = tiny_llama(seed=5)
    ids = chunks[:2]
    torch.testing.assert_close(lm_loss(lm.model, ids), lm.model(input_ids=ids, labels=ids).loss,
                               rtol=1e-5, atol=1e-5)


def test_deep_bank_trained_by_distillation(chunks, tmp_path):
    """A deep prompt trained towards a teacher: KL falls, the bank is deep and round-trips."""
    lm, teacher = tiny_llama(seed=5), tiny_llama(seed=6)
    config = TrainConfig(**{**FAST.to_dict(), "kind": "deep", "loss": "kd", "lr": 1e-2,
                            "prompt_lengths": (3,)})
    bank = train_prompts(lm, chunks, config, teacher=teacher, checkpoint_dir=tmp_path)
    assert bank.kind == "deep" and bank.names == ["pd0-L3"] and bank.lengths == [3]
    curve = bank.training["prompts"][0]["loss_curve"]
    assert curve[-1] < curve[0] and bank.training["loss"] == "kd"
    assert (tmp_path / "pd0-L3.pt").is_file()
    loaded = PromptBank.load(bank.save(tmp_path / "bank"))
    torch.testing.assert_close(loaded.prompts[0], bank.prompts[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_prompts(lm, chunks, config)


def test_bank_training_round_trips(chunks, tmp_path):
    lm = tiny_llama(seed=5)
    bank = train_prompts(lm, chunks, FAST, data={"path": "c4"})
    assert bank.names == ["p0-L3", "p1-L5"] and bank.lengths == [3, 5]
    assert bank.fingerprint == lm.fingerprint.to_dict()
    t = bank.training
    assert t["tokens_per_prompt"] == FAST.total_tokens and t["lr"] == FAST.lr
    assert [len(p["loss_curve"]) for p in t["prompts"]] == [8, 8]
    loaded = PromptBank.load(bank.save(tmp_path / "bank"))
    assert loaded.names == bank.names and loaded.training == json.loads(json.dumps(t))
    for a, b in zip(loaded.prompts, bank.prompts, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded.check_model(lm.fingerprint, strict=True)


def test_clusters_split_the_data(chunks):
    lm = tiny_llama(seed=5)
    assign = cluster_chunks(lm, chunks, 2, seed=0)
    assert assign.shape == (16,) and set(assign.tolist()) == {0, 1}
    assert torch.equal(assign, cluster_chunks(lm, chunks, 2, seed=0))
    bank = train_prompts(lm, chunks, TrainConfig(**{**FAST.to_dict(), "clusters": True,
                                                     "prompt_lengths": (2, 2)}))
    assert bank.names == ["c0-L2", "c1-L2"] and sum(bank.training["clusters"]) == 16


def test_lora_changes_only_adapter_weights_and_reloads_unmerged(chunks, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    lm = tiny_llama(seed=5)
    before = snapshot(lm.model)
    with torch.no_grad():
        loss0 = lm_loss(lm.model, chunks)
    model, stats = train_lora(lm, chunks, FAST)
    assert stats.step == 8 and lm.model is model
    with torch.no_grad():
        assert lm_loss(model, chunks) < loss0
    changed = set()
    for name, p in model.named_parameters():
        base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" in name:
            assert p.dtype == torch.float32
            if "lora_B" in name:
                assert p.abs().sum() > 0, name  # B starts at zero and must have moved
            changed.add(name)
        else:
            assert torch.equal(p, before[base_name]), name
    assert len(changed) == 2 * 7 * 2  # A and B on 7 projections in 2 layers
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = PeftModel.from_pretrained(tiny_llama(seed=5).model, tmp_path / "adapter")
    assert any(isinstance(m, LoraLayer) for m in fresh.modules())  # not merged
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=chunks[:2]).logits,
                                   model(input_ids=chunks[:2]).logits, rtol=0, atol=1e-6)


def test_a_checkpoint_of_other_training_text_is_refused(chunks, tmp_path):
    from idp_core.lab.fit import CheckpointError

    lm = tiny_llama()
    ckpt = tmp_path / "p.pt"
    train_prompt(lm, chunks, 3, FAST, seed=0, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match=r"p\.pt: made by another configuration.*chunks"):
        train_prompt(lm, chunks.flip(0), 3, FAST, seed=0, checkpoint=ckpt)


def test_cli_trains_bank_and_adapter(tmp_path):
    lm = tiny_llama(seed=5)
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    common = ["--model", str(tmp_path / "m"), "--total-tokens", "256", "--seq-len", "32",
              "--batch-size", "4", "--dtype", "float32"]
    assert main(["train-prompts", *common, "--lengths", "2,3", "--out", str(tmp_path / "b")]) == 0
    bank = PromptBank.load(tmp_path / "b")
    assert bank.lengths == [2, 3] and bank.training["steps_per_prompt"] == 2
    assert main(["train-lora", *common, "--rank", "2", "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "train.json").read_text())
    # rank 2: r * (in + out) per projection (q, k, v, o, gate, up, down), 2 layers
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert meta["steps"] == 2
    assert meta["num_parameters"] == 2 * sum(2 * (i + o) for i, o in shapes)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"lr": 0}, "lr"), ({"weight_decay": -1}, "weight_decay"), ({"prompt_lengths": ()},
     "prompt_lengths"), ({"lora_rank": 0}, "lora_rank"), ({"dtype": "int8"}, "dtype"),
     ({"total_tokens": 10}, "total_tokens"), ({"kind": "wide"}, "kind"),
     ({"loss": "l2"}, "loss"), ({"init": "zeros"}, "init"), ({"warmup": -1}, "warmup")],
)
def test_train_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_attached_lora_runs_in_the_model_dtype(tmp_path):
    """A saved adapter attaches unmerged with weights in the model's dtype (not peft's float32
    default) and computes what peft's default computes, up to bfloat16 rounding."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from idp_core.model import attach_lora

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(tiny_llama(seed=2).model, config).save_pretrained(tmp_path)
    lm = tiny_llama(seed=2)
    lm.model.to(torch.bfloat16)
    num = attach_lora(lm, tmp_path)
    lora = {n: p for n, p in lm.model.named_parameters() if "lora_" in n}
    assert num == sum(p.numel() for p in lora.values()) > 0
    assert {p.dtype for p in lora.values()} == {torch.bfloat16}
    reference = tiny_llama(seed=2).model.to(torch.bfloat16)
    reference = PeftModel.from_pretrained(reference, str(tmp_path)).eval()  # float32 adapters
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        got, want = lm.model(ids).logits.float(), reference(ids).logits.float()
        base = tiny_llama(seed=2).model.to(torch.bfloat16)(ids).logits.float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    assert (got - base).abs().max() > 0.1  # the adapter is applied
