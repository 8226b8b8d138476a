"""Full prefill and blend TTFT on an idle CPU and on one shared with other work, per engine setting.

    flock /tmp/blendrag-cpu.lock .venv/bin/python -m bench.busy_cpu [--loads 0,1,2] \\
        [--policies default,passive] [--threads 2,1] [--n 2] [--repeats 1] [--out runs/busy_cpu.json]

The competing work is ``--loads`` processes that spin on a core each (default: none, half the
cores, all of them). Under each load, every setting runs side by side, in an order that rotates
from one prompt to the next so that none always runs first: full prefill at each ``--threads``
(torch's intra-op threads), and blend at each ``--threads`` with the layer-wise KV loader thread
on and off (``BlendEngine.prefetch``), each under each ``--policies``: how an OpenMP thread
waits at a barrier, ``default`` (libgomp spins a while, then sleeps), ``passive`` (it sleeps at
once, ``OMP_WAIT_POLICY=PASSIVE``, what the ``blendrag`` command sets) or ``spin10k`` (a shorter
spin, ``GOMP_SPINCOUNT=10000``). libgomp reads these once, when torch loads, so each policy has
its own worker process and engine; the idle worker blocks on its pipe.

Chunk KV is precomputed into the CLI's kind of store (memory in front of a disk directory)
before any timing. Prompts: the first ``--n`` bundled sample questions, each over its own
document and the next ``--top-k`` - 1 sample documents (the demo's prompts: one chunk per
document, about 1,550 tokens), or with ``--dataset`` (e.g. ../shared/data/musique_dev.json)
that dataset's first questions over their first passages. Reported per load and setting: the
mean over prompts of each prompt's median TTFT, and blend's speedup over full prefill with the
same policy and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from blendrag.cli.demo import SAMPLES, sample_questions
from harness.data import load_prompts
from harness.report import settings, write_json

Prompt = tuple[list[str], str]  # (chunks, question)
# (mode, threads, prefetch) inside one worker; full prefill loads no stored KV: prefetch False.
Setting = tuple[str, int, bool]
# How long an OpenMP thread spins at a barrier before it sleeps: libgomp's own default (300,000
# spins), at once (PASSIVE), or after 10,000 spins. The environment of each worker.
POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
}
REPLY = "busy_cpu> "  # marks the worker's answers among anything else on its stdout


def sample_prompts(n: int, top_k: int) -> list[Prompt]:
    """Each sample question over its own document, then the next ``top_k - 1`` in name order."""
    docs = sorted(p for p in (SAMPLES / "corpus").iterdir() if p.is_file())
    names = [p.name for p in docs]
    prompts = []
    for q in sample_questions()[:n]:
        i = names.index(q["doc_id"])
        picked = [docs[(i + j) % len(docs)] for j in range(top_k)]
        prompts.append(([p.read_text(encoding="utf-8") for p in picked], q["question"]))
    return prompts


@contextmanager
def spinners(n: int) -> Iterator[None]:
    """``n`` processes that each keep a core busy, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)  # let them reach the scheduler before the first timing
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def worker_env(policy: str) -> dict[str, str]:
    """This process's environment with ``policy``'s OpenMP wait settings instead of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return env | POLICIES[policy]


class Worker:
    """A process with its own engine under one OpenMP wait policy, timing one prefill per call."""

    def __init__(self, policy: str, job: Path) -> None:
        argv = [sys.executable, "-m", "bench.busy_cpu", "--worker", str(job)]
        self.policy = policy
        self.proc = subprocess.Popen(
            argv, env=worker_env(policy), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.torch_threads = int(self._reply())  # once loaded, precomputed and warmed up

    def ttft(self, setting: Setting, prompt: int) -> float:
        self.proc.stdin.write(json.dumps([*setting, prompt]) + "\n")
        self.proc.stdin.flush()
        return float(self._reply())

    def _reply(self) -> str:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return line[len(REPLY) :].strip()
        raise RuntimeError(f"bench worker ({self.policy}) exited with status {self.proc.wait()}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve(job_path: Path) -> int:
    """The worker's side: load, precompute, warm every setting up, then time what stdin asks."""
    import torch

    from blendrag import BlendEngine

    job = json.loads(job_path.read_text())
    prompts, candidates = job["prompts"], [tuple(s) for s in job["settings"]]
    default_threads = torch.get_num_threads()
    engine = BlendEngine.from_pretrained(job["model"], store=job["kv_dir"], device="cpu")

    def ttft(setting: Setting, prompt: int) -> float:
        mode, threads, prefetch = setting
        torch.set_num_threads(threads)
        engine.prefetch = prefetch
        chunks, question = prompts[prompt]
        return engine.prefill(chunks, question, mode=mode).stats.ttft_s

    for chunks, _ in prompts:
        engine.precompute(chunks)
    for s in candidates:  # each thread count's pool, the first calls' allocations
        ttft(s, 0)
    print(f"{REPLY}{default_threads}", flush=True)
    for line in sys.stdin:
        *setting, prompt = json.loads(line)
        print(f"{REPLY}{ttft(tuple(setting), prompt)}", flush=True)
    return 0


def candidate_settings(threads: list[int]) -> list[Setting]:
    full = [("full", t, False) for t in threads]
    blend = [("blend", t, prefetch) for t in threads for prefetch in (True, False)]
    return full + blend


def measure(
    workers: dict[str, Worker], candidates: list[Setting], n_prompts: int, load: int, repeats: int
) -> dict[tuple[str, Setting], float]:
    """Mean over prompts of each prompt's median TTFT, per (policy, setting), under ``load``."""
    keys = [(policy, s) for policy in workers for s in candidates]
    times: dict[tuple[str, Setting], list[list[float]]] = {k: [[] for _ in range(n_prompts)] for k in keys}
    with spinners(load):
        for round_ in range(repeats * n_prompts):
            prompt, shift = round_ % n_prompts, round_ % len(keys)
            for policy, s in keys[shift:] + keys[:shift]:
                times[policy, s][prompt].append(workers[policy].ttft(s, prompt))
    return {k: statistics.mean(statistics.median(t) for t in per_prompt) for k, per_prompt in times.items()}


def table(
    results: dict[int, dict[tuple[str, Setting], float]], policies: list[str], threads: list[int]
) -> list[dict]:
    rows = []
    for load, by_key in results.items():
        for policy in policies:
            for t in threads:
                full = by_key[policy, ("full", t, False)]
                for prefetch in (True, False):
                    blend = by_key[policy, ("blend", t, prefetch)]
                    rows.append(
                        dict(
                            load=load,
                            policy=policy,
                            threads=t,
                            prefetch=prefetch,
                            full_s=full,
                            blend_s=blend,
                            speedup=full / blend,
                        )
                    )
    return rows


def print_table(rows: list[dict]) -> None:
    header = ("spinners", "policy", "threads", "prefetch", "full s", "blend s", "speedup")
    print(" ".join(f"{h:>8}" for h in header))
    for r in rows:
        print(
            f"{r['load']:>8} {r['policy']:>8} {r['threads']:>8} {'on' if r['prefetch'] else 'off':>8} "
            f"{r['full_s']:>8.2f} {r['blend_s']:>8.2f} {r['speedup']:>7.1f}x"
        )


def str_list(text: str) -> list[str]:
    return text.split(",")


def int_list(text: str) -> list[int]:
    return [int(x) for x in str_list(text)]


def policy_list(text: str) -> list[str]:
    policies = str_list(text)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policies {sorted(unknown)}; choose from {sorted(POLICIES)}"
        )
    return policies


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="python -m bench.busy_cpu", description=__doc__.splitlines()[0])
    p.add_argument(
        "--loads",
        type=int_list,
        default=sorted({0, cores // 2, cores}),
        help="spinning processes, one run per count (default: 0, half the cores, all of them)",
    )
    p.add_argument(
        "--policies",
        type=policy_list,
        default=["default", "passive"],
        help=f"OpenMP wait policies, of {', '.join(POLICIES)} (default: default,passive)",
    )
    p.add_argument(
        "--threads",
        type=int_list,
        default=sorted({cores, max(1, cores - 1)}, reverse=True),
        help="torch intra-op thread counts to compare (default: all cores and one fewer)",
    )
    p.add_argument("--dataset", type=Path, default=None, help="a dataset JSON instead of the samples")
    p.add_argument("--n", type=int, default=2, help="prompts")
    p.add_argument("--top-k", type=int, default=4, help="chunks per prompt")
    p.add_argument("--repeats", type=int, default=1, help="timings per setting and prompt (median)")
    p.add_argument("--model", default=None, help="local checkpoint dir (default: the embedded model)")
    p.add_argument("--out", type=Path, default=Path("runs/busy_cpu.json"))
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a worker's job file (internal)
    args = p.parse_args(argv)
    if args.worker is not None:
        return serve(args.worker)

    if args.dataset is not None:
        prompts, source = load_prompts(args.dataset, args.n, args.top_k), str(args.dataset)
    else:
        prompts, source = sample_prompts(args.n, args.top_k), "sample corpus"
    candidates = candidate_settings(args.threads)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        job = Path(tmp) / "job.json"
        job.write_text(
            json.dumps({"prompts": prompts, "settings": candidates, "model": args.model, "kv_dir": tmp})
        )
        workers = {}
        for policy in args.policies:  # one after the other: the second finds the KV on disk
            workers[policy] = Worker(policy, job)
            stack.callback(workers[policy].close)
        start = time.perf_counter()
        results = {
            load: measure(workers, candidates, len(prompts), load, args.repeats) for load in args.loads
        }
        elapsed = time.perf_counter() - start
        default_threads = next(iter(workers.values())).torch_threads
    rows = table(results, args.policies, args.threads)
    print(
        f"{len(prompts)} prompts ({source}, top-k {args.top_k}), {cores} cores, torch default "
        f"{default_threads} threads; mean of per-prompt medians of {args.repeats}; {elapsed:.0f} s timed"
    )
    print_table(rows)
    report = {
        "settings": settings(args),
        "machine": {"cpu_count": cores, "torch_threads": default_threads, "platform": platform.platform()},
        "prompts": source,
        "rows": rows,
    }
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
