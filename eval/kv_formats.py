"""Fidelity of each stored-KV format: ``reuse`` and the default ``blend`` with chunk KV stored in
that format, scored against full prefill like ``eval.fidelity`` and paired with the same mode on
fp32 storage (is a format's loss inside the noise of fp32 storage?).

    python -m eval.kv_formats --dataset ../shared/data/musique_dev.json --n 100 \\
        --formats fp32,bf16,int8,fp8,cachegen --out runs/kv-formats.json

Chunk KV is computed once per question in fp32 and quantized into each format (what the engine
does when it computes a chunk in that format), so the formats differ in storage only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from blendrag import BlendConfig, BlendEngine
from blendrag.engine import resolve_device
from blendrag.loading import load_model
from blendrag.store import MemoryStore, codec
from blendrag.store.base import ChunkKV
from blendrag.store.formats import FORMATS, get_format
from eval.fidelity import add_screen_args, load_reference, score_variant
from harness.data import dataset_chunks, load_dataset
from harness.report import settings, write_json
from harness.runner import Backend
from harness.stats import bootstrap_ci
from harness.variants import Variant, name_list

BASELINE = "fp32"
VARIANTS = [Variant("reuse", "reuse"), Variant("blend", "blend", BlendConfig().recompute_ratio, "preview")]
METRICS = ("kl_first", "first_miss", "identical", "delta_nll")


def format_engines(loaded: Any, formats: Sequence[str]) -> dict[str, BlendEngine]:
    """One engine per format over the same model, each with its own memory store."""
    return {name: BlendEngine(loaded, MemoryStore(1 << 40), kv_format=name) for name in formats}


def store_chunks(engines: dict[str, BlendEngine], chunks: list[str]) -> dict[str, int]:
    """Compute each chunk's KV once (fp32), store it in every engine in its format; returns the
    encoded bytes of the question's chunks per format."""
    base = engines[BASELINE]
    base.precompute(chunks)
    nbytes = dict.fromkeys(engines, 0)
    for text in chunks:
        kv32 = base.store.get(base.chunk_kv.key(text))
        for name, engine in engines.items():
            fmt = get_format(name)
            kv = ChunkKV(*fmt.quantize(kv32.k, kv32.v), fmt.tag)
            engine.store.put(engine.chunk_kv.key(text), kv)
            nbytes[name] += len(codec.encode(kv))
    return nbytes


def evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    device, dtype = resolve_device(args.device, args.dtype)
    loaded = load_model(args.model, dtype)
    loaded.model.to(device)
    formats = [BASELINE, *(f for f in name_list(args.formats) if f != BASELINE)]
    for name in formats:
        get_format(name)
    items = load_dataset(args.dataset, args.n)
    source, records = dataset_chunks(args.top_k), []
    for item in tqdm(items, desc="questions", unit="q"):
        chunks, question = source(item), item["question"]
        engines = format_engines(loaded, formats)  # fresh stores: memory stays one question's KV
        nbytes = store_chunks(engines, chunks)
        n_tokens = sum(len(engines[BASELINE].prompt_format.chunk_ids(t)) for t in chunks)
        ref = load_reference(args.ref_cache, engines[BASELINE], chunks, question, args.max_new_tokens)
        results = {
            name: {
                v.name: score_variant(Backend(engine, BlendConfig()), chunks, question, v, ref)
                for v in VARIANTS
            }
            for name, engine in engines.items()
        }
        records.append({"question": question, "n_tokens": n_tokens, "bytes": nbytes, "results": results})
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per format: bytes per token, and per mode each metric's mean with a bootstrap 95 % interval,
    and the paired difference in KL from the same mode on fp32 storage."""
    n_tokens = sum(r["n_tokens"] for r in records)
    rows = []
    for name in records[0]["bytes"]:
        row: dict[str, Any] = {"format": name, "n": len(records)}
        row["bytes_per_token"] = sum(r["bytes"][name] for r in records) / n_tokens
        for v in VARIANTS:
            per_q = [r["results"][name][v.name] for r in records]
            for metric in METRICS:
                values = [x[metric] for x in per_q]
                row[f"{v.name}.{metric}"] = sum(values) / len(values)
                row[f"{v.name}.{metric}.ci95"] = bootstrap_ci(values)
            diff = [
                x["kl_first"] - r["results"][BASELINE][v.name]["kl_first"]
                for x, r in zip(per_q, records, strict=True)
            ]
            row[f"{v.name}.kl_vs_fp32"] = sum(diff) / len(diff)
            row[f"{v.name}.kl_vs_fp32.ci95"] = bootstrap_ci(diff)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    base = next(r for r in rows if r["format"] == BASELINE)["bytes_per_token"]
    lines = [
        "| format | bytes/token | vs fp32 | mode | first-token KL [95% CI] | KL - fp32's [95% CI] "
        "| tokens agreed | identical | dNLL |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        for v in VARIANTS:
            m = f"{v.name}."
            kl, dkl = _with_ci(r, m + "kl_first", ".4f"), _with_ci(r, m + "kl_vs_fp32", "+.4f")
            size = f"{r['bytes_per_token']:,.0f} | {base / r['bytes_per_token']:.2f}x"
            rest = f"{r[m + 'first_miss']:.1f} | {r[m + 'identical']:.2f} | {r[m + 'delta_nll']:.4f}"
            lines.append(f"| {r['format']} | {size} | {v.name} | {kl} | {dkl} | {rest} |")
    return "\n".join(lines)


def _with_ci(row: dict[str, Any], key: str, spec: str) -> str:
    lo, hi = row[key + ".ci95"]
    return f"{row[key]:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.kv_formats", description=__doc__.splitlines()[0])
    add_screen_args(p)
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated; fp32 is always included")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        records = evaluate(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    rows = summarize(records)
    if args.out:
        write_json(args.out, {"settings": settings(args), "summary": rows, "records": records})
    print(format_table(rows))
    print(f"({len(records)} questions, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        raise SystemExit(main())
