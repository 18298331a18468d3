"""`idp soak`: a bounded load and soak test at and past capacity (loopback only; stops itself).

Clients send a mix of prompt lengths and max_tokens, some streaming, for a fixed time. Every
request must complete or be refused with 429/503 and a Retry-After header; no other 5xx.
With `--server-pid` it samples the server's resident memory, open file descriptors and threads
after warm-up and at the end, to show nothing leaks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import httpx

from idp_core.lab.loadgen import WIKITEXT, percentiles, prompt_texts


def process_stats(pid: int) -> dict[str, int]:
    """Resident memory (kB), open file descriptors and threads of a local process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


async def one(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        if payload["stream"]:
            async with client.stream("POST", url + "/v1/completions", json=payload) as r:
                body = b"".join([chunk async for chunk in r.aiter_bytes()])
        else:
            r = await client.post(url + "/v1/completions", json=payload)
            body = r.content
    except httpx.HTTPError as e:
        return {"status": 0, "error": type(e).__name__, "latency_s": time.perf_counter() - start}
    errored = b'data: {"error"' in body  # a failure after the stream's headers went out
    ok = r.status_code == 200 and not errored and (
        not payload["stream"] or body.endswith(b"data: [DONE]\n\n"))
    return {"status": 500 if errored else r.status_code, "ok": ok,
            "retry_after": "retry-after" in r.headers, "latency_s": time.perf_counter() - start}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prompts = prompt_texts(Path(args.data), 256, args.max_prompt_chars, args.seed)
    results: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    deadline = start + args.duration_s
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline and len(results) < args.max_requests:
            payload = {"prompt": rng.choice(prompts)[: rng.randint(8, args.max_prompt_chars)],
                       "max_tokens": rng.choice(args.max_tokens), "temperature": 0,
                       "stream": rng.random() < args.stream_fraction}
            results.append(await one(client, args.url, payload))

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            samples.append({"t_s": time.perf_counter() - start, **process_stats(args.server_pid)})
            await asyncio.sleep(args.sample_every_s)

    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits, headers=headers) as c:
        tasks = [client_loop(c) for _ in range(args.clients)]
        if args.server_pid:
            tasks.append(sampler())
        await asyncio.gather(*tasks)
    if args.server_pid:
        await asyncio.sleep(2.0)  # let the server retire the last requests
        samples.append({"t_s": time.perf_counter() - start, **process_stats(args.server_pid)})
    return summarise(results, samples, args)


def summarise(results: list[dict[str, Any]], samples: list[dict[str, Any]],
              args: argparse.Namespace) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    refused = [r for r in results if r["status"] in (429, 503)]
    other_5xx = [r for r in results if r["status"] >= 500 and r["status"] != 503]
    done = [r for r in results if r.get("ok")]
    out: dict[str, Any] = {
        "sent": len(results), "completed": len(done), "refused": len(refused),
        "bad_request": sum(400 <= r["status"] < 500 and r["status"] != 429 for r in results),
        "refused_without_retry_after": sum(not r["retry_after"] for r in refused),
        "server_errors": len(other_5xx), "transport_errors": statuses.get("0", 0),
        "status_counts": statuses, "latency_s": percentiles([r["latency_s"] for r in done]),
    }
    if samples:
        warm = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
        first, last = warm[0], samples[-1]
        mid = min(warm, key=lambda s: abs(s["t_s"] - (first["t_s"] + last["t_s"]) / 2))
        out["process"] = {"after_warmup": first, "end": last,
                          "rss_growth_pct": 100 * (last["rss_kb"] / first["rss_kb"] - 1),
                          "rss_growth_second_half_pct": 100 * (last["rss_kb"] / mid["rss_kb"] - 1),
                          "fd_growth": last["fds"] - first["fds"],
                          "thread_growth": last["threads"] - first["threads"],
                          "samples": samples}
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-prompt-chars", type=int, default=1200)
    parser.add_argument("--stream-fraction", type=float, default=0.3)
    parser.add_argument("--server-pid", type=int, default=0, help="sample its RSS, fds, threads")
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--sample-every-s", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(WIKITEXT))
    parser.add_argument("--out", default="", help="write the summary JSON here")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    summary = asyncio.run(soak(args))
    brief = {**summary, "process": {k: v for k, v in summary.get("process", {}).items()
                                    if k != "samples"}}
    print(json.dumps(brief, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    healthy = summary["server_errors"] == 0 and summary["transport_errors"] == 0 and \
        summary["refused_without_retry_after"] == 0
    return 0 if healthy else 1
