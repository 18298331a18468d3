"""Summarise the recovery grid that `report.py` runs (point estimates, paired bootstrap CIs,
share of the compression loss recovered) and render it: Table 1-style Markdown and two PNGs.
Reads saved raw results, so older runs re-render without running anything. `idp compare`:
paired differences between two saved rows of reports on the same items (two banks, say)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from idp_core.lab.tasks import (
    GROUP_ORDER,
    PRIMARY,
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_means,
    lambada_perplexity,
)

NUM_BOOT = 1000
IDP = "+IDP"


# ---- summarising ----------------------------------------------------------------------------
def summarise(raw: dict[str, dict[str, Any]], *, seed: int = 0,
              pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Point estimates, 95% CIs and paired bootstrap replicates of every figure, per method;
    `pairs` (a, b) to difference, by default the grid's (see `differences`).

    Averages are unweighted means over tasks of each task's primary metric (acc, or exact
    match); their CIs resample every task's items independently (a generator per task) with
    the same indices for every method, so differences between methods are paired.
    """
    methods = list(raw)
    tasks = list(next(iter(raw.values()))["tasks"])
    groups = {g: [t for t in tasks if raw[methods[0]]["tasks"][t]["group"] == g]
              for g in (*GROUP_ORDER, "other")}
    groups = {g: ts for g, ts in groups.items() if ts}
    rows: dict[str, Any] = {}
    reps: dict[str, dict[str, np.ndarray]] = {}
    points: dict[str, dict[str, float]] = {}  # the average and pooled figures themselves
    for m in methods:
        row: dict[str, Any] = {"params": raw[m]["params"], "tasks": {}, "averages": {}}
        reps[m] = {}
        for t in tasks:
            r = raw[m]["tasks"][t]
            cell: dict[str, Any] = {"n": r["num_items"], "primary": PRIMARY[r["kind"]],
                                    "prefix_used": r.get("prefix_used", {})}
            for key, values in r["per_item"].items():
                if key == "loglik":
                    cell["perplexity"] = lambada_perplexity(values)
                    cell["perplexity_ci"] = bootstrap_ci(
                        values, stat=lambda s: np.exp(-s.mean(axis=1)), num=NUM_BOOT, seed=seed,
                        key=t)
                    continue
                cell[key] = float(np.mean(values))
                cell[f"{key}_ci"] = bootstrap_ci(values, num=NUM_BOOT, seed=seed, key=t)
            reps[m][t] = bootstrap_means(r["per_item"][cell["primary"]], num=NUM_BOOT, seed=seed,
                                         key=t)
            row["tasks"][t] = cell
        for name, ts in [*groups.items(), ("Average", tasks)]:
            point = float(np.mean([row["tasks"][t][row["tasks"][t]["primary"]] for t in ts]))
            rep = np.mean([reps[m][t] for t in ts], axis=0)
            reps[m][name] = rep
            row["averages"][name] = {"value": point, "ci": _ci(rep)}
        # Every item weighted alike: tasks of 25 items weigh what tasks of 500 do in the
        # average above, so their noise dominates its CI; this one weighs them by their size.
        sizes = np.array([len(raw[m]["tasks"][t]["per_item"][row["tasks"][t]["primary"]])
                          for t in tasks])
        reps[m]["Items pooled"] = sizes @ np.array([reps[m][t] for t in tasks]) / sizes.sum()
        points[m] = {"Average": row["averages"]["Average"]["value"],
                     "Items pooled": float(sizes @ np.array(
                         [row["tasks"][t][row["tasks"][t]["primary"]] for t in tasks])
                         / sizes.sum())}
        row["wikitext2_ppl"] = raw[m].get("wikitext2_ppl")
        rows[m] = row
    return {"methods": methods, "tasks": tasks, "groups": groups, "rows": rows,
            "differences": differences(methods, points, reps, pairs)}


def _ci(rep: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(rep, [0.025, 0.975])
    return float(lo), float(hi)


def differences(methods: list[str], points: dict[str, dict[str, float]],
                reps: dict[str, dict[str, np.ndarray]],
                pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """a - b for each pair on the overall average (tasks weighted alike) and on all items
    pooled (items weighted alike; `pooled_*`), with paired bootstrap CIs; by default the
    compression gap (uncompressed minus compressed), then IDP minus every other method."""
    if pairs is None:
        pairs = [("uncompressed", "compressed")] \
            if {"uncompressed", "compressed"} <= set(methods) else []
        if IDP in methods:
            pairs += [(IDP, m) for m in methods if m != IDP]
    out = []
    for a, b in pairs:
        d: dict[str, Any] = {"a": a, "b": b}
        for key, name in (("", "Average"), ("pooled_", "Items pooled")):
            diff = reps[a][name] - reps[b][name]
            d.update({f"{key}diff": points[a][name] - points[b][name], f"{key}ci": _ci(diff),
                      f"{key}p_le_0": float(np.mean(diff <= 0))})
        out.append(d)
    return out


def recovered_ppl(summary: dict[str, Any], method: str = IDP) -> float | None:
    """Share of the WikiText-2 perplexity increase a method wins back (in perplexity)."""
    rows = summary["rows"]
    if not {"uncompressed", "compressed", method} <= set(rows):
        return None
    ppl = {m: rows[m]["wikitext2_ppl"] for m in ("uncompressed", "compressed", method)}
    if any(v is None for v in ppl.values()) or ppl["compressed"] == ppl["uncompressed"]:
        return None
    return (ppl["compressed"] - ppl[method]) / (ppl["compressed"] - ppl["uncompressed"])


def recovered(summary: dict[str, Any], method: str = IDP) -> float | None:
    """Share of the compression loss a method wins back: (m - compressed) / (orig - compressed)."""
    rows = summary["rows"]
    if not {"uncompressed", "compressed", method} <= set(rows):
        return None
    avg = {m: rows[m]["averages"]["Average"]["value"] for m in ("uncompressed", "compressed",
                                                                  method)}
    gap = avg["uncompressed"] - avg["compressed"]
    return None if gap == 0 else (avg[method] - avg["compressed"]) / gap


# ---- rendering ------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _rows_git(meta: dict[str, Any]) -> str:
    """", tasks ran at: row c1, c2; ..." where a row's tasks ran at another commit than the
    render's (reused or resumed rows); empty otherwise."""
    rows = {name: c for name, c in (meta.get("rows_git") or {}).items() if c != [meta["git"]]}
    if not rows:
        return ""
    return " (tasks ran at: " + "; ".join(f"{n} {', '.join(c) or 'an unrecorded commit'}"
                                          for n, c in rows.items()) + ")"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    tasks, groups, rows = summary["tasks"], summary["groups"], summary["rows"]
    avgs = [*groups, "Average"]
    head = ["Method", *[f"{t} (n={rows[summary['methods'][0]]['tasks'][t]['n']})" for t in tasks],
            *avgs, "Trainable params", "WikiText-2 ppl"]
    lines = [f"# Accuracy recovery on {meta['model']}", "",
             f"Command: `{meta['command']}`", "",
             f"Git {meta['git']}{_rows_git(meta)}, dtype {meta['dtype']}, {meta['date']}; "
             f"limit {meta['limit']} "
             f"items per task (fixed seed {meta['seed']}); `.sample` files used whole. "
             "Accuracy in % (exact match for TriviaQA/WebQuestions, LAMBADA last-word acc); "
             "averages are unweighted means over tasks. WikiText-2 perplexity over "
             f"{meta['ppl_windows']} windows of {meta['ppl_seq_len']} tokens.", "",
             "## Table 1 layout (accuracy, %)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in summary["methods"]:
        r = rows[m]
        cells = [pct(r["tasks"][t][r["tasks"][t]["primary"]]) for t in tasks]
        cells += [pct(r["averages"][a]["value"]) for a in avgs]
        ppl = r["wikitext2_ppl"]
        cells += [f"{r['params']:,}", "-" if ppl is None else f"{ppl:.2f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## 95% bootstrap confidence intervals (%)", "",
              "| Method | " + " | ".join([*tasks, *avgs]) + " |",
              "|" + "---|" * (1 + len(tasks) + len(avgs))]
    for m in summary["methods"]:
        r = rows[m]
        cis = [r["tasks"][t][r["tasks"][t]["primary"] + "_ci"] for t in tasks]
        cis += [r["averages"][a]["ci"] for a in avgs]
        lines.append(f"| {m} | " + " | ".join(f"{pct(lo)}–{pct(hi)}" for lo, hi in cis) + " |")
    extra = [t for t in tasks if "acc_norm" in rows[summary["methods"][0]]["tasks"][t]]
    lam = [t for t in tasks if "perplexity" in rows[summary["methods"][0]]["tasks"][t]]
    if extra or lam:
        lines += ["", "## acc_norm (%) and LAMBADA perplexity, with 95% CIs", "",
                  "| Method | " + " | ".join([*(f"{t} acc_norm" for t in extra),
                                             *(f"{t} ppl" for t in lam)]) + " |",
                  "|" + "---|" * (1 + len(extra) + len(lam))]
        for m in summary["methods"]:
            c = rows[m]["tasks"]
            cells = [f"{pct(c[t]['acc_norm'])} ({pct(c[t]['acc_norm_ci'][0])}–"
                     f"{pct(c[t]['acc_norm_ci'][1])})" for t in extra]
            cells += [f"{c[t]['perplexity']:.1f} ({c[t]['perplexity_ci'][0]:.1f}–"
                      f"{c[t]['perplexity_ci'][1]:.1f})" for t in lam]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        lines += ["", "## Differences on the overall average (paired bootstrap, points)", "",
                  "Average: the mean over tasks (as in Table 1); items pooled: the mean over every "
                  "item of every task, so a task weighs what its items do.", "",
                  "| difference | average | 95% CI | share of replicates <= 0 | items pooled "
                  "| 95% CI | share <= 0 |", "|---|---|---|---|---|---|---|"]
        for d in summary["differences"]:
            lines.append(f"| {d['a']} − {d['b']} | {pct(d['diff'])} | {pct(d['ci'][0])} to "
                         f"{pct(d['ci'][1])} | {d['p_le_0']:.3f} | {pct(d['pooled_diff'])} | "
                         f"{pct(d['pooled_ci'][0])} to {pct(d['pooled_ci'][1])} | "
                         f"{d['pooled_p_le_0']:.3f} |")
    idp_rows = [m for m in summary["methods"] if m.startswith(IDP)]
    if idp_rows:
        lines += ["", "## Which prompt IDP chose (share of requests)", "",
                  "| Method | " + " | ".join(tasks) + " |", "|" + "---|" * (1 + len(tasks))]
        for m in idp_rows:
            cells = []
            for t in tasks:
                used = rows[m]["tasks"][t]["prefix_used"]
                total = sum(used.values()) or 1
                cells.append(", ".join(f"{k} {100 * v / total:.0f}%"
                                       for k, v in sorted(used.items())))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    recovering = [m for m in summary["methods"] if m not in ("uncompressed", "compressed")
                  and recovered(summary, m) is not None]
    if recovering:
        lines += ["", "## Share of the compression loss recovered", ""]
    for m in recovering:
        rec, rec_ppl = recovered(summary, m), recovered_ppl(summary, m)
        assert rec is not None
        lines.append(f"- {m} recovers {100 * rec:.0f}% of the average-accuracy loss "
                     "((m − compressed) / (uncompressed − compressed))"
                     + ("" if rec_ppl is None else
                        f" and {100 * rec_ppl:.0f}% of the WikiText-2 perplexity increase") + ".")
    lines += ["", "Figures: `recovery_tasks.png` (per task, 95% CIs), `recovery_params.png` "
                  "(average accuracy vs trainable parameters, the paper's Figure 4)."]
    return "\n".join(lines) + "\n"


def plots(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, rows = summary["methods"], summary["rows"]
    cols = [*summary["tasks"], *summary["groups"], "Average"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cols) * len(methods) / 4), 4.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals, los, his = [], [], []
        for c in cols:
            if c in rows[m]["tasks"]:
                cell = rows[m]["tasks"][c]
                v, (lo, hi) = cell[cell["primary"]], cell[cell["primary"] + "_ci"]
            else:
                v, (lo, hi) = rows[m]["averages"][c]["value"], rows[m]["averages"][c]["ci"]
            vals.append(100 * v)
            los.append(100 * (v - lo))
            his.append(100 * (hi - v))
        ax.bar([j + i * width for j in range(len(cols))], vals, width, yerr=[los, his],
               capsize=1.5, label=m, error_kw={"lw": 0.6})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))],
                  cols, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("accuracy % (95% bootstrap CI)")
    ax.set_title("Accuracy by task and recovery method")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "recovery_tasks.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in methods:
        a = rows[m]["averages"]["Average"]
        if rows[m]["params"] == 0:  # no trainable parameters: a reference level
            ax.axhline(100 * a["value"], ls="--", lw=1, color="grey" if m == "compressed"
                       else "black", label=f"{m} ({100 * a['value']:.1f})")
            continue
        x = rows[m]["params"]
        ax.errorbar([x], [100 * a["value"]], yerr=[[100 * (a["value"] - a["ci"][0])],
                                                   [100 * (a["ci"][1] - a["value"])]],
                    fmt="o", capsize=3, label=f"{m} ({100 * a['value']:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.legend(fontsize=7)
    ax.set_ylabel("average accuracy % (95% CI)")
    ax.set_title("Average accuracy vs trainable parameters")
    fig.tight_layout()
    fig.savefig(out / "recovery_params.png", dpi=120)
    plt.close(fig)


# ---- comparing two saved rows ---------------------------------------------------------------
SAME_ITEMS = ("limit", "seed", "tasks")  # settings two rows must share to be paired item by item


def compare_rows(a: dict[str, Any], b: dict[str, Any], *, names: tuple[str, str] = ("a", "b"),
                 seed: int = 0) -> dict[str, Any]:
    """a - b for two saved report rows (`recovery_raw/*.json`) scored on the same items: each
    task's accuracy and the average and pooled figures, with paired bootstrap 95 % CIs."""
    for key in SAME_ITEMS:
        if a["settings"].get(key) != b["settings"].get(key):
            raise ValueError(f"{names[0]} and {names[1]} were run on other items: {key} "
                             f"{a['settings'].get(key)} vs {b['settings'].get(key)}")
    summary = summarise({names[0]: a, names[1]: b}, seed=seed, pairs=[names])
    ra, rb = (summary["rows"][n] for n in names)
    tasks = {}
    for t in summary["tasks"]:
        key = ra["tasks"][t]["primary"]
        x, y = (np.asarray(r["tasks"][t]["per_item"][key], dtype=np.float64) for r in (a, b))
        diff = x - y
        rep = diff[bootstrap_indices(len(diff), num=NUM_BOOT, seed=seed, key=t)].mean(axis=1)
        tasks[t] = {"n": len(diff), "a": ra["tasks"][t][key], "b": rb["tasks"][t][key],
                    "diff": float(diff.mean()), "ci": _ci(rep)}
    return {"a": names[0], "b": names[1], "tasks": tasks, **summary["differences"][0]}


def compare_markdown(c: dict[str, Any]) -> str:
    lines = [f"a = {c['a']}, b = {c['b']} (points; paired bootstrap 95 % CIs)", "",
             "| task | n | a | b | a - b | 95 % CI |", "|---|---|---|---|---|---|"]
    for t, r in c["tasks"].items():
        lines.append(f"| {t} | {r['n']} | {pct(r['a'])} | {pct(r['b'])} | {pct(r['diff'])} | "
                     f"{pct(r['ci'][0])} to {pct(r['ci'][1])} |")
    for key, name in (("", "average over tasks"), ("pooled_", "items pooled")):
        lines.append(f"| {name} | | | | {pct(c[key + 'diff'])} | {pct(c[key + 'ci'][0])} to "
                     f"{pct(c[key + 'ci'][1])} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="a saved report row (recovery_raw/NAME.json)")
    parser.add_argument("b", help="another row of a report on the same items")
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")


def run(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(f).read_text()) for f in (args.a, args.b))
    c = compare_rows(a, b, names=(args.a, args.b))
    if args.out:
        Path(args.out).write_text(json.dumps(c, indent=1) + "\n")
    print(compare_markdown(c), end="")
    return 0
