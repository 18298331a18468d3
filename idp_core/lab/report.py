"""`idp eval tasks` (one model, several recovery methods, the task suite) and `idp report`, which
runs the recovery grid of Hoang et al. Table 1 (uncompressed / compressed / +prompt / +concat /
+LoRA / +IDP) and has `recovery.py` render it as Markdown, JSON and PNGs with 95% bootstrap CIs.
Every score goes through the serving engine.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from idp_core.lab.provenance import files_sha256, git_commit
from idp_core.lab.recovery import IDP, markdown, pct, plots, recovered, summarise
from idp_core.lab.tasks import TASKS_DIR, evaluate_task, load_task, task_files


# ---- running ------------------------------------------------------------------------------
def load_tasks(folder: str | Path, names: list[str] | None, *, limit: int | None, seed: int):
    tasks = [load_task(p, limit=limit, seed=seed) for p in task_files(folder)]
    if names:
        missing = set(names) - {t.name for t in tasks}
        if missing:
            raise ValueError(f"unknown tasks {sorted(missing)} in {folder}")
        tasks = [t for t in tasks if t.name in names]
    return tasks


def run_method(engine, tasks, *, selection: str, batch_size: int, ppl_ids, ppl_windows: int,
               ppl_seq_len: int, reuse: dict[str, Any] | None = None,
               on_task: Callable[[dict[str, Any]], None] | None = None,
               git: str | None = None) -> dict[str, Any]:
    """All tasks (and WikiText-2 perplexity if `ppl_ids` is given) for one selection; tasks in
    `reuse` (name -> saved result) are copied instead of run; `on_task` gets the result so far
    after each task that ran (to save it, so a stopped run resumes task by task)."""
    from idp_core.lab.evaluate import perplexity

    out: dict[str, Any] = {"selection": selection, "tasks": {}}
    for task in tasks:
        if reuse and task.name in reuse:
            out["tasks"][task.name] = reuse[task.name]
            continue
        start = time.perf_counter()
        res = evaluate_task(engine, task, selection=selection, batch_size=batch_size)
        res.wall_s = round(time.perf_counter() - start, 1)
        out["tasks"][task.name] = {**asdict(res), "num_total": task.num_total,
                                   "source": task.source, "group": task.group,
                                   "git": git or git_commit()}
        print(f"  {task.name:>16} [{selection}] {res.metrics()}  ({res.wall_s}s)", flush=True)
        if on_task is not None:
            on_task(out)
    if ppl_ids is not None:
        start = time.perf_counter()
        out["wikitext2_ppl"] = perplexity(engine, ppl_ids, selection=selection,
                                          seq_len=ppl_seq_len, max_windows=ppl_windows,
                                          batch_size=8, progress=True)
        print(f"  wikitext2 [{selection}] ppl {out['wikitext2_ppl']:.3f} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    return out


# ---- CLI --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="compressed checkpoint (default: built-in)")
    parser.add_argument("--original", action="store_true",
                        help="`idp eval`: the uncompressed default GGUF instead of --model")
    parser.add_argument("--bank", default=None, help="prompt bank (default: the shipped one)")
    parser.add_argument("--lora", default=None, help="LoRA adapter (default: the shipped one)")
    parser.add_argument("--methods", default=None,
                        help="comma list. eval: none, auto, auto-item, concat, prompt names, "
                             "lora. report: uncompressed, compressed, prompt, prompt:NAME, "
                             "concat, lora, idp, idp-item (default all)")
    parser.add_argument("--tasks-dir", default=str(TASKS_DIR))
    parser.add_argument("--tasks", default=None, help="comma list of task names (default all)")
    parser.add_argument("--limit", type=int, default=None, help="items per task (fixed subset)")
    parser.add_argument("--seed", type=int, default=1234, help="subset seed")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ppl-windows", type=int, default=32,
                        help="WikiText-2 windows (0: skip perplexity)")
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--out", default=None, help="eval: JSON file; report: folder")
    parser.add_argument("--render-only", action="store_true",
                        help="report: rebuild Markdown/PNG/JSON from the saved raw results")
    parser.add_argument("--notes", default=None,
                        help="report: a Markdown file appended to recovery.md (findings)")


def run(args: argparse.Namespace) -> int:
    return run_report(args) if args.command == "report" else run_eval(args)


def _ppl_ids(lm, args):
    from idp_core.lab.data import load_wikitext2

    return load_wikitext2(lm.tokenizer) if args.ppl_windows > 0 else None


def _engine(lm, bank_path):
    from idp_core.bank import PromptBank
    from idp_core.build import build_engine

    bank = PromptBank.load(bank_path)
    return build_engine(lm, bank=bank, origin=str(bank_path)), bank


def _lora_engine(source, lora_path, dtype):
    from idp_core.build import build_engine
    from idp_core.model import load_model, lora_parameters

    engine = build_engine(load_model(source, dtype=dtype), lora=lora_path)
    return engine, lora_parameters(engine.lm.model)


def run_eval(args: argparse.Namespace) -> int:
    from idp_core.build import build_engine
    from idp_core.lab.artefacts import ensure_default_model
    from idp_core.model import load_model

    source = None if args.original else (args.model or ensure_default_model())
    tasks = load_tasks(args.tasks_dir, args.tasks and args.tasks.split(","), limit=args.limit,
                       seed=args.seed)
    selections = (args.methods or "none").split(",")
    raw: dict[str, Any] = {}
    engine = None
    for sel in selections:
        if sel == "lora":
            if not args.lora:
                raise ValueError("--methods lora needs --lora ADAPTER")
            lora_engine, params = _lora_engine(source, args.lora, args.dtype)
            run_engine, sel_used = lora_engine, "none"
        else:
            if engine is None:
                lm = load_model(source, dtype=args.dtype)
                engine = _engine(lm, args.bank)[0] if args.bank else build_engine(lm)
            run_engine, sel_used, params = engine, sel, 0
        raw[sel] = {**run_method(run_engine, tasks, selection=sel_used,
                                 batch_size=args.batch_size, ppl_ids=_ppl_ids(run_engine.lm, args),
                                 ppl_windows=args.ppl_windows, ppl_seq_len=args.ppl_seq_len),
                    "params": params, "model": run_engine.lm.describe()}
    summary = summarise(raw)
    for m in selections:
        r = summary["rows"][m]
        lo, hi = r["averages"]["Average"]["ci"]
        print(f"{m}: average {pct(r['averages']['Average']['value'])}% "
              f"(95% CI {pct(lo)}-{pct(hi)})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"raw": raw, "summary": summary}, indent=1,
                                             default=float) + "\n")
    return 0


def report_methods(bank, requested: list[str] | None) -> list[tuple[str, str, str]]:
    """(row name, kind, engine selection) of the grid, in the paper's row order; `requested`
    filters by kind: uncompressed, compressed, prompt, concat, lora, idp, idp-item (IDP chosen
    once per item instead of per request); `prompt:NAME` keeps only that prompt's row."""
    rows = [("uncompressed", "uncompressed", "none"), ("compressed", "compressed", "none")]
    if bank is not None:
        rows += [(f"+prompt {n} (L={L})", "prompt", n)
                 for n, L in zip(bank.names, bank.lengths, strict=True)]
    rows += [("+concat", "concat", "concat"), ("+LoRA", "lora", "none"), (IDP, "idp", "auto"),
             (f"{IDP} per item", "idp-item", "auto-item")]
    if requested:
        named = {r.split(":", 1)[1] for r in requested if r.startswith("prompt:")}
        unknown = set(requested) - {kind for _, kind, _ in rows} - {f"prompt:{n}" for n in named
                                                                   if bank and n in bank.names}
        if unknown:
            raise ValueError(f"unknown --methods {sorted(unknown)}")
        rows = [r for r in rows if r[1] in requested or (r[1] == "prompt" and r[2] in named)]
    return rows


UNPROMPTED = ("uncompressed", "compressed", "lora")  # rows that use no prompt bank


def short_commit(commit: str) -> str:
    """A full hash (maybe "+uncommitted") in its 7-character short form, the suffix kept."""
    head, plus, rest = commit.partition("+")
    return head[:7] + plus + rest


def rows_git(raw: dict[str, Any]) -> dict[str, list[str]]:
    """The commits each row's tasks ran at (a row reused or resumed from earlier runs can carry
    several), short form, sorted."""
    return {name: sorted({short_commit(t["git"]) for t in row["tasks"].values() if t.get("git")})
            for name, row in raw.items()}


def run_report(args: argparse.Namespace) -> int:
    from idp_core.bank import PromptBank
    from idp_core.build import build_engine
    from idp_core.lab.artefacts import ensure_default_model
    from idp_core.model import load_model
    from idp_core.paths import DEFAULT_BANK, DEFAULT_LORA

    out = Path(args.out or "docs")
    raw_dir = out / "recovery_raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    # The code this process runs is the code at its start; its own records under `out` are
    # tracked files it rewrites, not a change to the code.
    commit = git_commit(ignore=out)
    bank_path, lora_path = Path(args.bank or DEFAULT_BANK), Path(args.lora or DEFAULT_LORA)
    requested = args.methods.split(",") if args.methods else None
    needs_bank = requested is None or any(r.split(":")[0] in ("prompt", "concat", "idp",
                                                              "idp-item") for r in requested)
    bank = PromptBank.load(bank_path) if needs_bank else None
    grid = report_methods(bank, requested)
    source = Path(args.model) if args.model else ensure_default_model()
    tasks = load_tasks(args.tasks_dir, args.tasks and args.tasks.split(","), limit=args.limit,
                       seed=args.seed)
    common = {"batch_size": args.batch_size, "ppl_windows": args.ppl_windows,
              "ppl_seq_len": args.ppl_seq_len}
    engines: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    # A saved method is reused only if it was run with these settings (resume after a stop),
    # on the same compressed weights (a rebuild under the same folder is another model), with
    # the same bank or adapter files where it uses them.
    compressed = {"name": source.name, "weights_sha256": files_sha256(source, "*.safetensors")}
    common_settings = {"limit": args.limit, "seed": args.seed, "dtype": args.dtype,
                       "tasks": sorted(t.name for t in tasks), **common}
    made_with = {"bank": files_sha256(bank_path) if bank is not None else None,
                 "lora": files_sha256(lora_path) if any(k == "lora" for _, k, _ in grid) else None}
    for name, kind, sel in grid:
        uses = "lora" if kind == "lora" else "bank" if kind not in UNPROMPTED else None
        settings = {**common_settings, **({uses: made_with[uses]} if uses else {}),
                    "model": "original" if kind == "uncompressed" else compressed}
        path = raw_dir / f"{kind}{'_' + sel if kind == 'prompt' else ''}.json"
        done: dict[str, Any] = {}  # tasks of a stopped run of this method, same settings
        saved_wall = 0.0
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings and saved.get("partial"):
                done, saved_wall = saved["tasks"], saved.get("wall_s", 0.0)
                print(f"== {name}: resuming after {len(done)} saved tasks", flush=True)
            elif saved.get("settings") == settings or args.render_only:
                raw[name] = saved
                continue
            else:
                print(f"== {name}: {path} was run with other settings; running it again",
                      flush=True)
        if args.render_only:
            raise FileNotFoundError(f"--render-only: no saved results {path}")
        if not done:
            print(f"== {name}", flush=True)
        params = 0
        if kind == "uncompressed":
            engine = build_engine(load_model(None, dtype=args.dtype))
        elif kind == "lora":
            engine, params = _lora_engine(source, lora_path, args.dtype)
        elif kind == "compressed" and bank is None:
            engine = build_engine(load_model(source, dtype=args.dtype))
        else:
            if "bank" not in engines:
                engines["bank"] = _engine(load_model(source, dtype=args.dtype), bank_path)[0]
            engine = engines["bank"]
            if kind in ("concat", "idp", "idp-item"):
                params = bank.num_parameters
            elif kind == "prompt":
                params = bank.prompts[bank.index(sel)].numel()
        ppl_ids, reuse = _ppl_ids(engine.lm, args), dict(done)
        if kind == "idp-item" and IDP in raw:
            # One request per item, whose whole input is the context: per item == per request.
            reuse |= {t: {**r, "reused_from": IDP} for t, r in raw[IDP]["tasks"].items()
                      if r["kind"] == "exact_match"}
            ppl_ids = None
        head = {"params": int(params), "model": engine.lm.describe(), "settings": settings}
        t0 = time.perf_counter() - saved_wall  # the wall time includes a stopped run's
        on_task = functools.partial(_save, path, head, t0, partial=True)
        result = run_method(engine, tasks, selection=sel, ppl_ids=ppl_ids, reuse=reuse,
                            on_task=on_task, git=commit, **common)
        if ppl_ids is None and kind == "idp-item" and IDP in raw:
            result["wikitext2_ppl"] = raw[IDP].get("wikitext2_ppl")
        raw[name] = _save(path, head, t0, result)
    summary = summarise(raw)
    meta = {"model": source.name, "bank": str(bank_path), "lora": str(lora_path),
            "limit": args.limit, "seed": args.seed, "dtype": args.dtype,
            "git": short_commit(commit), "rows_git": rows_git(raw),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "ppl_windows": args.ppl_windows, "ppl_seq_len": args.ppl_seq_len,
            "command": getattr(args, "command_line", None) or _command(args)}
    (out / "recovery.json").write_text(json.dumps({"meta": meta, "summary": summary},
                                                  indent=1, default=float) + "\n")
    text = markdown(summary, meta)
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    (out / "recovery.md").write_text(text)
    plots(summary, out)
    print(text)
    rec = recovered(summary)
    if rec is not None and not math.isnan(rec):
        print(f"IDP recovered {100 * rec:.0f}% of the compression gap")
    return 0


def _save(path: Path, head: dict[str, Any], t0: float, result: dict[str, Any], *,
          partial: bool = False) -> dict[str, Any]:
    """One method's results so far (`partial`) or whole, written whole or not at all."""
    data = {**result, **head, "wall_s": round(time.perf_counter() - t0, 1),
            **({"partial": True} if partial else {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)
    return data


def _command(args: argparse.Namespace) -> str:
    parts = ["idp report"]
    for key in ("model", "bank", "lora", "methods", "tasks", "limit", "seed", "dtype",
                "batch_size", "ppl_windows", "ppl_seq_len", "out"):
        value = getattr(args, key)
        if value is not None:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)
