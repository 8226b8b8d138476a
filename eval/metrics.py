"""Quality metrics beyond the SQuAD rule (``harness.answers``): Rouge-L against gold answers and
the first token's KL divergence from full prefill."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.answers import answer_tokens, best_over_golds, f_measure


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One rolling row of the classic DP table: O(len(a) * len(b)) time, O(len(b)) memory.
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: str, ref: str) -> float:
    """Rouge-L F-measure (beta = 1) from the longest common subsequence of normalized tokens."""
    pred_toks, ref_toks = answer_tokens(pred), answer_tokens(ref)
    if not pred_toks or not ref_toks:
        return float(pred_toks == ref_toks)
    return f_measure(_lcs_length(pred_toks, ref_toks), len(pred_toks), len(ref_toks))


def best_rouge_l(pred: str, golds: Sequence[str]) -> float:
    return best_over_golds(rouge_l, pred, golds)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(softmax(p) || softmax(q)) in nats; log_softmax in float64 keeps tiny probabilities exact."""
    log_p = torch.log_softmax(p_logits.detach().to(torch.float64).flatten(), dim=-1)
    log_q = torch.log_softmax(q_logits.detach().to(torch.float64).flatten(), dim=-1)
    # Clamp: rounding can leave a -1e-17 where the true value is 0.
    return max(float(torch.sum(log_p.exp() * (log_p - log_q))), 0.0)
