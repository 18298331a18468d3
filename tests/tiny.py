"""Tiny random-weight Llama models and a byte-level tokenizer, built in code (no files)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from idp_core.bank import PromptBank
from idp_core.model import LoadedModel, wrap_model

EOS = "<|eos|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + one end-of-sequence token (id 256)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def tiny_llama(
    *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
    attn: str = "sdpa", max_context: int = 512,
) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_context,
        rope_theta=10000.0,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a larger scale makes greedy choices decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return wrap_model(model, byte_tokenizer(), name="tiny-llama")


def random_bank(lm: LoadedModel, lengths: tuple[int, ...] = (3, 7, 5), seed: int = 1) -> PromptBank:
    g = torch.Generator().manual_seed(seed)
    d = lm.model.config.hidden_size
    prompts = [torch.randn(n, d, generator=g) for n in lengths]
    names = [f"p{i}" for i in range(len(lengths))]
    return PromptBank(names, prompts, lm.fingerprint.to_dict(), {"note": "random"})


def random_deep_bank(lm: LoadedModel, lengths: tuple[int, ...] = (3, 7, 5),
                     seed: int = 2) -> PromptBank:
    """Deep prompts [2, layers, Hkv, n, D]: random raw keys put through RoPE at 0..n-1."""
    from reference import rope_at

    from idp_core.kv import kv_layout

    g = torch.Generator().manual_seed(seed)
    shape = kv_layout(lm.model)
    prompts = []
    for n in lengths:
        raw = torch.randn(2, shape["num_layers"], shape["num_kv_heads"], n, shape["head_dim"],
                          generator=g)
        raw[0] = rope_at(lm, raw[0], list(range(n)))
        prompts.append(raw)
    names = [f"d{i}" for i in range(len(lengths))]
    return PromptBank(names, prompts, lm.fingerprint.to_dict(), {"note": "random"}, kind="deep")
