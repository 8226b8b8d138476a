"""Byte format of one stored chunk KV, shared by every backend that writes bytes.

Layout (integers and tensor bytes little-endian, as on every platform torch ships for)::

    b"BRKV" | u16 version | u32 header length | u32 header crc32 | msgpack header | payload

The header names the KV format (``blendrag.store.formats``) and the shape; the payload is laid out
layer by layer, each layer with its length and crc32 in the header, so a reader can fetch, verify
and decode a single layer by offset and start computing on it while later layers are still
loading. Version 1 entries (raw tensors in the dtype the header names) are still read.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, BinaryIO

import msgpack
import torch

from blendrag.errors import CorruptEntry
from blendrag.store.base import ChunkKV
from blendrag.store.formats import KVFormat, get_format, raw_format_for

MAGIC = b"BRKV"
VERSION = 2
_READABLE = (1, 2)
_PREFIX = struct.Struct("<4sHII")  # magic, version, header length, header crc32
_V1_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Header:
    """Everything needed to locate, verify and decode each layer of an encoded entry."""

    format: KVFormat
    shape: tuple[int, int, int, int]  # [n_layers, n_kv_heads, n_tokens, head_dim] of K (and of V)
    layer_len: tuple[int, ...]
    layer_crc: tuple[int, ...]
    data_offset: int  # where the payload starts, from the beginning of the entry
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.shape[0]

    @property
    def payload_len(self) -> int:
        return sum(self.layer_len)

    def layer_offset(self, layer: int) -> int:
        """Offset of ``layer`` from the beginning of the entry (file or bytes)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for an entry with {self.n_layers} layers")
        return self.data_offset + sum(self.layer_len[:layer])


def encode(kv: ChunkKV, meta: dict[str, Any] | None = None) -> bytes:
    """Serialize ``kv`` (on any device) in its format (raw in its dtype when it names none), with
    optional msgpack-able ``meta``."""
    if kv.k.shape != kv.v.shape or kv.k.dtype != kv.v.dtype or kv.k.dim() != 4:
        raise ValueError(f"K and V must be 4-D with equal shape and dtype, got {kv.k.shape} {kv.v.shape}")
    fmt = get_format(kv.format or raw_format_for(kv.k.dtype))
    if kv.k.numel() == 0:
        raise ValueError("refusing to store an empty KV")
    k, v = kv.k.detach().cpu(), kv.v.detach().cpu()
    layers = [fmt.encode_layer(k[i], v[i], i, kv.n_layers) for i in range(kv.n_layers)]
    header = msgpack.packb(
        {
            "format": fmt.tag,
            "shape": list(kv.k.shape),
            "layer_len": [len(b) for b in layers],
            "layer_crc": [zlib.crc32(b) for b in layers],
            "meta": meta or {},
        }
    )
    prefix = _PREFIX.pack(MAGIC, VERSION, len(header), zlib.crc32(header))
    return b"".join([prefix, header, *layers])


def read_header(src: Buffer | BinaryIO) -> Header:
    """Parse and verify the header at the start of ``src`` (bytes, or a file positioned at 0)."""
    f = BytesIO(src) if isinstance(src, bytes | bytearray | memoryview) else src
    magic, version, header_len, header_crc = _PREFIX.unpack(_read_exact(f, _PREFIX.size, "prefix"))
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {magic!r}: not a blendrag KV entry")
    if version not in _READABLE:
        raise CorruptEntry(f"unsupported KV entry version {version} (this build reads {_READABLE})")
    raw = _read_exact(f, header_len, "header")
    if zlib.crc32(raw) != header_crc:
        raise CorruptEntry("header checksum mismatch")
    try:
        h = msgpack.unpackb(raw)
        return _parse_header(_v1_to_v2(h) if version == 1 else h, data_offset=_PREFIX.size + header_len)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"malformed header: {e}") from e


def decode(data: Buffer) -> ChunkKV:
    """Inverse of :func:`encode`; raises :class:`CorruptEntry` on any damage or truncation."""
    header = read_header(data)
    payload = memoryview(data)[header.data_offset :]
    if len(payload) != header.payload_len:
        raise CorruptEntry(f"payload is {len(payload)} bytes, header says {header.payload_len} (truncated?)")
    bounds = list(itertools.accumulate(header.layer_len, initial=0))
    pairs = [decode_layer(header, i, payload[bounds[i] : bounds[i + 1]]) for i in range(header.n_layers)]
    return ChunkKV(
        k=torch.stack([k for k, _ in pairs]), v=torch.stack([v for _, v in pairs]), format=header.format.tag
    )


def decode_layer(header: Header, layer: int, buf: Buffer) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify and decode one layer's bytes (``header.layer_len[layer]`` of them) into (k, v)."""
    buf = memoryview(buf)
    _check_layer(header, layer, buf)
    return header.format.decode_layer(buf, header.shape[1:], layer, header.n_layers)


def read_layer(f: BinaryIO, header: Header, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read, verify and decode a single layer from an open entry file."""
    f.seek(header.layer_offset(layer))
    data = bytearray(header.layer_len[layer])
    if f.readinto(data) != len(data):
        raise CorruptEntry(f"truncated layer {layer}")
    return decode_layer(header, layer, data)


def _v1_to_v2(h: dict[str, Any]) -> dict[str, Any]:
    """A version-1 header (one raw dtype, equal layers) in version 2's terms."""
    fmt = raw_format_for(_V1_DTYPES[h["dtype"]])
    n_layers = int(h["n_layers"])
    if n_layers <= 0 or h["payload_len"] % n_layers:
        raise ValueError(f"payload_len {h['payload_len']} does not split into {n_layers} layers")
    layer_len = [h["payload_len"] // n_layers] * n_layers
    return {"format": fmt, "layer_len": layer_len} | {k: h[k] for k in ("shape", "layer_crc", "meta")}


def _parse_header(h: dict[str, Any], data_offset: int) -> Header:
    shape = tuple(int(d) for d in h["shape"])
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"bad shape {shape}")
    header = Header(
        format=get_format(h["format"]),
        shape=shape,
        layer_len=tuple(int(n) for n in h["layer_len"]),
        layer_crc=tuple(h["layer_crc"]),
        data_offset=data_offset,
        meta=h["meta"],
    )
    if len(header.layer_len) != header.n_layers or len(header.layer_crc) != header.n_layers:
        raise ValueError(f"layer count mismatch: shape {shape}, {len(header.layer_crc)} checksums")
    return header


def _check_layer(header: Header, layer: int, buf: memoryview) -> None:
    if len(buf) != header.layer_len[layer]:
        raise CorruptEntry(f"layer {layer} is {len(buf)} bytes, expected {header.layer_len[layer]}")
    if zlib.crc32(buf) != header.layer_crc[layer]:
        raise CorruptEntry(f"checksum mismatch in layer {layer}")


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptEntry(f"truncated {what}: got {len(data)} of {n} bytes")
    return data
