"""`idp oracle`: how much a bank's prompts differ on held-out text, and how much of that the
selection captures.

Every held-out window (of each domain file, C4 and WikiText-2) is scored under every prompt of
the bank (and none) through the serving path: echo + logprobs, in-process through the engine or
against a running server. The per-window losses give the oracle (the best prompt for each
window); the picks of each selection rule give its loss. Reported: each prompt's mean loss, the
best single prompt, the oracle's loss and the headroom (best single - oracle), and per rule its
loss, capture ((best single - rule) / headroom), agreement with the oracle and pick shares, per
source, with paired bootstrap CIs over windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from idp_core.config import AUTO, NONE, SelectConfig
from idp_core.generate import Engine, GenRequest
from idp_core.lab.evaluate import SCORE_ONLY
from idp_core.select import select_prompts

log = logging.getLogger(__name__)


# windows [[ids]], selection -> (mean NLL of tokens 1.. per window, prompt used per window)
Scorer = Callable[[list[list[int]], str], tuple[list[float], list[str | None]]]


def engine_scorer(engine: Engine, *, batch_size: int = 8) -> Scorer:
    """Scores windows through `Engine.generate`, as the server does."""
    def score(windows: list[list[int]], selection: str) -> tuple[list[float], list[str | None]]:
        nll, used = [], []
        for i in range(0, len(windows), batch_size):
            batch = [GenRequest(w, SCORE_ONLY, selection) for w in windows[i:i + batch_size]]
            for res in engine.generate(batch):
                lps = [lp.logprob for lp in (res.prompt_logprobs or [])[1:] if lp is not None]
                nll.append(-math.fsum(lps) / len(lps))
                used.append(res.prompt_used)
        return nll, used
    return score


def http_scorer(url: str, *, api_key: str = "", timeout_s: float = 600.0) -> Scorer:
    """Scores windows against a running server (POST /v1/completions, echo + logprobs)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def score(windows: list[list[int]], selection: str) -> tuple[list[float], list[str | None]]:
        nll, used = [], []
        for w in windows:
            r = client.post("/v1/completions", json={
                "prompt": w, "max_tokens": 0, "echo": True, "logprobs": 0,
                "prompt_selection": selection})
            r.raise_for_status()
            body = r.json()
            lps = [x for x in body["choices"][0]["logprobs"]["token_logprobs"][1:]
                   if x is not None]
            nll.append(-math.fsum(lps) / len(lps))
            used.append(body["choices"][0].get("prompt_used"))
        return nll, used
    return score


# ---- analysis -----------------------------------------------------------------------------
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarise(names: list[str], losses: dict[str, list[float]], sources: list[str],
              picks: dict[str, list[str]], *, num: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The oracle table from per-window losses.

    Args:
        names: the bank's prompts.
        losses: per selection (each prompt, optionally "none"), mean NLL per window.
        sources: the source (domain) of each window.
        picks: per rule, the prompt it picked for each window.

    Returns:
        JSON-able summary: per-prompt mean losses, best single, oracle, headroom, and per rule
        loss, capture, agreement and pick shares, overall and per source, with 95 % CIs.
    """
    n = len(sources)
    table = torch.tensor([losses[p] for p in names])  # [P, W]
    oracle_idx = table.argmin(0)  # [W]
    oracle = table.min(0).values
    best = min(names, key=lambda p: _mean(losses[p]))
    best_t = torch.tensor(losses[best])
    rule_t = {r: torch.tensor([losses[p][w] for w, p in enumerate(ps)])
              for r, ps in picks.items()}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (num, n), generator=g)

    def ci(stat: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
        draws = stat(idx).sort().values  # stat over [num, n] index rows -> [num]
        est = float(stat(torch.arange(n)[None])[0])
        return [round(est, 5), round(float(draws[int(0.025 * num)]), 5),
                round(float(draws[int(0.975 * num) - 1]), 5)]

    headroom = ci(lambda r: best_t[r].mean(-1) - oracle[r].mean(-1))
    out: dict[str, Any] = {
        "windows": n,
        "mean_loss": {p: round(_mean(v), 5) for p, v in losses.items()},
        "perplexity": {p: round(math.exp(_mean(v)), 4) for p, v in losses.items()},
        "best_single": best,
        "oracle_loss": round(float(oracle.mean()), 5),
        "oracle_perplexity": round(math.exp(float(oracle.mean())), 4),
        "headroom_nats": headroom,
        "headroom_share_of_best": round(headroom[0] / _mean(losses[best]), 5),
        "oracle_pick_share": {p: round(float((oracle_idx == i).float().mean()), 4)
                              for i, p in enumerate(names)},
        "rules": {},
        "by_source": {},
    }
    for r, t in rule_t.items():
        agree = [names[int(oracle_idx[w])] == picks[r][w] for w in range(n)]
        out["rules"][r] = {
            "loss": round(float(t.mean()), 5),
            "perplexity": round(math.exp(float(t.mean())), 4),
            "minus_best_nats": ci(lambda rr, t=t: t[rr].mean(-1) - best_t[rr].mean(-1)),
            "minus_best_perplexity": ci(lambda rr, t=t: t[rr].mean(-1).exp()
                                        - best_t[rr].mean(-1).exp()),
            "capture": ci(lambda rr, t=t: (best_t[rr].mean(-1) - t[rr].mean(-1))
                          / (best_t[rr].mean(-1) - oracle[rr].mean(-1)).clamp(min=1e-9)),
            "agreement": round(sum(agree) / n, 4),
            "pick_share": {p: round(picks[r].count(p) / n, 4) for p in names},
        }
    for s in dict.fromkeys(sources):
        ws = [w for w in range(n) if sources[w] == s]
        entry: dict[str, Any] = {
            "windows": len(ws),
            "mean_loss": {p: round(_mean([losses[p][w] for w in ws]), 5) for p in losses},
            "oracle_loss": round(float(oracle[ws].mean()), 5),
            "oracle_pick_share": {p: round(sum(int(oracle_idx[w]) == i for w in ws) / len(ws), 4)
                                  for i, p in enumerate(names)},
            "rules": {},
        }
        for r in picks:
            entry["rules"][r] = {
                "loss": round(_mean([losses[picks[r][w]][w] for w in ws]), 5),
                "pick_share": {p: round(sum(picks[r][w] == p for w in ws) / len(ws), 4)
                               for p in names},
            }
        if s in names:
            entry["own_pick"] = {r: entry["rules"][r]["pick_share"][s] for r in picks}
        out["by_source"][s] = entry
    own = [s for s in out["by_source"] if s in names]
    if own:
        out["own_domain_pick"] = {
            r: round(sum(picks[r][w] == sources[w] for w in range(n) if sources[w] in names)
                     / sum(sources[w] in names for w in range(n)), 4) for r in picks}
    return out


def render(summary: dict[str, Any], title: str) -> str:
    """The oracle table as Markdown."""
    names = list(summary["oracle_pick_share"])
    rules = list(summary["rules"])
    f = lambda c: f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"  # noqa: E731
    lines = [f"# {title}", "",
             f"{summary['windows']} held-out windows. Mean NLL (nats/token); perplexity in "
             f"brackets. Best single prompt: **{summary['best_single']}**; oracle "
             f"{summary['oracle_loss']:.4f} ({summary['oracle_perplexity']:.2f}); headroom "
             f"{f(summary['headroom_nats'])} nats = "
             f"{100 * summary['headroom_share_of_best']:.1f} % of the best single prompt's "
             f"loss (95 % CI).", "",
             "| rule | loss | perplexity | - best single (nats) | capture | agreement with "
             "oracle | largest pick share |", "|---|---|---|---|---|---|---|"]
    for r in rules:
        e = summary["rules"][r]
        top = max(e["pick_share"], key=e["pick_share"].get)
        lines.append(f"| {r} | {e['loss']:.4f} | {e['perplexity']:.2f} | "
                     f"{f(e['minus_best_nats'])} | {f(e['capture'])} | {e['agreement']:.2f} | "
                     f"{top} {e['pick_share'][top]:.2f} |")
    lines.append(f"| oracle | {summary['oracle_loss']:.4f} | {summary['oracle_perplexity']:.2f}"
                 f" | | 1 | 1 | {max(summary['oracle_pick_share'].values()):.2f} |")
    if "own_domain_pick" in summary:
        lines += ["", "Own-domain picks (windows of a domain that has a prompt, picking it): " +
                  ", ".join(f"{r} {v:.2f}" for r, v in summary["own_domain_pick"].items())]
    lines += ["", "Per source: mean loss of each prompt (and none), the oracle, and each rule; "
              "then pick shares.", "",
              "| source | " + " | ".join(list(summary["mean_loss"]) + ["oracle"] + rules) + " |",
              "|---" * (len(summary["mean_loss"]) + len(rules) + 2) + "|"]
    for s, e in summary["by_source"].items():
        cells = [f"{e['mean_loss'][p]:.3f}" for p in summary["mean_loss"]]
        cells += [f"{e['oracle_loss']:.3f}"] + [f"{e['rules'][r]['loss']:.3f}" for r in rules]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "| source | who | " + " | ".join(names) + " |",
              "|---|---" + "|---" * len(names) + "|"]
    for s, e in summary["by_source"].items():
        lines.append(f"| {s} | oracle | " + " | ".join(
            f"{e['oracle_pick_share'][p]:.2f}" for p in names) + " |")
        for r in rules:
            lines.append(f"| {s} | {r} | " + " | ".join(
                f"{e['rules'][r]['pick_share'][p]:.2f}" for p in names) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Pick share per source (rows) and prompt (columns): the oracle beside each rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["oracle_pick_share"])
    sources = list(summary["by_source"])
    panels = ["oracle", *summary["rules"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.45 * len(sources) + 1.6),
                             squeeze=False)
    for ax, who in zip(axes[0], panels, strict=True):
        grid = [[summary["by_source"][s]["oracle_pick_share" if who == "oracle" else "rules"]
                 [p] if who == "oracle" else
                 summary["by_source"][s]["rules"][who]["pick_share"][p] for p in names]
                for s in sources]
        ax.imshow(grid, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(sources)), sources if who == "oracle" else [""] * len(sources),
                      fontsize=7)
        ax.set_title(who, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v >= 0.05:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v > 0.6 else "black")
    fig.suptitle("pick share per source (rows) and prompt (columns)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyse(scorer: Scorer, names: list[str], windows: dict[str, torch.Tensor],
            rule_picks: Callable[[list[list[int]]], dict[str, list[str]]] | None,
            *, with_none: bool = True) -> dict[str, Any]:
    """Score every window under every prompt (and none) and under `auto`; summarise.

    Args:
        rule_picks: in-process, the picks of every rule for the windows (None: only what
            `auto` picks, as served).
    """
    flat = [w.tolist() for ws in windows.values() for w in ws]
    sources = [s for s, ws in windows.items() for _ in range(len(ws))]
    losses = {}
    for sel in [*names, *([NONE] if with_none else [])]:
        t0 = time.perf_counter()
        losses[sel], _ = scorer(flat, sel)
        log.info("%s: mean NLL %.4f over %d windows (%.0f s)", sel, _mean(losses[sel]),
                 len(flat), time.perf_counter() - t0)
    auto_loss, served = scorer(flat, AUTO)
    picks = {"served": [str(p) for p in served]}
    if rule_picks is not None:
        picks.update(rule_picks(flat))
    summary = summarise(names, losses, sources, picks)
    check = max(abs(a - losses[p][w]) for w, (a, p) in enumerate(zip(auto_loss, picks["served"],
                                                                       strict=True)))
    summary["auto_equals_picked_prompt_max_abs_diff"] = round(check, 6)
    summary["per_window"] = {"sources": sources, "losses": losses, "picks": picks}
    return summary


def in_process_picks(engine: Engine, rules: list[str]) -> Callable[[list[list[int]]],
                                                                   dict[str, list[str]]]:
    """Each rule's picks through the served selection pass, one window at a time."""
    def picks(windows: list[list[int]]) -> dict[str, list[str]]:
        out = {}
        for rule in rules:
            config = SelectConfig(score=engine.select_config.score,
                                  align=engine.select_config.align, rule=rule)
            chosen = []
            for w in windows:
                ids = torch.tensor([w], device=engine.device)
                sel = select_prompts(engine.lm.model, engine.store, ids, torch.ones_like(ids),
                                     config)
                chosen.append(engine.store.names[int(sel.indices[0])])
            out[rule] = chosen
        return out
    return picks


# ---- CLI ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bank", default=None, help="bank folder (in-process; default: the "
                        "default bank)")
    parser.add_argument("--model", default=None,
                        help="compressed checkpoint folder (default: the default compressed model)")
    parser.add_argument("--url", default=None,
                        help="score against this running server instead (its bank and rule)")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--per-source", type=int, default=12, help="held-out windows per source")
    parser.add_argument("--wikitext-windows", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-none", action="store_true", help="skip scoring without a prompt")
    parser.add_argument("--out", required=True, help="folder for oracle.json, .md and .png")


def run(args: argparse.Namespace) -> int:
    from idp_core import paths
    from idp_core.bank import PromptBank
    from idp_core.build import build_engine
    from idp_core.lab.artefacts import ensure_default_model
    from idp_core.lab.curve import eval_windows, split_sources
    from idp_core.lab.provenance import machine
    from idp_core.model import load_model

    start = time.time()
    data_dir = Path(args.data_dir)
    if args.url:
        import httpx
        from transformers import AutoTokenizer

        served = httpx.get(args.url.rstrip("/") + "/v1/prompts", timeout=30).json()
        names = [p["name"] for p in served["data"]]
        if not names:
            raise SystemExit(f"idp oracle: {args.url} serves no prompt bank")
        # the served model's tokenizer (the server takes token ids)
        tokenizer = AutoTokenizer.from_pretrained(args.model or ensure_default_model())
        scorer, rule_picks, label = http_scorer(args.url, api_key=args.api_key), None, args.url
    else:
        bank_dir = Path(args.bank) if args.bank else paths.DEFAULT_BANK
        bank = PromptBank.load(bank_dir)
        lm = load_model(args.model or ensure_default_model(), dtype=args.dtype)
        engine = build_engine(lm, bank=bank, origin=str(bank_dir))
        tokenizer, names, label = lm.tokenizer, bank.names, str(bank_dir)
        rules = ["attention", *bank.routers]
        scorer = engine_scorer(engine, batch_size=args.batch_size)
        rule_picks = in_process_picks(engine, rules)
    windows = eval_windows(tokenizer, split_sources(data_dir),
                           data_dir / "eval" / "wikitext2_raw_test.rows.jsonl",
                           per_source=args.per_source, wikitext_windows=args.wikitext_windows,
                           seq_len=args.seq_len)
    summary = analyse(scorer, names, windows, rule_picks, with_none=not args.no_none)
    summary["bank"] = label
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    summary["machine"] = machine()
    summary["wall_s"] = round(time.time() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oracle.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "oracle.md").write_text(render(summary, f"Oracle analysis of {label}"))
    plot(summary, out / "oracle.png")
    print(render(summary, f"Oracle analysis of {label}"))
    return 0
