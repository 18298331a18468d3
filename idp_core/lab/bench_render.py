"""Tables (Markdown) and plots (PNG) of `idp bench` results, one of each per benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def latency_table(result: dict[str, Any]) -> str:
    lines = ["| task | L | variant | median s | p10-p90 s | x none |", "|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r["variant"] == "idp-selection-pass":
            lines.append(f"| {r['task']} | {r['seq_len']} | selection pass | {r['median']:.4f} "
                         f"| {r['p10']:.4f}-{r['p90']:.4f} | "
                         f"{100 * r['fraction_of_request']:.2f}% of IDP request |")
        else:
            lines.append(f"| {r['task']} | {r['seq_len']} | {r['variant']} | {r['median']:.3f} "
                         f"| {r['p10']:.3f}-{r['p90']:.3f} | {r['ratio_to_none']:.3f} |")
    lines += ["", "| task | L | IDP / LoRA |", "|---|---|---|"]
    lines += [f"| {r['task']} | {r['seq_len']} | {r['idp_over_lora']:.3f} ({r['lora']}) |"
              for r in result["idp_over_lora"]]
    return "\n".join(lines)


def selection_table(result: dict[str, Any]) -> str:
    lines = ["| m | B | selection s | request s | fraction |", "|---|---|---|---|---|"]
    lines += [f"| {r['bank_size']} | {r['batch']} | {r['selection_s']['median']:.4f} | "
              f"{r['request_s']['median']:.3f} | {100 * r['fraction']:.2f}% |"
              for r in result["records"]]
    return "\n".join(lines)


def prefix_table(result: dict[str, Any]) -> str:
    lines = ["| prompt (n) | B x L | cached s | recomputed s | speed-up | resident KV |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['prompt']} ({r['prompt_len']}) | {r['batch']} x {r['seq_len']} | "
              f"{r['cached_s']['median']:.3f} | {r['recomputed_s']['median']:.3f} | "
              f"{r['speedup']:.2f}x | {r['resident_kv_bytes'] / 1e6:.2f} MB |"
              for r in result["records"]]
    return "\n".join(lines)


def served_table(result: dict[str, Any]) -> str:
    lines = ["| path | B x L, new tokens | median s | p10-p90 s | tokens/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['batch']} x {r['seq_len']}, {r['new_tokens']} | "
              f"{r['median']:.3f} | {r['p10']:.3f}-{r['p90']:.3f} | {r['tokens_per_s']:.1f} |"
              for r in result["records"]]
    lines.append(f"\nserved / in-process throughput: {result['served_over_inprocess']:.3f}")
    return "\n".join(lines)


def profile_table(result: dict[str, Any]) -> str:
    groups = list(result["records"][0]["self_cpu_s"])
    gpu = "gpu_kernel_s" in result["records"][0]
    extra = " GPU kernels s | kernel launches |" if gpu else ""
    lines = ["| variant | B x L | wall s (profiled) | " + " | ".join(f"{g} s" for g in groups)
             + " | top operators (self CPU s) |" + extra,
             "|---|---|---|" + "---|" * (len(groups) + 1 + 2 * gpu)]
    for r in result["records"]:
        top = ", ".join(f"{o['op'].removeprefix('aten::')} {o['self_cpu_s']:.3f}"
                        for o in r["top_ops"][:4])
        cells = f" {r['gpu_kernel_s']:.4f} | {r['kernel_launches']} |" if gpu else ""
        lines.append(f"| {r['variant']} | {r['batch']} x {r['seq_len']} | {r['wall_s']:.3f} | "
                     + " | ".join(f"{r['self_cpu_s'][g]:.3f}" for g in groups)
                     + f" | {top} |" + cells)
    return "\n".join(lines)


def memory_table(result: dict[str, Any]) -> str:
    lines = ["| batches run | RSS MB | live tensors MB |", "|---|---|---|"]
    lines += [f"| {r['batches']} | {r['rss_mb']:.0f} | {r['live_tensor_mb']:.0f} |"
              for r in result["records"]]
    return "\n".join(lines)


def plot(kind: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if kind == "latency":
        recs = [r for r in result["records"] if r["variant"] != "idp-selection-pass"]
        groups = sorted({(r["task"], r["seq_len"]) for r in recs})
        names = list(dict.fromkeys(r["variant"] for r in recs))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [next(r["ratio_to_none"] for r in recs if (r["task"], r["seq_len"]) == g
                       and r["variant"] == name) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))],
                      [f"{t}\nL={L}" for t, L in groups])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("latency / no recovery (median)")
        ax.set_title("Latency by recovery method (lower is better)")
    elif kind == "selection":
        for m in sorted({r["bank_size"] for r in result["records"]}):
            recs = [r for r in result["records"] if r["bank_size"] == m]
            ax.plot([r["batch"] for r in recs], [100 * r["fraction"] for r in recs], "o-",
                    label=f"m={m}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("selection pass, % of request")
        ax.set_title("IDP selection overhead")
    elif kind == "memory":
        recs = [r for r in result["records"] if isinstance(r["batches"], int)]
        ax.plot([r["batches"] for r in recs], [r["rss_mb"] for r in recs], "o-", label="RSS")
        ax.plot([r["batches"] for r in recs], [r["live_tensor_mb"] for r in recs], "s-",
                label="live tensors")
        ax.axhline(result["records"][-1]["rss_mb"], color="grey", ls="--",
                   label="RSS after malloc_trim")
        ax.set_xlabel("batches of random shapes")
        ax.set_ylabel("MB")
        ax.set_title("Engine memory: allocator retention, not live tensors")
    elif kind == "profile":
        recs, bottom = result["records"], None
        for g in recs[0]["self_cpu_s"]:
            ys = [r["self_cpu_s"][g] for r in recs]
            ax.bar([r["variant"] for r in recs], ys, bottom=bottom, label=g)
            bottom = ys if bottom is None else [a + b for a, b in zip(bottom, ys, strict=True)]
        ax.set_ylabel("seconds in operator (profiler self CPU)")
        ax.set_title(f"Where one {recs[0]['batch']} x {recs[0]['seq_len']} forward goes")
    elif kind == "served":
        recs = result["records"]
        ax.bar([r["variant"] for r in recs], [r["tokens_per_s"] for r in recs])
        ax.set_ylabel("generated tokens/s (median)")
        ax.set_title(f"Same {recs[0]['batch']} requests: served / in-process = "
                     f"{result['served_over_inprocess']:.2f}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    else:
        recs = result["records"]
        xs = range(len(recs))
        ax.bar([x - 0.2 for x in xs], [r["cached_s"]["median"] for r in recs], 0.4,
               label="cached prompt KV")
        ax.bar([x + 0.2 for x in xs], [r["recomputed_s"]["median"] for r in recs], 0.4,
               label="recompute [P; X]")
        ax.set_xticks(list(xs), [f"{r['prompt']} (n={r['prompt_len']})" for r in recs])
        ax.set_ylabel("prefill seconds (median)")
        ax.set_title("Prompt as cached KV vs recomputed per request")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TABLES = {"latency": latency_table, "selection": selection_table, "prefix": prefix_table,
          "served": served_table, "memory": memory_table, "profile": profile_table}
