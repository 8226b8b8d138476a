"""Answer-quality and fidelity metrics: SQuAD-style F1/EM, Rouge-L, first-token KL, summaries."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (the SQuAD evaluation rule)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f_measure(overlap: int, n_pred: int, n_gold: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_gold
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, gold: str) -> float:
    """Bag-of-tokens F1 on normalized text; two empty answers agree (score 1)."""
    pred_toks, gold_toks = _tokens(pred), _tokens(gold)
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    overlap = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    return _f_measure(overlap, len(pred_toks), len(gold_toks))


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
    pred_toks, ref_toks = _tokens(pred), _tokens(ref)
    if not pred_toks or not ref_toks:
        return float(pred_toks == ref_toks)
    return _f_measure(_lcs_length(pred_toks, ref_toks), len(pred_toks), len(ref_toks))


def best_over_golds(metric: Callable[[str, str], float], pred: str, golds: Sequence[str]) -> float:
    """A question may list several acceptable answers; the prediction is credited with the best match."""
    return max((metric(pred, gold) for gold in golds), default=0.0)


def best_f1(pred: str, golds: Sequence[str]) -> float:
    return best_over_golds(f1_score, pred, golds)


def best_em(pred: str, golds: Sequence[str]) -> float:
    return best_over_golds(exact_match, pred, golds)


def best_rouge_l(pred: str, golds: Sequence[str]) -> float:
    return best_over_golds(rouge_l, pred, golds)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(softmax(p) || softmax(q)) in nats; log_softmax in float64 keeps tiny probabilities exact."""
    log_p = torch.log_softmax(p_logits.detach().to(torch.float64).flatten(), dim=-1)
    log_q = torch.log_softmax(q_logits.detach().to(torch.float64).flatten(), dim=-1)
    # Clamp: rounding can leave a -1e-17 where the true value is 0.
    return max(float(torch.sum(log_p.exp() * (log_p - log_q))), 0.0)


def _percentile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default), without pulling in numpy.
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, median and 90th percentile; NaN for an empty input so a missing metric stays visible."""
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan")}
    ordered = sorted(values)
    return {
        "mean": sum(ordered) / len(ordered),
        "p50": _percentile(ordered, 0.5),
        "p90": _percentile(ordered, 0.9),
    }
