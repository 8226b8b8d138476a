"""The one place that imports Triton, so a CPU-only install fails here, with a clear message, and
only when a Triton path is actually asked for."""

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("blendrag's CUDA kernels need triton: pip install 'blendrag[gpu]'") from e

__all__ = ["triton", "tl"]
