"""How one layer of a chunk's KV becomes bytes: raw (fp32, bf16, fp16), 8-bit with scales (int8,
fp8 e4m3), or CacheGen-style compressed (fewer bits in deeper layers, token deltas, zstd).

Every format is a pair of functions over one layer's ``k``/``v`` (``[n_kv_heads, n_tokens,
head_dim]``, keys before RoPE) plus ``quantize``, which returns exactly the values a decode of the
encoding would: the engine quantizes each chunk's KV once when it computes it, so the memory tier
(which keeps tensors, not bytes) and the disk and Redis tiers (which keep bytes) hand back the same
values, and a prompt's answer does not depend on which tier served it.

Scales (docs/decisions/0011-kv-formats.md): keys are scaled per head and channel (their outliers
sit in fixed channels; KIVI, KVQuant), values per head and token. Scales are fp16 and a decoded
value is ``code * scale`` in fp32, which is exact; so quantizing decoded values again gives the
same codes, and copying an entry from one tier into another loses nothing more.
"""

from __future__ import annotations

import math
import re
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from blendrag.errors import CorruptEntry

Layer = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [n_kv_heads, n_tokens, head_dim]
Shape = tuple[int, int, int]  # [n_kv_heads, n_tokens, head_dim]

_MIN_SCALE = 2.0**-14  # smallest normal fp16: no scale underflows to zero or a subnormal


class KVFormat(ABC):
    """One way of storing a layer; ``tag`` (name and parameters) goes into store keys, so entries
    written in different formats never mix."""

    name: str
    decoded_dtype: torch.dtype

    @property
    def tag(self) -> str:
        return self.name

    @abstractmethod
    def encode_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> bytes: ...

    @abstractmethod
    def decode_layer(self, buf: memoryview, shape: Shape, layer: int, n_layers: int) -> Layer: ...

    @abstractmethod
    def quantize_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> Layer:
        """``decode_layer(encode_layer(k, v))`` without building the bytes."""

    def quantize(self, k: torch.Tensor, v: torch.Tensor) -> Layer:
        """Every layer of ``[n_layers, heads, tokens, head_dim]`` K and V through ``quantize_layer``."""
        n = k.shape[0]
        pairs = [self.quantize_layer(k[i], v[i], i, n) for i in range(n)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@dataclass(frozen=True)
class RawFormat(KVFormat):
    """The tensor's bytes in ``dtype`` (fp32: what blendrag stored before it had formats)."""

    name: str
    decoded_dtype: torch.dtype

    def encode_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> bytes:
        both = torch.stack([k, v]).to(self.decoded_dtype).contiguous()
        return both.view(torch.uint8).numpy().tobytes()

    def decode_layer(self, buf: memoryview, shape: Shape, layer: int, n_layers: int) -> Layer:
        expected = 2 * math.prod(shape) * self.decoded_dtype.itemsize
        _check_len(buf, expected, layer)
        both = _frombuffer(buf, self.decoded_dtype).view(2, *shape)
        return both[0].clone(), both[1].clone()

    def quantize_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> Layer:
        return k.to(self.decoded_dtype), v.to(self.decoded_dtype)


@dataclass(frozen=True)
class ScaledFormat(KVFormat):
    """8-bit codes (``int8`` or ``float8_e4m3fn``) with fp16 scales: per (head, channel) for K,
    per (head, token) for V. Layout: K scales, V scales, K codes, V codes."""

    name: str
    code_dtype: torch.dtype
    decoded_dtype: torch.dtype = torch.float32

    @property
    def qmax(self) -> float:
        return 127.0 if self.code_dtype == torch.int8 else torch.finfo(self.code_dtype).max

    def encode_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> bytes:
        return b"".join(_bytes(t) for t in _scaled_codes(k, v, self.qmax, self.code_dtype))

    def decode_layer(self, buf: memoryview, shape: Shape, layer: int, n_layers: int) -> Layer:
        _check_len(buf, sum(_scaled_sizes(shape)), layer)
        return _decode_scaled(buf, shape, self.code_dtype)

    def quantize_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> Layer:
        return _dequant_kv(*_scaled_codes(k, v, self.qmax, self.code_dtype))


@dataclass(frozen=True)
class CacheGenFormat(KVFormat):
    """CacheGen-style (SIGCOMM'24): integer codes with the scales above, fewer bits in deeper
    layers (``bits``: one width per third of the layers, shallow first, as shallow layers are the
    most sensitive to loss), compressed with zstd (whose literal coder is Huffman and FSE, an ANS
    coder). Lossless relative to the quantized codes. Unlike CacheGen it stores no differences
    between neighbouring tokens: on SmolLM2's chunk KV they saved 0.2 % of the bytes and cost a
    cumulative sum per decode (docs/decisions/0011-kv-formats.md)."""

    name: str = "cachegen"
    bits: tuple[int, int, int] = (8, 6, 5)
    level: int = 3
    decoded_dtype: torch.dtype = torch.float32

    @property
    def tag(self) -> str:
        return f"{self.name}-{'.'.join(map(str, self.bits))}"

    def qmax(self, layer: int, n_layers: int) -> float:
        return 2.0 ** (self.bits[min(2, 3 * layer // n_layers)] - 1) - 1

    def encode_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> bytes:
        raw = b"".join(_bytes(t) for t in _scaled_codes(k, v, self.qmax(layer, n_layers), torch.int8))
        return struct.pack("<I", len(raw)) + _zstd().ZstdCompressor(level=self.level).compress(raw)

    def decode_layer(self, buf: memoryview, shape: Shape, layer: int, n_layers: int) -> Layer:
        sizes = _scaled_sizes(shape)
        if len(buf) < 4 or struct.unpack_from("<I", buf)[0] != sum(sizes):
            raise CorruptEntry(f"layer {layer}: compressed payload does not match shape {shape}")
        zstd = _zstd()
        try:
            raw = zstd.ZstdDecompressor().decompress(buf[4:], max_output_size=sum(sizes))
        except zstd.ZstdError as e:
            raise CorruptEntry(f"layer {layer}: {e}") from e
        _check_len(memoryview(raw), sum(sizes), layer)
        return _decode_scaled(memoryview(raw), shape, torch.int8)

    def quantize_layer(self, k: torch.Tensor, v: torch.Tensor, layer: int, n_layers: int) -> Layer:
        return _dequant_kv(*_scaled_codes(k, v, self.qmax(layer, n_layers), torch.int8))


FORMATS: dict[str, KVFormat] = {
    f.name: f
    for f in (
        RawFormat("fp32", torch.float32),
        RawFormat("bf16", torch.bfloat16),
        RawFormat("fp16", torch.float16),
        ScaledFormat("int8", torch.int8),
        ScaledFormat("fp8", torch.float8_e4m3fn),
        CacheGenFormat(),
    )
}
DEFAULT_FORMAT = "int8"  # docs/decisions/0011-kv-formats.md
LOSSLESS_FORMAT = FORMATS["fp32"]  # holds KV of every model dtype as it was computed
_RAW_BY_DTYPE = {f.decoded_dtype: f.name for f in FORMATS.values() if isinstance(f, RawFormat)}


_CACHEGEN_BITS = re.compile(r"cachegen-([2-8])\.([2-8])\.([2-8])")


def get_format(name: str) -> KVFormat:
    """A format by name; ``cachegen-B1.B2.B3`` is the cachegen format with those bits per third of
    the layers (2 to 8 each)."""
    if name in FORMATS:
        return FORMATS[name]
    if m := _CACHEGEN_BITS.fullmatch(name):
        return CacheGenFormat(bits=(int(m[1]), int(m[2]), int(m[3])))
    choices = ", ".join(FORMATS)
    raise ValueError(f"unknown KV format {name!r}; choose from {choices} or cachegen-B1.B2.B3")


def raw_format_for(dtype: torch.dtype) -> str:
    """The raw format that stores ``dtype`` as it is (for KV handed to a store without a format)."""
    try:
        return _RAW_BY_DTYPE[dtype]
    except KeyError:
        known = sorted(map(str, _RAW_BY_DTYPE))
        raise ValueError(f"unsupported KV dtype {dtype}; expected one of {known}") from None


def _scaled_codes(k: torch.Tensor, v: torch.Tensor, qmax: float, code_dtype: torch.dtype) -> list:
    """K scales, V scales, K codes, V codes of one layer (``[heads, tokens, dim]`` K and V)."""
    kc, ks = _codes(k, 1, qmax, code_dtype)
    vc, vs = _codes(v, 2, qmax, code_dtype)
    return [ks, vs, kc, vc]


def _codes(x: torch.Tensor, reduce_dim: int, qmax: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Codes and fp16 scales of ``x``, one scale per slice along ``reduce_dim`` (1: per channel,
    over tokens; 2: per token, over channels)."""
    x = x.float()
    scale = (x.abs().amax(dim=reduce_dim, keepdim=True) / qmax).clamp(_MIN_SCALE, 65504.0).half()
    scaled = (x / scale.float()).clamp(-qmax, qmax)
    return (scaled.round().to(torch.int8) if dtype == torch.int8 else scaled.to(dtype)), scale


def _dequant_kv(ks: torch.Tensor, vs: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> Layer:
    # code * fp16 scale is exact in fp32: quantizing the result again gives the same codes.
    return kc.float() * ks.float(), vc.float() * vs.float()


def _scaled_sizes(shape: Shape) -> list[int]:
    """Bytes of K scales, V scales, K codes and V codes of one layer."""
    heads, tokens, dim = shape
    return [heads * dim * 2, heads * tokens * 2, heads * tokens * dim, heads * tokens * dim]


def _decode_scaled(buf: memoryview, shape: Shape, code_dtype: torch.dtype) -> Layer:
    heads, tokens, dim = shape
    ks, vs, kc, vc = _split(buf, _scaled_sizes(shape))
    return _dequant_kv(
        _frombuffer(ks, torch.float16).view(heads, 1, dim),
        _frombuffer(vs, torch.float16).view(heads, tokens, 1),
        _frombuffer(kc, code_dtype).view(shape),
        _frombuffer(vc, code_dtype).view(shape),
    )


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _frombuffer(buf: memoryview | bytes, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``buf``. It shares memory (torch.frombuffer warns on read-only buffers, so
    those are copied), so every caller makes new tensors from it rather than returning it."""
    return torch.frombuffer(bytearray(buf) if memoryview(buf).readonly else buf, dtype=dtype)


def _split(buf: memoryview, sizes: list[int]) -> list[memoryview]:
    out, start = [], 0
    for size in sizes:
        out.append(buf[start : start + size])
        start += size
    return out


def _check_len(buf: memoryview, expected: int, layer: int) -> None:
    if len(buf) != expected:
        raise CorruptEntry(f"layer {layer} is {len(buf)} bytes, expected {expected}")


def _zstd():
    import zstandard  # a core dependency; imported here so reading raw formats never needs it

    return zstandard
