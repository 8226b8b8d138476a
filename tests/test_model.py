"""The project's layer-wise forward against transformers' own implementation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from blendrag.forward import run_layers
from blendrag.kvbuffer import KVBuffer
from blendrag.loading import load_model
from blendrag.rope import Rotary


@pytest.mark.parametrize("variant", ["llama", "llama3", "qwen2", "qwen3"])
def test_full_forward_matches_transformers(tiny_dirs, variant):
    path = tiny_dirs[variant]
    loaded = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, loaded.model.args.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        kv = KVBuffer(loaded.model.args, len(ids), torch.float32)
        kv.length = len(ids)
        out = run_layers(
            loaded.model, Rotary(loaded.config, loaded.model.args.head_dim), kv, ids, torch.arange(len(ids))
        )
        ours = loaded.model.logits(out.last_hidden)
    torch.testing.assert_close(ours, ref[-1], atol=1e-4, rtol=1e-4)


def test_llama3_scaling_changes_rotation(tiny_dirs):
    plain, scaled = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["llama3"])
    pos = torch.arange(100, 110)
    cos_a, _ = Rotary(plain.config, 16).cos_sin(pos, torch.float32)
    cos_b, _ = Rotary(scaled.config, 16).cos_sin(pos, torch.float32)
    assert not torch.allclose(cos_a, cos_b)
