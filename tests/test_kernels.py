"""blendrag.kernels: torch references against the engine's own arithmetic, Triton kernels against
the references under Triton's interpreter, FlexAttention against SDPA.

Triton decides at ``@triton.jit`` time (module import) whether to interpret, from
TRITON_INTERPRET, so the Triton checks run in one subprocess started with it set: the rest of the
suite keeps an untouched triton. Run as a script, this file runs those checks and prints one JSON
line of results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from blendrag import kernels
from blendrag.forward import causal_mask
from blendrag.kernels import reference
from blendrag.model import attend
from blendrag.rope import Rotary, rotate

ROOT = Path(__file__).resolve().parents[1]
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# Lengths straddle the kernels' 32-row blocks; one-token chunks and a gap between segments.
SEGMENTS = [(0, 1), (1, 33), (34, 1), (40, 7), (50, 30)]


def tables(
    head_dim: int, length: int, dtype: torch.dtype, rope: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin by position for positions [0, length), from a LlamaConfig's rope (None: default)."""
    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope
    )
    return Rotary(config, head_dim).cos_sin(torch.arange(length), dtype)


def sorted_positions(n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(length, generator=g)[:n].sort().values


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- Triton kernels vs references (run in the interpreter subprocess) -----------------------------

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def _check_rope(head_dim: int, dtype: torch.dtype, rope: dict | None, atol: float, rtol: float) -> None:
    k = randn(3, 2, 90, head_dim, dtype=dtype)  # [L, Hkv, capacity, D]
    cos, sin = tables(head_dim, 90, dtype, rope)
    expected = k.clone()
    reference.rope_realign(expected, SEGMENTS, cos, sin)
    kernels.rope_realign(k, SEGMENTS, cos, sin)
    torch.testing.assert_close(k, expected, atol=atol, rtol=rtol)


@check
def rope_realign_default_rope() -> None:
    _check_rope(24, torch.float32, None, atol=1e-6, rtol=0)  # half = 12: not a power of two


@check
def rope_realign_llama3_rope() -> None:
    _check_rope(32, torch.float32, LLAMA3, atol=1e-6, rtol=0)


@check
def rope_realign_bf16() -> None:
    # The kernel rotates in fp32, the reference in bf16: a bf16 rounding or two apart.
    _check_rope(32, torch.bfloat16, LLAMA3, atol=1e-2, rtol=1.6e-2)


def _check_deviation(n: int) -> None:
    v_layer = randn(3, 100, 24)
    positions = sorted_positions(n, 100, seed=1)
    # Fresh V as the model yields it: a transposed view of [n, Hkv, D].
    v_fresh = randn(n, 3, 24, seed=2).transpose(0, 1)
    expected = reference.kv_deviation(v_fresh, v_layer, positions)
    torch.testing.assert_close(kernels.kv_deviation(v_fresh, v_layer, positions), expected)


@check
def kv_deviation_rows() -> None:
    _check_deviation(37)


@check
def kv_deviation_one_token() -> None:
    _check_deviation(1)


def _check_scatter(n: int, dtype: torch.dtype) -> None:
    k_buf, v_buf = randn(4, 3, 100, 24, dtype=dtype), randn(4, 3, 100, 24, dtype=dtype, seed=1)
    positions = sorted_positions(n, 100, seed=2)
    k = randn(3, n, 24, dtype=dtype, seed=3)
    v = randn(n, 3, 24, dtype=dtype, seed=4).transpose(0, 1)
    k_expected, v_expected = k_buf.clone(), v_buf.clone()
    reference.kv_scatter(k_expected[2], v_expected[2], positions, k, v)
    kernels.kv_scatter(k_buf[2], v_buf[2], positions, k, v)
    assert torch.equal(k_buf, k_expected) and torch.equal(v_buf, v_expected)


@check
def kv_scatter_rows() -> None:
    _check_scatter(37, torch.float32)


@check
def kv_scatter_one_token_bf16() -> None:
    _check_scatter(1, torch.bfloat16)


def run_checks() -> dict[str, str]:
    results = {}
    with kernels.triton_on_cpu():
        for name, fn in CHECKS.items():
            try:
                fn()
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    pytest.importorskip("triton")
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=pythonpath)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKS)
def test_triton_kernel_under_interpreter(interpreted: dict[str, str], name: str) -> None:
    assert interpreted[name] == "ok", interpreted[name]


# --- references against the engine's arithmetic (in process) -------------------------------------


def test_rope_realign_equals_rotating_at_placement() -> None:
    """Rotating each chunk at its placement, the one-call realign does for all, bitwise."""
    cos, sin = tables(32, 90, torch.float32, LLAMA3)
    k = randn(3, 2, 90, 32)
    expected = k.clone()
    for start, length in SEGMENTS:
        end = start + length
        expected[:, :, start:end] = rotate(k[:, :, start:end], cos[start:end], sin[start:end])
    kernels.rope_realign(k, SEGMENTS, cos, sin)
    assert torch.equal(k, expected)


def test_rope_realign_without_segments_is_a_no_op() -> None:
    k = randn(1, 1, 4, 8)
    kernels.rope_realign(k, [], *tables(8, 4, torch.float32))
    assert torch.equal(k, randn(1, 1, 4, 8))


def test_kv_deviation_matches_selection_scores() -> None:
    v_layer, v_fresh = randn(3, 100, 24), randn(3, 37, 24, seed=1)
    positions = sorted_positions(37, 100, seed=2)
    expected = (v_fresh - v_layer[:, positions]).float().pow(2).sum(dim=(0, 2))
    torch.testing.assert_close(kernels.kv_deviation(v_fresh, v_layer, positions), expected)


def test_kv_scatter_writes_only_the_positions() -> None:
    k_buf, v_buf = torch.zeros(2, 3, 50, 8), torch.zeros(2, 3, 50, 8)
    positions = torch.tensor([0, 7, 49])
    k, v = randn(3, 3, 8), randn(3, 3, 8, seed=1)
    kernels.kv_scatter(k_buf[1], v_buf[1], positions, k, v)
    assert torch.equal(k_buf[1][:, positions], k) and torch.equal(v_buf[1][:, positions], v)
    assert k_buf.count_nonzero() == k.numel() and v_buf.count_nonzero() == v.numel()


def _attention_inputs(n: int, length: int, seed: int):
    positions = sorted_positions(n, length, seed)
    return positions, randn(6, n, 16, seed=seed), randn(2, length, 16, seed=1), randn(2, length, 16, seed=2)


def test_cpu_paths_never_import_triton() -> None:
    """A CPU-only install has no triton: only ``triton_on_cpu`` and CUDA tensors reach it."""
    k, v, positions = randn(1, 2, 8, 8), randn(1, 2, 8, 8), torch.arange(8)
    kernels.rope_realign(k, [(0, 8)], *tables(8, 8, torch.float32))
    kernels.kv_deviation(v[0], v[0], positions)
    kernels.kv_scatter(k[0], v[0], positions, randn(2, 8, 8), randn(2, 8, 8))
    kernels.selective_attention(k[0], k[0], v[0], kernels.selective_mask(positions, 8))
    assert "blendrag.kernels._triton" not in sys.modules


def naive_selective_attention(q, keys, values, positions):
    """One query at a time, softmax over keys 0..p written out: the oracle for the masks."""
    group = q.shape[0] // keys.shape[0]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    rows = []
    for i, p in enumerate(positions.tolist()):
        weights = torch.softmax(q[:, i : i + 1] @ k[:, : p + 1].transpose(1, 2) / q.shape[-1] ** 0.5, -1)
        rows.append(weights @ v[:, : p + 1])
    return torch.cat(rows, 1)


@pytest.mark.parametrize("n", [1, 37, 150])
def test_model_attention_under_selective_mask_matches_naive(n) -> None:
    """The model's path: ``causal_mask`` builds the CPU mask, ``attend`` dispatches on it."""
    positions, q, keys, values = _attention_inputs(n, 301, seed=n)
    mask = causal_mask(positions, 301)
    assert isinstance(mask, torch.Tensor)
    expected = naive_selective_attention(q, keys, values, positions)
    torch.testing.assert_close(attend(q, keys, values, mask), expected, atol=1e-5, rtol=1e-5)


def test_flex_attention_matches_reference() -> None:
    """Compiled FlexAttention (the CUDA path) on CPU; one shape, two position sets, so one compile."""
    from blendrag.kernels import flex

    for seed in (0, 3):
        positions, q, keys, values = _attention_inputs(37, 101, seed)
        expected = reference.selective_attention(
            q, keys, values, reference.causal_by_position(positions, 101)
        )
        out = flex.selective_attention(q, keys, values, flex.block_mask(positions, 101))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    print(json.dumps(run_checks()))
