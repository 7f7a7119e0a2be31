"""`rewardforge score` on models exported from a few training steps; plain transformers reproduces it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rated_rows, synthetic_pairs, write_jsonl

import rewardforge
from rewardforge.cli import main
from rewardforge.config import load_config

KINDS = ["gpt2", "llama", "qwen2", "bert"]
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """``exported(kind)`` -> model directory exported from 2 training steps on the tiny ``kind`` backbone."""
    from rewardforge.train import run_training

    root = tmp_path_factory.mktemp("scoring")
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(16, seed=1))
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cfg = load_config(None, [
                f"model.name_or_path={tiny_model(kind)}", f"data.train=[{data}]", "data.validation_fraction=0.3",
                f"data.max_length={MAX_LENGTH}", "data.cache_dir=none", "train.max_steps=2", "train.batch_size=4",
                "train.learning_rate=1e-3", "train.warmup_ratio=0", f"output_dir={root / kind}",
            ])
            summary = run_training(cfg, progress=False)
            cache[kind] = Path(summary["export"]["path"])
        return cache[kind]

    return get


ROWS = [
    {"prompt": "How do I boil an egg?", "response": "Put it in boiling water for nine minutes.", "id": "a"},
    {"prompt": "Why is the sky blue?", "response": "Go away.", "id": "b"},
    {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is gravity?"}, {"role": "assistant", "content": "Gravity keeps planets in orbit."},
    ], "id": "c"},
    {"text": "Human: hello\n\nAssistant: The quick brown fox jumps over the lazy dog.", "id": "d"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "response": "Paris.", "id": "e"},
]


def score(model_dir, rows, tmp_path, *extra, name="in.jsonl"):
    inp = write_jsonl(tmp_path / name, rows)
    out = tmp_path / f"out-{name}"
    rc = main(["score", str(model_dir), "--input", str(inp), "--output", str(out), "--device", "cpu", *extra])
    assert rc == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_score_jsonl_all_input_kinds(exported, tmp_path, capsys):
    model_dir = exported("gpt2")
    recs = score(model_dir, ROWS, tmp_path)
    assert "scored 5 inputs" in capsys.readouterr().err
    assert [r["id"] for r in recs] == ["a", "b", "c", "d", "e"]  # input order and fields kept
    for rec, row in zip(recs, ROWS):
        assert {k: rec[k] for k in row} == row
        assert "text" not in rec or "text" in row  # only with --return-text
        assert "truncated" not in rec

    meta = json.loads((model_dir / "rewardforge.json").read_text())
    rewards = np.array([r["reward"] for r in recs])
    assert len(set(rewards.round(6))) == 5
    np.testing.assert_allclose([r["reward_normalized"] for r in recs], (rewards - meta["reward_mean"]) / meta["reward_std"], atol=1e-5)

    # the same numbers through the Python API
    scorer = rewardforge.load(model_dir, device="cpu")
    api = scorer.score([ROWS[0]["prompt"], ROWS[1]["prompt"], ROWS[4]["prompt"]], [ROWS[0]["response"], ROWS[1]["response"], "Paris."])
    np.testing.assert_allclose(api, rewards[[0, 1, 4]], atol=1e-5)
    msgs = ROWS[2]["messages"]
    np.testing.assert_allclose(scorer.score([msgs[:-1]], [msgs[-1:]]), rewards[[2]], atol=1e-5)
    np.testing.assert_allclose(scorer.score_texts([ROWS[3]["text"]]), rewards[[3]], atol=1e-5)

    # a one-turn messages row is the same input as its prompt/response row
    same = score(model_dir, [{"messages": [{"role": "user", "content": ROWS[0]["prompt"]},
                                           {"role": "assistant", "content": ROWS[0]["response"]}]}], tmp_path, name="m.jsonl")
    assert same[0]["reward"] == pytest.approx(recs[0]["reward"], abs=1e-6)


def test_score_stdin_to_stdout(exported, monkeypatch, capsys):
    model_dir = exported("gpt2")
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in ROWS[:2]) + "\n"))
    assert main(["score", str(model_dir), "--device", "cpu", "--return-text"]) == 0
    lines = capsys.readouterr().out.splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["id"] for r in recs] == ["a", "b"]
    assert recs[0]["text"] == "Human: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes."


def test_long_input_is_marked_truncated(exported, tmp_path, capsys):
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
    recs = score(exported("gpt2"), [{"prompt": long, "response": "Sure."}, ROWS[1]], tmp_path)
    assert recs[0]["truncated"] is True and "truncated" not in recs[1]
    assert "1 truncated to max_length" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_return_text_reproduced_by_plain_transformers(exported, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = exported(kind)
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    runs = {bs: score(model_dir, ROWS, tmp_path, "--return-text", "--batch-size", str(bs), name=f"in{bs}.jsonl") for bs in (1, 2, 16)}
    texts = [r["text"] for r in runs[1]]
    lead, trail = {"bert": ("[CLS]", "[SEP]"), "llama": ("<s>", "")}.get(kind, ("", ""))
    suffix = "<|im_end|>\n" if kind == "qwen2" else ""
    # text rows are brought to the model's format: its special tokens written once, its end of turn completed
    assert texts[3] == lead + ROWS[3]["text"] + suffix + trail
    with torch.no_grad():
        reference = [plain(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    for bs, recs in runs.items():
        assert [r["text"] for r in recs] == texts
        np.testing.assert_allclose([r["reward"] for r in recs], reference, atol=1e-4, err_msg=f"{kind}, batch size {bs}")
    meta = json.loads((model_dir / "rewardforge.json").read_text())
    assert meta["pooling"] == ("pooled" if kind == "bert" else "last_token") and meta["max_length"] == MAX_LENGTH
    if kind == "qwen2":  # its own chat template is used, not the plain one
        assert texts[0].startswith("<|im_start|>user\nHow do I boil an egg?<|im_end|>\n<|im_start|>assistant\n")
    else:  # the export's template writes the special tokens the training tokenizer added
        assert texts[0] == lead + "Human: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes." + trail
        assert texts[4] == lead + "System: Be brief.\n\nHuman: Capital of France?\n\nAssistant: Paris." + trail
    # add_special_tokens=False readers (TRL, verl) and the chat template get the same ids
    for t in texts:
        assert tok(t, add_special_tokens=False)["input_ids"] == tok(t)["input_ids"]


def test_regression_model_reports_attributes(tiny_model, tmp_path):
    from rewardforge.train import run_training

    data = write_jsonl(tmp_path / "rated.jsonl", rated_rows(16, seed=2))
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model('gpt2')}", "model.reward_model_type=regression",
        "model.attributes=[helpfulness, safety]", "model.attribute_weights=[0.25, 0.75]", f"data.train=[{data}]",
        "data.validation_fraction=0.3", "data.max_length=64", "data.cache_dir=none", "train.max_steps=2",
        "train.batch_size=4", f"output_dir={tmp_path / 'run'}",
    ])
    model_dir = Path(run_training(cfg, progress=False)["export"]["path"])
    recs = score(model_dir, ROWS[:2], tmp_path)
    for r in recs:
        assert set(r["attributes"]) == {"helpfulness", "safety"}
        assert r["reward"] == pytest.approx(0.25 * r["attributes"]["helpfulness"] + 0.75 * r["attributes"]["safety"], abs=1e-5)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"in\.jsonl:2: invalid JSON"),
        ('{"prompt": "only a prompt"}', r"in\.jsonl:2: each line needs prompt\+response, messages, or text"),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', r"in\.jsonl:2: messages: the last message must be the assistant response"),
        ('{"text": 5}', r"in\.jsonl:2: field 'text' must be a string"),
        ('{"prompt": 5, "response": "x"}', r"in\.jsonl:2: field 'prompt' must be a string or a list of messages"),
    ],
)
def test_malformed_input_line_exits_2_naming_the_line(exported, tmp_path, capsys, bad_line, message):
    import re

    inp = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], bad_line, ROWS[1]])
    out = tmp_path / "out.jsonl"
    rc = main(["score", str(exported("gpt2")), "--input", str(inp), "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("rewardforge score: error: ")
    assert re.search(message, err), err
    assert not out.exists() or out.read_text() == ""  # nothing half-written


def test_invalid_utf8_input_exits_2_naming_the_line(exported, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes((json.dumps(ROWS[0]) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    rc = main(["score", str(exported("gpt2")), "--input", str(inp), "--device", "cpu"])
    assert rc == 2 and "in.jsonl:2" in capsys.readouterr().err


def test_missing_model_dir_exits_2(tmp_path, capsys):
    rc = main(["score", str(tmp_path), "--input", str(tmp_path / "x.jsonl"), "--device", "cpu"])
    assert rc == 2
    assert "is not a rewardforge model directory (no rewardforge.json)" in capsys.readouterr().err


def test_python_dash_m_help():
    res = subprocess.run([sys.executable, "-m", "rewardforge", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: rewardforge")
    for command in ("train", "export", "score"):
        assert command in res.stdout
    res = subprocess.run([sys.executable, "-m", "rewardforge", "score", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--return-text" in res.stdout and "--batch-size" in res.stdout


# ---------------------------------------------------------------- user errors: one line naming the path and the fix


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # what fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_path_errors_are_one_line_naming_the_path_and_checked_before_work(exported, tmp_path, capsys):
    model_dir = exported("gpt2")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    err = _one_line_error(capsys, ["train", f"model.name_or_path={empty}", f"output_dir={tmp_path / 'o1'}"])
    assert f"{empty} is a directory without config.json or tokenizer files" in err
    err = _one_line_error(capsys, ["train", f"model.name_or_path={tmp_path / 'missing'}", f"output_dir={tmp_path / 'o2'}"])
    assert f"{tmp_path / 'missing'} does not exist" in err
    err = _one_line_error(capsys, ["score", str(model_dir), "--input", str(inp), "--output", str(blocker / "out.jsonl")])
    assert err.endswith(f"--output {blocker / 'out.jsonl'}: {blocker} is not a writable directory; give another path")
    err = _one_line_error(capsys, ["export", str(tmp_path / "no-ckpt"), str(tmp_path / "x")])
    assert "does not exist; give a checkpoint directory" in err
    err = _one_line_error(capsys, ["export", str(empty), str(tmp_path / "x")])
    assert "is not a rewardforge checkpoint (no config.yaml)" in err


def test_data_errors_say_the_fix_and_a_failed_run_leaves_no_empty_folder(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{broken"])
    out = tmp_path / "never-started"
    err = _one_line_error(capsys, ["train", f"model.name_or_path={tiny_model('gpt2')}", f"data.train=[{empty}]",
                                   f"output_dir={out}", "data.cache_dir=none"])
    assert err.endswith(f"no training examples left after reading {empty}: the files hold no rows; give data.train "
                        "files with preference pairs or rated responses")
    assert not out.exists()
    err = _one_line_error(capsys, ["train", f"model.name_or_path={tiny_model('gpt2')}", f"data.train=[{broken}]",
                                   f"output_dir={out}", "data.cache_dir=none"])
    assert f"{broken}:2: invalid JSON" in err and err.endswith("set data.skip_bad_rows=true to skip such rows")


def test_help_config_lines_fit_a_terminal(capsys):
    assert main(["train", "--help-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 60 and max(map(len, lines)) <= 100
