"""Byte format of one stored chunk KV, shared by every backend that writes bytes.

Layout (integers and tensor bytes little-endian, as on every platform torch ships for)::

    b"BRKV" | u16 version | u32 header length | u32 header crc32 | msgpack header | payload

The payload is laid out layer by layer (layer 0 K, layer 0 V, layer 1 K, ...), each layer with
its own crc32 in the header, so a reader can fetch and verify a single layer by offset and start
computing on it while later layers are still loading.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, BinaryIO

import msgpack
import torch

from blendrag.errors import CorruptEntry
from blendrag.store.base import ChunkKV

MAGIC = b"BRKV"
VERSION = 1
_PREFIX = struct.Struct("<4sHII")  # magic, version, header length, header crc32
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Header:
    """Everything needed to locate and verify each layer of an encoded entry."""

    dtype: torch.dtype
    shape: tuple[int, int, int, int]  # [n_layers, n_kv_heads, n_tokens, head_dim] of K (and of V)
    layer_crc: tuple[int, ...]
    data_offset: int  # where the payload starts, from the beginning of the entry
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.shape[0]

    @property
    def layer_nbytes(self) -> int:
        """Bytes of one layer's K and V together."""
        return 2 * math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def payload_len(self) -> int:
        return self.n_layers * self.layer_nbytes

    def layer_offset(self, layer: int) -> int:
        """Offset of ``layer`` from the beginning of the entry (file or bytes)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for an entry with {self.n_layers} layers")
        return self.data_offset + layer * self.layer_nbytes


def encode(kv: ChunkKV, meta: dict[str, Any] | None = None) -> bytes:
    """Serialize ``kv`` (on any device) with optional msgpack-able ``meta``."""
    if kv.k.shape != kv.v.shape or kv.k.dtype != kv.v.dtype or kv.k.dim() != 4:
        raise ValueError(f"K and V must be 4-D with equal shape and dtype, got {kv.k.shape} {kv.v.shape}")
    if kv.k.dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported KV dtype {kv.k.dtype}; expected one of {sorted(_DTYPES)}")
    if kv.k.numel() == 0:
        raise ValueError("refusing to store an empty KV")
    # [n_layers, 2, heads, tokens, head_dim] is exactly the layer-by-layer K, V order.
    layers = torch.stack([kv.k, kv.v], dim=1).detach().cpu().contiguous()
    payload = memoryview(layers.view(torch.uint8).numpy()).cast("B")
    layer_nbytes = len(payload) // kv.n_layers
    header = msgpack.packb(
        {
            "dtype": _DTYPE_NAMES[kv.k.dtype],
            "shape": list(kv.k.shape),
            "n_layers": kv.n_layers,
            "layer_crc": [
                zlib.crc32(payload[i * layer_nbytes : (i + 1) * layer_nbytes]) for i in range(kv.n_layers)
            ],
            "payload_len": len(payload),
            "meta": meta or {},
        }
    )
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header))
    return b"".join([prefix, header, payload])


def read_header(src: Buffer | BinaryIO) -> Header:
    """Parse and verify the header at the start of ``src`` (bytes, or a file positioned at 0)."""
    f = BytesIO(src) if isinstance(src, bytes | bytearray | memoryview) else src
    magic, version, header_len, header_crc = _PREFIX.unpack(_read_exact(f, _PREFIX.size, "prefix"))
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {magic!r}: not a blendrag KV entry")
    if version != VERSION:
        raise CorruptEntry(f"unsupported KV entry version {version} (this build reads {VERSION})")
    raw = _read_exact(f, header_len, "header")
    if zlib.crc32(raw) != header_crc:
        raise CorruptEntry("header checksum mismatch")
    try:
        return _parse_header(msgpack.unpackb(raw), data_offset=_PREFIX.size + header_len)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"malformed header: {e}") from e


def decode(data: Buffer) -> ChunkKV:
    """Inverse of :func:`encode`; raises :class:`CorruptEntry` on any damage or truncation."""
    header = read_header(data)
    payload = memoryview(data)[header.data_offset :]
    if len(payload) != header.payload_len:
        raise CorruptEntry(f"payload is {len(payload)} bytes, header says {header.payload_len} (truncated?)")
    for layer in range(header.n_layers):
        start = layer * header.layer_nbytes
        _check_layer(header, layer, payload[start : start + header.layer_nbytes])
    layers = _as_tensor(payload, header.dtype).view(header.n_layers, 2, *header.shape[1:])
    return ChunkKV(k=_owned(layers[:, 0]), v=_owned(layers[:, 1]))


def decode_layer(header: Header, layer: int, buf: Buffer) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify and decode one layer's bytes (``header.layer_nbytes`` of them) into (k, v)."""
    _check_layer(header, layer, memoryview(buf))
    kv = _as_tensor(memoryview(buf), header.dtype).view(2, *header.shape[1:])
    return _owned(kv[0]), _owned(kv[1])


def read_layer(f: BinaryIO, header: Header, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read, verify and decode a single layer from an open entry file."""
    f.seek(header.layer_offset(layer))
    return decode_layer(header, layer, _read_exact(f, header.layer_nbytes, f"layer {layer}"))


def _parse_header(h: dict[str, Any], data_offset: int) -> Header:
    if h["dtype"] not in _DTYPES:
        raise ValueError(f"unknown dtype {h['dtype']!r}")
    shape = tuple(int(d) for d in h["shape"])
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"bad shape {shape}")
    header = Header(
        dtype=_DTYPES[h["dtype"]],
        shape=shape,
        layer_crc=tuple(h["layer_crc"]),
        data_offset=data_offset,
        meta=h["meta"],
    )
    if h["n_layers"] != header.n_layers or len(header.layer_crc) != header.n_layers:
        raise ValueError(f"layer count mismatch: shape {shape}, {len(header.layer_crc)} checksums")
    if h["payload_len"] != header.payload_len:
        raise ValueError(f"payload_len {h['payload_len']} does not match shape {shape}")
    return header


def _check_layer(header: Header, layer: int, buf: memoryview) -> None:
    if len(buf) != header.layer_nbytes:
        raise CorruptEntry(f"layer {layer} is {len(buf)} bytes, expected {header.layer_nbytes}")
    if zlib.crc32(buf) != header.layer_crc[layer]:
        raise CorruptEntry(f"checksum mismatch in layer {layer}")


def _as_tensor(buf: memoryview, dtype: torch.dtype) -> torch.Tensor:
    # torch.frombuffer shares memory and warns when it is read-only (bytes); copy those. Readers
    # that own a bytearray (DiskStore) skip this copy; results are cloned out by _owned anyway.
    return torch.frombuffer(bytearray(buf) if buf.readonly else buf, dtype=dtype)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that no longer aliases the caller's buffer."""
    return t.clone(memory_format=torch.contiguous_format)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptEntry(f"truncated {what}: got {len(data)} of {n} bytes")
    return data
