"""GPU readiness: the tests marked ``gpu`` (``bench/gpu_check.sh`` runs them on a CUDA machine; elsewhere they
skip with the reason), and the CPU checks that keep ``bench/gpu_check.sh`` and ``bench/gpu_train.py`` working
where no GPU is (bash syntax, the peak table and FLOP formula, the training script's CPU mode end to end)."""

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

from conftest import synthetic_pairs, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_train  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is "
                                "false here); bench/gpu_check.sh runs these on a GPU machine")
gpu = [pytest.mark.gpu, needs_cuda]


def _args(model_dir: Path, tmp: Path, out: Path, *extra: str) -> list[str]:
    data = write_jsonl(tmp / "pairs.jsonl", synthetic_pairs(64))
    val = write_jsonl(tmp / "val.jsonl", synthetic_pairs(32, seed=3))
    return [f"model.name_or_path={model_dir}", f"data.train=[{data}]", f"data.validation=[{val}]", "data.cache_dir=none",
            "train.batch_size=8", "train.learning_rate=1e-3", "train.max_steps=4", f"output_dir={out}", *extra]


def _val_items(tmp: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (tmp / "val.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.parametrize("precision", ["bf16", "bf16_master"])
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.gpu
@needs_cuda
def test_training_on_cuda_in_bf16_gives_the_rewards_of_cpu_fp32_training(kind, precision, tiny_model, tmp_path):
    import rewardforge
    from rewardforge.config import load_config
    from rewardforge.train import run_training

    model_dir = tiny_model(kind)
    cpu_args = _args(model_dir, tmp_path, tmp_path / "cpu", "train.precision=fp32")
    # The CPU reference in its own process: accelerate puts a run on the GPU whenever one is visible.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "rewardforge", "train", *cpu_args, "--quiet"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.cuda.reset_peak_memory_stats()
    gpu_args = [a.replace(str(tmp_path / "cpu"), str(tmp_path / "gpu")) for a in cpu_args[:-1]] + [f"train.precision={precision}"]
    run_training(load_config(None, gpu_args), progress=False)
    assert torch.cuda.max_memory_allocated() > 0, "the run did not use the GPU"
    config = (tmp_path / "gpu" / "config.yaml").read_text()
    assert f"precision: {precision}" in config
    prompts, responses = _val_items(tmp_path)
    r_cpu = rewardforge.load(tmp_path / "cpu" / "model", device="cpu").score(prompts, responses)
    r_gpu = rewardforge.load(tmp_path / "gpu" / "model", device="cpu").score(prompts, responses)
    # 4 steps at lr 1e-3 in bf16 against fp32: the same model to bf16's rounding of the updates. On CPU these
    # tiny decoders differ from fp32 by at most 3.6% of the rewards' spread (qwen2 bf16_master; bf16: 1.4%,
    # llama 0.1-0.2%), correlation > 0.99999; a wrong device, dtype or gradient path is far off.
    spread = float(np.std(r_cpu))
    assert np.max(np.abs(r_gpu - r_cpu)) <= 0.15 * spread, (r_cpu[:6], r_gpu[:6])
    assert np.corrcoef(r_cpu, r_gpu)[0, 1] > 0.999


@pytest.mark.gpu
@needs_cuda
def test_export_loads_and_scores_on_cuda_as_on_cpu(tiny_model, tmp_path):
    import rewardforge
    from rewardforge.config import load_config
    from rewardforge.train import run_training

    args = _args(tiny_model("llama"), tmp_path, tmp_path / "run", "train.precision=bf16")
    run_training(load_config(None, args), progress=False)
    prompts, responses = _val_items(tmp_path)
    on_gpu = rewardforge.load(tmp_path / "run", device="cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    r_gpu = on_gpu.score(prompts, responses)
    r_cpu = rewardforge.load(tmp_path / "run", device="cpu").score(prompts, responses)
    np.testing.assert_allclose(r_gpu, r_cpu, atol=1e-4, rtol=1e-4)  # fp32 on both: kernels' rounding only
    # bf16 on the GPU, as `rewardforge serve --dtype bf16` would score
    r_bf16 = rewardforge.load(tmp_path / "run", device="cuda", dtype=torch.bfloat16).score(prompts, responses)
    assert np.max(np.abs(r_bf16 - r_cpu)) <= 0.05 * (float(np.std(r_cpu)) + 1e-6) + 1e-2


@pytest.mark.gpu
@needs_cuda
def test_the_gpu_training_bench_runs_a_small_model(tmp_path):
    """bench/gpu_train.py's GPU path (one process, bf16_master, the device's peak and CUDA memory stats) on a tiny model."""
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--tiny", "--steps", "6", "--warmup", "2",
                           "--batch-size", "4", "--max-length", "64", "--workdir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == torch.cuda.get_device_name(0) and r["peak_memory_gib"] > 0 and r["pairs_per_s"] > 0


# ---------------------------------------------------------------------------- everywhere (CPU)


def test_the_gpu_marker_is_registered(request):
    assert any(line.startswith("gpu:") for line in request.config.getini("markers"))


def test_gpu_check_script_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    done = subprocess.run([bash, "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    done = subprocess.run([bash, str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA GPU is visible" in done.stderr


def test_bf16_peaks_by_device_name():
    assert gpu_train.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_train.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_train.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM figure
    assert gpu_train.bf16_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert gpu_train.bf16_peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_train.bf16_peak_tflops("Tesla T4") is None


def test_training_flops_per_sequence_by_hand():
    # 3 x (2 * N * L + 4 * layers * d * L^2) with N=1000, L=8, one layer of width 16
    assert gpu_train.training_flops_per_sequence(1000, 1, 16, 8) == 3 * (2 * 1000 * 8 + 4 * 16 * 64)
    # Qwen2-0.5B's blocks: 24 x (q, k, v, o, gate, up, down) linear weights
    per_block = 896 * 896 + 2 * 896 * 128 + 896 * 896 + 3 * 896 * 4864
    assert per_block * 24 == 357_826_560


def test_the_gpu_training_bench_runs_on_cpu_with_fsdp_over_two_processes(tmp_path):
    """The commands bench/gpu_check.sh runs (--prepare, then torchrun), in their CPU mode: FSDP over two gloo
    processes, a 2-layer Qwen2, through rewardforge's setup() and train()."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch built without gloo")
    common = ["--device", "cpu", "--tiny", "--workdir", str(tmp_path), "--steps", "4", "--warmup", "1", "--batch-size", "2",
              "--max-length", "48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = str(ROOT / "bench" / "gpu_train.py")
    prep = subprocess.run([sys.executable, script, "--prepare", *common], env=env, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr[-3000:]
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                           *common, "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["processes"] == 2 and r["pairs_per_step"] == 4 and r["steps_timed"] == "2-4"
    assert r["pairs_per_s"] > 0 and r["mfu"] is None and r["device"] == "cpu"
    assert 0 < r["final_loss"] < 5
    assert r["tokens_per_sequence"] == 48  # every sequence cut to max_length: the FLOP count's length
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3, 4]
    assert "strategy fsdp on 2 process(es)" in done.stdout
