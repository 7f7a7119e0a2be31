"""The reward model type registry: lookups, errors, and a new type trained without touching train.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synthetic_pairs, write_jsonl

from rewardforge.config import ConfigError, load_config
from rewardforge.losses import pairwise_accuracy
from rewardforge.registry import (
    RewardModelSpec,
    RewardModelType,
    get_reward_model_spec,
    register_reward_model_type,
    registered_types,
    unregister_reward_model_type,
)


def test_builtin_types():
    assert registered_types()[:2] == ["binary_ranking", "regression"]
    assert get_reward_model_spec(RewardModelType.BINARY_RANKING) is get_reward_model_spec("binary_ranking")
    assert get_reward_model_spec("binary_ranking").default_loss == "bradley_terry"
    assert get_reward_model_spec("regression").default_loss == "mse"


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model\.reward_model_type='pairwise' is not registered; choose one of binary_ranking, regression"):
        get_reward_model_spec("pairwise")


def test_loss_not_available_for_type_lists_the_choices():
    spec = get_reward_model_spec("binary_ranking")
    cfg = load_config(None, ["loss.name=mse"])
    with pytest.raises(
        ConfigError,
        match=r"loss\.name='mse' is not available for model\.reward_model_type='binary_ranking'; "
        r"choose one of auto, bradley_terry, margin_bradley_terry, regular_bradley_terry, scaled_bradley_terry",
    ):
        spec.check(cfg)


def test_regression_without_attributes_errors():
    cfg = load_config(None, ["model.reward_model_type=regression"])
    with pytest.raises(ConfigError, match=r"model\.reward_model_type=regression needs model\.attributes"):
        get_reward_model_spec("regression").check(cfg)


def test_regression_data_kind_follows_the_loss():
    spec = get_reward_model_spec("regression")
    cfg = load_config(None, ["model.reward_model_type=regression", "model.attributes=[a, b]"])
    spec.check(cfg)
    assert spec.loss_name(cfg) == "mse" and spec.data_kind(cfg) == "rated"
    cfg = load_config(None, ["model.reward_model_type=regression", "model.attributes=[a, b]", "loss.name=bradley_terry"])
    assert spec.data_kind(cfg) == "pairs"


def test_binary_ranking_rejects_several_attributes():
    cfg = load_config(None, ["model.attributes=[a, b]"])
    with pytest.raises(ConfigError, match=r"binary_ranking predicts one scalar"):
        get_reward_model_spec("binary_ranking").check(cfg)


def test_training_unknown_type_fails_before_loading_anything(tmp_path):
    from rewardforge.train import run_training

    cfg = load_config(None, ["model.name_or_path=/nonexistent", "model.reward_model_type=regression",
                             f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"needs model\.attributes"):
        run_training(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_register_validation_and_builtins_protected():
    def loss(outputs, batch, cfg):
        return outputs.sum(), {}

    with pytest.raises(ValueError, match=r"reward model type 'binary_ranking' is already registered; pass overwrite=True"):
        register_reward_model_type(RewardModelSpec(name="binary_ranking", losses={"x": loss}, default_loss="x"))
    with pytest.raises(ValueError, match=r"default_loss 'y' is not one of the spec's losses \['x'\]"):
        register_reward_model_type(RewardModelSpec(name="toy", losses={"x": loss}, default_loss="y"))
    assert "toy" not in registered_types()
    with pytest.raises(ValueError, match=r"the built-in type 'regression' cannot be removed"):
        unregister_reward_model_type("regression")


# ------------------------------------------------------------------ a new type, trained end to end

CALLS: list[float] = []


def hinge_loss(outputs, batch, cfg):
    """mean(max(0, 1 - (r_c - r_r))): a margin ranking loss the built-ins do not have."""
    b = outputs.shape[0] // 2
    c, r = outputs[:b, 0], outputs[b:, 0]
    loss = torch.clamp(1.0 - (c - r), min=0.0).mean()
    CALLS.append(loss.item())
    return loss, {"accuracy": pairwise_accuracy(c.detach(), r.detach())}


@pytest.fixture
def hinge_type():
    spec = register_reward_model_type(
        RewardModelSpec(name="hinge_ranking", losses={"hinge": hinge_loss}, default_loss="hinge", loss_data={"hinge": "pairs"})
    )
    CALLS.clear()
    yield spec
    unregister_reward_model_type("hinge_ranking")


def test_registered_type_trains_through_run_training(hinge_type, tiny_model, tmp_path):
    from rewardforge.train import run_training

    assert "hinge_ranking" in registered_types()
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=3))
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model('gpt2')}", "model.reward_model_type=hinge_ranking",
        f"data.train=[{data}]", "data.validation_fraction=0.25", "data.max_length=64", "data.cache_dir=none",
        "train.max_steps=3", "train.batch_size=4", "train.log_steps=1", "train.learning_rate=1e-3", "train.warmup_ratio=0",
        f"output_dir={out}",
    ])
    summary = run_training(cfg, progress=False)
    assert summary["reward_model_type"] == "hinge_ranking" and summary["loss"] == "hinge"
    assert summary["steps"] == 3
    assert len(CALLS) == 3  # one micro-batch per step, each through our loss
    train_records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in train_records if r["split"] == "train"]
    # the logged training loss is exactly what our loss returned
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert [r["loss"] for r in train_records] == pytest.approx(CALLS, abs=1e-6)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in train_records)
    meta = json.loads((out / "model" / "rewardforge.json").read_text())
    assert meta["reward_model_type"] == "hinge_ranking" and meta["pooling"] == "last_token"
    assert summary["final_validation"]["pairs"] == summary["data"]["validation_examples"] > 0


def test_unregister_removes_the_type(hinge_type):
    unregister_reward_model_type("hinge_ranking")
    with pytest.raises(ConfigError, match=r"'hinge_ranking' is not registered"):
        get_reward_model_spec("hinge_ranking")
    unregister_reward_model_type("hinge_ranking")  # removing twice is harmless (the fixture does it again)
