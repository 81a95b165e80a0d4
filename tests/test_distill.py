import math

import pytest
import torch

from expertpool.distill import ckd_loss, scale_loss, sd_loss, soft_loss, uhc_loss


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _softmax(v, T):
    e = [math.exp(x / T) for x in v]
    return [x / sum(e) for x in e]


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]


def test_soft_loss_by_hand():
    T = 4.0
    expected = sum(_kl(_softmax(t, T), _softmax(s, T)) for s, t in zip(S, T_)) / 2 * T * T
    assert soft_loss(torch.tensor(S), torch.tensor(T_), T).item() == pytest.approx(expected, rel=1e-5)


def test_scale_loss_by_hand():
    expected = sum(abs(a - b) for s, t in zip(S, T_) for a, b in zip(s, t)) / 6
    assert scale_loss(torch.tensor(S), torch.tensor(T_)).item() == pytest.approx(expected)


def test_ckd_is_soft_plus_alpha_scale_and_ablations():
    s, t = torch.tensor(S), torch.tensor(T_)
    soft, scale = soft_loss(s, t, 4.0).item(), scale_loss(s, t).item()
    assert ckd_loss(s, t, 4.0, 0.3).item() == pytest.approx(soft + 0.3 * scale, rel=1e-6)
    assert ckd_loss(s, t, 4.0, 0.3, scale=False).item() == pytest.approx(soft, rel=1e-6)
    assert ckd_loss(s, t, 4.0, 0.3, soft=False).item() == pytest.approx(0.3 * scale, rel=1e-6)
    with pytest.raises(ValueError):
        ckd_loss(s, t, soft=False, scale=False)


def test_soft_loss_is_zero_for_equal_logits_and_shift_invariant():
    t = torch.randn(5, 4)
    assert soft_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_loss(t + 3.0, t).item() == pytest.approx(0.0, abs=1e-5)
    assert scale_loss(t + 3.0, t).item() == pytest.approx(3.0)


def test_uhc_and_sd_by_hand():
    T = 2.0
    s = [0.5, -0.5, 1.0, 2.0]
    t1, t2 = [1.0, 0.0], [0.0, 3.0]
    # UHC: each teacher on its slice of the student's logits
    uhc = (_kl(_softmax(t1, T), _softmax(s[:2], T)) + _kl(_softmax(t2, T), _softmax(s[2:], T))) / 2 * T * T
    got = uhc_loss(torch.tensor([s]), [torch.tensor([t1]), torch.tensor([t2])], T).item()
    assert got == pytest.approx(uhc, rel=1e-5)
    # SD: each teacher zero-padded to all classes, against the student's full softmax
    q = _softmax(s, T)
    p1, p2 = _softmax(t1, T) + [0, 0], [0, 0] + _softmax(t2, T)
    sd = (_kl(p1, q) + _kl(p2, q)) / 2 * T * T
    got = sd_loss(torch.tensor([s]), [torch.tensor([t1]), torch.tensor([t2])], T).item()
    assert got == pytest.approx(sd, rel=1e-5)
