"""``train.report_to``: TensorBoard, MLflow (local file store) and W&B (offline) get what metrics.jsonl gets."""

from __future__ import annotations

import json

import pytest

from conftest import synthetic_pairs, write_jsonl
from rewardforge.config import ConfigError, load_config


@pytest.fixture(scope="module")
def tracked_run(tiny_model, tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from rewardforge.train import run_training

    root = tmp_path_factory.mktemp("trackers")
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(48))
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # no network: W&B writes its run to disk only
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        cfg = load_config(None, [f"model.name_or_path={tiny_model('gpt2')}", f"data.train=[{data}]", "data.cache_dir=none",
                                 "train.max_steps=4", "train.batch_size=4", "train.log_steps=2", "train.eval_steps=2",
                                 "train.report_to=[tensorboard, mlflow, wandb]", f"output_dir={root / 'run'}"])
        run_training(cfg, progress=False)
    finally:
        mp.undo()
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root / "run", records


def _expected(records, split, key):
    return [(r["step"], r[key]) for r in records if r["split"] == split and key in r]


def test_tensorboard_event_files_hold_the_metrics_with_the_same_steps(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = tracked_run
    logdirs = [p.parent for p in (run / "trackers").rglob("events.out.tfevents.*")]
    scalars = {}
    for d in logdirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for split, key in (("train", "loss"), ("validation", "accuracy"), ("train", "rss_mb"), ("validation", "peak_rss_mb")):
        got = scalars[f"{split}/{key}"]
        want = _expected(records, split, key)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(abs(a - b) < 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, want))  # TensorBoard keeps float32


def test_mlflow_local_run_has_the_metrics_and_the_config(tracked_run):
    from mlflow.tracking import MlflowClient

    run, records = tracked_run
    client = MlflowClient(tracking_uri=(run / "trackers" / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("run")
    (mrun,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(mrun.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(s, round(v, 6)) for s, v in _expected(records, "train", "loss")]
    params = mrun.data.params
    assert params["train.max_steps"] == "4" and params["data_report.train_examples"].isdigit()


def test_wandb_offline_run_is_written(tracked_run):
    """W&B's offline run (its .wandb transaction log of protobuf records; ``wandb sync`` uploads it later) holds the
    metric names, their values as W&B serialises them (JSON) and the config."""
    run, records = tracked_run
    logs = list((run / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, "no offline W&B run under output_dir/trackers/wandb"
    data = logs[0].read_bytes()
    assert b"train/loss" in data and b"validation/accuracy" in data and b"train.max_steps" in data
    for _, loss in _expected(records, "train", "loss"):
        assert json.dumps(loss).encode() in data


def test_report_to_names_are_checked():
    with pytest.raises(ConfigError, match=r"train.report_to has 'tensorbored'; choose from tensorboard, wandb, mlflow, none"):
        load_config(None, ["train.report_to=[tensorbored]"])


def test_a_missing_tracker_package_names_the_extra(monkeypatch):
    import importlib.util

    from rewardforge.train import trackers_of

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(None, ["train.report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"the wandb package is not installed; install it with pip install 'rewardforge\[wandb\]'"):
        trackers_of(cfg)
