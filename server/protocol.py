"""OpenAI-compatible request/response schemas; `to_gen_config` is the only bridge to the core."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from idp_core.config import GenConfig

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SamplingFields(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: disabled")
    n: int = Field(1, ge=1, le=1, description="only 1 choice per prompt is supported")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    user: str | None = None
    ignore_eos: bool = False
    prompt_selection: str = Field(
        "auto", description='"auto" (IDP), "none", "concat" or a prompt name from /v1/prompts'
    )

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def gen_config(self, *, max_tokens: int, logprobs: int | None, echo: bool) -> GenConfig:
        # top_p 0 with temperature 0 is greedy anyway; keep GenConfig's (0, 1] invariant.
        return GenConfig(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p if self.top_p > 0 else 1e-9,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=self.stop_strings(),
            logprobs=logprobs,
            echo=echo,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stream_options: dict[str, Any] | None = Field(
        None, description="accepted so OpenAI clients may send it; ignored (no usage chunk)")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_gen_config(self, default_max_tokens: int = 16) -> GenConfig:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self.gen_config(max_tokens=max_tokens, logprobs=self.logprobs, echo=self.echo)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream_options: dict[str, Any] | None = Field(
        None, description="accepted so OpenAI clients may send it; ignored (no usage chunk)")

    def to_gen_config(self, default_max_tokens: int) -> GenConfig:
        max_tokens = next((x for x in (self.max_completion_tokens, self.max_tokens)
                           if x is not None), default_max_tokens)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.gen_config(max_tokens=max_tokens, logprobs=logprobs, echo=False)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_used: str | None = Field(None, description="prompt of the bank used (IDP extension)")
    selection_scores: dict[str, float] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_used: str | None = Field(None, description="prompt of the bank used (IDP extension)")
    selection_scores: dict[str, float] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
