"""Registry of reward model types: each name maps to its model builder, data kinds and losses.

The training loop only talks to a :class:`ResolvedType`, resolved once in ``setup()`` from the spec
and the config (``spec.resolve(cfg)``), so a new type registers here with
:func:`register_reward_model_type` without touching the loop. A type whose data is neither
preference pairs nor rated responses also registers its :class:`DataKind` (collator and validation
metrics, and where the defaults do not fit its dataset builder, validation columns and shared-prompt
collator) with :func:`register_data_kind`; ``listwise`` (lists of K responses) is built that way.

``model.ensemble_size=K > 1`` makes ``resolve()`` wrap the type's ResolvedType into an ensemble
(:func:`rewardforge.ensemble.wrap`): K heads on one backbone, each trained on its own bootstrap weighting
through the base loss's per-example weights. Any type whose losses are marked
:func:`~rewardforge.losses.takes_example_weight` and whose model builder gives
``K * len(output_names)`` outputs (the default builder does) can be trained as an ensemble.

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
from rewardforge.data.lists import ListCollator, build_list_dataset, list_columns
from rewardforge.data.packing import PackedListCollator, PackedPairCollator
from rewardforge.losses import LIST_LOSSES, PAIR_LOSSES, RATED_LOSSES, attribute_weights, combine, output_names  # noqa: F401 (public)
from rewardforge.models.reward_model import RewardModel, build_model

LossFn = Callable[[torch.Tensor, dict, Config], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class RewardModelType(str, enum.Enum):
    """The built-in reward model types (``model.reward_model_type``)."""

    BINARY_RANKING = "binary_ranking"
    REGRESSION = "regression"
    LISTWISE = "listwise"


# ------------------------------------------------------------------ data kinds


@dataclass(frozen=True)
class DataKind:
    """What a kind of training data needs beyond its dataset builder.

    Attributes:
        name: ``pairs``, ``rated`` or a registered kind (``data.datasets.build_dataset(kind=...)``).
        collator: ``fn(pad_id) -> collate`` for the training and validation batches.
        metrics: ``fn(pred, output_names, weights) -> dict``: the validation metrics of the outputs
            that :func:`rewardforge.training.validation.predict` gives for this kind's batches.
        build: ``fn(cfg, tokenizer, sources) -> (dataset, DataReport)``; None: ``data.datasets.build_dataset``
            with ``kind=name``.
        columns: ``fn(outputs, batch) -> {name: tensor}``: what validation keeps of a batch, one entry per
            example with a unique ``index`` (rows are gathered across processes and sorted by it); None:
            ``predict``'s pair and rated columns.
        packed_collator: ``fn(pad_id) -> collate`` of ``train.share_prompt`` (shared-prompt packing for
            decoders); None: this kind cannot share prompts.
    """

    name: str
    collator: Callable[[int], Any]
    metrics: Callable[[dict, list[str], list[float]], dict[str, Any]]
    build: Callable[[Config, Any, list[str]], Any] | None = None
    columns: Callable[[torch.Tensor, dict], dict] | None = None
    packed_collator: Callable[[int], Any] | None = None


def _pair_metrics(pred, names, weights):
    from rewardforge.training.validation import pair_metrics

    return pair_metrics(combine(pred["chosen"], weights), combine(pred["rejected"], weights)) if pred else {"pairs": 0}


def _rated_metrics(pred, names, weights):
    from rewardforge.training.validation import regression_metrics

    return regression_metrics(pred["pred"], pred["labels"], names) if pred else {"examples": 0}


def _list_metrics(pred, names, weights):
    from rewardforge.training.validation import list_metrics

    return list_metrics(combine(pred["pred"], weights), pred["scores"], pred["list"]) if pred else {"lists": 0}


_DATA_KINDS: dict[str, DataKind] = {
    "pairs": DataKind("pairs", PairCollator, _pair_metrics, packed_collator=PackedPairCollator),
    "rated": DataKind("rated", RatedCollator, _rated_metrics),
    "lists": DataKind("lists", ListCollator, _list_metrics, build=build_list_dataset, columns=list_columns,
                      packed_collator=PackedListCollator),
}


def register_data_kind(kind: DataKind, *, overwrite: bool = False) -> DataKind:
    if kind.name in _DATA_KINDS and not overwrite:
        raise ValueError(f"data kind {kind.name!r} is already registered; pass overwrite=True to replace it")
    _DATA_KINDS[kind.name] = kind
    return kind


def get_data_kind(name: str) -> DataKind:
    try:
        return _DATA_KINDS[name]
    except KeyError:
        raise ValueError(f"data kind {name!r} is not registered; the registered ones are {', '.join(_DATA_KINDS)}") from None


# ------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class RewardModelSpec:
    """Everything the training loop needs to know about one reward model type.

    Attributes:
        name: the config value of ``model.reward_model_type``.
        losses: loss name -> ``fn(outputs [rows, N], batch, cfg) -> (loss, stats)``; for pair data
            ``outputs`` holds the chosen rows first, then the rejected rows.
        default_loss: the loss used when ``loss.name=auto``.
        loss_data: loss name -> the data kind it trains on; a loss not named here trains on
            ``pairs`` if it is a pair loss of :data:`rewardforge.losses.PAIR_LOSSES`, else on ``rated``.
        build_model: ``fn(cfg, tokenizer) -> RewardModel`` with ``model.ensemble_size * len(output_names)``
            outputs, labelled :func:`rewardforge.ensemble.model_labels` (the default builder does that).
    """

    name: str
    losses: dict[str, LossFn]
    default_loss: str
    loss_data: dict[str, str] = field(default_factory=dict)
    build_model: Callable[[Config, Any], RewardModel] = field(default=lambda cfg, tok: _build_default(cfg, tok))

    def loss_name(self, cfg: Config) -> str:
        name = self.default_loss if cfg.loss.name == "auto" else cfg.loss.name
        if name not in self.losses:
            raise ConfigError(
                f"loss.name={name!r} is not available for model.reward_model_type={self.name!r}; "
                f"choose one of {', '.join(['auto', *self.losses])}"
            )
        return name

    def data_kind(self, cfg: Config) -> str:
        """Which dataset builder this config needs (``pairs``, ``rated`` or a registered kind)."""
        name = self.loss_name(cfg)
        return self.loss_data.get(name, "pairs" if name in PAIR_LOSSES else "rated")

    def check(self, cfg: Config) -> None:
        """Reject configs this type cannot train (one line naming the key and the fix)."""
        self.loss_name(cfg)

    def resolve(self, cfg: Config) -> "ResolvedType":
        """The checked spec with everything the loop derives from the config, computed once."""
        self.check(cfg)
        name = self.loss_name(cfg)
        resolved = ResolvedType(self, name, self.losses[name], get_data_kind(self.data_kind(cfg)), output_names(cfg),
                                attribute_weights(cfg))
        if cfg.model.ensemble_size > 1:
            from rewardforge.ensemble import wrap

            resolved = wrap(resolved, cfg)
        return resolved


def _build_default(cfg: Config, tokenizer) -> RewardModel:
    from rewardforge.ensemble import model_labels, share_head_init

    labels = model_labels(cfg)
    model = build_model(cfg.model, tokenizer, len(labels), labels)
    if cfg.model.ensemble_size > 1 and cfg.model.ensemble_init == "shared":
        share_head_init(model, cfg.model.ensemble_size)
    return model


@dataclass(frozen=True)
class ResolvedType:
    """A reward model type resolved for one config: what ``setup()`` keeps on the ``Run``."""

    spec: RewardModelSpec
    loss_name: str
    loss_fn: LossFn
    data: DataKind
    output_names: list[str]
    weights: list[float]
    ensemble_size: int = 1  # K heads (model.ensemble_size); the model has ensemble_size * len(output_names) outputs

    @property
    def name(self) -> str:
        return self.spec.name

    def build_model(self, cfg: Config, tokenizer) -> RewardModel:
        model = self.spec.build_model(cfg, tokenizer)
        want = self.ensemble_size * len(self.output_names)
        if self.ensemble_size > 1 and model.num_outputs != want:
            from rewardforge.errors import ModelError

            raise ModelError(
                f"the model builder of model.reward_model_type={self.name!r} gave {model.num_outputs} outputs, but "
                f"model.ensemble_size={self.ensemble_size} x {len(self.output_names)} outputs needs {want}; build "
                "len(rewardforge.ensemble.model_labels(cfg)) outputs, or set model.ensemble_size=1"
            )
        return model

    def build_dataset(self, cfg: Config, tokenizer, sources: list[str]):
        if self.data.build is not None:
            return self.data.build(cfg, tokenizer, sources)
        d = cfg.data
        return build_dataset(
            sources, tokenizer, kind=self.data.name, fmt=d.format, max_length=d.max_length, truncation=d.truncation,
            attributes=list(cfg.model.attributes), skip_bad_rows=d.skip_bad_rows, field_map=dict(d.field_map),
            split=d.split, cache_dir=d.cache_dir or None, drop_duplicates=d.drop_duplicates, num_proc=d.num_proc,
        )

    def mean_predictions(self, pred: dict) -> dict:
        """``predict()``'s outputs with an ensemble's members averaged (``[n, K * N]`` -> ``[n, N]``)."""
        from rewardforge.ensemble import reduce_predictions

        return reduce_predictions(pred, self.ensemble_size, len(self.output_names))

    def ensemble_metadata(self, cfg: Config) -> dict[str, Any] | None:
        """The ``ensemble`` record of ``rewardforge.json`` (None for a single model)."""
        if self.ensemble_size == 1:
            return None
        from rewardforge.ensemble import metadata

        return metadata(self.ensemble_size, self.output_names, cfg.model.ensemble_bootstrap, cfg.model.ensemble_members)

    def collator(self, pad_id: int):
        return self.data.collator(pad_id)

    def packed_collator(self, pad_id: int):
        """The ``train.share_prompt`` collator; a kind without one is a config error naming the fix."""
        if self.data.packed_collator is None:
            can = [k.name for k in _DATA_KINDS.values() if k.packed_collator is not None]
            raise ConfigError(f"train.share_prompt=true is not available for {self.data.name} data "
                              f"(model.reward_model_type={self.name}, loss {self.loss_name}); it packs {' and '.join(can)} "
                              "(a pair loss or a listwise type): set train.share_prompt=false")
        return self.data.packed_collator(pad_id)

    def metrics(self, pred: dict) -> dict[str, Any]:
        """Validation metrics of :func:`~rewardforge.training.validation.predict`'s outputs."""
        return self.data.metrics(pred, self.output_names, self.weights)


class _RegressionSpec(RewardModelSpec):
    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if not cfg.model.attributes:
            raise ConfigError("model.reward_model_type=regression needs model.attributes, e.g. [helpfulness, safety]")


class _BinarySpec(RewardModelSpec):
    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if len(cfg.model.attributes) > 1:
            raise ConfigError(
                "model.reward_model_type=binary_ranking predicts one scalar; remove model.attributes or use "
                "model.reward_model_type=regression for several attributes"
            )


class _ListwiseSpec(RewardModelSpec):
    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if len(cfg.model.attributes) > 1:
            raise ConfigError(
                "model.reward_model_type=listwise predicts one scalar; remove model.attributes (the lists' scores, or "
                "data.score_label for grouped rated rows, say what is better)"
            )
        if cfg.data.format != "auto":
            raise ConfigError(f"data.format={cfg.data.format!r} is a pair or rated format; model.reward_model_type=listwise "
                              "reads list rows ({prompt, responses, scores|ranking|best}) or, with data.group_by, rated rows: "
                              "set data.format=auto")


_REGISTRY: dict[str, RewardModelSpec] = {
    RewardModelType.BINARY_RANKING.value: _BinarySpec(
        name="binary_ranking", losses=dict(PAIR_LOSSES), default_loss="bradley_terry"
    ),
    RewardModelType.REGRESSION.value: _RegressionSpec(
        name="regression", losses={**RATED_LOSSES, **PAIR_LOSSES}, default_loss="mse"
    ),
    RewardModelType.LISTWISE.value: _ListwiseSpec(
        name="listwise", losses=dict(LIST_LOSSES), default_loss="plackett_luce", loss_data={n: "lists" for n in LIST_LOSSES}
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


def resolve_type(cfg: Config) -> ResolvedType:
    """``get_reward_model_spec(cfg.model.reward_model_type).resolve(cfg)`` (an ensemble when ``model.ensemble_size > 1``,
    also for a spec whose own ``resolve`` does not call :meth:`RewardModelSpec.resolve`)."""
    resolved = get_reward_model_spec(cfg.model.reward_model_type).resolve(cfg)
    if cfg.model.ensemble_size > 1 and resolved.ensemble_size == 1:
        from rewardforge.ensemble import wrap

        resolved = wrap(resolved, cfg)
    return resolved
