"""Several processes on CPU (gloo) through torchrun: the global batch is split, not repeated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_pairs, write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")


def _train(nproc: int, args: list[str], cwd: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if launcher == "accelerate":  # --multi_gpu selects accelerate's torch-elastic launcher; without GPUs it runs gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", "rewardforge", "train", *args, "--quiet"]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "rewardforge", "train", *args, "--quiet"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "rewardforge", "train", *args, "--quiet"]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(75))  # 75 pairs: the epoch ends on a ragged global batch
    val = write_jsonl(root / "val.jsonl", synthetic_pairs(21, seed=1))  # 21: processes get unequal validation batches
    common = [f"model.name_or_path={tiny_model('llama')}", f"data.train=[{data}]", f"data.validation=[{val}]",
              "train.learning_rate=1e-3", "train.precision=fp32",  # one vs two processes compared at 1e-5
              "data.cache_dir=none", "train.epochs=1", "train.log_steps=1", "train.save_steps=4", "train.save_total_limit=0"]
    _train(1, common + ["train.batch_size=8", f"output_dir={root / 'one'}"], root)
    two = _train(2, common + ["train.batch_size=4", f"output_dir={root / 'two'}"], root)
    return root, common, two


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    root, _, _ = runs
    a, b = load_file(root / "one/model/model.safetensors"), load_file(root / "two/model/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    sa, sb = (json.loads((root / d / "summary.json").read_text()) for d in ("one", "two"))
    assert sa["steps"] == sb["steps"] and sa["examples_seen"] == sb["examples_seen"] == sa["data"]["train_examples"]
    assert sa["final_validation"]["pairs"] == sb["final_validation"]["pairs"]  # no padding duplicates counted
    assert sa["final_validation"]["accuracy"] == sb["final_validation"]["accuracy"]
    assert sb["final_validation"]["loss"] == pytest.approx(sa["final_validation"]["loss"], abs=1e-5)
    la = [r["loss"] for r in map(json.loads, (root / "one/metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    lb = [r["loss"] for r in map(json.loads, (root / "two/metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert lb == pytest.approx(la, abs=1e-5)


def test_only_rank_zero_writes_and_the_checkpoint_holds_every_rng_stream(runs):
    root, _, two = runs
    assert two.stdout.count('"final_validation"') == 1  # one summary printed, by rank 0
    lines = (root / "two/metrics.jsonl").read_text().splitlines()
    steps = [json.loads(l)["step"] for l in lines if json.loads(l)["split"] == "train"]
    assert steps == sorted(set(steps))  # not written twice
    ckpt = root / "two/checkpoints/step-4"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2


def test_a_two_process_checkpoint_resumes_with_one_process(runs):
    root, common, _ = runs
    (root / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(root / "two/checkpoints/step-4", root / "resumed/checkpoints/step-4")
    out = _train(1, common + ["train.batch_size=8", f"output_dir={root / 'resumed'}", "train.resume_from=auto"], root)
    assert "resuming a 2-process checkpoint with 1 processes" in out.stdout
    s = json.loads((root / "resumed/summary.json").read_text())
    one = json.loads((root / "one/summary.json").read_text())
    assert s["resumed_from"].endswith("step-4") and s["steps"] == one["steps"]
    # same global batch (8) either way, so the resumed run ends where the 1-process run ended
    a, b = load_file(root / "one/model/model.safetensors"), load_file(root / "resumed/model/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_accelerate_launch_runs_the_same_training_as_torchrun(runs):
    root, common, _ = runs
    out = _train(2, common + ["train.batch_size=4", f"output_dir={root / 'accel'}"], root, launcher="accelerate")
    assert "strategy: ddp on 2 process(es)" in out.stdout
    _assert_same_weights(root / "two/model", root / "accel/model")


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def fsdp_run(runs):
    root, common, _ = runs
    out = _train(2, common + ["train.batch_size=4", "train.strategy=fsdp", f"output_dir={root / 'fsdp'}"], root)
    return root, common, out


def test_fsdp_two_processes_train_like_one_process_and_export_a_plain_model(fsdp_run):
    root, _, out = fsdp_run
    assert "strategy: fsdp on 2 process(es)" in out.stdout
    _assert_same_weights(root / "one/model", root / "fsdp/model")
    sa, sf = (json.loads((root / d / "summary.json").read_text()) for d in ("one", "fsdp"))
    assert sf["steps"] == sa["steps"] and sf["examples_seen"] == sa["examples_seen"]
    assert sf["final_validation"]["pairs"] == sa["final_validation"]["pairs"] == 21  # repeated batches not counted
    assert sf["final_validation"]["accuracy"] == sa["final_validation"]["accuracy"]
    assert sf["final_validation"]["loss"] == pytest.approx(sa["final_validation"]["loss"], abs=1e-5)
    assert sf["memory_estimate"]["shards"] == 2
    assert sf["memory_estimate"]["grads_and_optimizer_gib"] == pytest.approx(sa["memory_estimate"]["grads_and_optimizer_gib"] / 2)
    # The export loads in one plain process and scores the validation pairs as the live sharded model did.
    import rewardforge

    rows = [json.loads(l) for l in (root / "val.jsonl").read_text().splitlines()]
    scorer = rewardforge.load(root / "fsdp/model", device="cpu")
    c, r = scorer.score_pairs([x["prompt"] for x in rows], [x["chosen"] for x in rows], [x["rejected"] for x in rows])
    assert float((c > r).mean()) == pytest.approx(sf["final_validation"]["accuracy"])
    assert float(np.concatenate([c, r]).mean()) == pytest.approx(sf["export"]["reward_mean"], abs=1e-4)


def test_an_fsdp_checkpoint_resumes_with_fsdp_and_with_one_process(fsdp_run):
    root, common, _ = fsdp_run
    ckpt = root / "fsdp/checkpoints/step-4"
    assert json.loads((ckpt / "trainer_state.json").read_text())["strategy"] == "fsdp"
    assert sorted(p.name for p in (ckpt / "model_and_optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for name, nproc, extra in (("fsdp_resumed", 2, ["train.batch_size=4", "train.strategy=fsdp"]),
                               ("fsdp_to_one", 1, ["train.batch_size=8"])):
        (root / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(ckpt, root / name / "checkpoints/step-4")
        _train(nproc, common + extra + [f"output_dir={root / name}", "train.resume_from=auto"], root)
        s = json.loads((root / name / "summary.json").read_text())
        assert s["resumed_from"].endswith("step-4")
        _assert_same_weights(root / "fsdp/model", root / name / "model")


def test_a_ddp_checkpoint_resumes_under_fsdp(runs):
    root, common, _ = runs
    (root / "ddp_to_fsdp/checkpoints").mkdir(parents=True)
    shutil.copytree(root / "two/checkpoints/step-4", root / "ddp_to_fsdp/checkpoints/step-4")
    _train(2, common + ["train.batch_size=4", "train.strategy=fsdp", f"output_dir={root / 'ddp_to_fsdp'}",
                        "train.resume_from=auto"], root)
    _assert_same_weights(root / "two/model", root / "ddp_to_fsdp/model")


def test_lora_under_ddp_trains_the_head_and_the_export_keeps_it(runs, tiny_model):
    from rewardforge.export.model_dir import load_reward_model

    root, common, _ = runs
    out = root / "lora"
    _train(2, common + ["train.batch_size=4", "model.lora_r=4", "model.lora_alpha=8", "model.lora_dropout=0.0",
                        f"output_dir={out}"], root)
    exported = load_file(out / "model/model.safetensors")
    assert not any("lora" in k for k in exported)  # adapters merged into the plain weights
    head = exported["score.weight"]
    # The head starts from the seeded init of a fresh run; training moved it and the export kept it.
    from rewardforge.config import load_config
    from rewardforge.registry import get_reward_model_spec
    from rewardforge.models.reward_model import load_tokenizer
    from accelerate.utils import set_seed

    cfg = load_config(None, [f"model.name_or_path={tiny_model('llama')}", "model.lora_r=4"])
    set_seed(cfg.train.seed)
    fresh = get_reward_model_spec("binary_ranking").build_model(cfg, load_tokenizer(cfg.model.name_or_path))
    init = fresh.head().modules_to_save["default"].weight.detach()
    assert not torch.allclose(head, init, atol=1e-4)
    model, _, _ = load_reward_model(out / "model")
    torch.testing.assert_close(model.head().weight, head)
    base = load_file(root / "one/model/model.safetensors")
    moved = [k for k in exported if "layers" in k and "proj" in k and not torch.equal(exported[k], base[k])]
    assert moved  # the merged LoRA deltas changed the adapted projections


def test_estimate_memory_sizes_a_config_without_loading_weights(tiny_model):
    import subprocess

    from rewardforge.config import load_config
    from rewardforge.models.reward_model import load_tokenizer
    from rewardforge.registry import get_reward_model_spec
    from rewardforge.train import estimate_for_config

    overrides = [f"model.name_or_path={tiny_model('llama')}", "train.strategy=fsdp"]
    cfg = load_config(None, overrides)
    real = get_reward_model_spec("binary_ranking").build_model(cfg, load_tokenizer(cfg.model.name_or_path))
    one, eight = estimate_for_config(cfg, 1), estimate_for_config(cfg, 8)
    assert one["parameters"] == eight["parameters"] == sum(p.numel() for p in real.parameters())
    assert one["shards"] == 1 and eight["shards"] == 8
    assert eight["grads_and_optimizer_gib"] == pytest.approx(one["grads_and_optimizer_gib"] / 8)
    assert eight["total_gib"] < one["total_gib"]
    out = subprocess.run([sys.executable, "-m", "rewardforge", "train", *overrides, "--estimate-memory", "--processes", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GiB per process (4 process(es), strategy fsdp" in out.stdout


def test_strategy_resolution_and_deepspeed_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rewardforge.config import ConfigError, load_config
    from rewardforge.training.distributed import resolve_strategy

    def acc(kind, n):
        return SimpleNamespace(distributed_type=kind, num_processes=n)

    auto, fsdp = load_config(None, []), load_config(None, ["train.strategy=fsdp"])
    assert resolve_strategy(auto, acc(DistributedType.NO, 1)) == "single"
    assert resolve_strategy(fsdp, acc(DistributedType.NO, 1)) == "single"
    assert resolve_strategy(auto, acc(DistributedType.MULTI_CPU, 2)) == "ddp"
    assert resolve_strategy(fsdp, acc(DistributedType.MULTI_CPU, 2)) == "fsdp"
    assert resolve_strategy(auto, acc(DistributedType.FSDP, 2)) == "fsdp"  # accelerate launch --use_fsdp
    with pytest.raises(ConfigError, match="DeepSpeed.*train.strategy=fsdp"):
        resolve_strategy(auto, acc(DistributedType.DEEPSPEED, 2))
    with pytest.raises(ConfigError, match="train.strategy='zero3' is not valid"):
        load_config(None, ["train.strategy=zero3"])


def test_fsdp_bf16_master_trains_like_one_process_bf16_master(runs):
    """FSDP's mixed-precision policy is the sharded form of the one-process bf16_master scheme."""
    root, common, _ = runs
    bf16 = common + ["train.precision=bf16_master", "train.save_steps=0"]
    _train(1, bf16 + ["train.batch_size=8", f"output_dir={root / 'o2_one'}"], root)
    _train(2, bf16 + ["train.batch_size=4", "train.strategy=fsdp", f"output_dir={root / 'o2_fsdp'}"], root)
    src = common[0].split("=", 1)[1]
    init = {"model." + k: v for k, v in load_file(Path(src) / "model.safetensors").items()}  # the backbone before training
    fp32, one, fsdp = (load_file(root / d / "model/model.safetensors") for d in ("one", "o2_one", "o2_fsdp"))
    assert one.keys() == fsdp.keys()
    assert {v.dtype for v in fsdp.values()} == {torch.float32}  # the masters, not the bf16 copies
    keys = sorted(k for k in init if init[k].shape == one[k].shape)  # (the embedding grew a pad row)
    moved = torch.cat([(one[k] - init[k]).flatten() for k in keys]).norm()
    apart = torch.cat([(fsdp[k] - one[k]).flatten() for k in keys]).norm()
    bf16_vs_fp32 = torch.cat([(one[k] - fp32[k]).flatten() for k in keys]).norm()
    # One batch of 8 and two of 4 round differently in bf16: the two runs are as far apart as
    # bf16 is from fp32, a small part of what training moved.
    assert apart < 0.2 * moved and apart < 1.5 * bf16_vs_fp32, (apart.item(), moved.item(), bf16_vs_fp32.item())
    sa, sf = (json.loads((root / d / "summary.json").read_text()) for d in ("o2_one", "o2_fsdp"))
    assert sf["steps"] == sa["steps"]
    assert abs(sf["final_validation"]["accuracy"] - sa["final_validation"]["accuracy"]) <= 2 / 21


def test_listwise_two_processes_match_one_process_with_the_same_global_batch(tiny_model, tmp_path):
    """Lists under DDP: a global batch of 4 lists split 2 + 2 trains as one process with 4 (the loss of a
    list needs all its K responses on one process: lists, not responses, are what is split)."""
    from rewardforge.data.synthetic import generate_lists

    data = write_jsonl(tmp_path / "lists.jsonl", generate_lists(22, k=4))  # 22 lists: the epoch ends ragged (4+4+...+2)
    val = write_jsonl(tmp_path / "val.jsonl", generate_lists(7, seed=5, k=3))
    common = [f"model.name_or_path={tiny_model('llama')}", "model.reward_model_type=listwise", f"data.train=[{data}]",
              f"data.validation=[{val}]", "train.learning_rate=1e-3", "train.precision=fp32", "data.cache_dir=none",
              "train.epochs=1", "train.log_steps=1"]
    _train(1, common + ["train.batch_size=4", f"output_dir={tmp_path / 'one'}"], tmp_path)
    _train(2, common + ["train.batch_size=2", f"output_dir={tmp_path / 'two'}"], tmp_path)
    a, b = load_file(tmp_path / "one/model/model.safetensors"), load_file(tmp_path / "two/model/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert sa["steps"] == sb["steps"] == 6 and sa["examples_seen"] == sb["examples_seen"] == 22
    fa, fb = sa["final_validation"], sb["final_validation"]
    assert (fa["lists"], fa["pairs"], fa["accuracy"]) == (fb["lists"], fb["pairs"], fb["accuracy"]) and fa["lists"] == 7
    assert fb["ndcg"] == pytest.approx(fa["ndcg"], abs=1e-6)
