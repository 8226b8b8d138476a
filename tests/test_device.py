"""The engine's device and dtype: every tensor a prefill makes lives on the engine's device, stored
KV stays on the host, and a bf16 engine blends at ratio 1.0 as its full prefill does."""

from __future__ import annotations

import pytest
import torch
from test_engine import CHUNKS, QUESTION, RATIO_ONE_CONFIGS

from blendrag import BlendConfig, BlendEngine
from blendrag.engine import resolve_device
from blendrag.errors import BlendRAGError
from blendrag.store import MemoryStore

MODES_AND_CONFIGS = [
    ("full", None),
    ("prefix", None),
    ("reuse", None),
    ("blend", BlendConfig(recompute_ratio=0.3, selector="preview", preview_draft=2)),
    ("blend", BlendConfig(recompute_ratio=0.3, selector="deviation", check_layer=1, gradual_layers=1)),
]


def tiny(tiny_dirs, **kwargs) -> BlendEngine:
    return BlendEngine.from_pretrained(
        str(tiny_dirs["llama"]), store=MemoryStore(1 << 30), chunk_context="prefix", **kwargs
    )


def test_defaults_are_cpu_fp32_without_cuda(tiny_dirs):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine defaults to CUDA and bf16")
    engine = tiny(tiny_dirs)
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    with pytest.raises(BlendRAGError, match="CUDA is not available"):
        resolve_device("cuda", None)
    with pytest.raises(BlendRAGError, match="'gpu'"):
        resolve_device("gpu", None)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(BlendRAGError, match="not a torch dtype"):
        resolve_device("cpu", "bf16")


@pytest.mark.parametrize(("mode", "config"), MODES_AND_CONFIGS)
def test_prefill_allocates_nothing_off_the_engine_device(tiny_dirs, mode, config):
    """With the default device set to ``meta``, any tensor the prefill made without naming the
    engine's device would be a meta tensor: mixing it with real ones fails, or the logits come out
    on ``meta``. (Foreground loading: the background loader's thread keeps its own default.)"""
    engine = tiny(tiny_dirs, prefetch=False)
    expected = engine.prefill(CHUNKS, QUESTION, mode=mode, config=config, max_new_tokens=3)
    with torch.device("meta"):
        pre = engine.prefill(CHUNKS, QUESTION, mode=mode, config=config, max_new_tokens=3)
        step = engine.continuation_logits(pre, [5, 6])
    assert pre.logits.device == pre.kv.k.device == step.device == engine.device
    torch.testing.assert_close(pre.logits, expected.logits, atol=0, rtol=0)


def test_stored_kv_stays_on_the_host(tiny_dirs):
    engine = tiny(tiny_dirs)
    engine.precompute(CHUNKS)
    entry = engine.store.get(engine.chunk_kv.key(CHUNKS[0]))
    assert entry.k.device.type == "cpu" and entry.format == engine.kv_format.tag


@pytest.fixture(scope="module")
def bf16_engine(tiny_dirs) -> BlendEngine:
    # bf16 storage: what a bf16 model computes, kept exactly (int8 would add its own error).
    return tiny(tiny_dirs, device="cpu", dtype=torch.bfloat16, kv_format="bf16")


def test_bf16_engine_holds_bf16_everywhere(bf16_engine):
    pre = bf16_engine.prefill(CHUNKS, QUESTION, mode="blend")
    assert bf16_engine.dtype == torch.bfloat16
    assert pre.kv.k.dtype == pre.kv.v.dtype == torch.bfloat16
    assert bf16_engine.store.get(bf16_engine.chunk_kv.key(CHUNKS[1])).v.dtype == torch.bfloat16


def test_bf16_and_fp32_engines_never_share_kv(tiny_dirs, bf16_engine):
    assert tiny(tiny_dirs).fingerprint != bf16_engine.fingerprint


@RATIO_ONE_CONFIGS
def test_bf16_blend_at_ratio_one_equals_full(bf16_engine, config):
    full = bf16_engine.prefill(CHUNKS, QUESTION, mode="full")
    blend = bf16_engine.prefill(CHUNKS, QUESTION, mode="blend", config=config)
    # bf16 keeps 8 bits of mantissa: the two paths round differently (stored vs fresh prefix KV,
    # other row subsets per matmul), so logits agree to bf16's precision, not bitwise.
    torch.testing.assert_close(blend.logits, full.logits, atol=0.05, rtol=0.02)
    # Greedy tokens, teacher-forced on full's answer: they agree wherever full's choice is not a
    # tie at bf16's resolution. A random tiny model's top two logits are often within one bf16
    # step (0.03 at these magnitudes), so free-running text may fork at such a tie.
    answer = bf16_engine.generate(CHUNKS, QUESTION, mode="full", max_new_tokens=12).token_ids
    full = bf16_engine.prefill(CHUNKS, QUESTION, mode="full", max_new_tokens=12)
    blend = bf16_engine.prefill(CHUNKS, QUESTION, mode="blend", config=config, max_new_tokens=12)
    rows = [torch.cat([p.logits[None], bf16_engine.continuation_logits(p, answer[:-1])]).float()
            for p in (full, blend)]  # fmt: skip
    top2 = rows[0].topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.125
    assert clear.sum() >= 3  # enough decided steps for the check to mean something
    assert torch.equal(rows[1].argmax(-1)[clear], rows[0].argmax(-1)[clear])
    assert rows[0].argmax(-1).tolist() == answer
