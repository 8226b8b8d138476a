"""Load test of a running gateway on loopback: N concurrent clients for T seconds.

    python -m bench.load --url http://127.0.0.1:8000 --clients 8 --duration 60 --mode blend \
        --server-pid PID --out runs/load-blend-8.json

First each question is asked once, alone (``--no-warmup`` skips it), so the timed phase sees the
steady state: chunk KV in the server's memory tier. Then each client loops until the time or the
request budget runs out, picking (seeded) a ``/query``
answered as JSON, a streamed ``/query`` (server-sent events), or a ``POST /documents`` of a small
new document. Afterwards every distinct (question, mode, chunks) a query got is asked again, alone,
with those chunks given as documents (``/v1/chat/completions``, no retrieval): greedy decoding
must give the same answer, so any difference is a concurrency bug. Reports requests/s, p50/p99
latency per kind, errors by status, answer mismatches, the server's RSS (sampled), and the TTFT
histogram from ``/metrics``. Only loopback addresses are accepted: this is not a tool to load
someone else's server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from harness.data import SAMPLE_QUESTIONS, sample_questions
from harness.report import write_json
from harness.stats import summarize

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_DURATION_S = 600
KINDS = ("query", "stream", "add")


@dataclass
class Record:
    kind: str
    status: int
    latency_s: float
    key: tuple | None = None  # (question, mode, chunk texts) of a successful query
    answer: str | None = None
    ttft_s: float | None = None


@dataclass
class Settings:
    url: str
    clients: int
    duration_s: float
    mode: str
    max_requests: int = 2000
    max_tokens: int = 16
    top_k: int = 4
    mix: dict[str, float] = field(default_factory=lambda: {"query": 0.6, "stream": 0.35, "add": 0.05})
    seed: int = 0
    server_pid: int | None = None
    warmup: bool = False


async def run_load(s: Settings, questions: list[str]) -> dict:
    """The whole test: load phase, RSS sampling beside it, then the sequential check."""
    host = urlparse(s.url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"refusing to load {s.url}: only loopback ({', '.join(sorted(LOOPBACK))})")
    if not 0 < s.duration_s <= MAX_DURATION_S:
        raise ValueError(f"duration must be in (0, {MAX_DURATION_S}] seconds")
    limits = httpx.Limits(max_connections=s.clients + 4)
    async with httpx.AsyncClient(base_url=s.url, timeout=300, limits=limits) as http:
        if s.warmup:  # every question once, alone: chunk KV is in the memory tier before timing
            for question in questions:  # "reuse": loads the chunks' KV, computes only the question
                body = dict(query_body(s, question, stream=False), max_tokens=1, mode="reuse")
                await http.post("/query", json=body)
        rss_start = rss_mb(s.server_pid)
        records: list[Record] = []
        budget = [s.max_requests]
        deadline = time.monotonic() + s.duration_s
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(s.server_pid, stop))
        started = time.monotonic()
        clients = [
            client(http, s, questions, random.Random(s.seed * 1000 + i), deadline, budget, records)
            for i in range(s.clients)
        ]
        await asyncio.gather(*clients)
        elapsed = time.monotonic() - started
        stop.set()
        rss = await sampler
        mismatches = await sequential_check(http, s, records)
        metrics = (await http.get("/metrics")).text
    return report(s, records, elapsed, mismatches, [rss_start, *rss], metrics)


async def client(http, s: Settings, questions, rng, deadline, budget, records) -> None:
    kinds, weights = zip(*s.mix.items(), strict=True)
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        kind = rng.choices(kinds, weights)[0]
        start = time.monotonic()
        try:
            record = await ONE[kind](http, s, rng.choice(questions), rng)
        except httpx.HTTPError as err:  # a dropped or timed-out connection counts as an error
            record = Record(kind, 0, 0.0, answer=type(err).__name__)
        record.latency_s = time.monotonic() - start
        records.append(record)


def query_body(s: Settings, question: str, stream: bool) -> dict:
    return {
        "question": question,
        "mode": s.mode,
        "top_k": s.top_k,
        "max_tokens": s.max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }


def answered(kind: str, body: dict, question: str, mode: str) -> Record:
    key = (question, mode, tuple(c["text"] for c in body["chunks"]))
    return Record(kind, 200, 0.0, key, body["answer"], body["stats"]["ttft_s"])


async def one_query(http, s: Settings, question: str, rng) -> Record:
    r = await http.post("/query", json=query_body(s, question, stream=False))
    if r.status_code != 200:
        return Record("query", r.status_code, 0)
    return answered("query", r.json(), question, s.mode)


async def one_stream(http, s: Settings, question: str, rng) -> Record:
    async with http.stream("POST", "/query", json=query_body(s, question, stream=True)) as r:
        if r.status_code != 200:
            await r.aread()
            return Record("stream", r.status_code, 0)
        event, last = None, None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                last = (event, line[len("data: ") :])
                event = None
    if last is None or last[0] != "done":  # an error event after the status line went out
        return Record("stream", 599, 0)
    return answered("stream", json.loads(last[1]), question, s.mode)


async def one_add(http, s: Settings, question: str, rng) -> Record:
    text = f"Load test note {rng.random():.6f}: the kiln cools overnight."
    doc = {"id": f"load-{uuid.uuid4().hex[:12]}", "text": text}
    r = await http.post("/documents", json={"documents": [doc]})
    return Record("add", r.status_code, 0)


ONE = {"query": one_query, "stream": one_stream, "add": one_add}


async def sequential_check(http, s: Settings, records: list[Record]) -> list[dict]:
    """Ask each distinct prompt again, alone, with its chunks given; list answers that differ."""
    answers: dict[tuple, set[str]] = defaultdict(set)
    for r in records:
        if r.key is not None:
            answers[r.key].add(r.answer)
    mismatches = []
    for (question, mode, chunks), seen in answers.items():
        body = {
            "messages": [{"role": "user", "content": question}],
            "documents": list(chunks) or None,
            "mode": mode,
            "max_tokens": s.max_tokens,
            "temperature": 0.0,
        }
        r = await http.post("/v1/chat/completions", json=body)
        ok = r.status_code == 200
        alone = r.json()["choices"][0]["message"]["content"] if ok else f"HTTP {r.status_code}"
        if seen != {alone}:
            mismatches.append({"question": question, "mode": mode, "alone": alone, "seen": sorted(seen)})
    return mismatches


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


async def sample_rss(pid: int | None, stop: asyncio.Event, every_s: float = 0.5) -> list[float]:
    samples = []
    while pid is not None and not stop.is_set():
        samples.append(rss_mb(pid))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
    return samples


def ttft_histogram(metrics: str) -> dict[str, dict]:
    """Cumulative TTFT bucket counts, count and sum per mode, from the Prometheus text."""
    out: dict[str, dict] = defaultdict(lambda: {"buckets": {}})
    for name, labels, value in re.findall(r"^blendrag_ttft_seconds_(\w+)\{([^}]*)\} (\S+)$", metrics, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        mode = fields["mode"]
        if name == "bucket":
            out[mode]["buckets"][fields["le"]] = float(value)
        else:
            out[mode][name] = float(value)
    return dict(out)


def rss_summary(rss: list[float | None]) -> dict | None:
    rss = [x for x in rss if x is not None]
    return {"start": rss[0], "max": max(rss), "end": rss[-1], "samples": len(rss)} if rss else None


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), **summarize(values, (50, 99)), "max": max(values)}


def report(s: Settings, records: list[Record], elapsed: float, mismatches, rss, metrics: str) -> dict:
    statuses = Counter(r.status for r in records)
    return {
        "clients": s.clients,
        "mode": s.mode,
        "duration_s": round(elapsed, 2),
        "requests": len(records),
        "requests_per_s": len(records) / elapsed if elapsed else 0.0,
        "by_kind": {kind: sum(r.kind == kind for r in records) for kind in KINDS},
        "status": {str(code): n for code, n in sorted(statuses.items())},
        "errors": {str(code): n for code, n in sorted(statuses.items()) if code not in (200, 202)},
        "server_errors": sum(n for code, n in statuses.items() if code >= 500 or code == 0),
        "latency_s": {kind: percentiles([r.latency_s for r in records if r.kind == kind]) for kind in KINDS}
        | {"all": percentiles([r.latency_s for r in records])},
        "ttft_s_from_responses": percentiles([r.ttft_s for r in records if r.ttft_s is not None]),
        "distinct_prompts_checked": len({r.key for r in records if r.key is not None}),
        "mismatches": mismatches,
        "server_rss_mb": rss_summary(rss),
        "ttft_histogram": ttft_histogram(metrics),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help=f"seconds (at most {MAX_DURATION_S})")
    p.add_argument("--mode", default="blend", choices=("blend", "full", "reuse", "prefix"))
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--mix", default="query=0.6,stream=0.35,add=0.05", help="weights of query, stream, add")
    p.add_argument("--questions", type=Path, default=SAMPLE_QUESTIONS, help="JSON list of {question}")
    p.add_argument("--server-pid", type=int, help="sample this process's RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip asking each question once before timing")
    p.add_argument("--out", type=Path, help="write the report as JSON here too")
    args = p.parse_args(argv)
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    if set(mix) - set(KINDS):
        p.error(f"--mix kinds must be among {KINDS}")
    settings = Settings(
        args.url,
        args.clients,
        args.duration,
        args.mode,
        args.max_requests,
        args.max_tokens,
        args.top_k,
        mix,
        args.seed,
        args.server_pid,
        not args.no_warmup,
    )
    questions = sample_questions(args.questions)
    result = asyncio.run(run_load(settings, questions))
    summary = {k: v for k, v in result.items() if k != "ttft_histogram"}
    print(json.dumps(summary, indent=2))
    if args.out:
        write_json(args.out, result, indent=2)
    return result


if __name__ == "__main__":
    main()
