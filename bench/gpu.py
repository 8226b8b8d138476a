"""GPU prefill benchmark: TTFT of full / reuse / blend on a CUDA device, chunk KV (a) already in
GPU memory or (b) in pinned CPU memory loaded layer by layer, plus kernel micro-benchmarks
against copy bandwidth.

    .venv/bin/python -m bench.gpu --out runs/gpu.json               # a CUDA machine
    .venv/bin/python -m bench.gpu --smoke --out runs/gpu-smoke.json # CPU, tiny shape (CI)

Models are random-weight ``blendrag.model.Transformer``s of real shapes (nothing downloaded):
SmolLM2-135M and Llama-3-8B, bf16 on CUDA (fp32 on CPU). Prompts are N random-token chunks of
``--chunk-tokens`` plus a ``--question-tokens`` question, no system prefix. Timings cover the
prefill up to the first token's logits (``Transformer.logits``), median of ``--repeats`` runs
after ``--warmup`` discarded ones (the first runs compile FlexAttention for the shape).

The engine itself runs on CPU tensors only, so this script drives the same parts it uses
(``KVBuffer``, ``run_layers``, ``plan_selection``) on the device, with the engine's plan for each
mode. Layer-wise loading (b): each layer's K/V of all chunks is one packed pinned tensor, copied
on a side stream and re-aligned (RoPE) there; the layer loop waits for layer i+1's copy only
when it writes layer i, so loading overlaps compute. On CPU the copies run synchronously.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from blendrag import kernels
from blendrag.config import BlendConfig
from blendrag.forward import run_layers
from blendrag.kvbuffer import KVBuffer
from blendrag.model import ModelArgs, Transformer
from blendrag.rope import Rotary
from blendrag.selection import plan_selection
from blendrag.store.base import ChunkKV
from harness.timing import time_ms

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
}


@dataclass
class Setup:
    """One model on one device, and the chunks of one prompt with their precomputed KV."""

    model: Transformer
    rotary: Rotary
    ids: torch.Tensor  # the whole prompt's token ids, on the device
    n_chunk_tokens: int  # chunks occupy positions [0, n_chunk_tokens), the question the rest
    chunk_kv: list[tuple[int, ChunkKV]]  # (offset, KV) of each chunk, on the device
    pinned_k: torch.Tensor | None = None  # [L, Hkv, n_chunk_tokens, D], chunks packed, host
    pinned_v: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def build_model(shape: str, device: str, dtype: torch.dtype) -> tuple[Transformer, Rotary]:
    config = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in place in the target dtype: no fp32 copy of 8B
    try:
        with torch.device(device):
            model = Transformer(ModelArgs.from_hf(config))
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False), Rotary(config, model.args.head_dim)


@torch.inference_mode()
def chunk_kv(model: Transformer, rotary: Rotary, ids: torch.Tensor) -> ChunkKV:
    """A chunk prefilled alone from position 0, K kept un-rotated: what the engine stores."""
    buf = KVBuffer(model.args, len(ids), model.embed_tokens.weight.dtype, ids.device)
    buf.length = len(ids)
    positions = torch.arange(len(ids), device=ids.device)
    out = run_layers(model, rotary, buf, ids, positions, capture=True, last_row_only=True)
    return ChunkKV(torch.stack(out.captured_k), torch.stack(out.captured_v))


def make_setup(
    model: Transformer, rotary: Rotary, n_chunks: int, chunk_tokens: int, question_tokens: int
) -> Setup:
    device = model.embed_tokens.weight.device
    gen = torch.Generator().manual_seed(n_chunks)
    chunks = [torch.randint(model.args.vocab_size, (chunk_tokens,), generator=gen) for _ in range(n_chunks)]
    question = torch.randint(model.args.vocab_size, (question_tokens,), generator=gen)
    kvs = [(i * chunk_tokens, chunk_kv(model, rotary, c.to(device))) for i, c in enumerate(chunks)]
    ids = torch.cat([*chunks, question]).to(device)
    setup = Setup(model, rotary, ids, n_chunks * chunk_tokens, kvs)
    pin = device.type == "cuda"
    setup.pinned_k = torch.cat([kv.k for _, kv in kvs], dim=2).cpu()
    setup.pinned_v = torch.cat([kv.v for _, kv in kvs], dim=2).cpu()
    if pin:
        setup.pinned_k, setup.pinned_v = setup.pinned_k.pin_memory(), setup.pinned_v.pin_memory()
    return setup


class LayerwiseLoader:
    """Copies the packed chunk KV into a buffer layer by layer and re-aligns each layer's keys.

    CUDA: every layer's copy and RoPE re-alignment is queued at once on a side stream, with an
    event per layer; ``ready(i)`` makes the compute stream wait for layers <= i. CPU: ``ready(i)``
    does the missing layers' work synchronously."""

    def __init__(self, setup: Setup, buf: KVBuffer) -> None:
        self.setup, self.buf, self.done = setup, buf, 0
        # Positions made on the device: kernels.rope_realign builds them on the host and copies
        # them in, a pageable copy that would block the host while it queues the 32 layers.
        self.positions = torch.arange(setup.n_chunk_tokens, device=setup.device)
        self.cos, self.sin = setup.rotary.cos_sin(self.positions, setup.dtype)
        if setup.device.type == "cuda":
            from blendrag.kernels.triton_rope import rope_realign

            self.realign = lambda k: rope_realign(k, self.positions, self.cos, self.sin)
        else:
            from blendrag.kernels.reference import rope_realign

            self.realign = lambda k: rope_realign(k, [(0, setup.n_chunk_tokens)], self.cos, self.sin)
        self.events: list[Any] = []
        if setup.device.type == "cuda":
            stream = torch.cuda.Stream(setup.device)
            stream.wait_stream(torch.cuda.current_stream(setup.device))  # the zeroed buffer, cos/sin
            with torch.cuda.stream(stream):
                for layer in range(setup.model.args.n_layers):
                    self._load(layer)
                    self.events.append(stream.record_event())

    def _load(self, layer: int) -> None:
        n = self.setup.n_chunk_tokens
        self.buf.k[layer, :, :n].copy_(self.setup.pinned_k[layer], non_blocking=True)
        self.buf.v[layer, :, :n].copy_(self.setup.pinned_v[layer], non_blocking=True)
        self.realign(self.buf.k[layer : layer + 1])

    def ready(self, layer: int) -> None:
        last = min(layer, self.setup.model.args.n_layers - 1)
        while self.done <= last:
            if self.events:
                torch.cuda.current_stream(self.setup.device).wait_event(self.events[self.done])
            else:
                self._load(self.done)
            self.done += 1


class PipelinedBuffer(KVBuffer):
    """A KVBuffer that waits for the next layer's KV before each layer write: ``run_layers``
    writes layer i before it reads layer i (attention) or i+1 (the check layer's deviation)."""

    loader: LayerwiseLoader

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.loader.ready(layer + 1)
        super().write(layer, positions, k, v)


def prefill(setup: Setup, mode: str, ratio: float | None, kv_location: str) -> torch.Tensor:
    """The engine's plan for ``mode`` on the device; returns the first token's logits."""
    args, n, device = setup.model.args, len(setup.ids), setup.device
    layerwise = mode != "full" and kv_location == "pinned"
    buf = (PipelinedBuffer if layerwise else KVBuffer)(args, n, setup.dtype, device)
    buf.length = n
    filters = None
    if mode == "full":
        positions = torch.arange(n, device=device)
    else:
        if layerwise:
            buf.loader = LayerwiseLoader(setup, buf)
            buf.loader.ready(0)
        else:
            buf.load(setup.chunk_kv, setup.rotary)
        start = setup.n_chunk_tokens if mode == "reuse" else 0
        positions = torch.arange(start, n, device=device)
        if mode == "blend":
            # CacheBlend's deviation selection; the default preview selector adds a reuse-sized pass.
            cfg = BlendConfig(recompute_ratio=ratio, selector="deviation", check_layer=1)
            no_forced = torch.empty(0, dtype=torch.long, device=device)
            positions, filters = plan_selection(
                cfg, positions, setup.n_chunk_tokens, setup.n_chunk_tokens, no_forced
            )
    out = run_layers(
        setup.model, setup.rotary, buf, setup.ids[positions], positions, filters, last_row_only=True
    )
    return setup.model.logits(out.last_hidden)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_rows(setup: Setup, ratios: list[float], warmup: int, repeats: int) -> list[dict[str, Any]]:
    locations = ["gpu", "pinned"] if setup.device.type == "cuda" else ["device", "host-copy"]
    cases = [("full", None, locations[0])] + [
        (mode, ratio, loc)
        for loc in locations
        for mode, ratio in [("reuse", None), *(("blend", r) for r in ratios)]
    ]
    rows = []
    for mode, ratio, loc in cases:
        kv_location = "pinned" if loc in ("pinned", "host-copy") else "device"
        with torch.inference_mode():
            run = functools.partial(prefill, setup, mode, ratio, kv_location)
            times = time_ms(run, warmup, repeats, functools.partial(sync, setup.device))
        rows.append(
            {"mode": mode, "ratio": ratio, "kv": loc, "ttft_ms": statistics.median(times), "all_ms": times}
        )
    return rows


def kernel_rows(setup: Setup, ratio: float, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Each kernel on this prompt's sizes, with its bytes moved (and FLOPs for attention) per call,
    beside the device's copy bandwidth on a buffer of the chunk KV's size."""
    a, device, dtype = setup.model.args, setup.device, setup.dtype
    n_tok, total = setup.n_chunk_tokens, len(setup.ids)
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(1)
    buf = KVBuffer(a, total, dtype, device)
    buf.length = total
    buf.load(setup.chunk_kv, setup.rotary)
    n_sel = round(ratio * n_tok) + (total - n_tok)
    sel = torch.randperm(n_tok, generator=gen)[: n_sel - (total - n_tok)].sort().values
    sel = torch.cat([sel, torch.arange(n_tok, total)]).to(device)
    all_pos = torch.arange(total, device=device)
    cos, sin = setup.rotary.cos_sin(all_pos, dtype)
    fresh = torch.randn(a.n_kv_heads, total, a.head_dim, generator=gen).to(device, dtype)
    k_sel, v_sel = fresh[:, :n_sel].clone(), fresh[:, :n_sel].clone()
    q_sel = torch.randn(a.n_heads, n_sel, a.head_dim, generator=gen).to(device, dtype)
    mask = kernels.selective_mask(sel, total)
    kv_all_bytes = buf.k[:, :, :n_tok].numel() * elt  # K of every layer of the chunks
    layer_bytes = a.n_kv_heads * total * a.head_dim * elt
    src = buf.k.clone()
    visible = int((sel + 1).sum())  # keys each query may see, summed: causal-by-position FLOPs
    cases: list[tuple[str, Callable[[], object], int, float]] = [
        ("copy d2d (K of all layers)", lambda: src.copy_(buf.k), 2 * buf.k.numel() * elt, 0.0),
        (
            "rope_realign (all layers)",
            lambda: kernels.rope_realign(buf.k, [(0, n_tok)], cos, sin),
            2 * kv_all_bytes,
            0.0,
        ),
        (
            "kv_deviation (one layer)",
            lambda: kernels.kv_deviation(fresh, buf.v[1], all_pos),
            2 * layer_bytes,
            0.0,
        ),
        (
            f"kv_scatter (r={ratio:g})",
            lambda: buf.write(1, sel, k_sel, v_sel),
            4 * a.n_kv_heads * n_sel * a.head_dim * elt,
            0.0,
        ),
        (
            f"selective_attention (r={ratio:g})",
            lambda: kernels.selective_attention(q_sel, buf.keys(1), buf.values(1), mask),
            2 * layer_bytes + 2 * q_sel.numel() * elt,
            4.0 * a.n_heads * a.head_dim * visible,
        ),
    ]
    if device.type == "cuda":
        host = setup.pinned_k
        dst = torch.empty_like(host, device=device)
        cases.insert(
            1,
            (
                "copy h2d pinned (chunk K)",
                lambda: dst.copy_(host, non_blocking=True),
                host.numel() * elt,
                0.0,
            ),
        )
    rows = []
    for name, fn, nbytes, flops in cases:
        with torch.inference_mode():
            ms = statistics.median(time_ms(fn, warmup, repeats, functools.partial(sync, device)))
        rows.append(
            {
                "kernel": name,
                "ms": ms,
                "bytes": nbytes,
                "gb_per_s": nbytes / ms / 1e6,
                "tflop_per_s": flops / ms / 1e9,
            }
        )
    copy_bw = rows[0]["gb_per_s"]
    for row in rows:
        row["vs_d2d_copy"] = row["gb_per_s"] / copy_bw
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if "kernel" in r:
            lines.append(
                f"  {r['kernel']:<34}{r['ms']:9.3f} ms {r['gb_per_s']:9.1f} GB/s"
                + f" ({r['vs_d2d_copy']:.2f} of d2d copy)"
                + (f" {r['tflop_per_s']:.1f} TFLOP/s" if r["tflop_per_s"] else "")
            )
        else:
            name = r["mode"] + (f" r={r['ratio']:g}" if r["ratio"] is not None else "")
            lines.append(f"  {name:<14} KV {r['kv']:<10}{r['ttft_ms']:10.2f} ms")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 2 chunks of 16 tokens (CI)")
    p.add_argument(
        "--shapes", default="smollm2-135m,llama3-8b", help=f"comma-separated from {', '.join(SHAPES)}"
    )
    p.add_argument("--chunks", type=_ints, default=[6, 12, 24], help="chunk counts")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--ratios", type=lambda t: [float(x) for x in t.split(",")], default=[0.05, 0.15, 0.3])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.chunks, args.chunk_tokens, args.question_tokens = "tiny", [2], 16, 4
        args.warmup, args.repeats = 1, 2
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        p.error(f"unknown shape(s) {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        raise SystemExit("error: no CUDA device (run with --smoke for the CPU smoke test)")
    dev_name = (
        torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    )
    report: dict[str, Any] = {
        "device": dev_name,
        "torch": torch.__version__,
        "settings": vars(args),
        "results": [],
    }
    print(f"{dev_name}, {dtype}")
    for shape in args.shapes:
        model, rotary = build_model(shape, device, dtype)
        for n_chunks in args.chunks:
            setup = make_setup(model, rotary, n_chunks, args.chunk_tokens, args.question_tokens)
            result = {
                "shape": shape,
                "n_chunks": n_chunks,
                "prompt_tokens": len(setup.ids),
                "prefill": prefill_rows(setup, args.ratios, args.warmup, args.repeats),
                "kernels": kernel_rows(
                    setup, 0.15 if 0.15 in args.ratios else args.ratios[0], args.warmup, args.repeats
                ),
            }
            print(f"{shape}, {n_chunks} chunks x {args.chunk_tokens} + {args.question_tokens} tokens")
            print(format_rows(result["prefill"]))
            print(format_rows(result["kernels"]))
            report["results"].append(result)
            del setup
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
