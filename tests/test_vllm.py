"""BlendConnector in a real, unmodified vLLM (the CPU build), with SmolLM2.

One ``LLM`` serves every test (it takes about a minute to start); the recompute ratio and the
chunk structure are per-request ``kv_transfer_params``. vLLM's own ``num_cached_tokens`` tells
how much of the prompt it did not compute: ``len(prompt) - 1`` on a hit, 0 on a fallback; the
connector's report (``blend_report``) comes back in ``kv_transfer_params``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import SAMPLE_CORPUS

from blendrag import BlendEngine
from blendrag.vllm import blend_request
from blendrag.vllm.client import blend_report
from harness.data import chunk_text

vllm = pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def store_engine(store_dir) -> BlendEngine:
    """blendrag's engine over the on-disk store the connector reads."""
    return BlendEngine.from_pretrained(store=str(store_dir))


@pytest.fixture(scope="module")
def llm(store_engine, store_dir):
    from vllm.config import KVTransferConfig

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the spawned processes inherit it
    config = KVTransferConfig(
        kv_connector="BlendConnector",
        kv_connector_module_path="blendrag.vllm.connector",
        kv_role="kv_both",
        kv_connector_extra_config={"store": str(store_dir)},
        kv_load_failure_policy="recompute",
    )
    llm = vllm.LLM(
        model=str(store_engine.model_path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=8192,
        kv_transfer_config=config,
    )
    yield llm
    del llm


def sample_chunks(names: list[str]) -> list[str]:
    return [(SAMPLE_CORPUS / n).read_text()[:1200] for n in names]


def generate(llm, prompt: dict, extra_args: dict | None = None):
    params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra_args)
    return llm.generate([prompt], params, use_tqdm=False)[0]


def plain(llm, ids: list[int]):
    """vLLM alone on the same token ids (a salt of its own: no prefix-cache hit from another test)."""
    return generate(llm, {"prompt_token_ids": ids, "cache_salt": f"plain-{os.urandom(8).hex()}"})


def blended(llm, request):
    return generate(llm, request.tokens_prompt(), request.extra_args())


def test_ratio_one_matches_plain_vllm_on_musique(llm, store_engine, musique):
    for item in musique[:5]:
        chunks = [chunk_text(ctx) for ctx in item["ctxs"][:6]]
        store_engine.precompute(chunks)
        request = blend_request(store_engine.prompt_format, chunks, item["question"], recompute_ratio=1.0)
        out = blended(llm, request)
        assert out.num_cached_tokens == len(request.prompt_token_ids) - 1  # vLLM computed one token
        assert out.outputs[0].text == plain(llm, request.prompt_token_ids).outputs[0].text


def test_hit_computes_only_the_last_token_and_equals_blendrag(llm, store_engine):
    chunks = sample_chunks(["saint_orvo_lighthouse.md", "brackenmoor_railway.txt"])
    question = "Who was the harbour engineer of the lighthouse?"
    store_engine.precompute(chunks)
    request = blend_request(store_engine.prompt_format, chunks, question, recompute_ratio=0.15)
    out = blended(llm, request)
    assert out.num_cached_tokens == len(request.prompt_token_ids) - 1
    # The KV vLLM decodes from is blendrag's blend: the same greedy text as blendrag's own decoding.
    own = store_engine.generate(chunks, question, recompute_ratio=0.15, max_new_tokens=MAX_TOKENS)
    assert out.outputs[0].text == own.text
    report = blend_report(out.kv_transfer_params)
    assert report.error is None and report.n_written == len(request.prompt_token_ids) - 1
    assert report.n_recomputed == own.stats.n_recomputed and report.cache_hits == len(chunks)


def test_repeated_blend_is_served_from_vllms_prefix_cache(llm, store_engine):
    """The same blend again (same salt): vLLM's own cache holds every full block of it, so the
    connector stays out and vLLM computes only the rest (less than a block) itself."""
    chunks = sample_chunks(["brackenmoor_railway.txt", "marisco_lantern_night.md"])
    store_engine.precompute(chunks)
    request = blend_request(store_engine.prompt_format, chunks, "When did the railway open?")
    first, again = blended(llm, request), blended(llm, request)
    n = len(request.prompt_token_ids)
    assert first.num_cached_tokens == n - 1
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    assert again.num_cached_tokens == (n - 1) // block_size * block_size  # vLLM's own blocks only
    assert again.outputs[0].text == first.outputs[0].text
    assert blend_report(first.kv_transfer_params) is not None
    assert blend_report(again.kv_transfer_params) is None


def test_a_failed_blend_is_prefilled_by_vllm(llm, store_engine):
    """A chunk's entry the scheduler sees but the worker cannot read (a directory where its file
    was): the worker reports the request's blocks as failed, and vLLM prefills the prompt itself."""
    chunks = sample_chunks(["hollin_ridge_observatory.txt", "vellmark_history.md"])
    store_engine.precompute(chunks)
    path = store_engine.store.tiers[1].path(store_engine.chunk_kv.key(chunks[0]))
    path.unlink()
    path.mkdir()
    request = blend_request(store_engine.prompt_format, chunks, "When was the observatory built?")
    try:
        out = blended(llm, request)
    finally:
        path.rmdir()
    assert blend_report(out.kv_transfer_params).error.startswith("IsADirectoryError")
    assert out.outputs[0].text == plain(llm, request.prompt_token_ids).outputs[0].text


FALLBACK_QUESTION = "In which year was the lighthouse first lit?"


# "Correct" here means exactly what vLLM alone answers: a fallback must be a normal prefill.


@pytest.mark.parametrize(
    "case", ["store_miss", "fingerprint_mismatch", "no_chunk_structure", "no_cache_salt"]
)
def test_fallback_is_a_normal_prefill(llm, store_engine, case):
    # Each case its own first chunk, so that no case meets another's blocks in vLLM's prefix cache
    # (which would count as cached tokens, rightly: they were prefilled normally).
    names = {
        "store_miss": ["calder_cup_regatta.md", "saint_orvo_lighthouse.md"],
        "fingerprint_mismatch": ["quillon_bicycle_works.txt", "saint_orvo_lighthouse.md"],
        "no_chunk_structure": ["marisco_lantern_night.md", "saint_orvo_lighthouse.md"],
        "no_cache_salt": ["tessaline_wool_cooperative.txt", "saint_orvo_lighthouse.md"],
    }[case]
    chunks = sample_chunks(names)
    if case != "store_miss":
        store_engine.precompute(chunks)
    fingerprint = "0" * 32 if case == "fingerprint_mismatch" else None
    request = blend_request(store_engine.prompt_format, chunks, FALLBACK_QUESTION, fingerprint=fingerprint)
    prompt, extra_args = request.tokens_prompt(), request.extra_args()
    if case == "no_chunk_structure":
        extra_args = None
    if case == "no_cache_salt":
        del prompt["cache_salt"]
    out = generate(llm, prompt, extra_args)
    assert out.num_cached_tokens == 0 and blend_report(out.kv_transfer_params) is None
    assert out.outputs[0].text == plain(llm, request.prompt_token_ids).outputs[0].text
    if case == "store_miss":  # the lighthouse chunk is stored (by other tests), the first is not
        assert not store_engine.chunk_kv.contains(chunks[0])  # and the lookup computed nothing
