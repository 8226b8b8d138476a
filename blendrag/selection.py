"""Which chunk tokens ``blend`` recomputes: the filters it installs at its check layer(s)."""

from __future__ import annotations

import math

import torch

from .config import BlendConfig
from .forward import Filter, LayerView, run_layers
from .kvbuffer import KVBuffer
from .model import Transformer
from .rope import Rotary


def attention_probs(q: torch.Tensor, keys: torch.Tensor, q_positions: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights of ``q [H, n, D]`` (at ``q_positions``) over ``keys [Hkv, T, D]``,
    causal by position: ``[Hkv, group, n, T]``, query head h = kv_head * group + j."""
    n_kv, length = keys.shape[0], keys.shape[1]
    group, n = q.shape[0] // n_kv, q.shape[1]
    # GQA without copying the keys per query head: one batched matmul per KV head.
    q = q.float().reshape(n_kv, group * n, -1) / math.sqrt(q.shape[-1])
    scores = (q @ keys.float().transpose(1, 2)).view(n_kv, group, n, length)
    # Only keys after the earliest query can be in some query's future: mask just those.
    first = int(q_positions.min()) + 1
    future = torch.arange(first, length, device=q.device)[None, :] > q_positions[:, None]
    scores[..., first:].masked_fill_(future, float("-inf"))
    return scores.softmax(dim=-1)


def question_attention(view: LayerView, question_rows: torch.Tensor) -> torch.Tensor:
    """Attention weight, averaged over heads and question tokens, that the question's queries
    give each buffer position at this layer: ``[kv.length]``."""
    keys = view.kv.keys(view.layer)
    probs = attention_probs(view.q[:, question_rows], keys, view.positions[question_rows])
    return probs.mean(dim=(0, 1, 2))


def preview_attention(
    config: BlendConfig,
    model: Transformer,
    rotary: Rotary,
    kv: KVBuffer,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The attention that the question (``token_ids`` at ``positions``), then ``preview_draft``
    answer tokens it greedily drafts, pay every prompt position over the reused KV in ``kv``,
    summed over all layers: ``[kv.length]``. Each draft token weighs as much as the whole
    question: the answer's tokens read other chunk tokens than the question does. What this
    leaves in ``kv`` (the question's K/V, drafts past ``kv.length``) is overwritten later."""
    n_prompt = kv.length
    total = torch.zeros(n_prompt + config.preview_draft, device=kv.k.device)

    def attend_and_record(
        q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_positions: torch.Tensor
    ) -> torch.Tensor:
        # The layer's attention, computed explicitly so that its weights are read, not recomputed.
        probs = attention_probs(q, keys, q_positions)
        n_kv, group, n, length = probs.shape
        total[:length] += probs.mean(dim=(0, 1, 2))
        out = probs.view(n_kv, group * n, length) @ values.float()
        return out.view(n_kv * group, n, -1).to(q.dtype)

    out = run_layers(model, rotary, kv, token_ids, positions, attention=attend_and_record)
    for _ in range(config.preview_draft):
        token = model.logits(out.last_hidden).argmax()
        kv.length += 1
        position = torch.tensor([kv.length - 1], device=kv.k.device)
        out = run_layers(model, rotary, kv, token[None], position, attention=attend_and_record)
    kv.length = n_prompt
    return total[:n_prompt]


def token_scores(
    config: BlendConfig, view: LayerView, question_rows: torch.Tensor, prior: torch.Tensor | None
) -> torch.Tensor:
    """Score of every active row (higher = recompute first)."""
    if config.selector == "preview":
        assert prior is not None, "the preview selector needs preview_attention's scores"
        return prior[view.positions]
    if config.selector == "deviation":
        return view.deviation
    attention = question_attention(view, question_rows)[view.positions]
    if config.selector == "attention":
        return attention
    return attention * view.deviation.sqrt()


def plan_selection(
    config: BlendConfig,
    positions: torch.Tensor,
    n_chunk_tokens: int,
    suffix_start: int,
    forced_positions: torch.Tensor,
    prior: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, Filter]]:
    """The positions ``run_layers`` starts with and the filters that narrow them: at each filter
    layer keep the question rows, the forced positions (EPIC's first-k) and the top-scored chunk
    rows, up to that layer's budget.

    A layer-0 cut by the preview's scores, known before the pass, is made before it instead: the
    tokens it drops then skip layer 0 too. Nothing is lost by that: a token's layer-0 K/V depends
    on the token and its position alone, so the K/V stored for it is already exact there."""
    filters: dict[int, Filter] = {}
    for layer, share in config.keep_ratios():
        if share >= 1.0:
            continue
        budget = round(share * n_chunk_tokens)
        if layer == 0 and config.selector == "preview":
            assert prior is not None, "the preview selector needs preview_attention's scores"
            positions = positions[_keep(budget, positions, prior[positions], suffix_start, forced_positions)]
        else:
            filters[layer] = _filter(config, budget, suffix_start, forced_positions, prior)
    return positions, filters


def _filter(
    config: BlendConfig,
    budget: int,
    suffix_start: int,
    forced_positions: torch.Tensor,
    prior: torch.Tensor | None,
) -> Filter:
    def keep(view: LayerView) -> torch.Tensor:
        question_rows = (view.positions >= suffix_start).nonzero().flatten()
        scores = token_scores(config, view, question_rows, prior)
        return _keep(budget, view.positions, scores, suffix_start, forced_positions)

    return keep


def _keep(
    budget: int,
    positions: torch.Tensor,
    scores: torch.Tensor,
    suffix_start: int,
    forced_positions: torch.Tensor,
) -> torch.Tensor:
    """Sorted indices into ``positions`` to keep: every question row, the forced rows, then the
    best-scored chunk rows up to ``budget`` chunk rows in all."""
    is_question = positions >= suffix_start
    forced = torch.isin(positions, forced_positions) & ~is_question
    # Forced rows first, question rows never compete: they are always kept.
    scores = scores.masked_fill(forced, float("inf")).masked_fill(is_question, float("-inf"))
    n_chunk_rows = int((~is_question).sum())
    chosen = scores.topk(min(budget, n_chunk_rows)).indices
    return torch.cat([chosen, is_question.nonzero().flatten()]).sort().values
