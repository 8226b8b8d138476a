"""A generated answer against gold answers: the answer's first line, compared by the SQuAD
evaluation rule (normalized exact match and bag-of-tokens F1), the best match over the golds."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def clean_answer(text: str) -> str:
    """The model keeps talking after the answer; the first line is the answer."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (the SQuAD evaluation rule)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def f_measure(overlap: int, n_pred: int, n_gold: int) -> float:
    """The harmonic mean of precision ``overlap / n_pred`` and recall ``overlap / n_gold``."""
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_gold
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, gold: str) -> float:
    """Bag-of-tokens F1 on normalized text; two empty answers agree (score 1)."""
    pred_toks, gold_toks = answer_tokens(pred), answer_tokens(gold)
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    overlap = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    return f_measure(overlap, len(pred_toks), len(gold_toks))


def best_over_golds(metric: Callable[[str, str], float], pred: str, golds: Sequence[str]) -> float:
    """A question may list several acceptable answers; the prediction is credited with the best match."""
    return max((metric(pred, gold) for gold in golds), default=0.0)


def best_f1(pred: str, golds: Sequence[str]) -> float:
    return best_over_golds(f1_score, pred, golds)


def best_em(pred: str, golds: Sequence[str]) -> float:
    return best_over_golds(exact_match, pred, golds)
