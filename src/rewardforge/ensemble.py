"""Reward model ensembles: K linear heads on one shared backbone, and what their disagreement says.

``model.ensemble_size=K`` turns any reward model type into an ensemble at the registry level: ``resolve()``
wraps the base type's :class:`~rewardforge.registry.ResolvedType` (:func:`wrap`), so the training loop,
validation, checkpoints and export run unchanged. What changes:

* the model has ``K * N`` outputs, member-major: column ``k * N + j`` is member ``k``'s output ``j``
  (``N`` = the base type's outputs: 1, or one per attribute), and ``id2label`` says so (:func:`head_labels`);
* the loss is the mean over members of the base loss, each member's with its own per-example bootstrap
  weights (:func:`bootstrap_weights`, passed as ``batch["example_weight"]``: the base loss adapter must be
  marked :func:`~rewardforge.losses.takes_example_weight`);
* validation metrics are the base metrics of the ensemble mean, plus each member's and, for pairs, the
  uncertainty report (:func:`rewardforge.eval.metrics.ensemble_pair_report`).

The reward of an ensemble is the mean of its members' (combined) rewards; its uncertainty is their
standard deviation (population, ``ddof=0``); a served reward may subtract ``lambda * std``
(``rewardforge serve --uncertainty-penalty LAMBDA``). :func:`summarize` is the one home of that rule for
scoring, serving and evaluation.

Example:
    >>> import numpy as np
    >>> s = summarize(np.array([[1.0, 3.0]]), [1.0], size=2, penalty=0.5)
    >>> s.mean.tolist(), s.std.tolist(), s.reward.tolist()
    ([2.0], [1.0], [1.5])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from rewardforge.losses import accepts_example_weight, combine, output_names

BOOTSTRAPS = ("poisson", "none")  # model.ensemble_bootstrap (config.py documents them)
_POISSON_MAX = 32  # Poisson(1) tail beyond 32: probability below 1e-36
_POISSON_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(_POISSON_MAX)])
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ------------------------------------------------------------------ layout


def head_labels(names: Sequence[str], size: int) -> list[str]:
    """``id2label`` of an ensemble's ``size * len(names)`` outputs: ``member_k`` (one output per member) or
    ``member_k/NAME`` (one per attribute); a single model (``size=1``) keeps ``names``.

    Example:
        >>> head_labels(["reward"], 2), head_labels(["a", "b"], 2)[:3]
        (['member_0', 'member_1'], ['member_0/a', 'member_0/b', 'member_1/a'])
    """
    if size == 1:
        return list(names)
    if len(names) == 1:
        return [f"member_{k}" for k in range(size)]
    return [f"member_{k}/{a}" for k in range(size) for a in names]


def model_labels(cfg: Any) -> list[str]:
    """The labels of the model a config builds: :func:`head_labels` of its outputs and ``model.ensemble_size``."""
    return head_labels(output_names(cfg), cfg.model.ensemble_size)


def member_outputs(outputs, size: int):
    """``[..., K * N]`` -> ``[..., K, N]`` (torch or numpy)."""
    return outputs.reshape(*outputs.shape[:-1], size, outputs.shape[-1] // size)


def member_rewards(outputs, weights: Sequence[float], size: int):
    """Each member's combined reward ``[..., K]`` from the outputs ``[..., K * N]``."""
    return combine(member_outputs(outputs, size), weights)


@torch.no_grad()
def share_head_init(model, size: int) -> None:
    """``model.ensemble_init=shared``: every member's head rows start as member 0's (``head()`` is the linear
    head of ``size * N`` outputs, member-major)."""
    head = model.head()
    head = getattr(head, "modules_to_save", {}).get("default", head) if hasattr(head, "modules_to_save") else head
    for p in (head.weight, head.bias):
        if p is not None:
            rows = member_outputs(p.T if p.ndim == 2 else p, size)  # [.., K, N] view
            rows.copy_(rows[..., :1, :].expand_as(rows).clone())


# ------------------------------------------------------------------ bootstrap


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a fixed, well-mixed hash of 64-bit integers."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def bootstrap_weights(seed: int, index, size: int, kind: str = "poisson") -> np.ndarray:
    """Per-example, per-member bootstrap weights ``[len(index), size]`` (float32).

    ``poisson``: ``w[i, k] ~ Poisson(1)``, drawn by inverting Poisson(1)'s CDF at a uniform number that is a
    hash of ``(seed, index[i], k)`` only, so an example gets the same weights whatever batch, epoch, process
    count or resume it is seen in (the online bootstrap of Oza & Russell 2001; Poisson(1) approximates the
    multinomial counts of resampling n of n). ``none``: every weight is 1.

    Example:
        >>> bootstrap_weights(0, [0, 1, 2], 2).shape
        (3, 2)
    """
    idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, np.int64).reshape(-1)
    if kind == "none":
        return np.ones((len(idx), size), np.float32)
    if kind != "poisson":
        raise ValueError(f"model.ensemble_bootstrap={kind!r} is not valid; choose one of {', '.join(BOOTSTRAPS)}")
    base = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))
    with np.errstate(over="ignore"):
        h = _splitmix64((base ^ idx.astype(np.uint64))[:, None] + np.arange(size, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03))
        h = _splitmix64(h)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # uniform in [0, 1)
    return np.searchsorted(_POISSON_CDF, u, side="right").astype(np.float32)


# ------------------------------------------------------------------ training: loss and metrics


def ensemble_loss(base_fn, size: int, seed: int, kind: str):
    """The loss of an ensemble: ``mean_k base_fn(outputs_k, batch with example_weight = w[:, k])``.

    The backbone's gradient is the mean of the members' (the same scale as one model's); each head gets
    only its own member's. The returned stats are the base stats of the ensemble's mean outputs.
    """

    def loss_fn(outputs: torch.Tensor, batch: dict, cfg):
        w = torch.from_numpy(bootstrap_weights(seed, batch["index"], size, kind)).to(outputs.device)
        n = outputs.shape[-1] // size
        losses = [base_fn(outputs[:, k * n : (k + 1) * n], {**batch, "example_weight": w[:, k]}, cfg)[0] for k in range(size)]
        with torch.no_grad():
            _, stats = base_fn(member_outputs(outputs.detach(), size).mean(-2), batch, cfg)
        return torch.stack(losses).mean(), stats

    loss_fn.ensemble_of = base_fn
    return loss_fn


def _is_outputs(v: Any, width: int) -> bool:
    return isinstance(v, np.ndarray) and v.ndim >= 2 and v.shape[-1] == width and v.dtype.kind == "f"


def ensemble_metrics(base_metrics, size: int):
    """Validation metrics of an ensemble: the base metrics of the mean outputs, with ``ensemble``: each member's
    scalar metrics (``members``: name -> K values) and, for pair predictions, the uncertainty report."""

    def metrics(pred: dict, names: list[str], weights: list[float]) -> dict[str, Any]:
        if not pred:
            return base_metrics(pred, names, weights)
        width = size * len(names)
        mean = {k: member_outputs(v, size).mean(-2) if _is_outputs(v, width) else v for k, v in pred.items()}
        out = dict(base_metrics(mean, names, weights))
        members = [base_metrics({k: member_outputs(v, size)[..., m, :] if _is_outputs(v, width) else v
                                 for k, v in pred.items()}, names, weights) for m in range(size)]
        scalar = [k for k, v in members[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        ens: dict[str, Any] = {"size": size, "members": {k: [m[k] for m in members] for k in scalar}}
        if "chosen" in pred and "rejected" in pred:
            from rewardforge.eval.metrics import ensemble_pair_report

            margins = member_rewards(pred["chosen"], weights, size) - member_rewards(pred["rejected"], weights, size)
            ens.update(ensemble_pair_report(margins))
        out["ensemble"] = ens
        return out

    return metrics


def wrap(resolved, cfg):
    """The ensemble of a resolved reward model type (``model.ensemble_size > 1``); raises ConfigError when its
    loss cannot weigh examples."""
    from rewardforge.config import ConfigError

    size = cfg.model.ensemble_size
    if not accepts_example_weight(resolved.loss_fn):
        raise ConfigError(
            f"model.ensemble_size={size} needs a loss that takes per-example weights, and loss.name="
            f"{resolved.loss_name!r} of model.reward_model_type={resolved.name!r} does not (mark its adapter with "
            "rewardforge.losses.takes_example_weight); set model.ensemble_size=1 or choose another loss.name"
        )
    data = replace(resolved.data, metrics=ensemble_metrics(resolved.data.metrics, size))  # the kind's other parts kept
    return replace(resolved, loss_fn=ensemble_loss(resolved.loss_fn, size, cfg.train.seed, cfg.model.ensemble_bootstrap),
                   data=data, ensemble_size=size)


def reduce_predictions(pred: dict, size: int, num_outputs: int) -> dict:
    """``predict()``'s outputs with every ``[n, K * N]`` array replaced by the members' mean ``[n, N]``."""
    if size == 1:
        return pred
    width = size * num_outputs
    return {k: member_outputs(v, size).mean(-2) if _is_outputs(v, width) else v for k, v in pred.items()}


LORA_ADAPTERS_DIR = "adapters"  # a LoRA ensemble's export: adapters/member_k, one peft adapter per member


def metadata(size: int, names: Sequence[str], bootstrap: str, members_kind: str = "heads") -> dict[str, Any]:
    """The ``ensemble`` record of ``rewardforge.json``; ``members_kind`` is ``model.ensemble_members``."""
    lora = members_kind == "lora"
    out = {
        "size": size,
        "members": head_labels(names, size) if len(names) == 1 else [f"member_{k}" for k in range(size)],
        "members_kind": members_kind,
        "layout": "outputs are member-major: column k * N + j is member k's output j (N = len(attributes))",
        "reward": "mean over members of each member's combined reward (attribute_weights); " + (
            "each member is the base model with its own adapter, so no single model holds the mean" if lora else
            "reward/ holds that mean as one linear head (the mean of the members' heads: exact, the heads are linear)"),
        "uncertainty": "population standard deviation (ddof=0) of the members' combined rewards",
        "uncertainty_penalty": "a server started with --uncertainty-penalty LAMBDA returns reward = mean - LAMBDA * std "
                               "(default 0: the mean); reward_mean/reward_std normalise the mean",
        "bootstrap": bootstrap,
    }
    if lora:
        out["adapters_dir"] = LORA_ADAPTERS_DIR
        out["member_adapters"] = [f"member_{k}" for k in range(size)]
        out["lora"] = ("member k is this directory's model (the base backbone and every member's head) with the peft "
                       f"adapter {LORA_ADAPTERS_DIR}/member_k, read at columns k * N .. k * N + N - 1")
    return out


# ------------------------------------------------------------------ scoring


@dataclass
class EnsembleSummary:
    """What an ensemble says about n inputs."""

    reward: np.ndarray  # mean - penalty * std [n]
    mean: np.ndarray  # mean of the members' rewards [n]
    std: np.ndarray  # their population standard deviation [n]
    members: np.ndarray  # every member's combined reward [n, K]
    outputs: np.ndarray  # the members' mean of each output [n, N]


def summarize(outputs: np.ndarray, weights: Sequence[float], size: int, penalty: float = 0.0) -> EnsembleSummary:
    """The one rule from model outputs ``[n, K * N]`` to the reward: the members' mean minus ``penalty`` times
    their standard deviation (a single model, ``size=1``, has std 0)."""
    outputs = np.asarray(outputs, np.float64)
    members = np.asarray(member_rewards(outputs, weights, size), np.float64).reshape(len(outputs), size)
    mean, std = members.mean(1), members.std(1)
    return EnsembleSummary(mean - penalty * std, mean, std, members, member_outputs(outputs, size).mean(-2))
