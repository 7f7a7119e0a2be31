"""Losses and metrics against numbers worked out by hand.

Handy values:  -log sigmoid(x) = log(1 + e^-x)
    x = 2  -> log(1 + 0.135335) = 0.126928
    x = 1  -> log(1 + 0.367879) = 0.313262
    x = 0  -> log 2             = 0.693147
    x = -1 -> log(1 + 2.718282) = 1.313262
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rewardforge.config import load_config
from rewardforge.registry import get_data_kind
from rewardforge.training.validation import pair_metrics, pearson, regression_metrics
from rewardforge.losses import bradley_terry_loss, masked_mse_loss, pairwise_accuracy, scaled_bradley_terry_loss
from rewardforge.losses import bt_loss, combine, mse_loss, plain_bt_loss, scaled_bt_loss

NLS2, NLS1, NLS0, NLSm1 = 0.126928, 0.313262, 0.693147, 1.313262
t = torch.tensor
nan = float("nan")


def approx(x):
    return pytest.approx(x, abs=1e-5)


# ------------------------------------------------------------------ Bradley–Terry


def test_bradley_terry_plain():
    # diffs r_c - r_r = [2, 0] -> mean(0.126928, 0.693147) = 0.410038
    loss = bradley_terry_loss(t([2.0, 0.5]), t([0.0, 0.5]))
    assert loss.item() == approx((NLS2 + NLS0) / 2) == approx(0.410038)


def test_bradley_terry_margin():
    # diffs [2, 0], margins [1, nan->0] -> shifted diffs [1, 0] -> mean(0.313262, 0.693147) = 0.503204
    loss = bradley_terry_loss(t([2.0, 0.5]), t([0.0, 0.5]), t([1.0, nan]))
    assert loss.item() == approx((NLS1 + NLS0) / 2) == approx(0.503204)
    # a margin the pair does not beat: diff 1 - margin 2 = -1 -> 1.313262
    assert bradley_terry_loss(t([1.0]), t([0.0]), t([2.0])).item() == approx(NLSm1)


def test_bradley_terry_centering_term():
    # BT part: diffs [2, 0] -> 0.410038
    # centering: (r_c + r_r)^2 = [(2+0)^2, (0.5+0.5)^2] = [4, 1] -> mean 2.5; coef 0.1 -> 0.25
    loss = bradley_terry_loss(t([2.0, 0.5]), t([0.0, 0.5]), center_coef=0.1)
    assert loss.item() == approx(0.410038 + 0.25)
    # the centering gradient pulls the sum of the pair's rewards towards 0
    c = t([3.0], requires_grad=True)
    r = t([3.0], requires_grad=True)
    bradley_terry_loss(c, r, center_coef=1.0).backward()
    # d/dc [log(1+e^-(c-r)) + (c+r)^2] at c=r=3: -0.5 + 2*6 = 11.5 ; d/dr: 0.5 + 12 = 12.5
    assert c.grad.item() == approx(11.5) and r.grad.item() == approx(12.5)


def test_scaled_bradley_terry():
    # diffs [2, 0]; weights |m| = [|-3|, nan->1] = [3, 1] -> (3*0.126928 + 1*0.693147)/2 = 0.536966
    loss = scaled_bradley_terry_loss(t([2.0, 0.5]), t([0.0, 0.5]), t([-3.0, nan]))
    assert loss.item() == approx((3 * NLS2 + NLS0) / 2) == approx(0.536966)
    # plus centering: [4, 1] mean 2.5, coef 0.2 -> + 0.5
    loss = scaled_bradley_terry_loss(t([2.0, 0.5]), t([0.0, 0.5]), t([-3.0, nan]), center_coef=0.2)
    assert loss.item() == approx(0.536966 + 0.5)


def test_bradley_terry_gradient_sign():
    c = t([0.0], requires_grad=True)
    r = t([0.0], requires_grad=True)
    bradley_terry_loss(c, r).backward()
    # d/dx log(1 + e^-x) at x = 0 is -sigmoid(0) = -0.5: chosen pushed up, rejected down
    assert c.grad.item() == approx(-0.5) and r.grad.item() == approx(0.5)


# ------------------------------------------------------------------ masked MSE


def test_masked_mse_ignores_missing():
    pred = t([[1.0, 2.0], [3.0, 4.0]])
    labels = t([[1.5, nan], [nan, 2.0]])
    # present: (1 - 1.5)^2 = 0.25 and (4 - 2)^2 = 4 -> (0.25 + 4) / 2 = 2.125
    assert masked_mse_loss(pred, labels).item() == approx(2.125)
    # nothing missing: ((1-0)^2 + (2-0)^2 + (3-0)^2 + (4-0)^2) / 4 = 30 / 4 = 7.5
    assert masked_mse_loss(pred, torch.zeros(2, 2)).item() == approx(7.5)


def test_masked_mse_all_missing_is_zero_with_a_gradient_path():
    pred = t([[1.0, 2.0]], requires_grad=True)
    loss = masked_mse_loss(pred, t([[nan, nan]]))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros(1, 2))


def test_masked_mse_gradient_only_on_present_labels():
    pred = t([[1.0, 2.0]], requires_grad=True)
    masked_mse_loss(pred, t([[3.0, nan]])).backward()
    # L = (1 - 3)^2 / 1 -> dL/dp0 = 2 * (1 - 3) = -4, dL/dp1 = 0
    assert pred.grad.tolist() == [[-4.0, 0.0]]


# ------------------------------------------------------------------ accuracy


def test_pairwise_accuracy_ties_count_half():
    # [win, tie, loss, win] -> (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert pairwise_accuracy(t([1.0, 2.0, 3.0, 5.0]), t([0.0, 2.0, 4.0, 1.0])).item() == approx(0.625)
    assert pairwise_accuracy(t([1.0]), t([1.0])).item() == 0.5


# ------------------------------------------------------------------ the registry's loss functions


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_registry_bt_uses_margin_only_when_enabled():
    outputs = t([[2.0], [0.5], [0.0], [0.5]])  # chosen rows first, then rejected rows
    batch = {"margin": t([1.0, nan])}
    loss, stats = bt_loss(outputs, batch, _cfg())
    assert loss.item() == approx(0.503204)  # margins [1, -] as in test_bradley_terry_margin
    assert stats["accuracy"].item() == approx(0.75)  # [win, tie]
    assert stats["margin"].item() == approx(1.0)  # mean of diffs [2, 0]
    assert bt_loss(outputs, batch, _cfg("loss.use_margin=false"))[0].item() == approx(0.410038)
    assert plain_bt_loss(outputs, batch, _cfg())[0].item() == approx(0.410038)
    assert bt_loss(outputs, batch, _cfg("loss.center_rewards_coef=0.1"))[0].item() == approx(0.503204 + 0.25)
    assert scaled_bt_loss(outputs, {"margin": t([-3.0, nan])}, _cfg())[0].item() == approx(0.536966)


def test_registry_bt_combines_attributes_with_weights():
    cfg = _cfg("model.attributes=[a, b]", "model.attribute_weights=[1, 3]", "model.reward_model_type=regression")
    # rows: chosen [1, 0.5] -> 1*1 + 3*0.5 = 2.5 ; rejected [0.5, 0] -> 0.5 ; diff 2 -> 0.126928
    outputs = t([[1.0, 0.5], [0.5, 0.0]])
    loss, _ = bt_loss(outputs, {"margin": t([nan])}, cfg)
    assert loss.item() == approx(NLS2)
    assert combine(outputs, [1.0, 3.0]).tolist() == [2.5, 0.5]
    # default weights: the mean -> chosen 0.75, rejected 0.25, diff 0.5 -> log(1 + e^-0.5) = 0.474077
    cfg = _cfg("model.attributes=[a, b]", "model.reward_model_type=regression")
    assert bt_loss(outputs, {"margin": t([nan])}, cfg)[0].item() == approx(0.474077)


def test_registry_mse_reports_mae_over_present_labels():
    cfg = _cfg("model.attributes=[a, b]", "model.reward_model_type=regression")
    loss, stats = mse_loss(t([[1.0, 2.0], [3.0, 4.0]]), {"labels": t([[1.5, nan], [nan, 2.0]])}, cfg)
    assert loss.item() == approx(2.125)
    assert stats["mae"].item() == approx((0.5 + 2.0) / 2)


# ------------------------------------------------------------------ evaluation metrics


def test_pair_metrics_by_hand():
    m = pair_metrics(np.array([2.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0]))
    # diffs [1, -1, 0]: win, loss, tie
    assert m["pairs"] == 3 and m["ties"] == 1
    assert m["accuracy"] == approx((1 + 0 + 0.5) / 3)
    assert m["loss"] == approx((NLS1 + NLSm1 + NLS0) / 3)  # 0.773224
    assert m["mean_margin"] == approx(0.0)
    # rewards [2, 0, 1, 1, 1, 1]: mean 1, std sqrt((1 + 1) / 6) = 0.577350
    assert m["reward_mean"] == approx(1.0) and m["reward_std"] == approx(math.sqrt(1 / 3))
    assert m["chosen_mean"] == approx(1.0) and m["rejected_mean"] == approx(1.0)
    assert pair_metrics(np.array([]), np.array([])) == {"pairs": 0}


def test_regression_metrics_by_hand():
    pred = np.array([[1.0, 0.0, 9.0], [2.0, 5.0, 9.0], [3.0, 0.0, 9.0]])
    labels = np.array([[1.0, nan, nan], [3.0, 4.0, nan], [2.0, nan, nan]])
    m = regression_metrics(pred, labels, ["a", "b", "c"])
    # a: errors [0, -1, 1] -> mse 2/3, mae 2/3;
    #    pearson of [1,2,3] and [1,3,2]: centred [-1,0,1], [-1,1,0] -> 1 / (sqrt 2 * sqrt 2) = 0.5
    assert m["a"] == {"n": 3, "mse": approx(2 / 3), "mae": approx(2 / 3), "pearson": approx(0.5)}
    # b: one label (5 vs 4) -> mse 1, mae 1, pearson undefined
    assert m["b"]["n"] == 1 and m["b"]["mse"] == approx(1.0) and m["b"]["mae"] == approx(1.0)
    assert math.isnan(m["b"]["pearson"])
    assert m["c"] == {"n": 0}  # no label at all
    # means over the attributes that have labels; pearson only where defined
    assert m["mse"] == approx((2 / 3 + 1) / 2) and m["mae"] == approx((2 / 3 + 1) / 2) and m["pearson"] == approx(0.5)
    assert m["examples"] == 3


def test_pearson_edge_cases():
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])) == approx(1.0)
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == approx(-1.0)
    assert math.isnan(pearson(np.array([1.0, 1.0]), np.array([1.0, 2.0])))
    assert math.isnan(pearson(np.array([1.0]), np.array([1.0])))


def test_validation_metrics_combines_outputs():
    pred = {"chosen": np.array([[1.0, 1.0], [0.0, 0.0]]), "rejected": np.array([[0.0, 0.0], [1.0, 0.0]])}
    # weights [0.5, 0.5]: chosen [1, 0], rejected [0, 0.5] -> diffs [1, -0.5] -> accuracy 0.5
    m = get_data_kind("pairs").metrics(pred, ["a", "b"], [0.5, 0.5])
    assert m["accuracy"] == approx(0.5) and m["mean_margin"] == approx(0.25)
    # weights [0, 1]: chosen [1, 0], rejected [0, 0] -> [win, tie] -> 0.75
    assert get_data_kind("pairs").metrics(pred, ["a", "b"], [0.0, 1.0])["accuracy"] == approx(0.75)
