"""Text data for calibration, training and perplexity: read files, tokenise into fixed chunks.

Data lives outside the repository in `../shared/data/` (never copied in); paths are settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_CALIB = DATA_DIR / "calib" / "c4_sample.jsonl"
WIKITEXT2_TEST = DATA_DIR / "eval" / "wikitext2_raw_test.rows.jsonl"


def read_texts(path: str | Path) -> list[str]:
    """Documents of a data file: the `text` field of each JSONL record, or a whole text file.

    Args:
        path: a `.jsonl` file whose records have a `text` field, or any plain text file
            (read as one document).

    Returns:
        Non-empty documents in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8")
        return [text] if text.strip() else []
    texts = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_no}: a JSONL record needs a string 'text' field")
            if record["text"].strip():
                texts.append(record["text"])
    return texts


def tokenize_chunks(
    tokenizer: Any, texts: list[str], *, num_samples: int, seq_len: int
) -> Tensor:
    """Concatenate documents (separated by EOS) and cut the first tokens into equal chunks.

    Deterministic: documents are taken in order, only as many as the chunks need.

    Args:
        tokenizer: a Hugging Face tokenizer (its EOS token separates documents).
        texts: documents in order.
        num_samples: number of chunks N.
        seq_len: tokens per chunk T.

    Returns:
        [N, T] token ids (int64).
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    need = num_samples * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(
            f"the data holds {len(ids)} tokens, fewer than num_samples * seq_len = {need}"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(num_samples, seq_len)  # [N, T]


def load_chunks(
    tokenizer: Any, path: str | Path = DEFAULT_CALIB, *, num_samples: int, seq_len: int
) -> Tensor:
    """`tokenize_chunks` of a data file: [N, T] token ids."""
    return tokenize_chunks(tokenizer, read_texts(path), num_samples=num_samples, seq_len=seq_len)


def load_wikitext2(tokenizer: Any, path: str | Path = WIKITEXT2_TEST) -> Tensor:
    """The WikiText-2 test text (rows joined with blank lines, the usual way) as [T] token ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 file not found: {path}")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f if line.strip()]
    ids = tokenizer("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)  # [T]


def describe_data(path: str | Path, *, num_samples: int, seq_len: int) -> dict[str, Any]:
    """JSON-able record of which data a run used (for compress.json and bank manifests)."""
    path = Path(path).resolve()
    try:
        shown = "../shared/" + str(path.relative_to(DATA_DIR.parent))
    except ValueError:
        shown = str(path)
    return {
        "path": shown,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "num_tokens": num_samples * seq_len,
        "selection": "first tokens of the documents in file order, EOS-separated, no shuffle",
    }
