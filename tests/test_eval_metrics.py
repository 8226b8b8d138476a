import math

import pytest
import torch

from eval.metrics import best_rouge_l, kl_divergence, rouge_l
from harness.answers import f1_score


def test_rouge_l_known_value():
    # LCS("x b c d e", "x c e f") = "x c e" (3): P = 3/5, R = 3/4 -> F = 2/3
    assert rouge_l("x b c d e", "x c e f") == pytest.approx(2 / 3)
    assert rouge_l("paris france", "paris france") == 1.0
    assert rouge_l("france paris", "paris") == pytest.approx(2 * 0.5 / 1.5)
    assert best_rouge_l("x b c d e", ["zzz", "x c e f"]) == pytest.approx(2 / 3)


def test_rouge_l_is_order_sensitive_unlike_f1():
    assert f1_score("y x", "x y") == 1.0
    assert rouge_l("y x", "x y") == pytest.approx(0.5)


def test_kl_of_identical_logits_is_zero():
    logits = torch.tensor([3.0, -1.0, 0.5, 100.0])
    assert kl_divergence(logits, logits) == 0.0
    # A constant shift does not change the distribution.
    assert kl_divergence(logits, logits + 7.0) == pytest.approx(0.0, abs=1e-12)


def test_kl_two_class_known_value():
    # p = softmax([0, 0]) = (1/2, 1/2); q = softmax([ln 3, 0]) = (3/4, 1/4)
    # KL(p || q) = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    p = torch.tensor([0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64)
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # KL is asymmetric: KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2)
    assert kl_divergence(q, p) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


def test_kl_is_stable_for_extreme_float16_logits():
    p = torch.tensor([60000.0, -60000.0], dtype=torch.float16)
    assert math.isfinite(kl_divergence(p, torch.zeros(2)))
    assert kl_divergence(p, torch.zeros(2)) == pytest.approx(math.log(2.0))


def test_deviation_layer_report_on_known_errors():
    from eval.deviation import layer_report

    full = torch.ones(3, 2, 10, 4)  # [layers, kv heads, tokens, head dim]
    reuse = full.clone()
    reuse[:, :, :2] += 1.0  # the same two tokens are off at every layer (8 each)
    reuse[2, :, 5] += 3.0  # and at layer 2 a third, worse one (72)
    rows = layer_report(full, reuse, ratio=0.2)  # the worst 2 of 10 tokens
    assert rows[1]["relative_error"] == pytest.approx((16 / 80) ** 0.5)
    assert (rows[1]["worst_share"], rows[1]["overlap_with_layer_1"]) == (1.0, 1.0)
    assert rows[2]["worst_share"] == pytest.approx(80 / 88)
    assert rows[2]["overlap_with_layer_1"] == 0.5


def test_mean_share_is_what_a_chunk_mean_explains():
    from eval.deviation import mean_share

    torch.manual_seed(0)
    reuse = torch.randn(2, 3, 12, 4)
    offset = torch.randn(1, 3, 1, 4)
    noise = torch.randn(2, 3, 12, 4)
    noise -= noise[:, :, 1:6].mean(2, keepdim=True)  # zero mean over the chunk (first token left out)
    full = reuse.clone()
    full[0, :, 0:6] += offset[0]  # layer 0: the chunk is shifted as a whole
    full[1, :, 0:6] += noise[1, :, 0:6]  # layer 1: residuals with no common part
    share = mean_share(full, reuse, [(0, 6)])
    torch.testing.assert_close(share, torch.tensor([1.0, 0.0], dtype=torch.float64))
