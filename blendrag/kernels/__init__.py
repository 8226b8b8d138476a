"""Fused ops of the blending hot path, one dispatcher for all of them.

CUDA tensors take the Triton kernels (and FlexAttention); CPU tensors take the torch versions in
``reference``. Triton modules are imported only when a Triton path runs, so a CPU install needs
no triton. ``triton_on_cpu()`` forces the Triton paths on CPU tensors: with ``TRITON_INTERPRET=1``
set before triton is first imported, that runs the kernels in Triton's interpreter (tests).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from . import reference

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    Mask = torch.Tensor | BlockMask  # what selective_mask returns and selective_attention takes

_force_triton = False


@contextmanager
def triton_on_cpu() -> Iterator[None]:
    global _force_triton
    from ._triton import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("Triton kernels run on CPU only under TRITON_INTERPRET=1")
    previous, _force_triton = _force_triton, True
    try:
        yield
    finally:
        _force_triton = previous


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or _force_triton


def segment_positions(segments: Sequence[tuple[int, int]], device: torch.device | str) -> torch.Tensor:
    """The positions covered by ``(start, length)`` segments, as one int64 tensor on ``device``."""
    ranges = [torch.arange(start, start + length) for start, length in segments]
    if not ranges:
        return torch.empty(0, dtype=torch.long, device=device)
    positions = torch.cat(ranges)
    if torch.device(device).type == "cuda":
        # From pageable memory the copy would block the host until the stream is idle: for the
        # background loader, until its side stream has copied the layer (no staging ahead). The
        # pinned allocator keeps this memory until the copy that reads it is done.
        positions = positions.pin_memory()
    return positions.to(device, non_blocking=True)


def rope_realign(
    k: torch.Tensor, segments: Sequence[tuple[int, int]], cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate the un-rotated keys in ``segments`` of ``k [L, Hkv, capacity, D]``, every layer,
    in place, to their positions. ``cos``/``sin`` are ``[T, D]`` tables by position (T > every
    position), e.g. ``rotary.cos_sin(torch.arange(T), k.dtype)``."""
    if not _use_triton(k):
        reference.rope_realign(k, segments, cos, sin)
        return
    positions = segment_positions(segments, k.device)
    if positions.numel() > 0:
        from .triton_rope import rope_realign

        rope_realign(k, positions, cos, sin)


def kv_deviation(v_fresh: torch.Tensor, v_layer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 ``[n]`` scores ``||v_fresh - v_layer[:, positions]||^2`` over heads and head dim:
    ``v_fresh [Hkv, n, D]``, ``v_layer [Hkv, capacity, D]`` (e.g. ``kv.v[layer]``, read before
    the layer's fresh V is written)."""
    if _use_triton(v_fresh):
        from .triton_deviation import kv_deviation as impl
    else:
        impl = reference.kv_deviation
    return impl(v_fresh, v_layer, positions)


def kv_scatter(
    k_layer: torch.Tensor, v_layer: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """``k_layer[:, positions] = k`` and the same for V: ``k, v [Hkv, n, D]`` into
    ``[Hkv, capacity, D]`` layers of the buffer; positions distinct."""
    if _use_triton(k):
        from .triton_scatter import kv_scatter as impl
    else:
        impl = reference.kv_scatter
    impl(k_layer, v_layer, positions, k, v)


def selective_mask(positions: torch.Tensor, length: int) -> torch.Tensor | BlockMask:
    """The causal-by-position mask for ``selective_attention``, built once per active set and
    shared by all layers: a FlexAttention ``BlockMask`` on CUDA, a boolean ``[n, length]`` on CPU.

    CPU stays on SDPA although compiled Flex is faster per call there: Flex compiles for seconds
    per new (n, length), which every request brings, and torch 2.13's CPU inductor fails to build
    its dynamic-shape recompile (docs/decisions/0005-cpu-selective-attention-sdpa.md)."""
    if _use_triton(positions):
        from .flex import block_mask

        return block_mask(positions, length)
    return reference.causal_by_position(positions, length)


def selective_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | BlockMask
) -> torch.Tensor:
    """Attention of ``q [H, n, D]`` (queries at sorted true positions) over ``keys/values
    [Hkv, T, D]`` with GQA, under a mask from ``selective_mask``; the mask's type picks the path."""
    if isinstance(mask, torch.Tensor):
        return reference.selective_attention(q, keys, values, mask)
    from .flex import selective_attention as impl

    return impl(q, keys, values, mask)
