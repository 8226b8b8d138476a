"""TTFT of vLLM alone against vLLM with blendrag's ``BlendConnector``, on the same token ids.

    python -m bench.vllm_ttft --dataset ../shared/data/musique_dev.json --n 20 --out runs/vllm.json

Every question's chunk KV is precomputed into the store first (indexing time, not timed). Then
one ``LLM`` (the connector loaded) answers each question plainly (no chunk structure: vLLM's full
prefill) and blended at each ratio (a per-request parameter). TTFT is vLLM's own
``first_token_latency`` (arrival to first token). Greedy answers are compared with plain vLLM's
after ``clean_answer`` (first line), as ``eval.quality`` compares with ``full``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.answers import best_f1, clean_answer
from harness.data import dataset_chunks, load_dataset
from harness.report import settings, write_json
from harness.stats import summarize
from harness.variants import float_list

PLAIN = "plain"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vllm_ttft", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True, help="JSON list of {question, answers, ctxs}")
    p.add_argument("--n", type=int, default=20, help="first N questions")
    p.add_argument("--top-k", type=int, default=6, help="chunks per question")
    p.add_argument("--ratios", type=float_list, default=[1.0, 0.3, 0.15, 0.05])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--store", default=None, help="KV store directory (default: a fresh temporary one)")
    p.add_argument("--kvcache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--out", type=Path, default=None, help="write records and summary as JSON")
    return p.parse_args(argv)


def run(args: argparse.Namespace, store: str) -> Iterator[dict[str, Any]]:
    """One record per question, as each is done."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from blendrag import BlendEngine
    from blendrag.vllm import blend_request

    items = load_dataset(args.dataset, args.n)
    chunks_of = dataset_chunks(args.top_k)
    engine = BlendEngine.from_pretrained(store=store)
    for item in items:
        engine.precompute(chunks_of(item))
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = args.kvcache_gib
    config = KVTransferConfig(
        kv_connector="BlendConnector",
        kv_connector_module_path="blendrag.vllm.connector",
        kv_role="kv_both",
        kv_connector_extra_config={"store": store},
    )
    llm = LLM(
        model=str(engine.model_path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=8192,
        kv_transfer_config=config,
        disable_log_stats=False,  # fills RequestOutput.metrics (first_token_latency)
    )

    def answer(prompt: dict, extra_args: dict | None) -> dict[str, Any]:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, extra_args=extra_args)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        text = clean_answer(out.outputs[0].text)
        return {"ttft_s": out.metrics.first_token_latency, "answer": text, "cached": out.num_cached_tokens}

    answer({"prompt_token_ids": engine.prompt_format.prefix_ids, "cache_salt": "warmup"}, None)
    for i, item in enumerate(items):
        chunks = chunks_of(item)
        ids = engine.prompt_format.build(chunks, item["question"]).ids
        # A salt per request: vLLM's prefix cache never serves one variant from another's blocks.
        results = {PLAIN: answer({"prompt_token_ids": ids, "cache_salt": f"plain-{i}"}, None)}
        for ratio in args.ratios:
            req = blend_request(engine.prompt_format, chunks, item["question"], recompute_ratio=ratio)
            results[f"blend@{ratio:g}"] = answer(req.tokens_prompt(), req.extra_args())
        for r in results.values():
            r["f1"] = best_f1(r["answer"], item["answers"])
            r["same_as_plain"] = float(r["answer"] == results[PLAIN]["answer"])
        print(i, {k: round(v["ttft_s"], 2) for k, v in results.items()}, flush=True)
        yield {"question": item["question"], "n_tokens": len(ids), "results": results}


def summarize_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    plain_mean = summarize([r["results"][PLAIN]["ttft_s"] for r in records])["mean"]
    summary = []
    for name in records[0]["results"]:
        rows = [r["results"][name] for r in records]
        ttft = summarize([row["ttft_s"] for row in rows])
        summary.append(
            {
                "variant": name,
                "n": len(rows),
                "ttft_mean_s": ttft["mean"],
                "ttft_p50_s": ttft["p50"],
                "speedup_vs_plain": plain_mean / ttft["mean"],
                "identical_to_plain": sum(row["same_as_plain"] for row in rows) / len(rows),
                "f1": sum(row["f1"] for row in rows) / len(rows),
                "mean_cached_tokens": sum(row["cached"] for row in rows) / len(rows),
            }
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="blendrag-vllm-kv-") as tmp:
        for record in run(args, args.store or tmp):
            records.append(record)
            write_report(args, records)  # after every question: a cut-off run keeps what it measured
    for row in summarize_runs(records):
        print(json.dumps(row))
    return 0


def write_report(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    if args.out:
        report = {"settings": settings(args), "summary": summarize_runs(records), "records": records}
        write_json(args.out, report)


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running this
    raise SystemExit(main())
