"""The teacher cache: the top-k KL against its slow definition, the cache against a teacher
forward per step, and refusals of a cache made otherwise."""

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_llama

from idp_core.config import TrainConfig
from idp_core.lab import teacher_cache
from idp_core.lab.objective import student_logits, teacher_logprobs, token_kl
from idp_core.lab.teacher_cache import TeacherCacheError
from idp_core.lab.train import train_lora, train_prompt

CHUNKS = torch.randint(0, 256, (6, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(seed=5, attn="eager")


def _coarse_kl(p_logp: torch.Tensor, q_logp: torch.Tensor, keep: list[int]) -> float:
    """KL(p || q) of two distributions over a vocabulary coarsened to `keep` + one bucket."""
    p, q = p_logp.exp(), q_logp.exp()
    rest = [i for i in range(len(p)) if i not in keep]
    kl = sum(float(p[i] * (p_logp[i] - q_logp[i])) for i in keep)
    if rest:
        pr, qr = float(p[rest].sum()), float(q[rest].sum())
        kl += pr * (torch.log(torch.tensor(pr)) - torch.log(torch.tensor(qr))).item()
    return kl


def test_top_k_kl_is_the_kl_of_the_coarsened_distributions(tiny, teacher):
    ids = CHUNKS[:2]
    logits = student_logits(tiny.model, ids)
    t_logp = teacher_logprobs(teacher.model, ids)
    full = token_kl(logits, t_logp)
    vocab = t_logp.shape[-1]
    for k in (1, 7, vocab):
        got = token_kl(logits, teacher_cache.top_k_targets(teacher.model, ids, k))
        s_logp = torch.log_softmax(logits, -1)
        for b, t in [(0, 0), (1, 4), (1, 8)]:
            keep = t_logp[b, t].topk(k).indices.tolist()
            want = _coarse_kl(t_logp[b, t].double(), s_logp[b, t].double(), keep)
            assert got[b, t].item() == pytest.approx(want, abs=1e-5)
        assert (got <= full + 1e-5).all() and (got >= -1e-6).all()
    torch.testing.assert_close(got, full)  # k = vocabulary: the full KL


def test_cache_is_built_once_and_found_by_row(tmp_path, teacher):
    path = tmp_path / "t.safetensors"
    cache = teacher_cache.ensure(path, teacher, CHUNKS, 5)
    again = teacher_cache.ensure(path, teacher, CHUNKS, 5)  # loaded, not rebuilt
    batch = CHUNKS[[4, 1, 4]]
    want = teacher_cache.top_k_targets(teacher.model, batch, 5)
    for got in (cache.lookup(batch), again.lookup(batch)):
        torch.testing.assert_close(got.logp, want.logp)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.rest, want.rest)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(KeyError):
        cache.lookup(torch.zeros(1, 10, dtype=torch.long))


def test_stale_cache_is_refused_naming_the_file(tmp_path, teacher):
    path = tmp_path / "t.safetensors"
    teacher_cache.ensure(path, teacher, CHUNKS, 5)
    other = tiny_llama(seed=6, attn="eager")
    bf16 = tiny_llama(seed=5, attn="eager")  # the same weights, whose fingerprint is dtype-blind
    bf16.model.to(torch.bfloat16)
    assert bf16.fingerprint == teacher.fingerprint
    cases = [(teacher, CHUNKS[:4], 5, "other data"), (teacher, CHUNKS, 6, "another top-k"),
             (other, CHUNKS, 5, "another teacher"), (bf16, CHUNKS, 5, "another dtype")]
    for t, chunks, k, what in cases:
        with pytest.raises(TeacherCacheError, match=f"{path}: made from {what}"):
            teacher_cache.ensure(path, t, chunks, k)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        teacher_cache.ensure(plain, teacher, CHUNKS, 5)
    with pytest.raises(ValueError, match="top_k must be in"):
        teacher_cache.ensure(tmp_path / "new.safetensors", teacher, CHUNKS, 0)


def test_training_on_a_full_cache_equals_a_teacher_forward_per_step(tmp_path, teacher):
    """With k = the vocabulary the cached targets are the teacher's distribution, so a prompt
    and a LoRA train exactly as with the live teacher."""
    vocab = teacher.model.config.vocab_size
    cache = teacher_cache.ensure(tmp_path / "full.safetensors", teacher, CHUNKS, vocab)
    config = TrainConfig(kind="deep", loss="kd", total_tokens=4 * 3 * 10, seq_len=10,
                         batch_size=3, lr=1e-2, warmup=1, dtype="float32")
    runs = []
    for c in (None, cache):
        lm = tiny_llama(attn="eager")
        prompt, state = train_prompt(lm, CHUNKS, 3, config, seed=0, teacher=teacher, cache=c)
        _, lora_state = train_lora(tiny_llama(attn="eager"), CHUNKS, config, teacher=teacher,
                                   cache=c)
        runs.append((prompt, state.losses, lora_state.losses))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=0)
    assert runs[0][1] == pytest.approx(runs[1][1], abs=1e-4)
    assert runs[0][2] == pytest.approx(runs[1][2], abs=1e-4)

