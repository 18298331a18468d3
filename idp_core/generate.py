"""Batched generation where each row carries only its own prompt's cached KV as prefix.

Row layout in the KV cache: [prefix pad | prompt_b | input_b | input pad | generated ...].
Pads are masked out; positions come from the mask (prompt at 0..n_b-1, input right after), so a
row computes exactly what `model(inputs_embeds=[P_b; embed(X_b)])` would, alone. The pieces
(`Engine.start`, `step`, `retire`, `merge`) are what a continuous-batching loop admits, steps and
retires with; `Engine.generate` runs a fixed set of requests to completion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache

from idp_core.attention import enable_prefix_attention, prefix_attention_mask
from idp_core.config import AUTO, CONCAT, NONE, GenConfig, SelectConfig
from idp_core.kv import PrefixKV, PromptKVStore, concat_rows, select_rows, stack_prefixes
from idp_core.model import LoadedModel
from idp_core.rows import Rows, decode_rows, forward_rows
from idp_core.sampling import make_generator, sample
from idp_core.select import select_prompts


@dataclass(frozen=True)
class GenRequest:
    """One request as the engine sees it: token ids, decoding settings, prompt selection."""

    input_ids: list[int]
    config: GenConfig = GenConfig()
    selection: str = AUTO  # "auto" (IDP), "none", "concat" or a prompt name
    request_id: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the `logprobs` most likely tokens, best first


@dataclass
class RunningRequest:
    """A request in flight: the prompt it uses, sampled tokens, timings."""

    request: GenRequest
    prompt_used: str  # resolved selection: a prompt name, "none" or "concat"
    method: str  # idp | prompt | none | concat | lora
    scores: dict[str, float] | None = None
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    next_pos: int = 0  # position id of the next token fed to the model
    finish_reason: str | None = None  # "stop" | "length"
    stop_at: int | None = None  # character index where a stop string begins
    selection_s: float = 0.0
    prefill_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # perf_counter per emitted token

    @property
    def config(self) -> GenConfig:
        return self.request.config


@dataclass(frozen=True)
class GenResult:
    """A finished request, with the stats the server turns into metrics."""

    request_id: str
    prompt_used: str  # a prompt name of the bank, "none" or "concat"
    method: str
    scores: dict[str, float] | None
    input_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    prompt_logprobs: list[TokenLogprob | None] | None
    output_logprobs: list[TokenLogprob] | None
    selection_s: float
    prefill_s: float
    token_times: list[float]


@dataclass
class Batch:
    """Running rows that share one padded KV cache."""

    seqs: list[RunningRequest]
    cache: DynamicCache
    mask: Tensor  # [B, S] 1 where the cache holds a real token
    last_tokens: Tensor  # [B] token each row feeds at the next step


class Engine:
    """Runs requests on one model with one resident prompt bank (or none, e.g. LoRA mode)."""

    def __init__(
        self,
        lm: LoadedModel,
        store: PromptKVStore | None,
        *,
        select_config: SelectConfig = SelectConfig(),
        method_without_bank: str = "none",
        batch_invariant: bool = True,
    ) -> None:
        self.lm = lm
        # Each row's attention over its own keys only (attention.py): a request's output does
        # not depend on the requests batched beside it, at some cost per decode step.
        self.batch_invariant = batch_invariant
        self.store = store
        self.select_config = select_config
        self.method_without_bank = method_without_bank  # "lora" for a LoRA-mode server
        causal_lm = lm.model.get_base_model() if hasattr(lm.model, "get_base_model") else lm.model
        self.decoder = causal_lm.get_decoder()
        # Prefill attends to the cached prefix and causally to the input without a dense mask.
        self.split_prefill = enable_prefix_attention(causal_lm)
        self.lm_head = causal_lm.get_output_embeddings()
        self.device = lm.device
        tok = lm.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        eos = lm.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = {*eos, *([tok.eos_token_id] if tok.eos_token_id is not None else [])}
        self.vocab_size = int(lm.model.config.vocab_size)

    @property
    def selection_rule(self) -> str | None:
        """The rule `auto` uses here ("attention", "centroid" or "linear"; None without a
        bank)."""
        if self.store is None:
            return None
        return self.store.rule if self.select_config.rule == "bank" else self.select_config.rule

    # ---- validation (callers check before queueing) -------------------------------------
    def prefix_length(self, selection: str) -> int:
        """Longest prefix a request with this selection can get (raises KeyError if unknown)."""
        if self.store is None:
            if selection in (AUTO, NONE):
                return 0
            raise KeyError(f"prompt selection {selection!r} needs a prompt bank; none is loaded")
        if selection == AUTO:
            return max(self.store.lengths)
        entry = self.store.entry(selection)
        return 0 if entry is None else entry.length

    def validate(self, request: GenRequest) -> None:
        """Raise ValueError (bad input) or KeyError (unknown prompt) before any work is queued."""
        ids = request.input_ids
        if not ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        prefix = self.prefix_length(request.selection)
        need = prefix + len(ids) + request.config.max_tokens
        if need > self.lm.max_context:
            raise ValueError(
                f"this request needs {need} positions (prompt prefix {prefix} + input {len(ids)} "
                f"+ max_tokens {request.config.max_tokens}); the model's context is "
                f"{self.lm.max_context}"
            )

    # ---- admit: selection pass + prefill --------------------------------------------------
    @torch.inference_mode()
    def start(self, requests: list[GenRequest]) -> Batch:
        """Select a prompt for every `auto` row, then prefill all rows on their prompt's KV.

        Returns a batch whose rows each hold their first sampled token (rows asking for
        max_tokens 0 come back already finished; `retire` removes them).
        """
        seqs = [self._new_sequence(r) for r in requests]
        self._select(seqs)
        return self._prefill(seqs)

    def _new_sequence(self, request: GenRequest) -> RunningRequest:
        if self.store is None:
            prompt, method = NONE, self.method_without_bank
        elif request.selection == AUTO:
            prompt, method = AUTO, "idp"
        else:
            prompt = request.selection
            method = prompt if prompt in (NONE, CONCAT) else "prompt"
        return RunningRequest(request, prompt, method, generator=make_generator(request.config))

    def _select(self, seqs: list[RunningRequest]) -> None:
        auto = [s for s in seqs if s.prompt_used == AUTO]
        if not auto or self.store is None:
            return
        # Batch-invariant: each row scored alone (its pass is ~1 % of a request), so padding
        # from other rows cannot move a near-tie; otherwise one pass over the padded batch.
        groups = [[s] for s in auto] if self.batch_invariant else [auto]
        seconds = 0.0
        for group in groups:
            rows = [s.request.input_ids for s in group]
            ids, mask = self._pad(rows)
            with forward_rows(Rows([len(r) for r in rows])):  # packed: kernel per row length
                sel = select_prompts(self.lm.model, self.store, ids, mask, self.select_config)
            for s, idx, row in zip(group, sel.indices.tolist(), sel.scores.tolist(),
                                   strict=True):
                s.prompt_used = self.store.names[idx]
                s.scores = dict(zip(self.store.names, row, strict=True))
            seconds += sel.seconds
        for s in auto:
            s.selection_s = seconds  # the admission's whole selection time, as one pass had

    def _entry(self, seq: RunningRequest) -> PrefixKV | None:
        return None if self.store is None else self.store.entry(seq.prompt_used)

    def _pad(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Right-pad token rows: ([B, T] ids, [B, T] mask)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _prefill(self, seqs: list[RunningRequest]) -> Batch:
        start = time.perf_counter()
        entries = [self._entry(s) for s in seqs]
        lengths = [len(s.request.input_ids) for s in seqs]
        ids, input_mask = self._pad([s.request.input_ids for s in seqs])  # [B, T]
        reserve = ids.shape[1] + max(s.config.max_tokens for s in seqs)
        cache, prefix_mask = stack_prefixes(entries, model=self.lm.model, reserve=reserve)
        mask = torch.cat([prefix_mask, input_mask], dim=1)  # [B, W+T]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_mask.shape[1] :]
        # Packed layers pick a kernel by each row's length; exact attention computes each row
        # on its own keys; neither depends on the batch.
        with forward_rows(Rows(lengths, exact=self.batch_invariant)):
            hidden = self.decoder(
                input_ids=ids,
                attention_mask=prefix_attention_mask(prefix_mask) if self.split_prefill else mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state  # [B, T, d]
        rows = torch.arange(len(seqs), device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.lm_head(hidden[rows, last]).float()  # [B, V]
        for b, s in enumerate(seqs):
            s.next_pos = int(prefix_mask[b].sum()) + lengths[b]
            if s.config.echo:
                s.prompt_logprobs = self._prompt_logprobs(s, hidden[b, : lengths[b]])
        elapsed = time.perf_counter() - start
        for s in seqs:
            s.prefill_s = elapsed
            if s.config.max_tokens == 0:
                s.finish_reason = "length"
        tokens = self._emit(seqs, logits)
        return Batch(seqs, cache, mask, tokens)

    def _prompt_logprobs(self, seq: RunningRequest, hidden: Tensor) -> list[TokenLogprob | None]:
        """Log-probability of each input token given the ones before it (first: None)."""
        logp = torch.log_softmax(self.lm_head(hidden[:-1]).float(), dim=-1)  # [T-1, V]
        ids = seq.request.input_ids
        k = max(seq.config.logprobs or 0, 1)
        out: list[TokenLogprob | None] = [None]
        for t in range(1, len(ids)):
            out.append(_token_logprob(logp[t - 1], ids[t], k))
        return out

    # ---- decode ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: Batch) -> None:
        """One decode step for every row: feed its last token, sample the next."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.seqs), 1)], dim=1)
        positions = torch.tensor([[s.next_pos] for s in batch.seqs], device=self.device)
        # Exact attention gathers each row's real keys into one canonical layout (rows.py).
        with forward_rows(decode_rows(batch.mask, exact=self.batch_invariant)):
            hidden = self.decoder(
                input_ids=batch.last_tokens[:, None],
                attention_mask=batch.mask,
                position_ids=positions,
                past_key_values=batch.cache,
                use_cache=True,
            ).last_hidden_state[:, -1]  # [B, d]
        for s in batch.seqs:
            s.next_pos += 1
        batch.last_tokens = self._emit(batch.seqs, self.lm_head(hidden).float())

    def _emit(self, seqs: list[RunningRequest], logits: Tensor) -> Tensor:
        """Sample a token per row, record it and its logprobs, and mark finished rows."""
        tokens = sample(logits, [s.config for s in seqs], [s.generator for s in seqs])
        logp = None
        if any(s.config.logprobs is not None for s in seqs):
            logp = torch.log_softmax(logits, dim=-1)
        now = time.perf_counter()
        for b, (s, tok) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            if s.finish_reason is not None:
                continue
            s.output_ids.append(tok)
            s.token_times.append(now)
            if logp is not None and s.config.logprobs is not None:
                s.output_logprobs.append(_token_logprob(logp[b], tok, s.config.logprobs))
            self._check_finished(s, tok)
        return tokens

    def _check_finished(self, s: RunningRequest, tok: int) -> None:
        if tok in self.eos_ids and not s.config.ignore_eos:
            s.finish_reason = "stop"
        elif s.config.stop and self._find_stop(s):
            s.finish_reason = "stop"
        elif len(s.output_ids) >= s.config.max_tokens or s.next_pos >= self.lm.max_context:
            s.finish_reason = "length"

    def _find_stop(self, s: RunningRequest) -> bool:
        # A stop string ending at the new token lies within its last len(stop) characters, so
        # decode only a tail of tokens: >= 1 UTF-8 byte each (a byte-level token may hold part
        # of a character), +8 for special tokens that decode to nothing.
        tail_tokens = max(len(x.encode()) for x in s.config.stop) + 8
        tail = self.decode(s.output_ids[-tail_tokens:])
        if not any(stop in tail for stop in s.config.stop):
            return False
        text = self.decode(s.output_ids)
        s.stop_at = min(i for i in (text.find(stop) for stop in s.config.stop) if i >= 0)
        return True

    def decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, s: RunningRequest) -> str:
        """The generated text so far, cut before a stop string."""
        return self.decode(s.output_ids)[: s.stop_at]

    # ---- batch bookkeeping ----------------------------------------------------------------
    def retire(self, batch: Batch) -> tuple[Batch | None, list[RunningRequest]]:
        """Remove finished rows; returns (the running rest or None, the finished ones)."""
        done = [s for s in batch.seqs if s.finish_reason is not None]
        if not done:
            return batch, []
        keep = [i for i, s in enumerate(batch.seqs) if s.finish_reason is None]
        if not keep:
            return None, done
        rows = torch.tensor(keep, device=self.device)
        mask = batch.mask[rows]
        start = int((mask.sum(0) > 0).nonzero()[0])  # drop columns no remaining row uses
        seqs = [batch.seqs[i] for i in keep]
        cache = select_rows(batch.cache, rows, start=start, reserve=_remaining(seqs))
        return Batch(seqs, cache, mask[:, start:], batch.last_tokens[rows]), done

    def merge(self, a: Batch, b: Batch) -> Batch:
        """One batch of a's rows then b's rows (time axes aligned by left padding)."""
        seqs = a.seqs + b.seqs
        cache = concat_rows(a.cache, b.cache, reserve=_remaining(seqs))
        width = max(a.mask.shape[1], b.mask.shape[1])
        pad = torch.nn.functional.pad
        mask = torch.cat([pad(m, (width - m.shape[1], 0)) for m in (a.mask, b.mask)])
        return Batch(seqs, cache, mask, torch.cat([a.last_tokens, b.last_tokens]))

    def result(self, s: RunningRequest) -> GenResult:
        return GenResult(
            request_id=s.request.request_id,
            prompt_used=s.prompt_used,
            method=s.method,
            scores=s.scores,
            input_ids=list(s.request.input_ids),
            output_ids=list(s.output_ids),
            text=self.text(s),
            finish_reason=s.finish_reason or "length",
            prompt_logprobs=s.prompt_logprobs,
            output_logprobs=s.output_logprobs if s.config.logprobs is not None else None,
            selection_s=s.selection_s,
            prefill_s=s.prefill_s,
            token_times=list(s.token_times),
        )

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Run requests as one batch to completion; results in request order."""
        for r in requests:
            self.validate(r)
        batch: Batch | None = self.start(requests)
        seqs = list(batch.seqs)
        while batch is not None:
            batch, _ = self.retire(batch)
            if batch is not None:
                self.step(batch)
        return [self.result(s) for s in seqs]


def _remaining(seqs: list[RunningRequest]) -> int:
    return max(s.config.max_tokens - len(s.output_ids) for s in seqs) + 1


def _token_logprob(logp: Tensor, token: int, k: int) -> TokenLogprob:
    top = torch.topk(logp, k) if k > 0 else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), pairs)
