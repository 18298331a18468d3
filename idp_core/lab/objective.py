"""What recovery training optimises: a student (the compressed model plus a shallow prompt, a
deep prompt or a LoRA adapter) scored on text by language modelling, by distillation from the
uncompressed teacher, or both.

Every student predicts tokens x_1..x_{T-1} of a chunk from the tokens before them (x_0 has no
context inside the chunk), so all methods are scored on the same positions.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from transformers import DynamicCache

from idp_core.model import LoadedModel

LossKind = Literal["lm", "kd", "mix"]
LOSSES: tuple[str, ...] = ("lm", "kd", "mix")


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(input embedding, decoder, lm_head) of a causal LM or of a peft model wrapping one."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.get_input_embeddings(), causal.get_decoder(), causal.get_output_embeddings()


def deep_cache(prompt: Tensor, batch: int, dtype: torch.dtype) -> DynamicCache:
    """A fresh cache holding a deep prompt [2, layers, Hkv, n, D] for `batch` rows.

    Fresh per forward: the model appends the input's keys to the cache it is given.
    """
    kv = prompt.to(dtype)
    return DynamicCache(ddp_cache_data=[
        (k[None].expand(batch, -1, -1, -1), v[None].expand(batch, -1, -1, -1))
        for k, v in zip(kv[0], kv[1], strict=True)
    ])


def student_logits(model: torch.nn.Module, ids: Tensor, prompt: Tensor | None = None) -> Tensor:
    """[B, T-1, V] float32 logits for x_1..x_{T-1} of `ids` [B, T] after an optional prompt.

    A shallow prompt [n, d] is prepended to the input embeddings (positions 0..n-1, the input
    at n..); a deep prompt [2, layers, Hkv, n, D] is the cache the input attends to, its keys
    already rotated for positions 0..n-1, so the input's positions start at n. Without a
    prompt (the plain or LoRA-wrapped model) the input sits at 0...
    """
    embed, decoder, lm_head = _parts(model)
    x = embed(ids)  # [B, T, d]
    batch, seq = ids.shape
    if prompt is None:
        hidden = decoder(inputs_embeds=x, use_cache=False).last_hidden_state
    elif prompt.ndim == 2:
        n = prompt.shape[0]
        x = torch.cat([prompt.to(x.dtype).expand(batch, -1, -1), x], dim=1)  # [B, n+T, d]
        hidden = decoder(inputs_embeds=x, use_cache=False).last_hidden_state[:, n:]
    else:
        n = prompt.shape[3]
        positions = torch.arange(n, n + seq, device=ids.device).expand(batch, -1)
        mask = torch.ones(batch, n + seq, dtype=torch.long, device=ids.device)
        hidden = decoder(inputs_embeds=x, past_key_values=deep_cache(prompt, batch, x.dtype),
                         position_ids=positions, attention_mask=mask,
                         use_cache=True).last_hidden_state
    return lm_head(hidden[:, :-1]).float()  # [B, T-1, V]


@torch.no_grad()
def teacher_logprobs(teacher: torch.nn.Module, ids: Tensor) -> Tensor:
    """[B, T-1, V] float32 log-probabilities of the teacher for x_1..x_{T-1}."""
    return torch.log_softmax(student_logits(teacher, ids), dim=-1)


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """[B, T-1] negative log-likelihood of x_1..x_{T-1} under `logits` [B, T-1, V]."""
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), ids[:, 1:], reduction="none"
    )


class TopK(NamedTuple):
    """The teacher's distribution kept as its top-k tokens plus one bucket for the rest
    (`lab/teacher_cache.py`): log-probabilities [..., k], token ids [..., k], log of the mass
    outside them [...] (-inf when k is the whole vocabulary)."""

    logp: Tensor
    ids: Tensor
    rest: Tensor


def token_kl(logits: Tensor, teacher: Tensor | TopK) -> Tensor:
    """[B, T-1] KL(teacher || student) per position, in nats: over the whole vocabulary for
    the teacher's full log-probabilities [B, T-1, V], or over its top-k tokens plus the rest
    bucket for a `TopK` (the KL of the coarsened distributions, <= the full one)."""
    logp = torch.log_softmax(logits, dim=-1)
    if not isinstance(teacher, TopK):
        return (teacher.exp() * (teacher - logp)).sum(-1)
    top = logp.gather(-1, teacher.ids)  # [B, T-1, k]
    rest = logp.scatter(-1, teacher.ids, float("-inf")).logsumexp(-1)  # [B, T-1]
    kl = (teacher.logp.exp() * (teacher.logp - top)).sum(-1)
    has_rest = torch.isfinite(teacher.rest)
    safe = torch.where(has_rest, teacher.rest - rest, torch.zeros_like(rest))
    return kl + torch.where(has_rest, teacher.rest.exp() * safe, torch.zeros_like(rest))


def recovery_loss(
    kind: LossKind, logits: Tensor, ids: Tensor, teacher_logp: Tensor | TopK | None, *,
    mix: float = 0.5,
) -> Tensor:
    """The training loss: mean NLL ("lm"), mean KL to the teacher ("kd"), or `mix` * KL +
    (1 - `mix`) * NLL ("mix"). The teacher is its full log-probabilities or a cached `TopK`."""
    if kind == "lm":
        return token_nll(logits, ids).mean()
    if teacher_logp is None:
        raise ValueError(f"loss {kind!r} needs the teacher's log-probabilities")
    kl = token_kl(logits, teacher_logp).mean()
    if kind == "kd":
        return kl
    return mix * kl + (1 - mix) * token_nll(logits, ids).mean()


def check_teacher(student: LoadedModel, teacher: LoadedModel) -> None:
    """Refuse a teacher whose vocabulary or tokenizer differs from the student's."""
    sv, tv = student.model.config.vocab_size, teacher.model.config.vocab_size
    if sv != tv:
        raise ValueError(
            f"teacher {teacher.source}: vocabulary of {tv} tokens, the student has {sv}"
        )
    s_vocab, t_vocab = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
        raise ValueError(
            f"teacher {teacher.source}: its tokenizer differs from the student's (e.g. {differ})"
        )


@torch.no_grad()
def init_from_text(lm: LoadedModel, ids: Tensor, kind: str) -> Tensor:
    """A float32 prompt made from real text `ids` [n]: its embeddings (shallow, [n, d]) or the
    KV the model computes for it at positions 0..n-1 (deep, [2, layers, Hkv, n, D]), on the
    model's device."""
    from idp_core.kv import compute_prefix_kv

    embeds = lm.model.get_input_embeddings()(ids.to(lm.device))  # [n, d]
    if kind == "shallow":
        return embeds.float().clone()
    kv = compute_prefix_kv(lm.model, embeds, name="init")
    return torch.stack([torch.stack(kv.keys), torch.stack(kv.values)]).float().clone()
