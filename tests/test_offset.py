"""Offset correction (blendrag.offset) on hand-made residuals, and in the engine."""

import pytest
import torch
from transformers import LlamaConfig

from blendrag import BlendConfig
from blendrag.kvbuffer import KVBuffer
from blendrag.model import ModelArgs
from blendrag.offset import OffsetCorrection
from blendrag.rope import Rotary, rotate
from tests.test_engine import CHUNKS, QUESTION

HEADS, DIM, LENGTH = 2, 8, 24
SPANS = [(4, 8), (12, 6)]  # positions 4-11 and 12-17; 0-3 a prefix, 18-23 a question


def rotary_of(rope: dict) -> Rotary:
    config = LlamaConfig(
        hidden_size=HEADS * DIM * 2, num_attention_heads=4, max_position_embeddings=64, rope_parameters=rope
    )
    return Rotary(config, DIM)


ROTARIES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    # YaRN's tables carry an attention factor != 1: rotated keys are scaled, not just turned.
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def buffer() -> KVBuffer:
    args = ModelArgs(100, HEADS * DIM, 1, 4, HEADS, DIM, 32, 1e-5, False, False, False)
    kv = KVBuffer(args, LENGTH, torch.float32)
    kv.length = LENGTH
    torch.manual_seed(0)
    kv.k.normal_()
    kv.v.normal_()
    return kv


@pytest.mark.parametrize("rope", ROTARIES)
def test_each_chunk_gets_the_mean_residual_of_its_probes(rope):
    """Probes of chunk 0 carry un-rotated key residuals a and b (mean (a+b)/2) and value
    residuals c and d; chunk 1 has no probe. Every other token of chunk 0 but its first moves by
    weight * mean (keys rotated to their own position); nothing else moves."""
    rotary, kv, weight = rotary_of(ROTARIES[rope]), buffer(), 0.5
    before_k, before_v = kv.k.clone(), kv.v.clone()
    probes = torch.tensor([6, 9, 20])  # two in chunk 0, one question row
    cos, sin = rotary.cos_sin(torch.arange(LENGTH), torch.float32)
    res_k, res_v = torch.randn(HEADS, 3, DIM), torch.randn(HEADS, 3, DIM)
    fresh_k = kv.k[0][:, probes] + rotate(res_k, cos[probes], sin[probes])
    fresh_v = kv.v[0][:, probes] + res_v
    OffsetCorrection(SPANS, weight, rotary, kv)(0, probes, fresh_k, fresh_v, kv)

    targets = torch.tensor([5, 7, 8, 10, 11])  # chunk 0 but its first token (4) and its probes
    shift_k, shift_v = res_k[:, :2].mean(1, keepdim=True), res_v[:, :2].mean(1, keepdim=True)
    expected_k = before_k[0][:, targets] + weight * rotate(shift_k, cos[targets], sin[targets])
    torch.testing.assert_close(kv.k[0][:, targets], expected_k)
    torch.testing.assert_close(kv.v[0][:, targets], before_v[0][:, targets] + weight * shift_v)
    untouched = torch.tensor([p for p in range(LENGTH) if p not in targets.tolist()])
    assert torch.equal(kv.k[0][:, untouched], before_k[0][:, untouched])
    assert torch.equal(kv.v[0][:, untouched], before_v[0][:, untouched])


def test_no_probe_in_any_chunk_changes_nothing():
    rotary, kv = rotary_of(ROTARIES["default"]), buffer()
    before_k, before_v = kv.k.clone(), kv.v.clone()
    question = torch.arange(18, 24)
    OffsetCorrection(SPANS, 1.0, rotary, kv)(
        0, question, kv.k[0][:, question] + 1, kv.v[0][:, question] + 1, kv
    )
    assert torch.equal(kv.k, before_k) and torch.equal(kv.v, before_v)


def test_offset_changes_blend_and_only_when_on(tiny_engine):
    """Off (weight 0), no correction is installed: the blend as it was before the option; on,
    it moves the non-recomputed tokens, and the KV it leaves is what decoding reads."""
    off = tiny_engine.prefill(
        CHUNKS, QUESTION, mode="blend", config=BlendConfig(recompute_ratio=0.3, offset_weight=0)
    )
    on = tiny_engine.prefill(
        CHUNKS, QUESTION, mode="blend", config=BlendConfig(recompute_ratio=0.3, offset_weight=1)
    )
    assert off.plan.correction is None and on.plan.correction is not None
    assert torch.equal(on.plan.positions, off.plan.positions)  # the same tokens recomputed
    assert not torch.equal(on.logits, off.logits)
    # The prefix and the exact first chunk (chunk context "prefix") are never corrected.
    exact = len(on.prompt.prefix) + len(on.prompt.chunks[0])
    assert torch.equal(on.kv.k[:, :, :exact], off.kv.k[:, :, :exact])
    chunks = slice(exact, on.prompt.suffix_start)
    assert not torch.equal(on.kv.v[:, :, chunks], off.kv.v[:, :, chunks])
