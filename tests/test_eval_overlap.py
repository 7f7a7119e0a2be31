"""Evaluation knows the model's training data: overlap reported and warned about; ``eval RUN_DIR`` = its validation split."""

from __future__ import annotations

import json

import pytest

from conftest import synthetic_pairs, write_jsonl
from rewardforge.cli import main
from rewardforge.config import load_config


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    from rewardforge.train import run_training

    root = tmp_path_factory.mktemp("overlap")
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(120, seed=3))
    cfg = load_config(None, [f"model.name_or_path={tiny_model('gpt2')}", f"data.train=[{data}]", "data.validation_fraction=0.25",
                             "data.cache_dir=none", "train.max_steps=3", "train.batch_size=8", "train.precision=fp32",
                             f"output_dir={root / 'run'}"])
    summary = run_training(cfg, progress=False)
    return root / "run", data, summary


def test_the_export_records_prompt_hashes_not_text(run_dir):
    run, data, summary = run_dir
    fp = json.loads((run / "model" / "training_prompts.json").read_text())
    assert fp["train"] and fp["validation"] and not set(fp["train"]) & set(fp["validation"])
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in fp["train"])  # hex digests, no text
    assert "boil" not in (run / "model" / "training_prompts.json").read_text().lower()


def test_eval_on_training_data_reports_the_overlap_and_warns(run_dir, tmp_path, capsys):
    run, data, summary = run_dir
    assert main(["eval", str(run / "model"), "--data", str(data), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    o = metrics["results"]["run/model"]["datasets"]["pairs"]["training_overlap"]
    assert o["pairs"] == summary["data"]["train_examples"] + summary["data"]["validation_examples"]
    assert o["in_training"] == summary["data"]["train_examples"] and o["in_validation"] == summary["data"]["validation_examples"]
    assert o["accuracy_unseen"]["n"] == summary["data"]["validation_examples"]
    assert f"warning: {o['in_training']} of {o['pairs']} pairs of pairs" in out and "rewardforge eval RUN_DIR" in out
    assert "Training data in the evaluation." in (tmp_path / "e" / "report.html").read_text()


def test_eval_of_a_run_directory_is_its_validation_split(run_dir, tmp_path, capsys):
    run, data, summary = run_dir
    assert main(["eval", str(run), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert "on its validation split: the held-out prompts of" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    d = metrics["results"]["run"]["datasets"]["pairs"]
    assert d["overall"]["n"] == summary["final_validation"]["pairs"]
    assert d["overall"]["accuracy"] == pytest.approx(summary["final_validation"]["accuracy"], abs=1e-9)
    assert d["training_overlap"]["in_training"] == 0


def test_long_phases_show_progress(run_dir, tiny_model, tmp_path, capsys):
    """Reading, rendering, tokenizing, validation and evaluation show a bar; eval one bar for the whole run."""
    from rewardforge.data.datasets import build_dataset, show_progress
    from rewardforge.eval.runner import evaluate_model
    from rewardforge.models.reward_model import load_tokenizer

    run, data, _ = run_dir
    from rewardforge.data.template import setup_template

    tok = load_tokenizer(str(tiny_model("gpt2")))
    setup_template(tok, "auto")
    with show_progress():
        build_dataset([str(data)], tok, kind="pairs", cache_dir="none")
    err = capsys.readouterr().err
    assert "data: read, render, tokenize" in err and "rows" in err  # the streamed build: one bar over its rows
    build_dataset([str(data)], tok, kind="pairs", cache_dir="none")  # off by default: library calls stay quiet
    assert capsys.readouterr().err == ""
    evaluate_model([str(run / "model")], [str(data), str(data)], None, progress=True)
    err = capsys.readouterr().err
    assert "eval (1 model(s), 2 file(s))" in err and err.count("seq/s") >= 1


def test_the_export_has_a_model_card_the_hub_reads_and_eval_adds_its_table(run_dir, tmp_path, capsys):
    from huggingface_hub import ModelCard

    run, data, summary = run_dir
    card = ModelCard.load(run / "model" / "README.md")
    d = card.data.to_dict()
    assert d["library_name"] == "transformers" and d["pipeline_tag"] == "text-classification"
    assert set(d["tags"]) >= {"reward-model", "rlhf"} and d["base_model"]
    acc = d["model-index"][0]["results"][0]["metrics"][0]
    assert acc["type"] == "accuracy" and acc["value"] == round(summary["final_validation"]["accuracy"], 4)
    assert "rewardforge serve PATH" in card.text and "truncation `prompt_left`" in card.text
    assert f"{summary['data']['train_examples']} train / {summary['data']['validation_examples']} validation" in card.text
    for _ in range(2):  # added once, then replaced, never duplicated
        assert main(["eval", str(run / "model"), "--data", str(data), "--out", str(tmp_path / "e"), "--quiet", "--update-card"]) == 0
    text = (run / "model" / "README.md").read_text()
    assert text.count("## Evaluation") == 1 and "| pairs |" in text
    assert ModelCard.load(run / "model" / "README.md").data.to_dict()["library_name"] == "transformers"
