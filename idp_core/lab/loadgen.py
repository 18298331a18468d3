"""`idp loadgen`: closed-loop streaming load against running servers (asyncio + httpx).

Bounded in requests and time, and only for the URLs given (run it against loopback). Targets
are interleaved per concurrency level (A B A B ...) so drift hits all alike. Each request asks
for exactly `max_tokens` tokens (ignore_eos), so throughput counts are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval" / \
    "wikitext2_raw_test.rows.jsonl"


@dataclass
class RequestStats:
    ok: bool
    status: int
    latency_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0


def prompt_texts(path: Path, num: int, chars: int, seed: int) -> list[str]:
    """`num` slices of WikiText-2 of about `chars` characters, deterministic for a seed."""
    rows = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
    text = " ".join(r.strip() for r in rows if r.strip())
    rng = random.Random(seed)
    return [text[i : i + chars] for i in (rng.randrange(len(text) - chars) for _ in range(num))]


async def one_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]
                      ) -> RequestStats:
    start = time.perf_counter()
    last, first, itl, chunks = start, None, [], 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                return RequestStats(False, r.status_code, time.perf_counter() - start)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    return RequestStats(False, 500, now - start)
                if not event["choices"][0]["text"]:
                    continue
                chunks += 1
                if first is None:
                    first = now - start
                else:
                    itl.append(now - last)
                last = now
    except httpx.HTTPError:
        return RequestStats(False, 0, time.perf_counter() - start)
    return RequestStats(True, 200, time.perf_counter() - start, first, itl,
                        payload["max_tokens"])


async def run_level(url: str, concurrency: int, prompts: list[str], args: argparse.Namespace
                    ) -> dict[str, Any]:
    """`concurrency` workers send requests back to back until the count or time runs out."""
    queue = list(prompts[: args.requests_per_level])
    stats: list[RequestStats] = []
    deadline = time.perf_counter() + args.duration_s

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < deadline:
            payload = {"prompt": queue.pop(), "max_tokens": args.max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}
            stats.append(await one_request(client, url, payload))

    limits = httpx.Limits(max_connections=concurrency)
    start = time.perf_counter()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = [s for s in stats if s.ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    itl = [x for s in ok for x in s.itl_s]
    return {"concurrency": concurrency, "sent": len(stats), "completed": len(ok),
            "failed": len(stats) - len(ok),
            "status_counts": dict(sorted(_count(s.status for s in stats).items())),
            "wall_s": wall, "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(s.tokens for s in ok) / wall,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(itl),
            "latency_s": percentiles([s.latency_s for s in ok])}


def _count(xs: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p95": None, "p99": None}
    qs = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return {"p50": statistics.median(xs), "p95": qs[94], "p99": qs[98]}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| target | conc. | done/sent | req/s | tok/s | TTFT p50 / p95 / p99 s | "
             "ITL p50 / p95 / p99 s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        t, i = r["ttft_s"], r["itl_s"]
        fmt = lambda d: " / ".join("-" if d[k] is None else f"{d[k]:.3f}"  # noqa: E731
                                   for k in ("p50", "p95", "p99"))
        lines.append(f"| {r['target']} | {r['concurrency']} | {r['completed']}/{r['sent']} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {fmt(t)} | "
                     f"{fmt(i)} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for target in dict.fromkeys(r["target"] for r in results):
        rs = [r for r in results if r["target"] == target]
        xs = [r["concurrency"] for r in rs]
        a.plot(xs, [r["tokens_per_s"] for r in rs], "o-", label=target)
        b.plot(xs, [r["ttft_s"]["p50"] or 0 for r in rs], "o-", label=f"{target} p50")
        b.plot(xs, [r["ttft_s"]["p99"] or 0 for r in rs], "x--", label=f"{target} p99")
    for ax, title in ((a, "throughput (tokens/s)"), (b, "time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(targets: list[list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """This machine and commit, and what each target reports it serves (its /v1/models)."""
    from idp_core.lab.provenance import machine

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    served = {}
    for name, url in targets:
        try:
            served[name] = httpx.get(url.rstrip("/") + "/v1/models", headers=headers,
                                     timeout=10).json()["data"][0]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            served[name] = {"error": repr(e)}
    return {**machine(), "targets": served}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", required=True,
                        help="NAME=URL of a running server (repeat to compare, interleaved)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--requests-per-level", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=120.0, help="per level and target")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default="", help="sent as 'Authorization: Bearer <key>'")
    parser.add_argument("--data", default=str(WIKITEXT))
    parser.add_argument("--out", default="docs/bench", help="folder for serving.json/.md/.png")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    targets = [t.split("=", 1) for t in args.target]
    if any(len(t) != 2 for t in targets):
        raise SystemExit("--target must be NAME=URL")
    prompts = prompt_texts(Path(args.data), args.requests_per_level, args.prompt_chars,
                           args.seed)
    results = []
    for concurrency in args.concurrency:
        for name, url in targets:  # interleaved
            r = asyncio.run(run_level(url.rstrip("/"), concurrency, prompts, args))
            results.append({"target": name, "url": url, **r})
            print(f"{name} c={concurrency}: {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['completed']}/{r['sent']} ok", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(
        {"env": environment(targets, args), "args": vars(args), "results": results}, indent=2,
        default=str) + "\n")
    (out / "serving.md").write_text(table(results) + "\n")
    plot(results, out / "serving.png")
    print(table(results))
    return 0 if all(r["failed"] == 0 for r in results) else 1

