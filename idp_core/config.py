"""Frozen, validated configuration records for the engine (JSON-able; no env reads here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

# Selection modes a request may ask for, besides naming one prompt of the bank.
AUTO = "auto"
NONE = "none"
CONCAT = "concat"
RESERVED_SELECTIONS = (AUTO, NONE, CONCAT)

ScoreMode = Literal["mean", "sum"]
AlignMode = Literal["start", "end"]


SELECTION_RULES = ("bank", "attention", "centroid", "linear")


@dataclass(frozen=True)
class SelectConfig:
    """How IDP scores prompts in the first-layer attention pass.

    Attributes:
        score: "mean" scores prompt i by the mean attention per prompt token that the input
            tokens pay to it (the paper's rule); "sum" uses the total attention mass instead.
        align: where each prompt sits in the pass. "end" (default): prompt i at
            n_max-n_i..n_max-1, ending right before the input, so every prompt is at the same
            relative distance from the input as when it is served (RoPE sees only relative
            positions). "start": prompt i at 0..n_i-1 and the input after the longest prompt,
            so shorter prompts sit further from the input than they do when served.
        query_chunk: input tokens processed per chunk, bounding the [B, H, chunk, T] buffer.
        rule: "bank" (default) uses the rule the bank was made for; "attention" the
            first-layer attention pass; "centroid" the nearest stored centroid of the input's
            mean embedding; "linear" a stored linear probe on it (banks made by
            `idp train-bank`).
    """

    score: ScoreMode = "mean"
    align: AlignMode = "end"
    query_chunk: int = 256
    rule: str = "bank"

    def __post_init__(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"SelectConfig.rule must be one of {SELECTION_RULES}, "
                             f"got {self.rule!r}")
        if self.score not in ("mean", "sum"):
            raise ValueError(f"SelectConfig.score must be 'mean' or 'sum', got {self.score!r}")
        if self.align not in ("start", "end"):
            raise ValueError(f"SelectConfig.align must be 'start' or 'end', got {self.align!r}")
        if self.query_chunk < 1:
            raise ValueError(f"SelectConfig.query_chunk must be >= 1, got {self.query_chunk}")


@dataclass(frozen=True)
class GenConfig:
    """Per-request decoding settings.

    Attributes:
        max_tokens: new tokens to generate (0 only scores the input, for echo + logprobs).
        temperature: 0 means greedy.
        top_p: nucleus mass kept, in (0, 1].
        top_k: 0 disables top-k.
        seed: makes sampling reproducible per request.
        stop: strings that end generation; the returned text stops before them.
        logprobs: number of top alternatives to return per token (None: no logprobs).
        echo: also return the input tokens with their log-probabilities.
        ignore_eos: keep generating past the end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"GenConfig.max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"GenConfig.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"GenConfig.top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"GenConfig.logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("GenConfig.stop must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# Learning rates per method, from short runs on the default model (docs/curve/notes.md).
DEFAULT_LR = {"shallow": 3e-2, "deep": 1e-2, "lora": 2e-3}
LR_SCHEDULES = ("constant", "cosine")  # the learning rate after warm-up (lab/fit.py)


@dataclass(frozen=True)
class TrainConfig:
    """Prompt / LoRA training settings.

    Attributes:
        kind: "shallow" (input-embedding prompts, the paper's) or "deep" (every layer's keys
            and values, prefix-tuning) prompts; ignored for LoRA.
        loss: "lm" (next-token cross-entropy), "kd" (KL from the uncompressed teacher) or
            "mix" (half of each).
        init: prompts start from real text ("text": its embeddings or KV) or from random
            vocabulary rows ("vocab").
        lr: AdamW learning rate (None: DEFAULT_LR of the method: shallow, deep or lora).
        warmup: steps of linear learning-rate warm-up.
        schedule: the learning rate after warm-up: "constant" or "cosine" (down to 0 at the
            last step).
        weight_decay: AdamW weight decay.
        total_tokens: training budget in input tokens, per prompt (or for the adapter).
        seq_len: tokens per training sequence (excluding the prompt).
        batch_size: sequences per optimiser step.
        prompt_lengths: one entry per prompt of the bank.
        lora_rank: rank of the LoRA baseline.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank).
        clusters: train prompt i on cluster i of the data (k-means over mean embeddings).
        seed: seeds data order and initialisation.
        dtype: dtype of the frozen model while training ("float32" or "bfloat16"; bf16 is
            slower on CPUs without AVX-512 bf16); trained parameters and optimiser state stay
            float32.
    """

    kind: str = "shallow"
    loss: str = "lm"
    init: str = "text"
    lr: float | None = None
    warmup: int = 5
    schedule: str = "constant"
    weight_decay: float = 1e-5
    total_tokens: int = 200_000
    seq_len: int = 256
    batch_size: int = 8
    prompt_lengths: tuple[int, ...] = (26, 100)
    lora_rank: int = 4
    lora_alpha: int = 8
    clusters: bool = False
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, value, allowed in (("kind", self.kind, ("shallow", "deep")),
                                     ("loss", self.loss, ("lm", "kd", "mix")),
                                     ("init", self.init, ("text", "vocab")),
                                     ("schedule", self.schedule, LR_SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {value!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"TrainConfig.warmup must be >= 0, got {self.warmup}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(
                f"TrainConfig.seq_len/batch_size must be >= 2/1, "
                f"got {self.seq_len}/{self.batch_size}"
            )
        if self.total_tokens < self.seq_len * self.batch_size:
            raise ValueError(
                f"TrainConfig.total_tokens ({self.total_tokens}) must cover at least one step "
                f"of batch_size * seq_len = {self.batch_size * self.seq_len} tokens"
            )
        if not self.prompt_lengths or any(n < 1 for n in self.prompt_lengths):
            raise ValueError(
                f"TrainConfig.prompt_lengths must be positive, got {self.prompt_lengths}"
            )
        if self.lora_rank < 1:
            raise ValueError(f"TrainConfig.lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha < 1:
            raise ValueError(f"TrainConfig.lora_alpha must be >= 1, got {self.lora_alpha}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(
                f"TrainConfig.dtype must be 'bfloat16' or 'float32', got {self.dtype!r}"
            )

    def rate(self, method: str) -> float:
        """The learning rate for method "shallow", "deep" or "lora"."""
        return self.lr if self.lr is not None else DEFAULT_LR[method]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
