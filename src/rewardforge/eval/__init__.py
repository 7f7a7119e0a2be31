"""Evaluate exported reward models: accuracy with confidence intervals, section scores, calibration,
length bias, reward distributions, preference strength, best-of-N and regression metrics, model
comparison, and a self-contained HTML report.

Command line::

    rewardforge eval MODEL_DIR [MODEL_DIR ...] --data FILE [FILE ...] [--out DIR]
    rewardforge eval MODEL_DIR DATA [DATA ...] [--out DIR]     # data told apart from models:
                                                               # a model dir holds rewardforge.json

Python::

    from rewardforge.eval import evaluate_model
    metrics = evaluate_model(["runs/a/model", "runs/b/model"], ["test.jsonl"], "runs/eval")

``DIR`` receives ``metrics.json``, ``report.html`` (opens offline in a browser) and ``plots/*.png``.
For the training loop, :func:`evaluate_pairs_during_training` scores in-memory models and returns
flat numbers. The metric formulas are documented in :mod:`rewardforge.eval.metrics`.
"""

__all__ = [
    "EvalDataset",
    "evaluate_model",
    "evaluate_pairs_during_training",
    "evaluate_scorer",
    "load_eval_data",
    "scorer_from_model",
]


_HOME = {"EvalDataset": "data", "load_eval_data": "data", "scorer_from_model": "scores", "evaluate_model": "runner",
         "evaluate_pairs_during_training": "runner", "evaluate_scorer": "runner"}


def __getattr__(name: str):
    # Lazy: ``rewardforge.eval.metrics`` stays importable without torch and transformers.
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"rewardforge.eval.{_HOME[name]}"), name)
    raise AttributeError(f"module 'rewardforge.eval' has no attribute {name!r}")
