"""The reuse adapter and ``blendrag tune``: the training forward is the engine's blend, the
adapter keys its own KV, and training lowers the distillation loss."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from blendrag import BlendConfig, BlendEngine
from blendrag.adapter import ReuseAdapter, resolve_adapter
from blendrag.cli import main as cli_main
from blendrag.errors import BlendRAGError
from blendrag.store import MemoryStore
from blendrag.store.base import ChunkKV
from blendrag.tune import (
    ADAPTER_FILE,
    Example,
    TuneSettings,
    compute_teacher,
    distillation_loss,
    in_turn,
    load_examples,
    student_log_probs,
    tune,
)

CHUNKS = [
    "The lighthouse keeper logged every ship that passed the cape in a green ledger.",
    "In 1887 a storm destroyed the pier, and the ledger was moved to the town archive.",
    "Visitors can read the ledger on Tuesdays, when the archive opens its reading room.",
]
QUESTION = "Where is the ledger kept now?"


@pytest.fixture(scope="module")
def make(tiny_dirs):
    """Engines of the same tiny checkpoint (the same weights), fp32 chunk KV."""

    def make(store=None, **kwargs) -> BlendEngine:
        store = store or MemoryStore(1 << 30)
        return BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=store, kv_format="fp32", **kwargs)

    return make


@pytest.fixture(scope="module")
def engine(make) -> BlendEngine:
    return make()


def random_adapter(engine: BlendEngine, n: int = 3, seed: int = 0) -> ReuseAdapter:
    g = torch.Generator().manual_seed(seed)
    return ReuseAdapter(torch.randn(n, engine.model.args.dim, generator=g) * 0.5)


def engine_blend_log_probs(engine: BlendEngine, answer: list[int], config: BlendConfig) -> torch.Tensor:
    """What inference computes: ``blend``'s prefill, then teacher forcing through ``answer``."""
    pre = engine.prefill(CHUNKS, QUESTION, config=config, max_new_tokens=len(answer))
    rest = engine.continuation_logits(pre, answer[:-1])
    return torch.cat([pre.logits[None], rest]).log_softmax(-1)


@pytest.mark.parametrize("offset_weight", [0.0, 0.5])
def test_the_training_forward_is_the_engines_blend(engine, make, offset_weight):
    adapter = random_adapter(engine)
    adapted = make(adapter=adapter)  # the same weights, chunks precomputed after the header
    config = BlendConfig(offset_weight=offset_weight)
    answer = compute_teacher(engine, Example(CHUNKS, QUESTION), 6).answer
    expected = engine_blend_log_probs(adapted, answer, config)
    got = student_log_probs(engine, adapter, Example(CHUNKS, QUESTION), answer, config)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_empty_header_is_no_adapter(engine):
    bare = ReuseAdapter(torch.zeros(0, engine.model.args.dim))
    answer = compute_teacher(engine, Example(CHUNKS, QUESTION), 6).answer
    expected = engine_blend_log_probs(engine, answer, engine.config)
    got = student_log_probs(engine, bare, Example(CHUNKS, QUESTION), answer, engine.config)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_at_ratio_one_the_student_is_full_prefill_and_the_loss_vanishes(engine):
    example = Example(CHUNKS, QUESTION)
    teacher = compute_teacher(engine, example, 6)
    config = replace(engine.config, recompute_ratio=1.0)
    loss = distillation_loss(engine, random_adapter(engine), example, teacher, config)
    assert float(loss.detach()) < 1e-5
    assert (
        float(distillation_loss(engine, random_adapter(engine), example, teacher, engine.config).detach())
        > 1e-3
    )


def test_the_loss_reaches_the_header(engine):
    adapter = random_adapter(engine)
    example = Example(CHUNKS, QUESTION)
    loss = distillation_loss(engine, adapter, example, compute_teacher(engine, example, 6), engine.config)
    loss.backward()
    assert adapter.header.grad is not None and float(adapter.header.grad.abs().sum()) > 0
    assert all(p.grad is None for p in engine.model.parameters())  # the model stays frozen


def test_an_adapter_round_trips_and_keys_its_own_kv(engine, make, tmp_path):
    adapter = random_adapter(engine)
    adapter.save(tmp_path / "a.safetensors", engine.fingerprint)
    loaded = ReuseAdapter.load(tmp_path / "a.safetensors")
    assert torch.equal(loaded.header, adapter.header) and loaded.digest() == adapter.digest()
    assert loaded.trained_for == engine.fingerprint and loaded.path == (tmp_path / "a.safetensors").resolve()
    store = MemoryStore(1 << 30)
    plain, adapted = make(store), make(store, adapter=tmp_path / "a.safetensors")
    other = make(store, adapter=random_adapter(engine, seed=1))
    assert len({plain.fingerprint, adapted.fingerprint, other.fingerprint}) == 3
    assert plain.fingerprint == engine.fingerprint and adapted.model_fingerprint == engine.fingerprint
    plain.precompute(CHUNKS)
    assert not any(adapted.chunk_kv.contains(c) for c in CHUNKS)  # never reads KV made without it
    assert adapted.precompute(CHUNKS) == len(CHUNKS)
    a = store.get(adapted.chunk_kv.key(CHUNKS[0]))
    b = store.get(plain.chunk_kv.key(CHUNKS[0]))
    assert a.k.shape == b.k.shape and not torch.equal(a.k, b.k)  # the chunk's KV, changed by the header


def test_a_header_of_the_prompt_prefix_computes_the_prefix_chunk_contexts_kv(engine, make):
    """`blendrag tune --tokens N` starts from the prefix's first N tokens: with N its length, the
    untrained header computes the chunk KV `chunk_context="prefix"` does (one attention sink)."""
    prefix_ids = engine.prompt_format.prefix_ids

    def chunk_kv(chunk_engine: BlendEngine) -> ChunkKV:
        chunk_engine.precompute(CHUNKS[:1])
        return chunk_engine.store.get(chunk_engine.chunk_kv.key(CHUNKS[0]))

    after_prefix = chunk_kv(make(chunk_context="prefix"))
    after_header = chunk_kv(make(adapter=ReuseAdapter.from_token_embeddings(engine.model, prefix_ids)))
    torch.testing.assert_close(after_header.k, after_prefix.k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after_header.v, after_prefix.v, atol=1e-4, rtol=1e-4)
    shorter = chunk_kv(make(adapter=ReuseAdapter.from_token_embeddings(engine.model, prefix_ids[:-1])))
    assert not torch.allclose(shorter.v, after_prefix.v, atol=1e-3)


def test_a_bad_adapter_is_one_clear_error(engine, make, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BlendRAGError, match="adapter"):
        make(adapter=tmp_path / "junk.safetensors")
    with pytest.raises(BlendRAGError, match="another model"):
        make(adapter=ReuseAdapter(torch.zeros(2, 7)))
    with pytest.raises(BlendRAGError, match="chunk_context"):
        make(chunk_context="prefix", adapter=random_adapter(engine))


def test_tune_lowers_the_loss_checkpoints_and_resumes(engine, tmp_path):
    examples = [
        Example(CHUNKS[i:] + CHUNKS[:i], q) for i in range(3) for q in (QUESTION, "Who logged the ships?")
    ]
    settings = TuneSettings(n_tokens=2, answer_tokens=4, lr=0.05, max_steps=12, checkpoint_every=6)
    result = tune(engine, examples[:4], examples[4:], tmp_path, settings)
    assert result.steps == 12 and [h["step"] for h in result.history] == [0, 6, 12]
    assert result.best_val_loss < result.history[0]["val_loss"]
    best = ReuseAdapter.load(tmp_path / ADAPTER_FILE)
    assert best.n_tokens == 2
    resumed = tune(engine, examples[:4], examples[4:], tmp_path, replace(settings, max_steps=18), resume=True)
    assert resumed.steps == 18 and [h["step"] for h in resumed.history] == [0, 6, 12, 18]
    assert resumed.no_adapter_val_loss == result.no_adapter_val_loss


def test_the_header_starts_as_the_whole_prompt_prefix(engine, tmp_path):
    examples = [Example(CHUNKS, QUESTION), Example(CHUNKS[::-1], QUESTION)]
    tune(engine, examples[:1], examples[1:], tmp_path / "a", TuneSettings(answer_tokens=3, max_steps=0))
    prefix_ids = engine.prompt_format.prefix_ids
    expected = ReuseAdapter.from_token_embeddings(engine.model, prefix_ids)
    assert ReuseAdapter.load(tmp_path / "a" / ADAPTER_FILE).digest() == expected.digest()
    too_long = TuneSettings(n_tokens=len(prefix_ids) + 1, max_steps=0)
    with pytest.raises(BlendRAGError, match=f"the prefix has {len(prefix_ids)}"):
        tune(engine, examples[:1], examples[1:], tmp_path / "b", too_long)
    assert not (tmp_path / "b").exists()


def test_blendrag_tune_runs_end_to_end(tiny_dirs, tmp_path, capsys):
    data = [
        {"question": f"What did the keeper log, {i}?", "ctxs": [{"title": "Cape", "text": c} for c in CHUNKS]}
        for i in range(4)
    ]
    (tmp_path / "data.json").write_text(json.dumps(data))
    out = tmp_path / "adapter"
    args = [
        "tune",
        "--data",
        str(tmp_path / "data.json"),
        "--out",
        str(out),
        "--model",
        str(tiny_dirs["llama"]),
    ]
    assert cli_main([*args, "--val", "1", "--steps", "3", "--tokens", "2", "--answer-tokens", "3"]) == 0
    assert (out / ADAPTER_FILE).exists()
    report = json.loads((out / "tune.json").read_text())
    assert report["steps"] == 3 and report["no_adapter_val_loss"] > 0
    assert cli_main([*args, "--val", "9", "--steps", "3"]) == 2  # no prompt left to train on
    assert "blendrag: error:" in capsys.readouterr().err


def test_prompts_of_several_files_are_taken_in_turn():
    a, b = [Example([f"a{i}"], "q") for i in range(3)], [Example(["b0"], "q")]
    assert [ex.chunks[0] for ex in in_turn([a, b])] == ["a0", "b0", "a1", "a2"]
    assert in_turn([a]) == a


def test_load_examples_reads_the_eval_format_and_refuses_others(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps([{"question": "q?", "answers": ["a"], "ctxs": [{"title": "T", "text": "x" * 50}] * 4}])
    )
    (ex,) = load_examples(path, n_chunks=2, chunk_chars=10)
    assert ex.chunks == ["T\nxxxxxxxx"] * 2 and ex.question == "q?"
    path.write_text(json.dumps({"question": "q?"}))
    with pytest.raises(BlendRAGError, match="expected a JSON list"):
        load_examples(path, 2, 10)


def test_an_index_built_with_an_adapter_is_queried_with_it(engine, tiny_dirs, tmp_path, capsys):
    adapter = tmp_path / "a.safetensors"
    random_adapter(engine).save(adapter, engine.fingerprint)
    model, index_dir = str(tiny_dirs["llama"]), str(tmp_path / "i")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "cape.txt").write_text("\n\n".join(CHUNKS))
    assert (
        cli_main(
            ["index", str(corpus), "--index-dir", index_dir, "--model", model, "--adapter", str(adapter)]
        )
        == 0
    )
    query = ["query", QUESTION, "--index-dir", index_dir, "--model", model, "--max-new-tokens", "2"]
    capsys.readouterr()
    assert cli_main([*query, "--adapter", str(adapter), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["cache_hits"] >= 1 and stats["cache_misses"] == 0
    assert cli_main([*query, "--adapter", "none"]) == 2  # without it the index's KV is not this engine's
    err = capsys.readouterr().err.strip()
    assert err.startswith("blendrag: error:") and err.count("\n") == 0
    assert f"built with reuse adapter {random_adapter(engine).digest()}, not none" in err
    plain_index = str(tmp_path / "plain")
    assert cli_main(["index", str(corpus), "--index-dir", plain_index, "--model", model]) == 0
    capsys.readouterr()
    assert cli_main([*query[:3], plain_index, *query[4:], "--adapter", str(adapter)]) == 2
    assert "built with reuse adapter none, not " in capsys.readouterr().err


def test_the_bundled_adapter_ships_for_the_bundled_model_only(make):
    bundled = ReuseAdapter.load("bundled")
    assert bundled.n_tokens == 50 and bundled.header.shape[1] == 576  # SmolLM2-135M's width
    with pytest.raises(BlendRAGError, match="another model"):
        make(adapter="bundled")
    assert make().adapter is None  # "auto", the default: no adapter for a model it was not trained for


def test_auto_means_the_bundled_adapter_for_exactly_the_model_it_was_trained_for():
    bundled = ReuseAdapter.load("bundled")
    assert resolve_adapter("auto", bundled.trained_for, "none").digest() == bundled.digest()
    assert resolve_adapter("auto", bundled.trained_for, "prefix") is None  # chunks after a prefix
    assert resolve_adapter("auto", "another model or dtype", "none") is None
    assert resolve_adapter("none", bundled.trained_for, "none") is None
    assert resolve_adapter(None, bundled.trained_for, "none") is None


def test_the_bundled_model_gets_its_adapter_by_default(smol_engine):
    adapter = smol_engine.adapter  # the engine of BlendEngine.from_pretrained()'s defaults
    assert adapter is not None and adapter.digest() == ReuseAdapter.load("bundled").digest()
    assert smol_engine.fingerprint != smol_engine.model_fingerprint
