"""GPU check of the engine on one CUDA device: correctness, prefill TTFT and kernels, in one run.

    bash scripts/gpu-check.sh              # a CUDA machine: results in $OUT, else runs/
    python -m bench.gpu_check --smoke      # CPU, tiny shapes, seconds (tests/test_gpu_check.py)

1. Correctness on the device, by relative error ||a - b|| / ||b|| against a tolerance: blend at
   ratio 1.0 equals full; re-aligned chunk keys equal the keys a full prefill computes fresh
   (layer 0 at every reused position, and every layer of the first chunk, which is exact under
   ``chunk_context="prefix"``); selective attention under the engine's mask (FlexAttention on
   CUDA) equals an fp64 oracle; in fp32 the device engine equals the CPU engine on the same
   weights, every mode. On tiny random models of four architectures and on the Llama-3-8B shape
   (weights drawn on the GPU), each in fp32 and in bf16, whose tolerances scale with its own
   error against fp32.
2. TTFT of ``BlendEngine.prefill`` for full, reuse and blend at each ratio (CacheBlend's
   deviation selection at check layer 1, and the default preview selector), N chunks x 512
   tokens + a 32-token question, with the chunk KV (a) in GPU memory, loaded in the foreground,
   (b) in pinned host memory, or (c) in plain host memory, as a store holds it, staged through
   pinned memory; (b) and (c) loaded layer by layer while the layers compute (the engine's
   prefetch: copies and re-alignment on a side stream, ``blendrag.transfer``). CUDA-event
   medians after warm-up, beside ``bench.roofline``'s model evaluated with the ceilings measured
   in the same run (device copy, host-to-device copy, GEMM).
3. The kernels of ``blendrag.kernels`` at the largest prompt's sizes, each checked against its
   torch reference and timed against a device-to-device copy of the bytes it moves.

Weights are random and the tokenizer synthetic (``bench.synthetic``): the numbers are timings and
numerics, not answers. ``--out`` receives gpu-check.json and gpu-check.md (gpu-check-smoke.* with
``--smoke``), rewritten after every section, so a run cut short keeps what it measured;
``--budget-s`` skips the timings that would start after it. Exit status 1 if a check failed or a
section raised.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import platform
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

import blendrag
from bench import roofline, synthetic
from blendrag import kernels
from blendrag.config import BlendConfig
from blendrag.engine import BlendEngine, Prefill
from blendrag.kernels import reference
from blendrag.kvbuffer import KVBuffer
from blendrag.model import Transformer
from blendrag.prompt import RAGPrompt
from blendrag.store import MemoryStore
from blendrag.store.base import ChunkKV
from harness.report import settings
from harness.stats import summarize
from harness.timing import time_ms

ROOT = Path(__file__).resolve().parents[1]
# ||a - b|| / ||b|| allowed, (fp32, bf16). bf16 keeps 8 bits of mantissa and the paths compared
# round differently (other kernels, other row counts per matmul); its "logits" and "k_deep" bounds
# are floors, raised with depth by engine_checks' fp32 reference. Kernels against their
# references on the same inputs: scatter copies exactly, deviation sums in fp32, rope rounds its
# fp32 result once to the buffer's dtype.
TOLERANCES = {
    "logits": (2e-3, 2e-2),  # blend at ratio 1.0 against full
    "k_layer0": (1e-4, 1e-2),  # re-aligned keys against fresh ones, layer 0
    "k_deep": (2e-3, 5e-2),  # the same over every layer (the exact first chunk)
    "attention": (1e-3, 2e-2),  # selective attention against the fp64 oracle
    "twin": (2e-3, None),  # the device engine against the CPU engine (fp32 only)
    "rope": (1e-5, 1e-2),
    "deviation": (1e-5, 1e-4),
    "scatter": (0.0, 0.0),
}


def tolerance(name: str, dtype: torch.dtype) -> float:
    return TOLERANCES[name][dtype == torch.bfloat16]


# Ratio 1.0 recomputes every chunk token whatever the selector; preview still runs its pass first.
RATIO_ONE = {
    "deviation": BlendConfig(recompute_ratio=1.0, selector="deviation", check_layer=1),
    "preview": BlendConfig(recompute_ratio=1.0, preview_draft=2),
}
TWIN_CASES = [
    ("full", "full", None),
    ("reuse", "reuse", None),
    ("blend deviation r=0.3", "blend", BlendConfig(recompute_ratio=0.3, selector="deviation", check_layer=1)),
    ("blend preview r=0.3", "blend", BlendConfig(recompute_ratio=0.3, preview_draft=2)),
]
# Where the chunk KV lives while timed: (store placement, engine's layer-wise prefetch).
LOCATIONS = {"device": False, "pinned": True, "host": True}
MB = 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64; NaN or a zero reference never passes a tolerance."""
    a, b = a.double(), b.double().to(a.device)
    return float((a - b).norm() / b.norm())


def check(
    name: str, model: str, error: float, tolerance: float, noise: float | None = None
) -> dict[str, Any]:
    row = {"model": model, "check": name, "error": error, "tolerance": tolerance, "noise": noise}
    return row | {"ok": error <= tolerance}


def median_ms(times: list[float]) -> float:
    return summarize(times)["p50"]


def measure(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, calls: int = 1
) -> list[float]:
    """Milliseconds per call for each of ``repeats`` runs of ``fn`` (which makes ``calls`` calls)
    after ``warmup`` discarded runs: CUDA events around each run on CUDA, the host clock of
    ``harness.timing.time_ms`` elsewhere."""
    if device.type != "cuda":
        return [ms / calls for ms in time_ms(fn, warmup, repeats)]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return times


# ---- correctness --------------------------------------------------------------------------


def blend_positions(prompt: RAGPrompt, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """What blend recomputes past its check layer: ``ratio`` of the chunk positions, drawn at
    random, then every question position; sorted."""
    start, end = len(prompt.prefix), prompt.suffix_start
    chosen = start + torch.randperm(end - start, generator=generator)[: round(ratio * (end - start))]
    return torch.cat([chosen.sort().values, torch.arange(end, len(prompt.ids))])


def attention_oracle(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """fp64 softmax attention, causal by position (query at p sees keys at <= p), GQA by
    repeating each KV head for its group of query heads."""
    group = q.shape[0] // keys.shape[0]
    k = keys.double().repeat_interleave(group, 0)
    v = values.double().repeat_interleave(group, 0)
    scores = q.double() @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    future = torch.arange(k.shape[1], device=q.device)[None, :] > positions[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


@torch.inference_mode()  # as the engine calls it: no second FlexAttention compile
def attention_check(engine: BlendEngine, label: str, kv: KVBuffer, prompt: RAGPrompt) -> dict[str, Any]:
    """The engine's selective attention (its mask: a FlexAttention block mask on CUDA) for
    blend-like queries over the last layer of a real buffer, against the fp64 oracle."""
    args, generator = engine.model.args, torch.Generator().manual_seed(0)
    positions = blend_positions(prompt, 0.15, generator).to(engine.device)
    q = torch.randn(args.n_heads, len(positions), args.head_dim, generator=generator)
    q = q.to(engine.device, engine.dtype)
    keys, values = kv.keys(args.n_layers - 1), kv.values(args.n_layers - 1)
    mask = kernels.selective_mask(positions, kv.length)
    out = kernels.selective_attention(q, keys, values, mask)
    path = "sdpa, boolean mask" if isinstance(mask, torch.Tensor) else "flex, block mask"
    error = rel_err(out, attention_oracle(q, keys, values, positions))
    return check(
        f"selective attention ({path}) = fp64 oracle", label, error, tolerance("attention", engine.dtype)
    )


def engine_checks(
    engine: BlendEngine, label: str, chunks: list[str], question: str, reference: Prefill | None = None
) -> list[dict[str, Any]]:
    """Blend at ratio 1.0 against full, re-aligned keys against fresh ones, and selective
    attention over the reused buffer against the oracle.

    ``reference``: the same prompt's full prefill by an fp32 copy of the weights. Then the
    logits' and the deep keys' tolerances become at least twice the error that full prefill
    itself has against it in this dtype (its "noise"): over 32 layers bf16 drifts past any fixed
    bound (4e-2 between two paths, 7e-2 from fp32, on a 32-layer model on CPU), and two paths of
    independent rounding differ by up to sqrt(2) of that."""
    full = engine.prefill(chunks, question, mode="full")
    reuse = engine.prefill(chunks, question, mode="reuse")
    prompt, fresh, aligned = reuse.prompt, full.kv.k, reuse.kv.k
    first = prompt.chunk_offsets()[0] + len(prompt.chunks[0])

    def against(name: str, key: str, error: float, noise: float | None = None) -> dict[str, Any]:
        bound = tolerance(key, engine.dtype)
        return check(name, label, error, bound if noise is None else max(bound, 2 * noise), noise)

    logits_noise = deep_noise = None
    if reference is not None:
        logits_noise = rel_err(full.logits, reference.logits)
        deep_noise = rel_err(fresh[:, :, :first], reference.kv.k[:, :, :first])
    rows = []
    for selector, config in RATIO_ONE.items():
        blend = engine.prefill(chunks, question, mode="blend", config=config)
        error = rel_err(blend.logits, full.logits)
        rows.append(against(f"blend@1.0 ({selector}) logits = full", "logits", error, logits_noise))
    error = rel_err(aligned[0, :, : prompt.suffix_start], fresh[0, :, : prompt.suffix_start])
    rows.append(against("re-aligned K = fresh K, layer 0, every reused position", "k_layer0", error))
    if engine.chunk_context == "prefix":
        error = rel_err(aligned[:, :, :first], fresh[:, :, :first])
        rows.append(
            against("re-aligned K = fresh K, every layer, exact first chunk", "k_deep", error, deep_noise)
        )
    rows.append(attention_check(engine, label, reuse.kv, prompt))
    return rows


def twin_checks(
    engine: BlendEngine, cpu: BlendEngine, label: str, chunks: list[str], question: str
) -> list[dict[str, Any]]:
    """The engine's logits against a CPU engine's (the torch reference kernels) on the same fp32
    weights, blend below ratio 1.0 included."""
    rows = []
    for name, mode, config in TWIN_CASES:
        ours = engine.prefill(chunks, question, mode=mode, config=config).logits
        theirs = cpu.prefill(chunks, question, mode=mode, config=config).logits
        error = rel_err(ours, theirs)
        rows.append(check(f"{name} logits = CPU engine", label, error, tolerance("twin", torch.float32)))
    return rows


def tiny_checks(variant: str, device: torch.device, rows: list[dict[str, Any]]) -> None:
    """One tiny architecture on ``device`` in fp32 (also against the CPU engine), then in bf16."""
    config = synthetic.model_config("tiny", variant)
    # bf16-exact weights in fp32: the bf16 copy rounds nothing, so the fp32 engine is its reference.
    cpu_model = synthetic.random_model(config, "cpu", torch.bfloat16).float()
    chunks = synthetic.chunk_texts(3, 24, seed=1)
    question = synthetic.random_text(12, random.Random(2))
    name, reference = f"tiny-{variant}", None
    for dtype in (torch.float32, torch.bfloat16):  # fp32 first: its full prefill is bf16's reference
        model = copy.deepcopy(cpu_model).to(device, dtype)
        engine = synthetic.engine(model, config, MemoryStore(1 << 30), name, chunk_context="prefix")
        label = f"{name} {dtype_name(dtype)}"
        rows.extend(engine_checks(engine, label, chunks, question, reference))
        if dtype == torch.float32:
            reference = engine.prefill(chunks, question, mode="full")
            cpu = synthetic.engine(cpu_model, config, MemoryStore(1 << 30), name, chunk_context="prefix")
            rows.extend(twin_checks(engine, cpu, label, chunks, question))


def shape_checks(
    model: Transformer, config: Any, shape: str, chunks: list[str], question: str, rows: list[dict[str, Any]]
) -> None:
    """The shape's checks on an fp32 copy of the weights (tight tolerances), then on the weights
    themselves against that copy's full prefill."""
    upcast = copy.deepcopy(model).float()
    engine = synthetic.engine(upcast, config, MemoryStore(1 << 40), shape, chunk_context="prefix")
    rows.extend(engine_checks(engine, f"{shape} float32", chunks, question))
    reference = engine.prefill(chunks, question, mode="full")
    del engine, upcast  # 32 GB at the 8B shape
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    engine = synthetic.engine(model, config, MemoryStore(1 << 40), shape, chunk_context="prefix")
    label = f"{shape} {dtype_name(engine.dtype)}"
    rows.extend(engine_checks(engine, label, chunks, question, reference))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- ceilings and prefill timings -----------------------------------------------------------


def measure_ceilings(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, Any]:
    """The device's copy bandwidth (bytes read + written), host-to-device bandwidth from pinned
    memory (CUDA) and GEMM rate in ``dtype``, on random data, as METHOD-style ceilings."""
    copy_bytes, n = (16 << 20, 256) if args.smoke else (2 << 30, 8192)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(measure(lambda: dst.copy_(src), device, args.warmup, args.repeats))
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    gemm_ms = median_ms(measure(lambda: a @ b, device, args.warmup, args.repeats))
    out = {
        "copy_gbs": 2 * copy_bytes / copy_ms / MB,
        "copy_bytes": copy_bytes,
        "gemm_tflops": 2 * n**3 / gemm_ms / 1e9,
        "gemm_n": n,
        "h2d_gbs": None,
    }
    if device.type == "cuda":
        host = src.cpu().pin_memory()
        h2d_ms = median_ms(
            measure(lambda: dst.copy_(host, non_blocking=True), device, args.warmup, args.repeats)
        )
        out["h2d_gbs"] = copy_bytes / h2d_ms / MB
    return out


def location_engines(
    model: torch.nn.Module, config: Any, name: str, pool: list[str], question: str
) -> dict[str, BlendEngine]:
    """One engine per ``LOCATIONS`` entry on one model, the pool's chunk KV and the prompt
    prefix's computed once: "device" keeps it in device memory and loads it in the foreground,
    "pinned" keeps it in pinned host memory (plain host memory without CUDA) and "host" in plain
    host memory, both loaded layer by layer while computing."""
    source = synthetic.engine(model, config, MemoryStore(1 << 40), name)
    source.precompute(pool)
    source.prefill(pool[:1], question, mode="reuse")  # stores the prompt prefix's KV too
    keys = [source.chunk_kv.key(t) for t in pool]
    keys.append(source.chunk_kv.segment_key([], source.prompt_format.prefix_ids))
    device = source.device

    def placed(location: str) -> MemoryStore:
        store = MemoryStore(1 << 40)
        for key in keys:
            kv = source.store.get(key)
            if location == "device":
                kv = ChunkKV(kv.k.to(device), kv.v.to(device))
            elif location == "pinned" and device.type == "cuda":
                kv = ChunkKV(kv.k.pin_memory(), kv.v.pin_memory())
            store.put(key, kv)
        return store

    return {
        location: synthetic.engine(model, config, placed(location), name, prefetch=prefetch)
        for location, prefetch in LOCATIONS.items()
    }


def prefill_cases(ratios: list[float]) -> Iterator[tuple[str, str, BlendConfig | None, str]]:
    """(method, mode, config, KV location); full reuses no KV, so it runs once."""
    yield "full", "full", None, "device"
    for location in LOCATIONS:
        yield "reuse", "reuse", None, location
        for r in ratios:
            deviation = BlendConfig(recompute_ratio=r, selector="deviation", check_layer=1)
            yield f"blend deviation r={r:g}", "blend", deviation, location
            yield f"blend preview r={r:g}", "blend", BlendConfig(recompute_ratio=r), location


def roofline_ms(
    engine: BlendEngine,
    prompt: RAGPrompt,
    mode: str,
    config: BlendConfig | None,
    location: str,
    ceilings: dict,
) -> float | None:
    """``bench.roofline``'s TTFT with the measured ceilings; None for the preview selector, which
    the model does not cover. Reused tokens (prefix + chunks) count as its chunk tokens."""
    if config is not None and config.selector != "deviation":
        return None
    a = engine.model.args
    shape = roofline.Shape(
        n_layers=a.n_layers,
        dim=a.dim,
        n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads,
        head_dim=a.head_dim,
        intermediate=a.intermediate_size,
        vocab=a.vocab_size,
        elt=engine.dtype.itemsize,
    )
    ratio, check_layer = (config.recompute_ratio, config.check_layer) if config else (0.0, 1)
    model = roofline.model(
        shape,
        prompt.suffix_start,
        len(prompt.suffix),
        mode,
        ratio,
        check_layer,
        pcie_gbs=ceilings["h2d_gbs"] or ceilings["copy_gbs"],  # no CUDA: a host copy stands in
        hbm_gbs=ceilings["copy_gbs"],
        peak_tflops=ceilings["gemm_tflops"],
    )
    return model["ttft_gpu_kv_ms" if location == "device" else "ttft_pinned_kv_ms"]


def timed_prefill(
    engine: BlendEngine, chunks: list[str], question: str, mode: str, config: BlendConfig | None, args
) -> dict[str, Any]:
    stats, last = [], []

    def run() -> None:
        last[:] = [engine.prefill(chunks, question, mode=mode, config=config)]  # one KV buffer kept
        stats.append(last[0].stats)

    times = measure(run, engine.device, args.warmup, args.repeats)
    stats = stats[args.warmup :]
    if not torch.isfinite(last[0].logits).all():
        raise RuntimeError("non-finite logits")
    if any(s.cache_misses for s in stats):
        raise RuntimeError("a timed prefill missed the store: it timed a recompute")
    summary = summarize(times)
    return {
        "median_ms": summary["p50"],
        "p90_ms": summary["p90"],
        "all_ms": times,
        "recomputed": stats[-1].n_recomputed,
        "compute_fraction": stats[-1].compute_fraction,
        "stall_ms": median_ms([1e3 * s.load_stall_s for s in stats]),
    }


def prefill_rows(
    engines: dict[str, BlendEngine],
    pool: list[str],
    question: str,
    args: argparse.Namespace,
    ceilings: dict[str, Any],
    deadline: float,
    rows: list[dict[str, Any]],
) -> None:
    for n_chunks in args.chunks:
        chunks = pool[:n_chunks]
        prompt = engines["device"].build_prompt(chunks, question)
        full_ms = None
        for method, mode, config, location in prefill_cases(args.ratios):
            row = {"chunks": n_chunks, "tokens": len(prompt.ids), "method": method, "kv": location}
            if time.monotonic() > deadline:
                rows.append(row | {"skipped": "time budget"})
                continue
            try:
                row |= timed_prefill(engines[location], chunks, question, mode, config, args)
            except Exception as err:  # one case failing (e.g. out of memory) must not end the run
                traceback.print_exc()
                rows.append(row | {"error": f"{type(err).__name__}: {err}"})
                continue
            full_ms = row["median_ms"] if mode == "full" else full_ms
            model_ms = roofline_ms(engines[location], prompt, mode, config, location, ceilings)
            row["model_ms"] = model_ms
            row["vs_model"] = row["median_ms"] / model_ms if model_ms else None
            row["speedup_vs_full"] = full_ms / row["median_ms"] if full_ms else None
            rows.append(row)
            print(
                f"  {n_chunks:3d} chunks  {method:<24} KV {location:<7} {row['median_ms']:9.2f} ms",
                flush=True,
            )


# ---- kernels ----------------------------------------------------------------------------------


@dataclass
class KernelCase:
    name: str
    run: Callable[[], object]  # one timed run: ``calls`` calls of the kernel
    calls: int
    nbytes: int  # per call: each input read once, each output written once
    error: float | None  # against the reference on the same inputs (None: nothing to compare)
    tolerance: float | None
    flops: float = 0.0


@dataclass
class KernelInputs:
    """One prompt's real buffer, blend's selection over it, and random inputs drawn on the device."""

    engine: BlendEngine
    kv: KVBuffer
    prompt: RAGPrompt
    selected: torch.Tensor
    generator: torch.Generator  # on the engine's device

    def randn(self, *shape: int) -> torch.Tensor:
        e = self.engine
        return torch.randn(*shape, generator=self.generator, device=e.device, dtype=e.dtype)

    def tolerance(self, name: str) -> float:
        return tolerance(name, self.engine.dtype)


def kernel_inputs(engine: BlendEngine, chunks: list[str], question: str, ratio: float) -> KernelInputs:
    """The buffer a reuse prefill of the prompt leaves (every chunk's KV re-aligned in place)."""
    pre = engine.prefill(chunks, question, mode="reuse")
    selected = blend_positions(pre.prompt, ratio, torch.Generator().manual_seed(1)).to(engine.device)
    generator = torch.Generator(engine.device).manual_seed(2)
    return KernelInputs(engine, pre.kv, pre.prompt, selected, generator)


def rope_case(x: KernelInputs) -> KernelCase:
    a, kv, prompt = x.engine.model.args, x.kv, x.prompt
    spans = [(0, len(prompt.prefix)), *zip(prompt.chunk_offsets(), map(len, prompt.chunks), strict=True)]
    n = prompt.suffix_start
    cos, sin = x.engine.rotary.cos_sin(torch.arange(kv.length, device=kv.k.device), kv.k.dtype)
    mine, ref = kv.k.clone(), kv.k.double()
    kernels.rope_realign(mine, spans, cos, sin)
    reference.rope_realign(ref, spans, cos.double(), sin.double())
    elt = kv.k.dtype.itemsize
    return KernelCase(
        "rope_realign (every layer, one launch)",
        lambda: kernels.rope_realign(kv.k, spans, cos, sin),
        1,
        2 * a.n_layers * a.n_kv_heads * n * a.head_dim * elt + 2 * n * a.head_dim * elt,
        rel_err(mine[:, :, :n], ref[:, :, :n]),
        x.tolerance("rope"),
    )


def deviation_case(x: KernelInputs) -> KernelCase:
    a, kv = x.engine.model.args, x.kv
    scored = torch.arange(len(x.prompt.prefix), kv.length, device=kv.v.device)  # the check layer's
    fresh = x.randn(a.n_layers, a.n_kv_heads, len(scored), a.head_dim)
    error = rel_err(
        kernels.kv_deviation(fresh[1], kv.v[1], scored),
        reference.kv_deviation(fresh[1].double(), kv.v[1].double(), scored),
    )
    return KernelCase(
        "kv_deviation (per layer, every token)",
        lambda: [kernels.kv_deviation(fresh[i], kv.v[i], scored) for i in range(a.n_layers)],
        a.n_layers,
        2 * a.n_kv_heads * len(scored) * a.head_dim * kv.v.dtype.itemsize + 4 * len(scored),
        error,
        x.tolerance("deviation"),
    )


def scatter_case(x: KernelInputs) -> KernelCase:
    a, kv, selected = x.engine.model.args, x.kv, x.selected
    k, v = (x.randn(a.n_layers, a.n_kv_heads, len(selected), a.head_dim) for _ in range(2))
    mine, ref = (kv.k[1].clone(), kv.v[1].clone()), (kv.k[1].clone(), kv.v[1].clone())
    kernels.kv_scatter(*mine, selected, k[1], v[1])
    reference.kv_scatter(*ref, selected, k[1], v[1])
    return KernelCase(
        "kv_scatter (per layer, blend's selection)",
        lambda: [kernels.kv_scatter(kv.k[i], kv.v[i], selected, k[i], v[i]) for i in range(a.n_layers)],
        a.n_layers,
        4 * a.n_kv_heads * len(selected) * a.head_dim * kv.k.dtype.itemsize + 8 * len(selected),
        max(rel_err(mine[0], ref[0]), rel_err(mine[1], ref[1])),
        x.tolerance("scatter"),
    )


def mask_case(x: KernelInputs) -> KernelCase:
    return KernelCase(
        "selective_mask (once per active set)",
        lambda: kernels.selective_mask(x.selected, x.kv.length),
        1,
        0,
        None,  # checked through the attention rows
        None,
    )


def attention_case(x: KernelInputs, engine_path: bool) -> KernelCase:
    """Selective attention over every layer: the engine's path (FlexAttention's block mask on
    CUDA) or the SDPA boolean mask the CPU takes; checked on the first KV head's group (an fp64
    oracle of all heads would not fit in memory)."""
    a, kv, selected = x.engine.model.args, x.kv, x.selected
    if engine_path:
        attend, mask = kernels.selective_attention, kernels.selective_mask(selected, kv.length)
    else:
        attend, mask = reference.selective_attention, reference.causal_by_position(selected, kv.length)
    q = x.randn(a.n_layers, a.n_heads, len(selected), a.head_dim)
    group = a.n_heads // a.n_kv_heads
    out = attend(q[1], kv.keys(1), kv.values(1), mask)[:group]
    oracle = attention_oracle(q[1, :group], kv.keys(1)[:1], kv.values(1)[:1], selected)
    path = "sdpa, boolean mask" if isinstance(mask, torch.Tensor) else "flex, block mask"
    return KernelCase(
        f"selective_attention ({path}{'; engine' if engine_path else ''}, per layer)",
        lambda: [attend(q[i], kv.keys(i), kv.values(i), mask) for i in range(a.n_layers)],
        a.n_layers,
        (2 * a.n_heads * len(selected) + 2 * a.n_kv_heads * kv.length) * a.head_dim * kv.k.dtype.itemsize,
        rel_err(out, oracle),
        x.tolerance("attention"),
        4.0 * a.n_heads * a.head_dim * float((selected + 1).sum()),  # each query sees keys <= it
    )


# Built one at a time, so that each case's inputs are freed before the next one's are drawn.
# Per-layer kernels run over every layer in turn: repeated runs do not re-read one cached layer.
KERNEL_CASES: dict[str, Callable[[KernelInputs], KernelCase]] = {
    "rope_realign": rope_case,
    "kv_deviation": deviation_case,
    "kv_scatter": scatter_case,
    "selective_mask": mask_case,
    "selective_attention (engine)": lambda x: attention_case(x, engine_path=True),
    "selective_attention (sdpa)": lambda x: attention_case(x, engine_path=False),
}


def copy_ms(nbytes: int, calls: int, device: torch.device, args) -> float:
    """A device-to-device copy moving ``nbytes`` (half read, half written), ``calls`` times from
    rotating buffers, as a kernel of that size would."""
    src = torch.randn(calls, max(nbytes // 8, 1), device=device)  # fp32: nbytes / 2 per row
    dst = torch.empty_like(src)
    return median_ms(
        measure(
            lambda: [dst[i].copy_(src[i]) for i in range(calls)], device, args.warmup, args.repeats, calls
        )
    )


@torch.inference_mode()
def kernel_rows(
    engine: BlendEngine,
    chunks: list[str],
    question: str,
    ratio: float,
    args: argparse.Namespace,
    deadline: float,
    rows: list[dict[str, Any]],
) -> None:
    inputs = kernel_inputs(engine, chunks, question, ratio)
    for name, build in KERNEL_CASES.items():
        if time.monotonic() > deadline:
            rows.append({"kernel": name, "skipped": "time budget", "error": None})
            continue
        case = build(inputs)
        row: dict[str, Any] = {"kernel": case.name, "mb": case.nbytes / MB}
        row |= {"error": case.error, "tolerance": case.tolerance}
        row["ok"] = case.error is None or case.error <= case.tolerance
        ms = median_ms(measure(case.run, engine.device, args.warmup, args.repeats, case.calls))
        row |= {
            "ms": ms,
            "gb_per_s": case.nbytes / ms / MB or None,
            "tflop_per_s": case.flops / ms / 1e9 or None,
        }
        if case.nbytes:
            row["copy_ms"] = copy_ms(case.nbytes, case.calls, engine.device, args)
            row["copy_over_kernel"] = row["copy_ms"] / ms
        rows.append(row)
        print(f"  {case.name:<54} {ms:9.4f} ms  error {_cell(case.error, '.1e')}", flush=True)


# ---- report -----------------------------------------------------------------------------------


def environment(device: torch.device, dtype: torch.dtype, shape: str) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        commit = git.stdout.strip() or None
    except OSError:  # no git on the machine
        commit = None
    env = {
        "device": platform.processor() or platform.machine(),
        "dtype": dtype_name(dtype),
        "shape": shape,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": transformers.__version__,
        "blendrag": str(Path(blendrag.__file__).parent),
        "commit": commit,
        "weights": "random, drawn on the device",
        "tokenizer": "synthetic byte-level (bench.synthetic): timings and numerics, not answers",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    return env


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; columns named with a trailing ':' are right-aligned (numbers)."""
    names = [c.rstrip(":") for c in columns]
    rules = ["---:" if c.endswith(":") else "---" for c in columns]
    return [f"| {' | '.join(cells)} |" for cells in [names, rules, *rows]]


def _prefill_cells(r: dict[str, Any]) -> list[str]:
    head = [str(r["chunks"]), str(r["tokens"]), r["method"], r["kv"]]
    if "median_ms" not in r:
        return head + [r.get("error") or r["skipped"]] + [""] * 6
    ratios = [_cell(r["vs_model"], ".2f"), _cell(r["speedup_vs_full"], ".2f")]
    return head + [
        f"{r['median_ms']:.2f}",
        f"{r['p90_ms']:.2f}",
        str(r["recomputed"]),
        f"{r['stall_ms']:.2f}",
        _cell(r["model_ms"], ".2f"),
        *ratios,
    ]


def _kernel_cells(r: dict[str, Any]) -> list[str]:
    if "ms" not in r:
        return [r["kernel"], r["skipped"]] + [""] * 8
    return [
        r["kernel"],
        f"{r['ms']:.4f}",
        f"{r['mb']:.1f}",
        _cell(r["gb_per_s"], ".0f"),
        _cell(r.get("copy_ms"), ".4f"),
        _cell(r.get("copy_over_kernel"), ".2f"),
        _cell(r["tflop_per_s"], ".1f"),
        _cell(r["error"], ".1e"),
        _cell(r["tolerance"], ".0e"),
        "" if r["error"] is None else ("yes" if r["ok"] else "NO"),
    ]


def markdown(report: dict[str, Any]) -> str:
    env, ceilings = report["environment"], report["ceilings"]
    lines = [
        f"# GPU check: {env['device']}" + (" (smoke run)" if report["settings"]["smoke"] else ""),
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
        f"{env['transformers']}, Python {env['python']}; commit {env['commit']}; {env['shape']} "
        f"shape in {env['dtype']}. Weights {env['weights']}; tokenizer {env['tokenizer']}.",
    ]
    if ceilings:
        lines += [
            "",
            f"Ceilings measured here: device copy {ceilings['copy_gbs']:.0f} GB/s (read + write), "
            f"host-to-device from pinned memory {_cell(ceilings['h2d_gbs'], '.1f') or 'n/a'} GB/s, "
            f"{env['dtype']} GEMM {ceilings['gemm_tflops']:.1f} TFLOP/s ({ceilings['gemm_n']}^3). "
            "The model column is bench.roofline's TTFT with these ceilings.",
        ]
    checks = [
        [r["model"], r["check"], f"{r['error']:.2e}", f"{r['tolerance']:.1e}", _cell(r["noise"], ".1e")]
        + ["yes" if r["ok"] else "NO"]
        for r in report["checks"]
    ]
    lines += [
        "",
        "## Correctness",
        "",
        "Error: ||a - b|| / ||b||. Noise: bf16 full prefill's error against an fp32 copy of the "
        "weights; the tolerance is at least twice it.",
        "",
    ]
    lines += _table(["model", "check", "error:", "tolerance:", "noise:", "ok"], checks)
    lines += [
        "",
        "## Prefill TTFT (ms)",
        "",
        "KV device: chunk KV in device memory, loaded in the foreground; pinned: in pinned host memory, "
        "host: in plain host memory (staged through pinned memory), both loaded layer by layer while "
        "computing. Stall: time the layer loop's host waited for the loader to issue a layer (on CUDA "
        "the wait for its copies is the compute stream's, inside the TTFT). Model: bench.roofline "
        "(CacheBlend's deviation selection; it does not model the preview selector; host is modelled "
        "as pinned, without the staging copy).",
        "",
    ]
    columns = ["chunks:", "tokens:", "method", "KV", "median:", "p90:", "recomputed:", "stall:"]
    columns += ["model:", "measured / model:", "speedup vs full:"]
    lines += _table(columns, [_prefill_cells(r) for r in report["prefill"]])
    lines += [
        "",
        "## Kernels",
        "",
        "Copy: a device-to-device copy of the same bytes, as many calls; copy / kernel 1.0 is copy speed.",
        "",
    ]
    columns = ["kernel", "ms per call:", "MB per call:", "GB/s:", "copy ms:", "copy / kernel:", "TFLOP/s:"]
    columns += ["error vs reference:", "tolerance:", "ok"]
    lines += _table(columns, [_kernel_cells(r) for r in report["kernels"]])
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e['section']}: {e['error']}" for e in report["errors"]]
    lines += ["", f"{report['elapsed_s']:.0f} s; {'all checks passed' if ok(report) else 'FAILED'}."]
    return "\n".join(lines) + "\n"


def ok(report: dict[str, Any]) -> bool:
    """No section raised, no timed case failed, every check and kernel is within tolerance."""
    failed_cases = any("error" in r for r in report["prefill"])
    checks = report["checks"] + [r for r in report["kernels"] if "ok" in r]
    return not report["errors"] and not failed_cases and all(r["ok"] for r in checks)


class Report:
    """The results so far, written as JSON and markdown after every section."""

    def __init__(self, stem: Path, data: dict[str, Any]) -> None:
        self.stem, self.start = stem, time.monotonic()
        self.data = data | {"ceilings": None, "checks": [], "prefill": [], "kernels": [], "errors": []}
        stem.parent.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None after recording what it raised; the report is rewritten either way."""
        try:
            return fn()
        except Exception as err:  # a GPU run is one shot: record, go on with what does not depend on it
            traceback.print_exc()
            self.data["errors"].append({"section": name, "error": f"{type(err).__name__}: {err}"})
            return None
        finally:
            self.data["elapsed_s"] = time.monotonic() - self.start
            # JSON first: it holds everything, the markdown is a view of it.
            self.stem.with_suffix(".json").write_text(json.dumps(self.data, indent=1, default=str))
            self.stem.with_suffix(".md").write_text(markdown(self.data))
            print(f"[{self.data['elapsed_s']:6.1f} s] {name}", flush=True)


# ---- main ---------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes, 1-2 chunks of 16 tokens, in seconds (CI)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs", help="folder for the JSON and markdown results")
    p.add_argument("--chunks", type=_ints, default=[6, 12, 24])
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--ratios", type=_floats, default=[0.05, 0.15, 0.3])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no timing after this many seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.chunks, args.chunk_tokens, args.question_tokens = [1, 2], 16, 8
        args.warmup, args.repeats = 1, 2
    return args


def _allow_flex_recompiles() -> None:
    # One process compiles FlexAttention for several models and dtypes, each possibly twice
    # (static, then dynamic shapes); past dynamo's limit it would silently run uncompiled.
    import torch._dynamo

    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):  # older torch calls it cache_size_limit
        config.recompile_limit = max(config.recompile_limit, 64)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            f"python -m bench.gpu_check: error: no CUDA device (torch {torch.__version__} sees none); "
            "--smoke runs the CPU smoke check",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = "tiny" if args.smoke else "llama3-8b"
    dtype = torch.bfloat16  # the smoke run too: the same code paths, the fp32 reference included
    if device.type == "cuda":
        _allow_flex_recompiles()
    deadline = time.monotonic() + args.budget_s
    data = {"environment": environment(device, dtype, shape), "settings": settings(args)}
    report = Report(args.out / ("gpu-check-smoke" if args.smoke else "gpu-check"), data)
    results = report.data
    print(f"{results['environment']['device']}: {shape} in {results['environment']['dtype']}", flush=True)

    def set_ceilings() -> None:
        results["ceilings"] = measure_ceilings(device, dtype, args)

    report.section("ceilings", set_ceilings)
    for variant in synthetic.TINY_VARIANTS:
        report.section(f"checks tiny-{variant}", lambda v=variant: tiny_checks(v, device, results["checks"]))
    config = synthetic.model_config(shape)
    model = report.section(f"{shape} weights", lambda: synthetic.random_model(config, device, dtype))
    if model is None:
        return _finish(report)
    question = synthetic.random_text(args.question_tokens, random.Random(3))
    chunks = synthetic.chunk_texts(3, args.chunk_tokens, seed=3)
    report.section(
        f"checks {shape}", lambda: shape_checks(model, config, shape, chunks, question, results["checks"])
    )
    pool = synthetic.chunk_texts(max(args.chunks), args.chunk_tokens, seed=4)
    engines = report.section(
        "chunk KV precompute", lambda: location_engines(model, config, shape, pool, question)
    )
    if engines is None or results["ceilings"] is None:
        return _finish(report)
    report.section(
        "prefill timings",
        lambda: prefill_rows(
            engines, pool, question, args, results["ceilings"], deadline, results["prefill"]
        ),
    )
    ratio = 0.15 if 0.15 in args.ratios else args.ratios[0]
    report.section(
        "kernels",
        lambda: kernel_rows(engines["device"], pool, question, ratio, args, deadline, results["kernels"]),
    )
    return _finish(report)


def _finish(report: Report) -> int:
    print(markdown(report.data))
    return 0 if ok(report.data) else 1


if __name__ == "__main__":
    raise SystemExit(main())
