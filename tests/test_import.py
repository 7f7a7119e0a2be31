"""``rewardforge import``: a Hugging Face reward model (TRL's RewardTrainer, a tiny random one) as a rewardforge model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rewardforge
from conftest import synthetic_pairs, write_jsonl
from rewardforge.cli import main
from rewardforge.models.reward_model import ModelError

TEXTS = ["Human: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes.",
         "Human: What is gravity?\n\nAssistant: That is a stupid question. Go away."]


def _hf_logits(model_dir: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return np.array([model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts])


@pytest.fixture(scope="module")
def random_hf_rm(tiny_model, tmp_path_factory):
    """A tiny random GPT-2 reward model saved by transformers (pad token = EOS, as GPT-2 ships)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = tiny_model("gpt2")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    with torch.no_grad():
        model.score.weight.mul_(20.0)
    out = tmp_path_factory.mktemp("hf-rm") / "rm"
    model.config.pad_token_id = AutoTokenizer.from_pretrained(src).pad_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_a_random_transformers_reward_model_imports_and_scores_like_transformers(random_hf_rm, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(12))
    out = tmp_path / "imported"
    assert main(["import", str(random_hf_rm), str(out), "--data", str(data), "--max-length", "128"]) == 0
    said = capsys.readouterr().out
    assert f"imported {random_hf_rm} -> {out}" in said and "over 24 responses" in said
    meta = json.loads((out / "rewardforge.json").read_text())
    assert meta["imported_from"] == str(random_hf_rm) and meta["sequences"] == 24 and meta["reward_std"] > 0
    scorer = rewardforge.load(out, device="cpu")
    # the same text through plain transformers on the original directory gives the same reward
    np.testing.assert_allclose(scorer.score_texts(TEXTS), _hf_logits(random_hf_rm, TEXTS), atol=1e-4)
    # and score/eval/serve now take it: the CLI scores a JSONL row
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "How do I boil an egg?", "response": "Nine minutes."}])
    assert main(["score", str(out), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--device", "cpu"]) == 0


def test_a_model_trained_by_trls_reward_trainer_imports(tiny_model, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = tiny_model("bert")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    pairs = synthetic_pairs(16)
    rows = [{"chosen": f"Human: {p['prompt']}\n\nAssistant: {p['chosen']}", "rejected": f"Human: {p['prompt']}\n\nAssistant: {p['rejected']}"}
            for p in pairs]
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, report_to=[],
                            use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, max_length=128,
                            gradient_checkpointing=False, eos_token=tok.sep_token)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    trl_dir = tmp_path / "trl-rm"
    trainer.save_model(str(trl_dir))
    tok.save_pretrained(trl_dir)
    data = write_jsonl(tmp_path / "val.jsonl", rows[:6])
    from rewardforge.export.hf_import import import_model

    meta = import_model(trl_dir, tmp_path / "imported", template="plain", max_length=128, data=[str(data)])
    assert meta["pooling"] == "pooled" and meta["statistics_from"] == [str(data)] and meta["sequences"] == 12
    scorer = rewardforge.load(tmp_path / "imported", device="cpu")
    np.testing.assert_allclose(scorer.score_texts(TEXTS), _hf_logits(trl_dir, TEXTS), atol=1e-4)


def test_what_is_not_a_model_directory_says_what_to_run(random_hf_rm, tmp_path):
    with pytest.raises(ModelError, match=r"is a Hugging Face reward model, not yet a rewardforge one; import it: rewardforge import"):
        rewardforge.load(random_hf_rm, device="cpu")
    ckpt = tmp_path / "run" / "checkpoints" / "step-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "config.yaml").write_text("{}")
    with pytest.raises(ModelError, match=r"is a training checkpoint, not a model directory; export it first: rewardforge export"):
        rewardforge.load(ckpt, device="cpu")
    (tmp_path / "run" / "config.yaml").write_text("{}")
    with pytest.raises(ModelError, match=r"is a training run without an export"):
        rewardforge.load(tmp_path / "run", device="cpu")
    with pytest.raises(ModelError, match=r"does not exist"):
        rewardforge.load(tmp_path / "nothing", device="cpu")
    from rewardforge.export.hf_import import import_model

    out = tmp_path / "imp"
    import_model(random_hf_rm, out)
    with pytest.raises(ModelError, match=r"already a rewardforge model directory"):
        import_model(out, tmp_path / "again")


def test_a_run_directory_resolves_to_its_export(random_hf_rm, tmp_path):
    from rewardforge.export.hf_import import import_model

    import_model(random_hf_rm, tmp_path / "run" / "model")
    assert rewardforge.load(tmp_path / "run", device="cpu").meta["imported_from"] == str(random_hf_rm)
