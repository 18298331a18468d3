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
    weights: Literal["auto", "packed", "dense"] = Field(
        "auto", description="GPTQ linear layers as packed int4 on torch's int4 kernel "
        "('packed'; refused where none takes them), dequantized once to dense tensors "
        "('dense'), or packed where a kernel exists ('auto')")
    batch_invariant: bool = Field(
        True, description="attention computes each row on its own keys (CPU): a request's "
        "output does not depend on what is batched beside it; false: batched kernels, faster")
    max_batch_size: int = Field(16, ge=1, description="rows decoded together")
    max_batch_tokens: int = Field(
        16384, ge=1, description="input + output tokens in flight (cached prompt prefixes "
        "excluded)")
    scheduling: Literal["continuous", "static"] = Field(
        "continuous", description="static: a batch runs to its end before new requests join "
        "(a baseline for benchmarks)")
    max_queue: int = Field(256, ge=1, description="requests waiting for a batch slot (also "
                           "the most prompts one request may carry)")
    max_body_bytes: int = Field(2_000_000, ge=1024)
    max_stop_strings: int = Field(16, ge=0)
    request_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    selection_rule: Literal["bank", "attention", "centroid", "linear"] = Field(
        "bank", description="how 'auto' picks a prompt: the bank's own rule, the first-layer "
        "attention pass, the nearest stored centroid or the stored linear probe")
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


class ReplicaSettings(BaseSettings):
    """`idp serve-ray`: how many replicas of the server run on Ray Serve, and when they scale.

    Every field is an IDP_RAY_<NAME> variable and a flag of `idp serve-ray`; the model, bank and
    batching settings of each replica are the plain server's (`Settings`).
    """

    model_config = SettingsConfigDict(env_prefix="IDP_RAY_")

    address: str = Field("", description="Ray cluster to join ('auto': the one `ray start` made); "
                         "empty: start a local one-node Ray")
    min_replicas: int = Field(1, description="replicas kept when idle (at least 1)")
    max_replicas: int = Field(2, description="replicas under load (one per GPU on a GPU host)")
    target_ongoing_requests: float = Field(
        16.0, description="autoscaling signal: requests in flight per replica the autoscaler aims "
        "at (default: one full batch of the default max_batch_size)")
    max_ongoing_requests: int = Field(
        64, description="requests Serve lets into one replica at a time; above max_batch_size so "
        "the replica's own queue refills its batch between decode steps")
    upscale_delay_s: float = Field(30.0, description="load must stay high this long to add a "
                                   "replica")
    downscale_delay_s: float = Field(600.0, description="load must stay low this long to remove "
                                     "a replica")
    look_back_period_s: float = Field(30.0, description="window the load is averaged over")
    metrics_interval_s: float = Field(10.0, description="how often each replica reports its "
                                      "load to the autoscaler (below look_back_period_s)")
    cpus_per_replica: float = Field(1.0, description="CPUs Ray reserves per replica (also its "
                                    "torch threads)")
    gpus_per_replica: float = Field(-1.0, description="GPUs per replica; -1: 1 when --device is "
                                    "cuda, else 0")
    app_name: str = "idp"
    metrics_export_port: int = Field(8080, ge=0, le=65535,
                                     description="a local Ray's Prometheus port (every replica's "
                                     "idp_* metrics, with a replica label)")

    def check(self) -> None:
        """ValueError (one line) for autoscaling settings that cannot work."""
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be at least 1, got {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests must be above 0, got "
                             f"{self.target_ongoing_requests}")
        if self.max_ongoing_requests < self.target_ongoing_requests:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below "
                             f"target_ongoing_requests ({self.target_ongoing_requests}): "
                             "replicas could never reach the target")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not 0 < self.metrics_interval_s < self.look_back_period_s:
            raise ValueError(f"metrics_interval_s ({self.metrics_interval_s}) must be above 0 "
                             f"and below look_back_period_s ({self.look_back_period_s})")
        if self.cpus_per_replica < 0:
            raise ValueError(f"cpus_per_replica must be at least 0, got {self.cpus_per_replica}")
