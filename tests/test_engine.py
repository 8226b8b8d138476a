"""Blending invariants on tiny random-weight models (fast) and the real SmolLM2 (slow)."""

import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from blendrag import BlendConfig, BlendEngine
from blendrag.forward import run_layers
from blendrag.kvbuffer import KVBuffer
from blendrag.store import DiskStore, MemoryStore

CHUNKS = [
    "The lighthouse at Varden Point was built in 1871 by the engineer Hilde Marsk.",
    "Marsk trained at the Bergen technical school and later designed three harbours.",
    "In 1903 the lamp was replaced by a Fresnel lens made in Paris.",
]
QUESTION = "Who built the lighthouse at Varden Point?"


# Blending every chunk token, with each way of choosing them: full prefill's result exactly.
RATIO_ONE_CONFIGS = pytest.mark.parametrize(
    "config",
    [
        BlendConfig(recompute_ratio=1.0, selector="deviation", check_layer=1),
        BlendConfig(recompute_ratio=1.0, selector="preview", check_layer=0, preview_draft=3),
        BlendConfig(recompute_ratio=1.0, offset_weight=1.0),
    ],
    ids=["deviation", "preview", "offset"],
)


@RATIO_ONE_CONFIGS
def test_blend_at_ratio_one_equals_full(tiny_engine, config):
    """Also proves the preview pass leaves nothing behind in the KV it shares with blending."""
    full = tiny_engine.prefill(CHUNKS, QUESTION, mode="full")
    blend = tiny_engine.prefill(CHUNKS, QUESTION, mode="blend", config=config)
    torch.testing.assert_close(blend.logits, full.logits, atol=1e-4, rtol=1e-4)
    assert blend.stats.n_recomputed == full.stats.n_tokens - len(full.prompt.prefix) - len(
        full.prompt.chunks[0]
    )
    g_full = tiny_engine.generate(CHUNKS, QUESTION, mode="full", max_new_tokens=12)
    g_blend = tiny_engine.generate(CHUNKS, QUESTION, mode="blend", config=config, max_new_tokens=12)
    assert g_blend.token_ids == g_full.token_ids


def test_prefix_mode_is_exact(tiny_engine):
    full = tiny_engine.prefill(CHUNKS, QUESTION, mode="full")
    prefix = tiny_engine.prefill(CHUNKS, QUESTION, mode="prefix")
    torch.testing.assert_close(prefix.logits, full.logits, atol=1e-4, rtol=1e-4)
    assert prefix.stats.n_recomputed == full.stats.n_tokens - full.prompt.chunk_offsets()[1]


def test_reuse_equals_blend_at_ratio_zero_when_checking_layer_zero(tiny_engine):
    reuse = tiny_engine.prefill(CHUNKS, QUESTION, mode="reuse")
    blend = tiny_engine.prefill(
        CHUNKS, QUESTION, mode="blend", config=BlendConfig(recompute_ratio=0.0, check_layer=0)
    )
    torch.testing.assert_close(blend.logits, reuse.logits, atol=1e-5, rtol=1e-5)
    assert blend.stats.n_recomputed == reuse.stats.n_recomputed == len(reuse.prompt.suffix)


def test_reuse_differs_from_full(tiny_engine):
    """Guards the tests above: with several chunks, reuse really is approximate here."""
    full = tiny_engine.prefill(CHUNKS, QUESTION, mode="full")
    reuse = tiny_engine.prefill(CHUNKS, QUESTION, mode="reuse")
    assert (reuse.logits - full.logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("selector", "check_layer"),
    [("deviation", 1), ("attention", 1), ("attention_deviation", 1), ("preview", 1), ("preview", 0)],
)
@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_question_always_recomputed_and_budget_respected(tiny_engine, selector, check_layer, ratio):
    cfg = BlendConfig(
        recompute_ratio=ratio, selector=selector, check_layer=check_layer, first_k=2, gradual_layers=1
    )
    pre = tiny_engine.prefill(CHUNKS, QUESTION, mode="blend", config=cfg)
    p = pre.prompt
    n_chunk = p.suffix_start - len(p.prefix)
    assert pre.stats.n_recomputed == len(p.suffix) + round(ratio * n_chunk)


def test_first_k_tokens_are_forced(tiny_engine):
    """With first_k and a budget that only fits them, exactly those positions are kept."""
    prompt = tiny_engine.prompt_format.build(CHUNKS, QUESTION)
    n_chunk = prompt.suffix_start - len(prompt.prefix)
    cfg = BlendConfig(recompute_ratio=3 * 2 / n_chunk, selector="deviation", check_layer=1, first_k=2)
    pre = tiny_engine.prefill(CHUNKS, QUESTION, mode="blend", config=cfg)
    assert list(pre.plan.filters) == [1]  # the check layer's filter made the cut
    forced = [o + j for o in prompt.chunk_offsets()[1:] for j in range(2)]
    question = list(range(prompt.suffix_start, len(prompt.ids)))
    kept_positions = pre.recomputed.tolist()
    assert set(forced) <= set(kept_positions)
    assert set(question) <= set(kept_positions)


@pytest.mark.parametrize("variant", ["llama", "llama3", "qwen3"])
def test_realigned_keys_equal_fresh_keys_at_new_offset(tiny_dirs, variant):
    """Chunk KV computed at positions 0.. and moved to offset 1000 equals what transformers
    computes for the same tokens at positions 1000.. (every layer, K and V)."""
    engine = BlendEngine.from_pretrained(
        str(tiny_dirs[variant]), store=MemoryStore(1 << 28), chunk_context="none", kv_format="fp32"
    )
    ids = engine.prompt_format.chunk_ids(CHUNKS[1])
    stored, _ = engine.chunk_kv.segments([], [ids])[0]
    offset = 1000
    buf = KVBuffer(engine.model.args, offset + len(ids), engine.dtype)
    buf.load([(offset, stored)], engine.rotary)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[variant], dtype=torch.float32).eval()
    with torch.no_grad():
        cache = hf(
            torch.tensor([ids]), position_ids=torch.arange(offset, offset + len(ids))[None]
        ).past_key_values
    for layer in range(engine.model.args.n_layers):
        torch.testing.assert_close(
            buf.k[layer, :, offset:], cache.layers[layer].keys[0], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            buf.v[layer, :, offset:], cache.layers[layer].values[0], atol=1e-4, rtol=1e-4
        )


def test_recomputed_token_never_attends_to_later_positions(tiny_engine):
    """Active tokens at positions 5 and 10 in a 40-slot buffer: whatever lies after position 10
    must not change their output (a bottom-right mask would let them see it)."""
    args = tiny_engine.model.args
    ids = torch.tensor([11, 12])
    positions = torch.tensor([5, 10])
    outs = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        buf = KVBuffer(args, 40, torch.float32)
        buf.k[:, :, :5].normal_(generator=torch.Generator().manual_seed(7))
        buf.v[:, :, :5].normal_(generator=torch.Generator().manual_seed(8))
        buf.k[:, :, 11:].normal_(generator=g)
        buf.v[:, :, 11:].normal_(generator=g)
        buf.length = 40
        outs.append(run_layers(tiny_engine.model, tiny_engine.rotary, buf, ids, positions).last_hidden)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["full", "reuse"])
def test_continuation_logits_equal_step_by_step_decoding(tiny_engine, mode):
    """Teacher forcing (eval.fidelity's shortcut) gives the logits greedy decoding sees."""
    out = tiny_engine.generate(CHUNKS, QUESTION, mode=mode, max_new_tokens=8)
    ids = out.token_ids
    assert len(ids) >= 2, "tiny model stopped too early for this test"
    pre = tiny_engine.prefill(CHUNKS, QUESTION, mode=mode, max_new_tokens=len(ids))
    forced = tiny_engine.continuation_logits(pre, ids)
    assert forced.argmax(-1).tolist()[:-1] == ids[1:]
    pre2 = tiny_engine.prefill(CHUNKS, QUESTION, mode=mode, max_new_tokens=len(ids))
    for i, token in enumerate(ids):
        step = tiny_engine.continuation_logits(pre2, [token])[0]
        torch.testing.assert_close(step, forced[i], atol=1e-4, rtol=1e-4)


def test_preview_recomputes_the_tokens_the_question_attends_to(tiny_engine):
    """The preview scores are the question's attention over the reused KV: the chunk rows the
    blend pass computes are exactly the top-scored ones."""
    from blendrag.selection import preview_attention

    cfg = BlendConfig(recompute_ratio=0.2, selector="preview", preview_draft=2)
    prompt = tiny_engine.prompt_format.build(CHUNKS, QUESTION)
    reuse = tiny_engine.prefill(CHUNKS, QUESTION, mode="reuse", max_new_tokens=cfg.preview_draft)
    suffix = torch.arange(prompt.suffix_start, len(prompt.ids))
    with torch.inference_mode():
        scores = preview_attention(
            cfg, tiny_engine.model, tiny_engine.rotary, reuse.kv, torch.tensor(prompt.suffix), suffix
        )
    assert scores.shape == (len(prompt.ids),)
    pre = tiny_engine.prefill(CHUNKS, QUESTION, mode="blend", config=cfg)
    torch.testing.assert_close(pre.plan.scores, scores)
    assert not pre.plan.filters  # the preview's cut is made before the pass
    assert torch.equal(pre.recomputed, pre.plan.positions)
    first = len(prompt.prefix) + len(prompt.chunks[0])  # exact first chunk (prefix context)
    candidates = torch.arange(first, prompt.suffix_start)
    budget = round(0.2 * (prompt.suffix_start - len(prompt.prefix)))
    expected = candidates[scores[candidates].topk(budget).indices].tolist()
    chunk_kept = [p for p in pre.plan.positions.tolist() if p < prompt.suffix_start]
    assert sorted(chunk_kept) == sorted(expected)


def test_preview_cut_before_the_pass_equals_the_cut_inside_it(tiny_engine, monkeypatch):
    """The preview's layer-0 cut is made before the pass (dropped tokens skip layer 0): the same
    as computing every token's layer 0 and cutting there, because stored layer-0 K/V is exact."""
    import blendrag.engine as engine_mod
    from blendrag.selection import plan_selection

    before = tiny_engine.prefill(CHUNKS, QUESTION, mode="blend")

    def cut_inside(config, positions, *args):
        kept, filters = plan_selection(config, positions, *args)
        assert len(kept) < len(positions) and not filters  # the default cuts before the pass
        return positions, {0: lambda view: torch.isin(view.positions, kept).nonzero().flatten()}

    monkeypatch.setattr(engine_mod, "plan_selection", cut_inside)
    inside = tiny_engine.prefill(CHUNKS, QUESTION, mode="blend")
    assert inside.stats.n_recomputed == before.stats.n_recomputed
    torch.testing.assert_close(before.logits, inside.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before.kv.v, inside.kv.v, atol=1e-5, rtol=1e-5)


def test_full_mode_ignores_the_store(tiny_dirs):
    store = MemoryStore(1 << 28)
    engine = BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=store)
    engine.prefill(CHUNKS, QUESTION, mode="full")
    assert store.nbytes() == 0


def test_corrupt_disk_entry_is_recomputed(tiny_dirs, tmp_path):
    engine = BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=DiskStore(tmp_path / "kv"))
    first = engine.prefill(CHUNKS, QUESTION, mode="reuse")
    assert first.stats.cache_misses == 3
    victim = next((tmp_path / "kv").rglob(f"{engine.chunk_kv.key(CHUNKS[2])}*"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = engine.prefill(CHUNKS, QUESTION, mode="reuse")
    assert again.stats.cache_hits == 2 and again.stats.cache_misses == 1
    assert engine.store.stats["corrupt"] == 1
    torch.testing.assert_close(again.logits, first.logits)


@pytest.mark.parametrize("mode", ["reuse", "blend"])
def test_background_layer_loading_equals_loading_first(tiny_dirs, tmp_path, mode):
    """Reading chunk KV from disk layer by layer on a thread changes when, never what, is loaded."""
    path, store = str(tiny_dirs["llama"]), DiskStore(tmp_path / "kv")
    foreground = BlendEngine.from_pretrained(path, store=store, prefetch=False)
    background = BlendEngine.from_pretrained(path, store=store, prefetch=True)
    foreground.precompute(CHUNKS)
    for _ in range(3):
        a = foreground.prefill(CHUNKS, QUESTION, mode=mode)
        b = background.prefill(CHUNKS, QUESTION, mode=mode)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.kv.k, b.kv.k) and torch.equal(a.kv.v, b.kv.v)
        assert a.stats.load_stall_s == 0 and b.stats.load_stall_s >= 0


def test_prefetcher_counts_only_the_time_a_caller_waited():
    from blendrag.prefetch import LayerPrefetcher

    prefetcher = LayerPrefetcher(lambda i: time.sleep(0.05), 4)
    prefetcher.wait(3)  # all four layers load while this waits
    stalled = prefetcher.stalled_s
    assert 0.15 < stalled < 1.0
    prefetcher.wait(0)  # already loaded: no wait
    assert prefetcher.stalled_s == stalled


def test_layer_load_failure_reaches_the_waiting_request_only_for_layers_not_loaded():
    from blendrag.prefetch import LayerPrefetcher

    def load(i):
        if i == 2:
            raise OSError("disk gone")

    prefetcher = LayerPrefetcher(load, 4)
    prefetcher.wait(1)
    for layer in (2, 3):
        with pytest.raises(OSError, match="disk gone"):
            prefetcher.wait(layer)


def test_kv_of_another_model_is_never_used(tiny_dirs):
    store = MemoryStore(1 << 28)
    a = BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=store)
    b = BlendEngine.from_pretrained(str(tiny_dirs["llama3"]), store=store)
    assert a.fingerprint != b.fingerprint
    a.precompute(CHUNKS)
    assert all(a.chunk_kv.contains(c) for c in CHUNKS) and not any(b.chunk_kv.contains(c) for c in CHUNKS)
    assert b.prefill(CHUNKS, QUESTION, mode="reuse").stats.cache_misses == 3


def test_precompute_then_hits(tiny_dirs):
    engine = BlendEngine.from_pretrained(str(tiny_dirs["llama"]), store=MemoryStore(1 << 28))
    assert engine.precompute(CHUNKS) == 3
    assert engine.precompute(CHUNKS) == 0
    stats = engine.prefill(CHUNKS, QUESTION, mode="blend").stats
    assert (stats.cache_hits, stats.cache_misses) == (3, 0)


def test_stream_pieces_join_to_text_and_respect_limits(tiny_engine):
    stream = tiny_engine.stream(CHUNKS, QUESTION, max_new_tokens=10)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert len(stream.result.token_ids) <= 10


def test_stop_string_cuts_text(tiny_engine):
    full = tiny_engine.generate(CHUNKS, QUESTION, max_new_tokens=16)
    assert len(full.text) > 4, "tiny model produced too little text for this test"
    stop = full.text[2:4]
    cut = tiny_engine.generate(CHUNKS, QUESTION, max_new_tokens=16, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_sampling_is_reproducible_with_seed(tiny_engine):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a = tiny_engine.generate(CHUNKS, QUESTION, **kw)
    b = tiny_engine.generate(CHUNKS, QUESTION, **kw)
    c = tiny_engine.generate(CHUNKS, QUESTION, **dict(kw, seed=4))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_tiny_temperature_samples_the_argmax():
    """Found by fuzzing: logits / 1e-293 overflowed to inf and softmax gave nan (a 500)."""
    from blendrag.sampling import Sampler, SamplingParams

    logits = torch.tensor([1.0, 3.0, -2.0, float("-inf")])
    assert Sampler(SamplingParams(temperature=1.2572957888303835e-293, seed=0))(logits) == 1


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        BlendConfig(recompute_ratio=1.5)
    with pytest.raises(ValueError):
        replace(BlendConfig(), selector="magic")
    with pytest.raises(ValueError, match="check_layer >= 1"):
        BlendConfig(selector="deviation", check_layer=0)  # no deviation exists at layer 0
    with pytest.raises(ValueError, match="offset_weight"):
        BlendConfig(offset_weight=1.5)


@pytest.mark.slow
def test_smollm2_blend_at_ratio_one_equals_full_on_musique(smol_engine, musique):
    item = musique[0]
    chunks = [c["text"] for c in item["ctxs"][:3]]
    full = smol_engine.generate(chunks, item["question"], mode="full", max_new_tokens=16)
    blend = smol_engine.generate(
        chunks, item["question"], mode="blend", recompute_ratio=1.0, max_new_tokens=16
    )
    assert blend.text == full.text
    a = smol_engine.prefill(chunks, item["question"], mode="full").logits
    b = smol_engine.prefill(chunks, item["question"], mode="blend", recompute_ratio=1.0).logits
    torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("rows", ["question at the end", "scattered rows"])
def test_question_attention_matches_a_per_head_softmax(tiny_engine, rows):
    """The GQA-grouped, tail-masked scores equal a naive loop: per query head, softmax over the
    keys at positions <= the row's position, averaged over heads and rows."""
    from blendrag.forward import LayerView
    from blendrag.selection import question_attention

    torch.manual_seed(0)
    args = tiny_engine.model.args  # GQA: two query heads per KV head
    kv = KVBuffer(args, capacity=40, dtype=torch.float32)
    kv.length = 37
    kv.k.normal_()
    positions = torch.tensor([3, 9, 10, 20, 31, 33, 34, 35, 36])
    question_rows = torch.tensor([5, 6, 7, 8] if rows == "question at the end" else [1, 4, 8])
    q = torch.randn(args.n_heads, len(positions), args.head_dim)
    got = question_attention(LayerView(1, positions, q, torch.zeros(len(positions)), kv), question_rows)

    expected = torch.zeros(kv.length)
    for h in range(args.n_heads):
        keys = kv.k[1, h // (args.n_heads // args.n_kv_heads), : kv.length]
        for row in question_rows.tolist():
            p = int(positions[row])
            weights = (keys[: p + 1] @ q[h, row] / args.head_dim**0.5).softmax(-1)
            expected[: p + 1] += weights / (args.n_heads * len(question_rows))
    torch.testing.assert_close(got, expected)


def test_preview_scores_are_the_question_attention_of_a_plain_pass(tiny_engine):
    """The preview reads the weights of the attention it computes itself; a plain layer pass
    over the same reused KV, observed at every layer, must give the same scores."""
    from blendrag.selection import preview_attention
    from eval.rankings import layer_attention  # question_attention observed at every layer

    prompt = tiny_engine.prompt_format.build(CHUNKS, QUESTION)
    reuse = tiny_engine.prefill(CHUNKS, QUESTION, mode="reuse")
    suffix = torch.arange(prompt.suffix_start, len(prompt.ids))
    ids = torch.tensor(prompt.suffix)
    model, rotary = tiny_engine.model, tiny_engine.rotary
    with torch.inference_mode():
        scores = preview_attention(BlendConfig(), model, rotary, reuse.kv, ids, suffix)
        expected = layer_attention(tiny_engine, reuse.kv, ids, suffix).sum(0)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
