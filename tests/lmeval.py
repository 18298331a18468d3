"""Run lm-evaluation-harness's `local-completions` model against a running server, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def run_local_completions(url: str, items: list[dict[str, Any]], task_yaml: str, task: str,
                          folder: Path) -> dict[str, Any]:
    """Write `items` as JSONL and `task_yaml` (with `{data}` for the file) into `folder`, run
    the task through the server and return lm-eval's output (samples logged)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    task_dir = folder / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / f"{task}.yaml").write_text(task_yaml.replace("{data}", str(data)))
    return simple_evaluate(
        model="local-completions",
        model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=remote,"
                   "tokenized_requests=True,max_length=512,num_concurrent=1,max_retries=1",
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=4,
    )
