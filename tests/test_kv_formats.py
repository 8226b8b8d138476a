"""Stored-KV formats: round trips, error bounds, corruption, and keys that never mix formats."""

import struct
import zlib

import msgpack
import pytest
import torch
from test_engine import CHUNKS, QUESTION

from blendrag import BlendConfig, BlendEngine
from blendrag.chunk_kv import segment_key
from blendrag.errors import BlendRAGError, CorruptEntry
from blendrag.store import ChunkKV, DiskStore, MemoryStore, codec
from blendrag.store.formats import DEFAULT_FORMAT, FORMATS, CacheGenFormat, get_format

ALL_FORMATS = [*FORMATS, "cachegen-4.3.2"]


def make_kv(seed: int = 0, n_layers: int = 6, tokens: int = 33) -> ChunkKV:
    """KV with what real keys have: a few channels far larger than the rest, and a range of sizes."""
    g = torch.Generator().manual_seed(seed)
    shape = (n_layers, 2, tokens, 16)
    k = torch.randn(shape, generator=g) * torch.logspace(-2, 1, 16)  # per-channel magnitudes
    v = torch.randn(shape, generator=g) * torch.logspace(-1, 0.5, tokens)[:, None]  # per token
    return ChunkKV(k, v)


def encoded(kv: ChunkKV, name: str) -> ChunkKV:
    return ChunkKV(kv.k, kv.v, get_format(name).tag)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_decoded_values_are_what_quantize_gives(name):
    """The memory tier keeps quantized tensors, disk and Redis keep bytes: both must read the same."""
    kv, fmt = make_kv(), get_format(name)
    out = codec.decode(codec.encode(encoded(kv, name)))
    qk, qv = fmt.quantize(kv.k, kv.v)
    assert out.format == fmt.tag and out.k.dtype == fmt.decoded_dtype
    assert torch.equal(out.k, qk) and torch.equal(out.v, qv)


@pytest.mark.parametrize("name", ALL_FORMATS)
def test_quantizing_again_changes_nothing(name):
    """Copying an entry between tiers (decode, store again) must lose nothing more."""
    kv, fmt = make_kv(), get_format(name)
    once = fmt.quantize(kv.k, kv.v)
    twice = fmt.quantize(*once)
    assert torch.equal(once[0], twice[0]) and torch.equal(once[1], twice[1])


def test_bf16_is_exact_to_bf16():
    kv = make_kv()
    out = codec.decode(codec.encode(encoded(kv, "bf16")))
    assert torch.equal(out.k, kv.k.bfloat16()) and torch.equal(out.v, kv.v.bfloat16())


def _err_bound(x: torch.Tensor, reduce_dim: int, name: str) -> torch.Tensor:
    """Largest error a correct 8-bit quantizer may make per element: half a step of int8 (plus the
    fp16 rounding of the scale), or e4m3's half-ulp (1/16 relative) above its subnormal floor."""
    scale = x.abs().amax(dim=reduce_dim, keepdim=True)
    if name == "int8":
        return scale / 127 * (0.5 + 2**-9) + scale * 2**-10
    return x.abs() / 16 + scale / 448 * 2**-9


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_8bit_error_bounds(name):
    kv = make_kv()
    qk, qv = get_format(name).quantize(kv.k, kv.v)
    # K is scaled per (layer, head, channel) over tokens (dim 2 here), V per token over channels.
    assert ((qk - kv.k).abs() <= _err_bound(kv.k, 2, name)).all()
    assert ((qv - kv.v).abs() <= _err_bound(kv.v, 3, name)).all()


def test_per_channel_key_scales_keep_small_channels():
    """A key channel 1000x smaller than another keeps its precision (a per-token scale would
    round it to zero)."""
    kv = make_kv()
    qk, _ = get_format("int8").quantize(kv.k, kv.v)
    small = (qk[..., 0] - kv.k[..., 0]).abs().max() / kv.k[..., 0].abs().max()
    assert small < 0.01


def test_cachegen_at_8_bits_has_int8s_values():
    kv = make_kv()
    q8 = get_format("int8").quantize(kv.k, kv.v)
    qc = get_format("cachegen-8.8.8").quantize(kv.k, kv.v)
    assert torch.equal(q8[0], qc[0]) and torch.equal(q8[1], qc[1])


def test_cachegen_bits_follow_depth():
    fmt = CacheGenFormat(bits=(8, 6, 4))
    assert [fmt.qmax(layer, 6) for layer in range(6)] == [127, 127, 31, 31, 7, 7]
    kv = make_kv()
    qk, _ = fmt.quantize(kv.k, kv.v)
    errors = [float((qk[i] - kv.k[i]).norm() / kv.k[i].norm()) for i in range(6)]
    assert errors[0] < errors[2] < errors[4]


def test_sizes_per_token():
    """What each format costs, relative to fp32, on a realistic head_dim."""
    kv = make_kv(tokens=256)
    size = {name: len(codec.encode(encoded(kv, name))) for name in FORMATS}
    assert size["bf16"] == pytest.approx(size["fp32"] / 2, rel=0.01)
    assert size["int8"] == pytest.approx(size["fp32"] / 4, rel=0.1)  # + scales: 2 bytes per 16
    assert size["cachegen"] < size["int8"] * 0.85


def test_unknown_format_names_the_choices():
    with pytest.raises(ValueError, match="bf16.*cachegen-B1.B2.B3"):
        get_format("int4")
    with pytest.raises(ValueError):
        get_format("cachegen-9.8.8")


def test_version_1_entries_stay_readable():
    kv = make_kv(n_layers=2)
    layers = [
        torch.stack([kv.k[i], kv.v[i]]).contiguous().view(torch.uint8).numpy().tobytes() for i in range(2)
    ]
    header = msgpack.packb(
        {
            "dtype": "float32",
            "shape": list(kv.k.shape),
            "n_layers": 2,
            "layer_crc": [zlib.crc32(b) for b in layers],
            "payload_len": sum(map(len, layers)),
            "meta": {"text": "old"},
        }
    )
    entry = struct.pack("<4sHII", b"BRKV", 1, len(header), zlib.crc32(header)) + header + b"".join(layers)
    out = codec.decode(entry)
    assert out.format == "fp32" and torch.equal(out.k, kv.k) and torch.equal(out.v, kv.v)
    assert codec.read_header(entry).meta == {"text": "old"}


def test_corrupt_compressed_layer_is_detected():
    data = bytearray(codec.encode(encoded(make_kv(), "cachegen")))
    header = codec.read_header(data)
    data[header.layer_offset(3) + 10] ^= 0xFF
    with pytest.raises(CorruptEntry, match="layer 3"):
        codec.decode(data)
    with pytest.raises(CorruptEntry, match="truncated"):
        codec.decode(data[:-5])


@pytest.mark.parametrize("payload", [b"", b"\x00\x00", struct.pack("<I", 10) + b"not zstd"])
def test_garbage_behind_a_valid_checksum_is_corrupt(payload):
    """A compressed layer that passes its crc but does not decompress to its shape (a writer bug,
    not a flipped bit) is still a CorruptEntry, never a zstd error or a wrong-sized tensor."""
    with pytest.raises(CorruptEntry):
        get_format("cachegen").decode_layer(memoryview(payload), (2, 3, 4), 0, 1)


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    from blendrag.loading import load_model

    return load_model(str(tiny_dirs["llama"]), torch.float32)


def test_formats_never_share_store_keys(loaded):
    store = MemoryStore(1 << 30)
    engines = {
        name: BlendEngine(loaded, store, kv_format=name) for name in ("fp32", "bf16", "int8", "cachegen")
    }
    keys = {name: e.chunk_kv.key(CHUNKS[0]) for name, e in engines.items()}
    assert len(set(keys.values())) == len(keys)
    # fp32 keeps the keys stores held before formats existed.
    ids = engines["fp32"].prompt_format.chunk_ids(CHUNKS[0])
    assert keys["fp32"] == segment_key(loaded.fingerprint, [], ids)
    engines["bf16"].precompute(CHUNKS)
    assert engines["int8"].precompute(CHUNKS) == len(CHUNKS)  # bf16 entries are not int8's


def test_default_format_is_int8(loaded):
    engine = BlendEngine(loaded, MemoryStore(1 << 30))
    assert DEFAULT_FORMAT == "int8" and engine.kv_format.name == "int8"
    engine.precompute(CHUNKS[:1])
    kv = engine.store.get(engine.chunk_kv.key(CHUNKS[0]))
    assert kv.format == "int8" and codec.read_header(codec.encode(kv)).format.name == "int8"


def test_bad_format_is_a_clear_error(tiny_dirs):
    with pytest.raises(BlendRAGError, match="unknown KV format 'int3'"):
        BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=MemoryStore(1 << 20), kv_format="int3")


@pytest.mark.parametrize("name", ["bf16", "int8", "cachegen"])
def test_blend_at_ratio_one_equals_full_in_every_format(loaded, name):
    """Recomputing every chunk token leaves nothing of the stored (lossy) KV in the answer."""
    engine = BlendEngine(loaded, MemoryStore(1 << 30), kv_format=name)
    config = BlendConfig(recompute_ratio=1.0, selector="deviation", check_layer=1)
    full = engine.prefill(CHUNKS, QUESTION, mode="full")
    blend = engine.prefill(CHUNKS, QUESTION, mode="blend", config=config)
    torch.testing.assert_close(blend.logits, full.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["int8", "cachegen"])
def test_corrupt_entry_on_disk_is_recomputed(loaded, tmp_path, name):
    store = DiskStore(tmp_path)
    engine = BlendEngine(loaded, store, kv_format=name)
    before = engine.prefill(CHUNKS, QUESTION, mode="reuse")
    path = store.path(engine.chunk_kv.key(CHUNKS[1]))
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(data)
    after = engine.prefill(CHUNKS, QUESTION, mode="reuse")
    assert after.stats.cache_misses == 1 and store.stats["corrupt"] == 1
    torch.testing.assert_close(after.logits, before.logits)  # recomputed in the same format
