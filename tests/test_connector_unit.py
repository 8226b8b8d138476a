"""``BlendConnector``'s scheduler and worker sides without a running vLLM: the tiny checkpoint,
a fake ``VllmConfig`` and fake attention layers whose cache-update op scatters K/V by slot.
The connector inside a real vLLM is ``tests/test_vllm.py``."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from blendrag import BlendEngine
from blendrag.adapter import ReuseAdapter
from blendrag.errors import BlendRAGError
from blendrag.vllm import blend_request
from blendrag.vllm.client import BlendReport, blend_report

pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

from blendrag.vllm import connector as conn_mod  # noqa: E402
from blendrag.vllm.connector import (  # noqa: E402
    BlendConnector,
    BlendConnectorMetadata,
    BlendConnectorStats,
    BlendWorkerMeta,
    LoadSpec,
    kv_head_shard,
    worker_device,
    write_kv,
)

BLOCK = 4
N_BLOCKS = 64
CHUNKS = ["The lighthouse was built in 1871 by the harbour board.", "Its lamp came from Paris in 1872."]
QUESTION = "Who built the lighthouse?"


def vllm_config(model, store, device="cpu", policy="recompute", **extra):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"store": str(store), **extra}, kv_load_failure_policy=policy
        ),
        cache_config=SimpleNamespace(block_size=BLOCK, enable_prefix_caching=True),
        model_config=SimpleNamespace(model=str(model), dtype=torch.float32),
        device_config=SimpleNamespace(device=None if device is None else torch.device(device)),
    )


@pytest.fixture
def store(tmp_path):
    return tmp_path / "kv"


@pytest.fixture
def model(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture
def indexer(model, store) -> BlendEngine:
    """blendrag's engine over the on-disk store the connector reads, with CHUNKS indexed."""
    engine = BlendEngine.from_pretrained(str(model), store=str(store))
    engine.precompute(CHUNKS)
    return engine


class FakeRank:
    world_size, rank_in_group, is_first_rank = 1, 0, True


@pytest.fixture
def worker(model, store, indexer, monkeypatch) -> BlendConnector:
    monkeypatch.setattr(conn_mod, "get_tp_group", FakeRank)
    monkeypatch.setattr(conn_mod, "get_pp_group", FakeRank)
    return BlendConnector(vllm_config(model, store), KVConnectorRole.WORKER, None)


@pytest.fixture
def scheduler(model, store, indexer) -> BlendConnector:
    return BlendConnector(vllm_config(model, store), KVConnectorRole.SCHEDULER, None)


def fake_request(request_id, blend):
    return SimpleNamespace(
        request_id=request_id,
        kv_transfer_params=blend.kv_transfer_params,
        cache_salt=blend.cache_salt,
        prompt_token_ids=blend.prompt_token_ids,
    )


class CountingStore:
    def __init__(self, inner):
        self.inner, self.lookups = inner, 0

    def contains(self, key):
        self.lookups += 1
        return self.inner.contains(key)


def count_builds(connector, monkeypatch) -> list[int]:
    calls, build = [], connector.prompt_format.build
    monkeypatch.setattr(connector.prompt_format, "build", lambda *a: calls.append(1) or build(*a))
    return calls


# ---- scheduler side ---------------------------------------------------------------------------


def test_a_waiting_request_is_matched_once_until_it_finishes(scheduler, indexer, monkeypatch):
    blend = blend_request(indexer.prompt_format, CHUNKS, QUESTION)
    request, n = fake_request("r1", blend), len(blend.prompt_token_ids)
    store = CountingStore(scheduler.store)
    scheduler.chunk_kv = replace(scheduler.chunk_kv, store=store)
    builds = count_builds(scheduler, monkeypatch)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (n - 1, False)
    assert (store.lookups, len(builds)) == (len(CHUNKS), 1)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (n - 1, False)
    assert (store.lookups, len(builds)) == (len(CHUNKS), 1)  # a dict lookup, nothing else
    # Per call still: vLLM's own prefix cache holding every full block leaves the rest to vLLM,
    # a shorter hit of its own leaves the connector the remainder.
    assert scheduler.get_num_new_matched_tokens(request, (n - 1) // BLOCK * BLOCK) == (0, False)
    assert scheduler.get_num_new_matched_tokens(request, BLOCK) == (n - 1 - BLOCK, False)
    assert (store.lookups, len(builds)) == (len(CHUNKS), 1)
    scheduler.request_finished(request, [])
    scheduler.get_num_new_matched_tokens(request, 0)
    assert (store.lookups, len(builds)) == (2 * len(CHUNKS), 2)  # finished: forgotten


def test_a_miss_is_remembered_too_and_counted(scheduler, indexer, monkeypatch):
    blend = blend_request(indexer.prompt_format, ["Not in the store."], QUESTION)
    request = fake_request("r2", blend)
    store = CountingStore(scheduler.store)
    scheduler.chunk_kv = replace(scheduler.chunk_kv, store=store)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert store.lookups == 1
    assert scheduler.get_kv_connector_stats().data == {"misses": 1}
    assert scheduler.get_kv_connector_stats() is None  # handed over once


def test_the_workers_report_reaches_the_finished_requests_params(scheduler, indexer):
    blend = blend_request(indexer.prompt_format, CHUNKS, QUESTION)
    request, n = fake_request("r3", blend), len(blend.prompt_token_ids)
    scheduler.get_num_new_matched_tokens(request, 0)
    scheduler.update_state_after_alloc(request, None, n - 1 - BLOCK)
    assert scheduler._pending["r3"].start == BLOCK  # vLLM's own hit ends there
    assert scheduler.get_kv_connector_stats().data == {"hits": 1}
    report = BlendReport(n_written=n - 1 - BLOCK, n_recomputed=7, compute_fraction=0.3)
    gone = BlendReport(n_written=5)  # a request that finished in the step that blended it
    output = SimpleNamespace(kv_connector_worker_meta=BlendWorkerMeta({"r3": report, "gone": gone}))
    scheduler.update_connector_output(output)
    assert "gone" not in scheduler._reports
    done, params = scheduler.request_finished(request, [])
    assert not done and blend_report(params) == report
    assert scheduler.request_finished(fake_request("r4", blend), []) == (False, None)


def test_a_failure_policy_of_fail_is_warned_about(model, store, indexer, caplog):
    logger = logging.getLogger("vllm.blendrag.connector")  # vLLM's logger does not propagate
    logger.addHandler(caplog.handler)
    try:
        BlendConnector(vllm_config(model, store, policy="fail"), KVConnectorRole.SCHEDULER, None)
    finally:
        logger.removeHandler(caplog.handler)
    assert "kv_load_failure_policy is 'fail'" in caplog.text


# ---- worker side -------------------------------------------------------------------------------


class FakeImpl:
    """The cache-update op: K/V of token t to slot ``slot_mapping[t]``."""

    def __init__(self):
        self.devices = []

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        self.devices.append((key.device, value.device, slot_mapping.device))
        kv_cache[0, slot_mapping] = key
        kv_cache[1, slot_mapping] = value


class FakeLayer:
    def __init__(self, n_kv_heads, head_dim, device="cpu"):
        self.impl, self.num_kv_heads = FakeImpl(), n_kv_heads
        self.kv_cache = torch.zeros(2, N_BLOCKS * BLOCK, n_kv_heads, head_dim, device=device)


def forward_context(engine, n_kv_heads=None):
    args = engine.model.args
    layers = {
        f"model.layers.{i}.self_attn.attn": FakeLayer(n_kv_heads or args.n_kv_heads, args.head_dim)
        for i in range(args.n_layers)
    }
    return SimpleNamespace(no_compile_layers=layers)


def load(worker, spec, ctx):
    worker.bind_connector_metadata(BlendConnectorMetadata([spec]))
    worker.start_load_kv(ctx)
    worker.clear_connector_metadata()


def spec_for(indexer, start, req_id="w1"):
    n = len(indexer.build_prompt(CHUNKS, QUESTION).ids)
    blocks = list(range(N_BLOCKS - 1, N_BLOCKS - 2 - (n // BLOCK), -1))  # any order vLLM hands out
    return LoadSpec(req_id, CHUNKS, QUESTION, indexer.config, start, n - 1, blocks)


def slot(spec, position):
    return spec.block_ids[position // BLOCK] * BLOCK + position % BLOCK


def test_the_worker_writes_the_blend_into_the_requests_slots(worker, indexer):
    spec, ctx = spec_for(indexer, start=BLOCK), forward_context(indexer)
    load(worker, spec, ctx)
    reference = indexer.prefill(CHUNKS, QUESTION, mode="blend")
    written = [slot(spec, p) for p in range(spec.start, spec.end)]
    for name, layer in ctx.no_compile_layers.items():
        i = int(name.split(".")[2])
        cache = layer.kv_cache
        assert torch.equal(cache[0, written], reference.kv.k[i, :, spec.start : spec.end].transpose(0, 1))
        assert torch.equal(cache[1, written], reference.kv.v[i, :, spec.start : spec.end].transpose(0, 1))
        untouched = torch.ones(cache.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert not cache[:, untouched].any()  # vLLM's own prefix and the last prompt token
    assert worker.get_block_ids_with_load_errors() == set()
    report = worker.build_connector_worker_meta().reports["w1"]
    assert report.error is None and report.n_written == spec.end - spec.start
    assert report.n_recomputed == reference.stats.n_recomputed
    assert report.cache_hits == len(CHUNKS) and report.cache_misses == 0
    assert worker.build_connector_worker_meta() is None  # one step's reports, once
    stats = worker.get_kv_connector_stats().reduce()
    assert stats == {
        "blended": 1,
        "tokens_written": spec.end - spec.start,
        "tokens_recomputed": reference.stats.n_recomputed,
    }


def test_with_an_adapter_the_connector_finds_and_blends_the_kv_made_after_it(
    model, store, indexer, tmp_path, monkeypatch
):
    adapter_file = tmp_path / "adapter.safetensors"
    header = torch.randn(3, indexer.model.args.dim, generator=torch.Generator().manual_seed(0))
    ReuseAdapter(header).save(adapter_file, indexer.model_fingerprint)
    adapted = BlendEngine.from_pretrained(str(model), store=str(store), adapter=str(adapter_file))
    question = "Where did the lamp come from?"
    blend = blend_request(adapted.prompt_format, CHUNKS, question, fingerprint=adapted.fingerprint)
    request, n = fake_request("a1", blend), len(blend.prompt_token_ids)
    with_adapter = vllm_config(model, store, adapter=str(adapter_file))
    bare = BlendConnector(vllm_config(model, store), KVConnectorRole.SCHEDULER, None)
    assert bare.get_num_new_matched_tokens(request, 0) == (0, False)  # another fingerprint
    scheduler = BlendConnector(with_adapter, KVConnectorRole.SCHEDULER, None)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # not stored yet
    adapted.precompute(CHUNKS)
    scheduler = BlendConnector(with_adapter, KVConnectorRole.SCHEDULER, None)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (n - 1, False)
    monkeypatch.setattr(conn_mod, "get_tp_group", FakeRank)
    monkeypatch.setattr(conn_mod, "get_pp_group", FakeRank)
    worker = BlendConnector(with_adapter, KVConnectorRole.WORKER, None)
    spec = LoadSpec("a1", CHUNKS, question, adapted.config, 0, n - 1, list(range(N_BLOCKS)))
    ctx = forward_context(adapted)
    load(worker, spec, ctx)
    reference = adapted.prefill(CHUNKS, question, mode="blend")
    cache = ctx.no_compile_layers["model.layers.1.self_attn.attn"].kv_cache
    assert torch.equal(cache[0, : n - 1], reference.kv.k[1, :, : n - 1].transpose(0, 1))
    assert worker.build_connector_worker_meta().reports["a1"].cache_misses == 0


def test_a_failed_blend_reports_its_blocks_once_and_the_step_goes_on(worker, indexer, store):
    spec = spec_for(indexer, start=BLOCK)
    # A store entry the scheduler sees but the worker cannot read: a directory where its file was.
    path = worker.store.tiers[1].path(indexer.chunk_kv.key(CHUNKS[1]))
    path.unlink()
    path.mkdir()
    load(worker, spec, forward_context(indexer))
    n_blocks = (spec.end + BLOCK - 1) // BLOCK
    assert worker.get_block_ids_with_load_errors() == set(spec.block_ids[1:n_blocks])
    assert worker.get_block_ids_with_load_errors() == set()  # reported in the failing step only
    report = worker.build_connector_worker_meta().reports["w1"]
    assert report.error.startswith("IsADirectoryError") and report.n_recomputed is None
    assert worker.get_kv_connector_stats().reduce() == {"load_errors": 1}


class SecondRank:
    world_size, rank_in_group, is_first_rank = 2, 1, True


def test_the_second_tp_rank_writes_its_heads_and_leaves_reporting_to_the_first(
    model, store, indexer, monkeypatch
):
    monkeypatch.setattr(conn_mod, "get_tp_group", SecondRank)
    monkeypatch.setattr(conn_mod, "get_pp_group", FakeRank)
    worker = BlendConnector(vllm_config(model, store), KVConnectorRole.WORKER, None)
    assert indexer.model.args.n_kv_heads == 2 and worker.heads == slice(1, 2)
    spec, ctx = spec_for(indexer, start=0), forward_context(indexer, n_kv_heads=1)
    load(worker, spec, ctx)
    reference = indexer.prefill(CHUNKS, QUESTION, mode="blend")
    written = [slot(spec, p) for p in range(spec.start, spec.end)]
    for i, layer in enumerate(ctx.no_compile_layers.values()):
        assert torch.equal(layer.kv_cache[0, written, 0], reference.kv.k[i, 1, : spec.end])
    assert worker.build_connector_worker_meta() is None and worker.get_kv_connector_stats() is None


def test_the_copy_of_the_weights_is_logged_with_its_size_and_device(model, store, monkeypatch, caplog):
    monkeypatch.setattr(conn_mod, "get_tp_group", FakeRank)
    monkeypatch.setattr(conn_mod, "get_pp_group", FakeRank)
    logger = logging.getLogger("vllm.blendrag.connector")
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    try:
        worker = BlendConnector(vllm_config(model, store), KVConnectorRole.WORKER, None)
    finally:
        logger.removeHandler(caplog.handler)
    nbytes = sum(p.numel() * p.element_size() for p in worker.engine.model.parameters())
    assert worker.engine.device == torch.device("cpu") and worker.engine.dtype == torch.float32
    assert f"{nbytes / 1e9:.2f} GB of parameters (torch.float32) on cpu" in caplog.text


def test_the_worker_device_is_vllms_with_its_index(monkeypatch):
    assert worker_device(vllm_config("m", "s", device=None)) == torch.device("cpu")
    assert worker_device(vllm_config("m", "s", device="cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert worker_device(vllm_config("m", "s", device="cuda")) == torch.device("cuda", 3)


# ---- tensor parallelism --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_kv_heads, tp_size, expected",
    [
        (8, 1, [(0, 8)]),
        (8, 2, [(0, 4), (4, 8)]),
        (8, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),
        (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # fewer heads than ranks: each on 2 ranks
        (1, 2, [(0, 1), (0, 1)]),
    ],
)
def test_kv_heads_shard_as_vllm_splits_them(n_kv_heads, tp_size, expected):
    shards = [kv_head_shard(n_kv_heads, tp_size, rank) for rank in range(tp_size)]
    assert [(s.start, s.stop) for s in shards] == expected


@pytest.mark.parametrize("n_kv_heads, tp_size, rank", [(6, 4, 0), (2, 3, 0), (4, 2, 2), (4, 2, -1)])
def test_a_shard_vllm_could_not_make_is_refused(n_kv_heads, tp_size, rank):
    with pytest.raises(ValueError):
        kv_head_shard(n_kv_heads, tp_size, rank)


def fake_kv(n_layers=2, n_kv_heads=2, n=10, head_dim=4):
    shape = (n_layers, n_kv_heads, n, head_dim)
    return SimpleNamespace(k=torch.randn(shape), v=torch.randn(shape))


def test_each_rank_writes_its_shard_of_the_heads():
    kv = fake_kv()
    spec = LoadSpec("r", [], "", None, 0, 9, [2, 0, 1])
    for rank in range(2):
        heads = kv_head_shard(2, 2, rank)
        layers = {i: FakeLayer(1, 4) for i in range(2)}
        write_kv(kv, spec, layers, BLOCK, heads)
        written = [slot(spec, p) for p in range(9)]
        for i, layer in layers.items():
            assert torch.equal(layer.kv_cache[0, written, 0], kv.k[i, rank, :9])
            assert torch.equal(layer.kv_cache[1, written, 0], kv.v[i, rank, :9])


def test_a_cache_that_holds_other_heads_than_the_shard_is_refused():
    with pytest.raises(BlendRAGError, match="holds 2 KV heads"):
        write_kv(
            fake_kv(), LoadSpec("r", [], "", None, 0, 9, [0, 1, 2]), {0: FakeLayer(2, 4)}, BLOCK, slice(0, 1)
        )


def test_kv_and_slots_go_to_the_caches_device():
    layers = {i: FakeLayer(2, 4, device="meta") for i in range(2)}  # a device the KV is not on
    write_kv(fake_kv(), LoadSpec("r", [], "", None, 0, 9, [0, 1, 2]), layers, BLOCK, slice(0, 2))
    meta = torch.device("meta")
    assert all(d == (meta, meta, meta) for layer in layers.values() for d in layer.impl.devices)


# ---- stats -----------------------------------------------------------------------------------------


def test_stats_sum_across_workers_and_steps_and_round_trip():
    a, b = BlendConnectorStats(), BlendConnectorStats()
    assert a.is_empty()
    a.add(blended=1, tokens_recomputed=30)
    b.add(blended=2, hits=3)
    total = a.aggregate(b)
    assert total.reduce() == {"blended": 3, "tokens_recomputed": 30, "hits": 3}
    again = BlendConnector.build_kv_connector_stats(total.to_dict())
    assert again.reduce() == total.reduce() and not again.is_empty()
    assert BlendConnector.build_kv_connector_stats(None).is_empty()


def test_worker_meta_merges_reports():
    x, y = BlendReport(n_written=1), BlendReport(n_written=2)
    assert BlendWorkerMeta({"a": x}).aggregate(BlendWorkerMeta({"b": y})).reports == {"a": x, "b": y}


def test_vllms_connector_logging_sums_and_prints_the_stats():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

    config = KVTransferConfig(
        kv_connector="BlendConnector", kv_connector_module_path="blendrag.vllm.connector", kv_role="kv_both"
    )
    vllm_logging = KVConnectorLogging(config)  # finds BlendConnector.build_kv_connector_stats
    stats = BlendConnectorStats()
    stats.add(hits=1, tokens_recomputed=30)
    vllm_logging.observe(stats.to_dict())  # as the scheduler's stats payload arrives
    vllm_logging.observe({"hits": 2})
    lines = []
    vllm_logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    assert lines == ["KV Transfer metrics: hits=3, tokens_recomputed=30"]
