"""The project's layer-wise forward against transformers' own implementation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from blendrag.forward import run_layers
from blendrag.kvbuffer import KVBuffer
from blendrag.loading import load_model
from blendrag.rope import Rotary


@pytest.mark.parametrize("last_row_only", [False, True])
@pytest.mark.parametrize("variant", ["llama", "llama3", "qwen2", "qwen3"])
def test_full_forward_matches_transformers(tiny_dirs, variant, last_row_only):
    path = tiny_dirs[variant]
    loaded = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, loaded.model.args.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        kv = KVBuffer(loaded.model.args, len(ids), torch.float32)
        kv.length = len(ids)
        rotary = Rotary(loaded.config, loaded.model.args.head_dim)
        out = run_layers(loaded.model, rotary, kv, ids, torch.arange(len(ids)), last_row_only=last_row_only)
        ours = loaded.model.logits(out.last_hidden)
    torch.testing.assert_close(ours, ref[-1], atol=1e-4, rtol=1e-4)
    assert out.hidden.shape[0] == (1 if last_row_only else len(ids))


def test_last_row_only_keeps_every_rows_kv_and_the_last_output(tiny_dirs):
    """Selected rows that end before the buffer does (the masked path): the last row's output and
    every layer's K/V are those of the pass that finishes all rows."""
    loaded = load_model(tiny_dirs["llama"])
    rotary = Rotary(loaded.config, loaded.model.args.head_dim)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, loaded.model.args.vocab_size, (200,), generator=gen)
    positions = torch.randperm(190, generator=gen)[:40].sort().values
    outs, kvs = [], []
    with torch.no_grad():
        for last_row_only in (False, True):
            kv = KVBuffer(loaded.model.args, len(ids), torch.float32)
            kv.length = len(ids)
            run_layers(loaded.model, rotary, kv, ids, torch.arange(len(ids)))  # fill every slot
            out = run_layers(loaded.model, rotary, kv, ids[positions], positions, last_row_only=last_row_only)
            outs.append(out.last_hidden)
            kvs.append(kv)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kvs[1].k, kvs[0].k, atol=0, rtol=0)
    torch.testing.assert_close(kvs[1].v, kvs[0].v, atol=0, rtol=0)


def test_llama3_scaling_changes_rotation(tiny_dirs):
    plain, scaled = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["llama3"])
    pos = torch.arange(100, 110)
    cos_a, _ = Rotary(plain.config, 16).cos_sin(pos, torch.float32)
    cos_b, _ = Rotary(scaled.config, 16).cos_sin(pos, torch.float32)
    assert not torch.allclose(cos_a, cos_b)
