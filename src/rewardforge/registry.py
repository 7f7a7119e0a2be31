"""Registry of reward model types: each name maps to its model class, dataset builder and losses.

The training loop only talks to a :class:`RewardModelSpec`, so a new type registers here with
:func:`register_reward_model_type` without touching the loop.

Example:
    >>> spec = get_reward_model_spec("binary_ranking")
    >>> spec.default_loss
    'bradley_terry'
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rewardforge.config import Config, ConfigError
from rewardforge.data.batching import PairCollator, RatedCollator
from rewardforge.data.datasets import build_dataset
from rewardforge.losses import bradley_terry_loss, masked_mse_loss, pairwise_accuracy, scaled_bradley_terry_loss
from rewardforge.models import RewardModel, build_model

LossFn = Callable[[torch.Tensor, dict, Config], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class RewardModelType(str, enum.Enum):
    """The built-in reward model types (``model.reward_model_type``)."""

    BINARY_RANKING = "binary_ranking"
    REGRESSION = "regression"


# ------------------------------------------------------------------ shared helpers


def output_names(cfg: Config) -> list[str]:
    """Names of the model outputs: the attributes, or ['reward'] for a scalar model."""
    return list(cfg.model.attributes) if cfg.model.attributes else ["reward"]


def attribute_weights(cfg: Config) -> list[float]:
    """Weights that combine the outputs into one scalar reward (default: their mean)."""
    n = len(output_names(cfg))
    return list(cfg.model.attribute_weights) if cfg.model.attribute_weights else [1.0 / n] * n


def combine(outputs: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Scalar reward ``outputs @ weights`` for outputs ``[B, N]``."""
    if outputs.shape[-1] == 1:
        return outputs[..., 0]
    return outputs @ torch.tensor(weights, dtype=outputs.dtype, device=outputs.device)


def _pair_rewards(outputs: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    r = combine(outputs, attribute_weights(cfg))
    b = r.shape[0] // 2
    return r[:b], r[b:]


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": pairwise_accuracy(chosen.detach(), rejected.detach()), "margin": (chosen - rejected).detach().mean()}


def bt_loss(outputs: torch.Tensor, batch: dict, cfg: Config):
    """Bradley–Terry on the (combined) reward, with the pair's margin when present and enabled."""
    c, r = _pair_rewards(outputs, cfg)
    margin = batch.get("margin") if cfg.loss.use_margin else None
    return bradley_terry_loss(c, r, margin, cfg.loss.center_rewards_coef), _pair_stats(c, r)


def plain_bt_loss(outputs: torch.Tensor, batch: dict, cfg: Config):
    """Bradley–Terry ignoring margins (NeMo's regular BT)."""
    c, r = _pair_rewards(outputs, cfg)
    return bradley_terry_loss(c, r, None, cfg.loss.center_rewards_coef), _pair_stats(c, r)


def scaled_bt_loss(outputs: torch.Tensor, batch: dict, cfg: Config):
    """NeMo's scaled BT: each pair's loss weighted by |margin|."""
    c, r = _pair_rewards(outputs, cfg)
    return scaled_bradley_terry_loss(c, r, batch["margin"], cfg.loss.center_rewards_coef), _pair_stats(c, r)


def mse_loss(outputs: torch.Tensor, batch: dict, cfg: Config):
    """Masked MSE over the attributes present in each row."""
    labels = batch["labels"]
    loss = masked_mse_loss(outputs, labels)
    mask = torch.isfinite(labels)
    mae = (torch.where(mask, (outputs.detach() - torch.nan_to_num(labels)).abs(), 0.0).sum() / mask.sum().clamp(min=1))
    return loss, {"mae": mae}


PAIR_LOSSES = {"bradley_terry": bt_loss, "margin_bradley_terry": bt_loss, "regular_bradley_terry": plain_bt_loss, "scaled_bradley_terry": scaled_bt_loss}


# ------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class RewardModelSpec:
    """Everything the training loop needs to know about one reward model type.

    Attributes:
        name: the config value of ``model.reward_model_type``.
        losses: loss name -> ``fn(outputs [rows, N], batch, cfg) -> (loss, stats)``; for pair data
            ``outputs`` holds the chosen rows first, then the rejected rows.
        default_loss: the loss used when ``loss.name=auto``.
        pair_losses: the loss names that train on preference pairs (the rest on rated rows).
        build_model: ``fn(cfg, tokenizer) -> RewardModel``.
    """

    name: str
    losses: dict[str, LossFn]
    default_loss: str
    pair_losses: frozenset[str] = frozenset(PAIR_LOSSES)
    build_model: Callable[[Config, Any], RewardModel] = field(
        default=lambda cfg, tok: build_model(cfg.model, tok, len(output_names(cfg)), output_names(cfg))
    )
    model_class: type = RewardModel

    def loss_name(self, cfg: Config) -> str:
        name = self.default_loss if cfg.loss.name == "auto" else cfg.loss.name
        if name not in self.losses:
            raise ConfigError(
                f"loss.name={name!r} is not available for model.reward_model_type={self.name!r}; "
                f"choose one of {', '.join(['auto', *self.losses])}"
            )
        return name

    def loss_fn(self, cfg: Config) -> LossFn:
        return self.losses[self.loss_name(cfg)]

    def data_kind(self, cfg: Config) -> str:
        """``pairs`` or ``rated``: which dataset builder this config needs."""
        return "pairs" if self.loss_name(cfg) in self.pair_losses else "rated"

    def build_dataset(self, cfg: Config, tokenizer, sources: list[str]):
        d = cfg.data
        return build_dataset(
            sources, tokenizer, kind=self.data_kind(cfg), fmt=d.format, max_length=d.max_length, truncation=d.truncation,
            attributes=list(cfg.model.attributes), skip_bad_rows=d.skip_bad_rows, field_map=dict(d.field_map),
            split=d.split, cache_dir=d.cache_dir or None, drop_duplicates=d.drop_duplicates, num_proc=d.num_proc,
        )

    def collator(self, cfg: Config, pad_id: int):
        return PairCollator(pad_id) if self.data_kind(cfg) == "pairs" else RatedCollator(pad_id)

    def check(self, cfg: Config) -> None:
        """Reject configs this type cannot train."""
        self.loss_name(cfg)


def _check_regression(cfg: Config) -> None:
    if not cfg.model.attributes:
        raise ConfigError("model.reward_model_type=regression needs model.attributes, e.g. [helpfulness, safety]")


class _RegressionSpec(RewardModelSpec):
    def check(self, cfg: Config) -> None:
        super().check(cfg)
        _check_regression(cfg)


class _BinarySpec(RewardModelSpec):
    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if len(cfg.model.attributes) > 1:
            raise ConfigError(
                "model.reward_model_type=binary_ranking predicts one scalar; remove model.attributes or use "
                "model.reward_model_type=regression for several attributes"
            )


_REGISTRY: dict[str, RewardModelSpec] = {
    RewardModelType.BINARY_RANKING.value: _BinarySpec(
        name="binary_ranking", losses=dict(PAIR_LOSSES), default_loss="bradley_terry"
    ),
    RewardModelType.REGRESSION.value: _RegressionSpec(
        name="regression", losses={"mse": mse_loss, **PAIR_LOSSES}, default_loss="mse"
    ),
}


def register_reward_model_type(spec: RewardModelSpec, *, overwrite: bool = False) -> RewardModelSpec:
    """Add a reward model type; ``model.reward_model_type=spec.name`` then selects it."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"reward model type {spec.name!r} is already registered; pass overwrite=True to replace it")
    if spec.default_loss not in spec.losses:
        raise ValueError(f"default_loss {spec.default_loss!r} is not one of the spec's losses {sorted(spec.losses)}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_reward_model_type(name: str) -> None:
    if name in {t.value for t in RewardModelType}:
        raise ValueError(f"the built-in type {name!r} cannot be removed")
    _REGISTRY.pop(name, None)


def registered_types() -> list[str]:
    return list(_REGISTRY)


def get_reward_model_spec(name: str | RewardModelType) -> RewardModelSpec:
    """Look a type up by name; an unknown name is an error listing the valid ones."""
    key = name.value if isinstance(name, RewardModelType) else name
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ConfigError(f"model.reward_model_type={key!r} is not registered; choose one of {', '.join(_REGISTRY)}") from None
