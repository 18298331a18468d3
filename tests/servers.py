"""Real server processes on free loopback ports, for HTTP and deployment tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tiny import random_bank, tiny_llama

from idp_core.lab.bench import free_port, wait_healthy

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


class RemoteServer:
    """`python -m server` in a subprocess; waits for /health, stops with SIGTERM."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True, timeout_s: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "--port", str(self.port), "--dtype", "float32",
               *args]
        # A file, not a pipe: an unread pipe fills up and blocks the server's logging.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="idp-server-", suffix=".log")
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=self.log,
            stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1],
        )
        if wait_ready:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        try:
            wait_healthy(self.proc, self.url, timeout_s)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{self.output()}") from None
        except TimeoutError:
            self.stop()
            raise

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def output(self) -> str:
        """Everything the server logged (stops it first)."""
        self.stop()
        return Path(self.log.name).read_text()
