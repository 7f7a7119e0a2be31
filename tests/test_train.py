"""End to end: train -> checkpoint -> resume -> export -> reload, for both built-in types."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rewardforge
from conftest import rated_rows, synthetic_pairs, train_and_resume, write_jsonl
from rewardforge.cli import main as cli_main
from rewardforge.config import ConfigError, load_config
from rewardforge.train import run_training


def _base(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", f"data.train=[{data}]", "train.batch_size=8", "train.learning_rate=1e-3",
        "data.cache_dir=none", f"output_dir={out}", *extra,
    ]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(160))


@pytest.fixture(scope="module")
def resume_runs(tiny_model, pairs_file, tmp_path_factory):
    """An uninterrupted 8-step run and one resumed from its step-4 checkpoint (dropout on, so RNG matters)."""
    root = tmp_path_factory.mktemp("resume")
    args = _base(tiny_model("llama"), pairs_file, root / "a", "train.max_steps=8", "train.save_steps=4",
                 "model.dropout=0.1", "train.save_total_limit=0", "train.log_steps=2", "train.eval_steps=4")
    full, resumed = train_and_resume(root, args, step=4)
    return root, full, resumed


def test_resume_gives_the_same_weights_and_metrics_as_an_uninterrupted_run(resume_runs):
    root, full, resumed = resume_runs
    assert resumed["resumed_from"] == str(root / "b/checkpoints/step-4")
    wa, wb = load_file(root / "a/model/model.safetensors"), load_file(root / "b/model/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise on CPU
    assert full["final_validation"] == resumed["final_validation"]
    assert full["steps"] == resumed["steps"] == 8


def test_checkpoints_metrics_and_summary_files(resume_runs):
    root, full, _ = resume_runs
    ckpts = sorted(p.name for p in (root / "a/checkpoints").iterdir())
    assert ckpts == ["step-4", "step-8"]
    files = {p.name for p in (root / "a/checkpoints/step-4").iterdir()}
    assert {"model_and_optimizer", "scheduler.bin", "random_states_0.pkl", "trainer_state.json", "config.yaml", "tokenizer"} <= files
    state = json.loads((root / "a/checkpoints/step-4/trainer_state.json").read_text())
    assert state["step"] == 4 and state["batch_in_epoch"] == 4
    records = [json.loads(l) for l in (root / "a/metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [2, 4, 6, 8]
    vals = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in vals] == [4, 8] and vals[-1].get("final") is True
    summary = json.loads((root / "a/summary.json").read_text())
    assert summary["data"]["train_examples"] + summary["data"]["validation_examples"] == 160
    assert summary["data"]["train"]["rows_read"] == 160 and summary["data"]["train"]["excluded"] == {}
    assert 0.0 <= summary["final_validation"]["accuracy"] <= 1.0
    assert summary["export"]["path"] == str(root / "a/model")
    # the verdict: the same accuracy with its interval, and the length baseline on the same pairs
    v = summary["validation_verdict"]
    assert v["accuracy"] == summary["final_validation"]["accuracy"] and v["pairs"] == summary["final_validation"]["pairs"]
    assert v["ci95"][0] <= v["accuracy"] <= v["ci95"][1] and 0.0 <= v["length_baseline"]["accuracy"] <= 1.0
    assert summary["next"]["serve"] == f"rewardforge serve {root / 'a/model'} --port 8000"
    (fmt,) = summary["data_formats"].values()  # the detected row format of the one training file
    assert fmt.endswith("(detected)")


def test_pair_verdict_on_hand_computed_numbers():
    from rewardforge.training.validation import pair_verdict

    # 80 of 100 right; the longer side is the chosen one in 50, the rejected in 40, tied in 10 -> 0.55
    chosen, rejected = np.r_[np.ones(80), np.zeros(20)], np.r_[np.zeros(80), np.ones(20)]
    c_tok = np.r_[np.full(50, 20), np.full(40, 10), np.full(10, 15)]
    r_tok = np.r_[np.full(50, 10), np.full(40, 20), np.full(10, 15)]
    v = pair_verdict(chosen, rejected, c_tok, r_tok)
    assert v["accuracy"] == 0.8 and v["length_baseline"]["accuracy"] == 0.55
    lo, hi = v["ci95"]  # Wilson, z = 1.96: 0.7112 .. 0.8666
    assert abs(lo - 0.7112) < 1e-3 and abs(hi - 0.8666) < 1e-3
    assert v["beats_chance"] and v["beats_length_baseline"] and v["verdict"].startswith("better than chance and")
    chance = pair_verdict(np.r_[np.ones(52), np.zeros(48)], np.r_[np.zeros(52), np.ones(48)], c_tok, r_tok)
    assert not chance["beats_chance"] and "not distinguishable from chance" in chance["verdict"]


def test_a_resumed_run_says_what_changed_since_its_checkpoint(resume_runs, tiny_model, pairs_file):
    from rewardforge.train import config_changes

    root, _, _ = resume_runs
    ckpt = root / "a/checkpoints/step-4"
    args = _base(tiny_model("llama"), pairs_file, root / "a", "train.max_steps=12", "train.save_steps=4",
                 "model.dropout=0.1", "train.save_total_limit=0", "train.log_steps=2", "train.eval_steps=4", "train.precision=auto")
    cfg = load_config(None, args + ["train.resume_from=auto"])
    from rewardforge.training.precision import effective_precision

    cfg.train.precision = effective_precision(cfg)  # as setup() resolves it
    assert config_changes(ckpt, cfg) == ["train.max_steps 8 -> 12"]


def test_export_from_checkpoint_matches_the_end_of_run_export(resume_runs, tmp_path):
    root, _, _ = resume_runs
    assert cli_main(["export", str(root / "a/checkpoints/step-8"), str(tmp_path / "exported")]) == 0
    wa, wc = load_file(root / "a/model/model.safetensors"), load_file(tmp_path / "exported/model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wc[k]), k
    meta_a = json.loads((root / "a/model/rewardforge.json").read_text())
    meta_c = json.loads((tmp_path / "exported/rewardforge.json").read_text())
    assert meta_c["reward_mean"] == pytest.approx(meta_a["reward_mean"], abs=1e-6)


def test_precision_auto_is_resolved_on_the_run_and_in_config_yaml_not_in_the_callers_config(tiny_model, pairs_file, tmp_path):
    import yaml

    from rewardforge.training.precision import effective_precision

    cfg = load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=1", "train.precision=auto"))
    run_training(cfg, progress=False, export=False)
    assert cfg.train.precision == "auto"  # the caller's config is untouched
    written = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["train"]["precision"]
    assert written == effective_precision(cfg) and written in ("fp32", "bf16", "bf16_master")


def test_auto_resume_without_checkpoint_starts_fresh(tiny_model, pairs_file, tmp_path):
    s = run_training(load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=2",
                                             "train.resume_from=auto")), progress=False)
    assert s["resumed_from"] is None and s["steps"] == 2


def test_resume_from_a_path_that_is_not_a_checkpoint_is_an_error(tiny_model, pairs_file, tmp_path):
    cfg = load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", f"train.resume_from={tmp_path}"))
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        run_training(cfg, progress=False)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_exported_scorer_reproduces_validation_metrics(kind, tiny_model, pairs_file, tmp_path):
    """The reloaded model scores the validation pairs exactly as the training-time model did (in fp32:
    under the bf16 precisions validation runs in bf16, while the export scores in fp32)."""
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(24, seed=7))
    s = run_training(load_config(None, _base(tiny_model(kind), pairs_file, tmp_path / "o", "train.max_steps=4",
                                             f"data.validation=[{val}]", "train.precision=fp32")), progress=False)
    scorer = rewardforge.load(tmp_path / "o/model", batch_size=5)
    rows = [json.loads(l) for l in val.read_text().splitlines()]
    rc, rr = scorer.score_pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    acc = float(np.mean((rc > rr) + 0.5 * (rc == rr)))
    assert acc == pytest.approx(s["final_validation"]["accuracy"])
    assert float(np.mean(rc - rr)) == pytest.approx(s["final_validation"]["mean_margin"], abs=1e-4)
    meta = json.loads((tmp_path / "o/model/rewardforge.json").read_text())
    all_r = np.concatenate([rc, rr])
    assert meta["reward_mean"] == pytest.approx(float(all_r.mean()), abs=1e-4)
    assert meta["reward_std"] == pytest.approx(float(all_r.std()), abs=1e-4)


def test_regression_train_export_reload(tiny_model, tmp_path):
    from transformers import AutoConfig

    data = write_jsonl(tmp_path / "rated.jsonl", rated_rows(120))
    s = run_training(load_config(None, _base(tiny_model("qwen2"), data, tmp_path / "o", "train.max_steps=30",
                                             "model.reward_model_type=regression", "model.attributes=[helpfulness,safety]",
                                             "model.attribute_weights=[0.7,0.3]", "train.learning_rate=3e-3")), progress=False)
    v = s["final_validation"]
    assert set(v) >= {"helpfulness", "safety", "mse", "mae", "pearson"}
    assert v["helpfulness"]["pearson"] > 0.9  # the labels are a function of the response: learnable
    cfg = AutoConfig.from_pretrained(tmp_path / "o/model")
    assert cfg.num_labels == 2 and cfg.id2label == {0: "helpfulness", 1: "safety"}
    scorer = rewardforge.load(tmp_path / "o/model")
    d = scorer.score_detailed(["What is gravity?"], ["Sure! Here is a clear answer."])
    assert d.outputs.shape == (1, 2)
    assert d.reward[0] == pytest.approx(0.7 * d.outputs[0, 0] + 0.3 * d.outputs[0, 1], abs=1e-5)


def test_regression_model_trained_with_bradley_terry_on_pairs(tiny_model, pairs_file, tmp_path):
    s = run_training(load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=3",
                                             "model.reward_model_type=regression", "model.attributes=[helpfulness,safety]",
                                             "loss.name=scaled_bradley_terry")), progress=False)
    assert s["loss"] == "scaled_bradley_terry" and "accuracy" in s["final_validation"]


def test_bf16_training_runs_on_cpu(tiny_model, pairs_file, tmp_path):
    s = run_training(load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=2",
                                             "train.precision=bf16")), progress=False)
    assert np.isfinite(s["final_validation"]["loss"])


def test_every_trainable_parameter_changes(tiny_model, pairs_file, tmp_path):
    """Training moves every unfrozen weight, head included (TRL's check)."""
    from transformers import AutoModel

    src = tiny_model("qwen2")
    run_training(load_config(None, _base(src, pairs_file, tmp_path / "o", "train.max_steps=3", "train.warmup_ratio=0")), progress=False)
    before = {k: v for k, v in AutoModel.from_pretrained(src).state_dict().items()}
    after = load_file(tmp_path / "o/model/model.safetensors")
    for k, v in before.items():
        assert not torch.equal(v, after["model." + k]), f"{k} did not change"
    assert "score.weight" in after


def test_unwritable_output_dir_fails_before_training(tiny_model, pairs_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config(None, _base(tiny_model("gpt2"), pairs_file, blocker / "out"))
    with pytest.raises(ConfigError, match="is not writable"):
        run_training(cfg, progress=False)


def test_cli_train_reports_bad_config_in_one_line(capsys, tmp_path):
    assert cli_main(["train", "train.batch_sise=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.batch_sise'" in err and "train.batch_size" in err


def test_extra_eval_datasets_are_scored_at_each_validation(tiny_model, pairs_file, tmp_path):
    extra = write_jsonl(tmp_path / "heldout.jsonl", synthetic_pairs(30, seed=11))
    s = run_training(load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=4",
                                             "train.eval_steps=2", f"eval.datasets=[{extra}]")), progress=False)
    records = [json.loads(l) for l in (tmp_path / "o/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    last = evals[-1]
    assert last["eval/heldout/pairs"] == 30 and 0.0 <= last["eval/heldout/accuracy"] <= 1.0
    assert {"eval/heldout/rude/accuracy", "eval/heldout/ece", "eval/heldout/longer_baseline"} <= set(last)
    assert s["final_eval"] == {k: v for k, v in last.items() if k.startswith("eval/")}
    # the scorer built from the live model agrees with the exported one
    scorer = rewardforge.load(tmp_path / "o/model")
    rows = [json.loads(l) for l in extra.read_text().splitlines()]
    rc, rr = scorer.score_pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    assert last["eval/heldout/accuracy"] == pytest.approx(float(np.mean((rc > rr) + 0.5 * (rc == rr))))


def test_lora_export_can_also_save_the_adapter_with_its_trained_head(tiny_model, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import rewardforge
    from rewardforge.models.reward_model import RewardModel

    base_dir = tiny_model("bert")
    cfg = load_config(None, [f"model.name_or_path={base_dir}", f"data.train=[{pairs_file}]", "train.max_steps=4",
                             "model.lora_r=4", "model.lora_save_adapter=true", "train.learning_rate=1e-2",
                             "data.cache_dir=none", f"output_dir={tmp_path}"])
    run_training(cfg, progress=False)
    adapter = tmp_path / "model/adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    peft_model = RewardModel(PeftModel.from_pretrained(base, adapter), "pooled").eval()
    merged = rewardforge.load(tmp_path / "model", device="cpu")
    texts = ["Human: hi\n\nAssistant: hello there", "Human: what is 2+2?\n\nAssistant: 4"]
    enc = merged.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        via_adapter = peft_model(enc["input_ids"], enc["attention_mask"])[:, 0].numpy()
    torch.testing.assert_close(torch.tensor(via_adapter), torch.tensor(merged.score_texts(texts, normalize=False)), atol=1e-5, rtol=0)
    # the adapter carries the trained head: the same weights as the merged export's head
    exported = load_file(tmp_path / "model/model.safetensors")
    torch.testing.assert_close(peft_model.head().modules_to_save["default"].weight.detach(), exported["classifier.weight"])


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 3.0, float("inf")])
def test_clip_gradients_equals_torch_clip_grad_norm(max_norm):
    """Above the limit the gradients are scaled exactly as torch does; within it they are left as they are."""
    from rewardforge.train import clip_gradients

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 0.3
        q.grad = p.grad.clone()
    b[1].grad = None  # a parameter without a gradient is skipped by both
    a[1].grad = None
    expected = torch.nn.utils.clip_grad_norm_(b, max_norm)
    got = clip_gradients(a, max_norm)
    assert got == pytest.approx(float(expected), rel=1e-6)
    assert 0.5 < got < 3.0  # the cases straddle the norm
    for p, q in zip(a, b):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_clip_gradients_reports_a_non_finite_norm():
    from rewardforge.train import clip_gradients

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert math.isnan(clip_gradients([p], 1.0))


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_head_lr_multiplier_scales_only_the_heads_learning_rate_through_the_schedule(tiny_model, pairs_file, tmp_path):
    from rewardforge.train import setup

    run = setup(load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=4",
                                        "train.head_lr_multiplier=10", "train.warmup_ratio=0.5")))
    head = {id(p) for p in run.bare_model().head().parameters()}
    groups = run.optimizer.param_groups
    assert head
    run.scheduler.step()  # step 1 of 2 warmup steps: half of each group's peak
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    body = [lr for i, lr in lr_of.items() if i not in head]
    assert {round(lr_of[i], 12) for i in head} == {round(10 * 1e-3 / 2, 12)}
    assert set(round(lr, 12) for lr in body) == {round(1e-3 / 2, 12)}
    assert len(lr_of) == sum(p.requires_grad for p in run.bare_model().parameters())


def test_head_lr_multiplier_must_be_positive(tiny_model, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="train.head_lr_multiplier must be a finite number > 0, got 0.0"):
        load_config(None, _base(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.head_lr_multiplier=0"))


def test_weight_average_on_hand_computed_numbers():
    """avg <- avg + (1 - d_t)(param - avg), d_t = min(decay, (1 + t) / (10 + t)); swapped in and out exactly."""
    from rewardforge.training.ema import WeightAverage

    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = WeightAverage(lin, decay=0.5)
    avg = 1.0
    for t, w in enumerate([3.0, 5.0, -1.0]):
        with torch.no_grad():
            lin.weight.fill_(w)
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))  # 0.1, 2/11, 0.25: the warm-up, then...
        avg = avg + (1 - d) * (w - avg)
        assert ema.average[0].item() == pytest.approx(avg, abs=1e-6)
    with ema.swapped_in():
        assert lin.weight.item() == pytest.approx(avg, abs=1e-6)
        with ema.swapped_in():  # nested: still the average
            assert lin.weight.item() == pytest.approx(avg, abs=1e-6)
    assert lin.weight.item() == -1.0 and ema.average[0].item() == pytest.approx(avg, abs=1e-6)
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(lin, decay=1.0)


@pytest.fixture(scope="module")
def ema_runs(tiny_model, pairs_file, tmp_path_factory):
    """With train.ema_decay: an uninterrupted 8-step run and one resumed from its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("ema")
    args = _base(tiny_model("llama"), pairs_file, root / "a", "train.max_steps=8", "train.save_steps=4",
                 "train.ema_decay=0.6", "train.save_total_limit=0", "train.eval_steps=4")
    full, resumed = train_and_resume(root, args, step=4)
    return root, full, resumed


def test_ema_is_what_is_validated_and_exported_and_resumes_bitwise(ema_runs, tmp_path):
    from rewardforge.training.distributed import MODEL_STATE_DIR

    root, full, resumed = ema_runs
    avg = load_file(root / "a/checkpoints/step-8/ema.safetensors")
    exported = load_file(root / "a/model/model.safetensors")
    assert int(avg.pop("__updates__")) == 8
    for name, v in avg.items():  # the export holds the average (parameter names: RewardModel's "model." prefix off)
        torch.testing.assert_close(exported[name.removeprefix("model.")], v, rtol=0, atol=0)
    assert any(not torch.equal(exported[n.removeprefix("model.")], v) for n, v in  # ... not the last weights
               _last_weights(root / "a/checkpoints/step-8" / MODEL_STATE_DIR).items() if n.removeprefix("model.") in exported)
    assert full["validated_weights"].startswith("exponential moving average (train.ema_decay=0.6)")
    resumed_avg = load_file(root / "b/checkpoints/step-8/ema.safetensors")
    for name, v in avg.items():
        assert torch.equal(resumed_avg[name], v), name
    assert full["final_validation"] == resumed["final_validation"]
    from rewardforge.train import export_checkpoint

    again = load_file(export_checkpoint(root / "a/checkpoints/step-8", tmp_path / "again") / "model.safetensors")
    for name, v in exported.items():  # exporting the checkpoint exports its average too
        assert torch.equal(again[name], v), name


def _last_weights(state_dir: Path) -> dict[str, torch.Tensor]:
    """The trained (not averaged) weights of a checkpoint's torch.distributed.checkpoint state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(state_dir), str(state_dir.parent / "flat.pt"))
    state = torch.load(state_dir.parent / "flat.pt", weights_only=False)
    model = state.get("model", state)
    return {k: v for k, v in model.items() if torch.is_tensor(v)}


def test_ema_resume_of_a_checkpoint_without_averages_names_the_fix(resume_runs, tiny_model, pairs_file, tmp_path):
    root, _, _ = resume_runs
    (tmp_path / "o" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "a/checkpoints/step-4", tmp_path / "o/checkpoints/step-4")
    args = _base(tiny_model("llama"), pairs_file, tmp_path / "o", "train.max_steps=8", "train.ema_decay=0.6",
                 "train.resume_from=auto")
    with pytest.raises(Exception, match="has no ema.safetensors: it was trained without train.ema_decay; resume it with train.ema_decay=0"):
        run_training(load_config(None, args), progress=False)
    with pytest.raises(ConfigError, match=r"train.ema_decay must be in \[0, 1\)"):
        load_config(None, _base(tiny_model("llama"), pairs_file, tmp_path / "p", "train.ema_decay=1"))
