"""The background loader of ``KVBuffer`` with an asynchronous transfer (``blendrag.transfer``),
run on CPU: a fake stands in for the CUDA stream, events and pinned memory and records what the
loader asked of it, and when, so the order the CUDA path depends on is checked without a GPU."""

from __future__ import annotations

import gc
import time
import weakref
from contextlib import contextmanager

import pytest
import torch

from blendrag import BlendEngine, kvbuffer
from blendrag.kvbuffer import STAGING_SLOTS, KVBuffer
from blendrag.store import MemoryStore
from blendrag.store.base import ChunkKV
from tests.test_engine import CHUNKS, QUESTION

SPANS = [(0, 5), (5, 7), (15, 4)]  # (start, tokens); positions 12-14 hold no stored KV
CAPACITY = 24


class FakeTransfer:
    """Asynchronous as far as the loader knows; its copies in fact finish when issued. It keeps,
    per layer, what the buffer and its staging slot held at each step of the loader."""

    asynchronous = True

    def __init__(self, shared: tuple[torch.Tensor, ...]) -> None:
        self.k, self.v = shared[0], shared[1]  # the request's buffer
        self.log: list[tuple[str, int]] = []
        self.staging: list[torch.Tensor] = []  # every pinned() allocation, in order
        self.entered_empty: list[bool] = []  # per layer: nothing copied in before its stream
        self.at_record: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}
        self.at_sync: dict[int, list[torch.Tensor]] = {}
        self.in_stream = False

    def slot(self, layer: int) -> list[torch.Tensor]:
        """Layer's staging: slot layer % STAGING_SLOTS, one [2, H, n, D] tensor per segment."""
        per_slot = len(self.staging) // STAGING_SLOTS
        first = (layer % STAGING_SLOTS) * per_slot
        return self.staging[first : first + per_slot]

    @contextmanager
    def stream(self):
        layer = len(self.entered_empty)
        self.entered_empty.append(not (self.k[layer].any() or self.v[layer].any()))
        self.in_stream = True
        yield
        self.in_stream = False

    def record(self, layer: int) -> None:
        assert self.in_stream, "a layer's event is recorded on the stream its work went to"
        self.log.append(("record", layer))
        slot = [t.clone() for t in self.slot(layer)]
        self.at_record[layer] = (self.k[layer].clone(), self.v[layer].clone(), slot)

    def wait(self, layer: int) -> None:
        self.log.append(("wait", layer))

    def pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.staging.append(torch.full(shape, float("nan"), dtype=dtype))
        return self.staging[-1]

    def sync(self, layer: int) -> None:
        self.log.append(("sync", layer))
        self.at_sync[layer] = [t.clone() for t in self.slot(layer)]


@pytest.fixture
def fakes(monkeypatch) -> list[FakeTransfer]:
    """Every background load from here on goes through a new FakeTransfer, listed here."""
    made: list[FakeTransfer] = []

    def transfer_for(device, n_layers, shared):
        made.append(FakeTransfer(shared))
        return made[-1]

    monkeypatch.setattr(kvbuffer, "transfer_for", transfer_for)
    return made


class SlowKV:
    """A stored chunk read layer by layer, as from disk: each read takes ``delay`` seconds and
    layer ``broken`` raises."""

    def __init__(self, kv: ChunkKV, delay: float = 0.0, broken: int | None = None) -> None:
        self.kv, self.delay, self.broken = kv, delay, broken
        self.n_layers, self.n_tokens, self.format = kv.n_layers, kv.n_tokens, None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        if i == self.broken:
            raise OSError("disk gone")
        return self.kv.layer(i)


def stored_segments(args, seed: int = 0) -> list[tuple[int, ChunkKV]]:
    """fp32 chunk KV at ``SPANS``, as an int8 entry decodes to (the buffer below is bf16)."""
    g = torch.Generator().manual_seed(seed)
    shape = (args.n_layers, args.n_kv_heads)
    return [
        (
            start,
            ChunkKV(
                torch.randn(*shape, n, args.head_dim, generator=g),
                torch.randn(*shape, n, args.head_dim, generator=g),
            ),
        )
        for start, n in SPANS
    ]


def foreground(engine: BlendEngine, segments) -> KVBuffer:
    buf = KVBuffer(engine.model.args, CAPACITY, torch.bfloat16)
    buf.load(segments, engine.rotary)
    return buf


def load_all(engine: BlendEngine, segments) -> KVBuffer:
    buf = KVBuffer(engine.model.args, CAPACITY, torch.bfloat16)
    buf.load(segments, engine.rotary, background=True)
    for layer in range(engine.model.args.n_layers):
        buf.wait(layer)
    return buf


def test_staged_load_equals_the_foreground_load_bit_for_bit(tiny_engine, fakes):
    segments = stored_segments(tiny_engine.model.args)
    expected, loaded = foreground(tiny_engine, segments), load_all(tiny_engine, segments)
    assert len(fakes) == 1
    assert torch.equal(loaded.k, expected.k) and torch.equal(loaded.v, expected.v)


def test_each_layer_is_staged_copied_and_realigned_on_the_stream_before_its_event(tiny_engine, fakes):
    segments = stored_segments(tiny_engine.model.args)
    expected = foreground(tiny_engine, segments)
    load_all(tiny_engine, segments)
    fake, n_layers = fakes[0], tiny_engine.model.args.n_layers
    assert fake.entered_empty == [True] * n_layers  # nothing of a layer is copied before its stream
    assert [e for e in fake.log if e[0] == "record"] == [("record", i) for i in range(n_layers)]
    for layer, (k, v, slot) in fake.at_record.items():
        # Copied and re-aligned: what the foreground load holds, when the event is recorded.
        assert torch.equal(k, expected.k[layer]) and torch.equal(v, expected.v[layer])
        # Staged: the slot holds this layer of every segment, in the buffer's dtype.
        for staged, (_, kv) in zip(slot, segments, strict=True):
            assert torch.equal(staged[0], kv.k[layer].bfloat16())
            assert torch.equal(staged[1], kv.v[layer].bfloat16())


def test_a_staging_slot_is_overwritten_only_after_the_copies_that_read_it_are_synced(tiny_engine, fakes):
    load_all(tiny_engine, stored_segments(tiny_engine.model.args))
    fake, n_layers = fakes[0], tiny_engine.model.args.n_layers
    assert n_layers > STAGING_SLOTS  # else no slot is reused
    assert len(fake.staging) == STAGING_SLOTS * len(SPANS)
    for layer in range(n_layers - STAGING_SLOTS):
        reuse = fake.log.index(("record", layer + STAGING_SLOTS))
        assert ("sync", layer) in fake.log[:reuse], f"slot of layer {layer} reused unsynced"
        # At the sync the slot still held what the layer's copies read.
        for at_sync, at_record in zip(fake.at_sync[layer], fake.at_record[layer][2], strict=True):
            assert torch.equal(at_sync, at_record)


def test_the_layer_loop_waits_for_each_layer_after_it_is_recorded_and_before_computing_it(
    tiny_dirs, fakes, monkeypatch
):
    """Through the engine, whose logits equal the foreground load's."""
    store = MemoryStore(1 << 28)
    background = BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=store, prefetch=True)
    foreground = BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=store, prefetch=False)
    foreground.precompute(CHUNKS)
    expected = foreground.prefill(CHUNKS, QUESTION, mode="reuse")
    for i, block in enumerate(background.model.layers):

        def qkv(h, i=i, inner=block.qkv):
            fakes[-1].log.append(("compute", i))
            return inner(h)

        monkeypatch.setattr(block, "qkv", qkv)
    out = background.prefill(CHUNKS, QUESTION, mode="reuse")
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.kv.k, expected.kv.k)
    (fake,) = fakes
    n_layers = len(background.model.layers)
    request_thread = [e for e in fake.log if e[0] in ("wait", "compute")]
    assert request_thread == [(step, i) for i in range(n_layers) for step in ("wait", "compute")]
    for i in range(n_layers):  # the loader thread recorded the layer before the request waited on it
        assert fake.log.index(("record", i)) < fake.log.index(("wait", i))


def test_a_failed_layer_reaches_the_waiting_request_and_no_compute_waits_for_it(tiny_engine, fakes):
    (start, kv), *rest = stored_segments(tiny_engine.model.args)
    buf = KVBuffer(tiny_engine.model.args, CAPACITY, torch.bfloat16)
    buf.load([(start, SlowKV(kv, broken=2)), *rest], tiny_engine.rotary, background=True)
    buf.wait(0)
    buf.wait(1)
    for layer in (2, 3):
        with pytest.raises(OSError, match="disk gone"):
            buf.wait(layer)
    assert [e for e in fakes[0].log if e[0] == "wait"] == [("wait", 0), ("wait", 1)]


def test_load_stall_is_the_time_the_layer_loop_waited_for_the_loader(tiny_engine, fakes):
    args = tiny_engine.model.args
    segments = [(start, SlowKV(kv, delay=0.05)) for start, kv in stored_segments(args)]
    buf = load_all(tiny_engine, segments)
    # Each layer reads three segments at 50 ms: the loop waited for nearly all of it.
    assert 0.9 * 0.15 * args.n_layers < buf.load_stall_s < 0.15 * args.n_layers + 1.0


def test_a_background_loaded_buffer_is_freed_when_its_request_drops_it(tiny_engine):
    """No reference cycle through the loader thread: with the garbage collector off, dropping
    the prefill frees its buffer at once (a cycle would hold every request's KV, on a GPU too,
    until Python's collector happened to run)."""
    assert tiny_engine.prefetch
    gc.collect()
    gc.disable()
    try:
        pre = tiny_engine.prefill(CHUNKS, QUESTION, mode="blend")
        buffer = weakref.ref(pre.kv)
        del pre
        assert buffer() is None
    finally:
        gc.enable()
