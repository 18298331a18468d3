"""Server settings: the only place that reads the environment (prefix IDP_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every field can be set as IDP_<NAME> in the environment or as a CLI flag."""

    model_config = SettingsConfigDict(env_prefix="IDP_", protected_namespaces=())

    model: str = Field("", description="checkpoint folder or .gguf; empty: embedded default")
    bank: str = Field("", description="prompt bank folder; empty: shipped default; 'none': no bank")
    lora: str = Field("", description="peft LoRA adapter folder: LoRA mode (no bank)")
    served_model_name: str = Field("", description="name in the API; empty: the model's name")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    device: str = "cpu"
    max_batch_size: int = Field(16, ge=1, description="rows decoded together")
    max_batch_tokens: int = Field(
        16384, ge=1, description="input + output tokens in flight (cached prompt prefixes "
        "excluded)")
    scheduling: Literal["continuous", "static"] = Field(
        "continuous", description="static: a batch runs to its end before new requests join "
        "(a baseline for benchmarks)")
    max_queue: int = Field(256, ge=0, description="requests waiting for a batch slot")
    max_body_bytes: int = Field(2_000_000, ge=1024)
    max_stop_strings: int = Field(16, ge=0)
    request_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    selection_rule: Literal["bank", "attention", "centroid"] = Field(
        "bank", description="how 'auto' picks a prompt: the bank's own rule, the first-layer "
        "attention pass, or the nearest stored centroid")
    selection_score: Literal["mean", "sum"] = "mean"
    selection_align: Literal["start", "end"] = Field(
        "end", description="prompt positions in the IDP pass: ending right before the input as "
        "served, or from 0")
    strict_fingerprint: bool = False
    api_key: str = Field("", description="require 'Authorization: Bearer <key>' when set")
    metrics_require_key: bool = False
    fault_token_id: int = Field(
        -1, description="testing only: a decode step holding a request whose prompt contains "
        "this token id raises (-1: off)")
    log_prompts: bool = Field(False, description="log prompt text (off: only lengths)")
