"""Real server processes on free loopback ports, for HTTP and deployment tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tiny import random_bank, tiny_llama

from idp_core.lab.servers import ServerProcess, free_port  # noqa: F401  (tests import both)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_artefacts(folder: Path, *, max_context: int = 512) -> dict[str, Path]:
    """A tiny random Llama checkpoint (with chat template), a 3-prompt bank and a LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    lm = tiny_llama(seed=0, max_context=max_context)
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    model_dir, bank_dir, lora_dir = folder / "model", folder / "bank", folder / "lora"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    random_bank(lm).save(bank_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    peft_model.save_pretrained(lora_dir)
    return {"model": model_dir, "bank": bank_dir, "lora": lora_dir}


class RemoteServer(ServerProcess):
    """A test server: float32 weights, then the test's own flags."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True, timeout_s: float = 120.0) -> None:
        super().__init__("--dtype", "float32", *args, env=env, wait_ready=wait_ready,
                         timeout_s=timeout_s)


def metric(url: str, name: str) -> float:
    """The sum of every /metrics sample whose line starts with `name` (labels included)."""
    import httpx

    text = httpx.get(url + "/metrics").text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name))


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 60.0,
               poll_s: float = 0.05) -> None:
    """Poll `check` until it is true (a refused connection counts as false); TimeoutError
    naming `what` after `timeout_s`. Tests order events with this, never with a fixed sleep."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
