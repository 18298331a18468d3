"""Recovery training: the objective against the served engine, exact resume, refusals."""

import math
from dataclasses import replace

import pytest
import torch
from reference import logits_alone
from tiny import random_deep_bank, tiny_llama

from idp_core.config import GenConfig
from idp_core.generate import Engine, GenRequest
from idp_core.kv import precompute_prompt_kv
from idp_core.lab.fit import CheckpointError, FitConfig, fit
from idp_core.lab.objective import (
    check_teacher,
    init_from_text,
    recovery_loss,
    student_logits,
    teacher_logprobs,
    token_kl,
    token_nll,
)

IDS = torch.tensor([[5, 9, 23, 42, 7, 1, 2, 3], [100, 3, 17, 17, 60, 61, 8, 9]])


def test_student_logits_equal_the_uncached_reference(tiny, tiny_bank):
    deep = random_deep_bank(tiny)
    for prompt in (None, tiny_bank.prompts[1], deep.prompts[1]):
        got = student_logits(tiny.model, IDS, prompt)
        for b in range(len(IDS)):
            want = logits_alone(tiny, prompt, IDS[b].tolist())[:-1]
            torch.testing.assert_close(got[b], want, atol=1e-4, rtol=0)


def test_trained_deep_prompt_scores_as_the_engine_serves_it(tiny):
    """The loss training minimises is the served model's: NLL from the training forward equals
    the engine's echo log-probabilities with the prompt as a bank prefix."""
    bank = random_deep_bank(tiny, (4,))
    nll = token_nll(student_logits(tiny.model, IDS, bank.prompts[0]), IDS)  # [B, T-1]
    engine = Engine(tiny, precompute_prompt_kv(tiny.model, bank))
    reqs = [GenRequest(r.tolist(), GenConfig(max_tokens=0, logprobs=1, echo=True), "d0")
            for r in IDS]
    for b, res in enumerate(engine.generate(reqs)):
        served = torch.tensor([-lp.logprob for lp in res.prompt_logprobs[1:]])
        torch.testing.assert_close(nll[b], served, atol=1e-4, rtol=0)


def test_losses_against_their_definitions(tiny):
    teacher = tiny_llama(seed=5, attn="eager")
    logits = student_logits(tiny.model, IDS)
    t_logp = teacher_logprobs(teacher.model, IDS)
    p = t_logp.exp()
    kl = (p * (t_logp - torch.log_softmax(logits, -1))).sum(-1)
    torch.testing.assert_close(token_kl(logits, t_logp), kl)
    assert token_kl(t_logp, t_logp).abs().max() < 1e-5  # a model against itself
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())
    torch.testing.assert_close(recovery_loss("lm", logits, IDS, None), ce)
    torch.testing.assert_close(recovery_loss("kd", logits, IDS, t_logp), kl.mean())
    torch.testing.assert_close(recovery_loss("mix", logits, IDS, t_logp, mix=0.25),
                               0.25 * kl.mean() + 0.75 * ce)
    with pytest.raises(ValueError, match="needs the teacher"):
        recovery_loss("kd", logits, IDS, None)


def _train(tiny, chunks, config, checkpoint, until=None):
    prompt = torch.nn.Parameter(init_from_text(tiny, chunks[0, :3], "deep"))
    teacher = tiny_llama(seed=5, attn="eager")

    def loss_fn(ids):
        return recovery_loss("kd", student_logits(tiny.model, ids, prompt), ids,
                             teacher_logprobs(teacher.model, ids))
    state = fit([prompt], loss_fn, chunks, config, checkpoint=checkpoint,
                settings={"method": "deep3-kd"}, until=until)
    return prompt.detach(), state


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    tiny = tiny_llama(attn="eager")
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    chunks = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    config = FitConfig(steps=6, batch_size=2, lr=1e-2, warmup=2, seed=3)
    whole, whole_state = _train(tiny, chunks, config, tmp_path / "a.pt")
    _train(tiny, chunks, config, tmp_path / "b.pt", until=4)  # interrupted after step 4
    resumed, state = _train(tiny, chunks, config, tmp_path / "b.pt")
    assert state.step == whole_state.step == 6
    assert state.losses == whole_state.losses
    assert torch.equal(resumed, whole)
    assert whole_state.losses[-1] < whole_state.losses[0]
    other = FitConfig(steps=6, batch_size=2, lr=3e-2, warmup=2, seed=3)
    with pytest.raises(CheckpointError, match=r"b\.pt: made by another configuration.*fit"):
        _train(tiny, chunks, other, tmp_path / "b.pt")
    # a checkpoint past the step asked for (a curve's smaller milestone, a shorter rerun) is
    # refused: it would be scored as if trained for fewer steps
    with pytest.raises(CheckpointError, match=r"b\.pt: trained to step 6, past the 4 steps"):
        _train(tiny, chunks, config, tmp_path / "b.pt", until=4)


def test_learning_rate_schedules():
    constant = FitConfig(steps=10, lr=1.0, warmup=4)
    assert [constant.lr_at(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = FitConfig(steps=10, lr=1.0, warmup=4, schedule="cosine")
    want = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * (i - 4) / 6))
                                     for i in range(4, 10)]
    assert [cosine.lr_at(i) for i in range(10)] == pytest.approx(want)
    assert cosine.lr_at(4) == 1.0 and cosine.lr_at(9) < 0.1 and cosine.lr_at(10) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        FitConfig(steps=10, schedule="linear")


def test_a_decayed_run_resumes_exactly_and_cannot_be_extended(tmp_path):
    tiny = tiny_llama(attn="eager")
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    chunks = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    config = FitConfig(steps=6, batch_size=2, lr=1e-2, warmup=2, seed=3, schedule="cosine")
    whole, whole_state = _train(tiny, chunks, config, tmp_path / "a.pt")
    _train(tiny, chunks, config, tmp_path / "b.pt", until=3)
    resumed, state = _train(tiny, chunks, config, tmp_path / "b.pt")
    assert state.losses == whole_state.losses and torch.equal(resumed, whole)
    constant, _ = _train(tiny, chunks, replace(config, schedule="constant"), tmp_path / "c.pt")
    assert not torch.equal(constant, whole)
    with pytest.raises(CheckpointError, match=r"b\.pt: made by another configuration.*fit"):
        _train(tiny, chunks, replace(config, steps=8), tmp_path / "b.pt")


def test_a_teacher_with_another_vocabulary_is_refused(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    from idp_core.model import wrap_model

    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    other = wrap_model(small, tiny.tokenizer, name="other")
    with pytest.raises(ValueError, match="vocabulary of 100 tokens, the student has 257"):
        check_teacher(tiny, other)
    check_teacher(tiny, tiny_llama(seed=9))


def test_prefix_mlp_against_its_per_token_definition_and_resumes_exactly(tmp_path):
    """A `+mlp` deep prompt starts at its initial KV, equals start_i + W2 tanh(W1 e_i + b1) + b2
    token by token once trained, and a run interrupted and resumed reaches the same prompt."""
    from idp_core.lab.train import PrefixMLP, loss_function, make_student

    tiny = tiny_llama(attn="eager")
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    chunks = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    plain = make_student(tiny, "deep", 3, chunks, seed=1)
    mlp = make_student(tiny, "deep", 3, chunks, seed=1, reparam="mlp")
    assert isinstance(mlp.encoder, PrefixMLP)
    assert torch.equal(mlp.prompt(), plain.prompt())  # W2, b2 start at 0
    teacher = tiny_llama(seed=5, attn="eager")
    config = FitConfig(steps=6, batch_size=2, lr=1e-3, warmup=2, seed=3)

    def train(checkpoint, until=None):
        student = make_student(tiny, "deep", 3, chunks, seed=1, reparam="mlp")
        state = fit(student.params, loss_function(student, "kd", teacher.model, tiny.device),
                    chunks, config, checkpoint=checkpoint, until=until,
                    settings={"method": "deep3-kd+mlp"})
        return student, state

    whole, whole_state = train(tmp_path / "a.pt")
    train(tmp_path / "b.pt", until=4)
    resumed, state = train(tmp_path / "b.pt")
    assert state.losses == whole_state.losses and whole_state.losses[-1] < whole_state.losses[0]
    with torch.no_grad():
        got = whole.prompt()
        assert torch.equal(resumed.prompt(), got) and not torch.equal(got, plain.prompt())
        enc = whole.encoder
        for i in range(3):  # the slow, obvious computation, one prompt token at a time
            h = torch.tanh(enc.up.weight @ enc.embeds[i] + enc.up.bias)
            delta = (enc.down.weight @ h + enc.down.bias).view(got.shape[:3] + got.shape[4:])
            torch.testing.assert_close(got[:, :, :, i], enc.start[:, :, :, i] + delta)
    with pytest.raises(ValueError, match="only 'mlp', for a fresh deep prompt"):
        make_student(tiny, "shallow", 3, chunks, reparam="mlp")


def test_batch_order_walks_epochs_and_fills_every_batch():
    import itertools

    from idp_core.lab.fit import batch_order

    def reference(num, batch_size, seed):  # the slow, obvious way: one stream of epochs
        g = torch.Generator().manual_seed(seed)
        stream = itertools.chain.from_iterable(
            torch.randperm(num, generator=g).tolist() for _ in itertools.count())
        while True:
            yield [next(stream) for _ in range(batch_size)]

    for num, batch_size in [(10, 4), (8, 4), (5, 5), (3, 8), (1, 2)]:
        got = [b.tolist() for b in itertools.islice(batch_order(num, batch_size, 7), 12)]
        want = list(itertools.islice(reference(num, batch_size, 7), 12))
        assert got == want, (num, batch_size)
