#!/usr/bin/env python
"""A ~0.5B-parameter decoder reward model trained in bf16 with FSDP over the visible GPUs.

Part of ``bench/gpu_check.sh``. The backbone is Qwen2-0.5B's architecture (hidden 896, 24 layers,
14 heads, 2 KV heads, MLP 4864, vocabulary 151,936) built from a transformers config with random
weights, and a word-level tokenizer built in code: nothing is downloaded. Synthetic pairs longer
than ``--max-length`` are truncated to exactly that many tokens, so every step computes the same
tokens. Training goes through rewardforge's own ``setup()`` + ``train()`` (``train.strategy=fsdp``,
``train.precision=bf16_master``: FSDP2 with bf16 compute over fp32 shards), one process per GPU:

    python bench/gpu_train.py --prepare DIR                     # writes the backbone, tokenizer and data
    torchrun --standalone --nproc_per_node=N bench/gpu_train.py --workdir DIR

It prints pairs/s (after ``--warmup`` steps, from metrics.jsonl's ``elapsed_s``), MFU against the
device's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`; another device prints its name and 'unknown
peak') and the peak GPU memory of the busiest process next to rewardforge's estimate.

Model FLOPs per sequence of L tokens (as bench/train_vs_trl.py): forward ``2*N*L + 4*layers*d*L^2``
(N = the weights of the blocks' linear layers; attention counted in full, not halved for the causal
mask), training 3x forward; embeddings and the 1-output head are left out.

``--device cpu --tiny`` runs the same code on a 2-layer model on CPU in seconds (the check that keeps
this script working where there is no GPU; ``tests/test_gpu.py`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, by a name fragment
# of torch.cuda.get_device_name(); the first match wins, so the specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("H200", 989.0),   # SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=True)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name (``None``: not in the table).

    >>> bf16_peak_tflops("NVIDIA H100 80GB HBM3"), bf16_peak_tflops("NVIDIA A100-SXM4-80GB"), bf16_peak_tflops("Tesla T4")
    (989.0, 312.0, None)
    """
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def training_flops_per_sequence(linear_weights: int, layers: int, hidden: int, length: int) -> float:
    """Model FLOPs of one training pass (forward + backward) of one sequence of ``length`` tokens.

    >>> training_flops_per_sequence(100, 1, 10, 4)   # 3 * (2*100*4 + 4*1*10*16)
    4320.0
    """
    return 3.0 * (2.0 * linear_weights * length + 4.0 * layers * hidden * length**2)


def prepare(workdir: Path, tiny: bool, pairs: int, max_length: int, seed: int = 0) -> None:
    """Write the random backbone, its tokenizer and ``pairs`` synthetic pairs under ``workdir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModel, PreTrainedTokenizerFast, Qwen2Config

    workdir.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE without merges: one token per byte, so a text of n letters is n tokens (and Qwen2's own
    # tokenizer class, which transformers picks for this directory, reads it the same way).
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet + specials)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    cfg = Qwen2Config(**(TINY if tiny else QWEN2_05B))
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    with torch.device(device):  # random init of 0.5B weights: seconds on a GPU, a minute on CPU
        model = AutoModel.from_config(cfg, dtype=torch.bfloat16)  # stored in bf16; rewardforge loads it in fp32
    model.save_pretrained(workdir / "backbone", safe_serialization=True)
    fast.save_pretrained(workdir / "backbone")
    rng = random.Random(seed)

    def words(n: int) -> str:  # n tokens
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))

    with open(workdir / "pairs.jsonl", "w") as fh:  # prompts longer than max_length: every sequence is cut to it
        for _ in range(pairs):
            fh.write(json.dumps({"prompt": words(max_length), "chosen": words(max_length // 4), "rejected": words(max_length // 4)}) + "\n")


def linear_weights_per_block(model) -> tuple[int, int, int]:
    """(weights of the blocks' linear layers, layers, hidden size) of the backbone, counted before sharding."""
    import torch

    hf = model.hf
    layers = hf.config.num_hidden_layers
    blocks = [m for m in hf.modules() if type(m).__name__.endswith("DecoderLayer")]
    n = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    return n, layers, hf.config.hidden_size


def train_and_report(args) -> dict:
    import numpy as np
    import torch

    from rewardforge.config import load_config
    from rewardforge.memory import peak_rss_mb
    from rewardforge.train import estimate_memory, setup, train

    workdir = Path(args.workdir)
    out = workdir / "run"
    overrides = [
        f"model.name_or_path={workdir / 'backbone'}", f"data.train=[{workdir / 'pairs.jsonl'}]", "data.validation_fraction=0.05",
        f"data.max_length={args.max_length}", "data.cache_dir=none", f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.steps}", "train.log_steps=1", "train.learning_rate=1e-5", "train.precision=bf16_master",
        "train.strategy=fsdp", "train.seed=0", f"output_dir={out}", *args.override,
    ]
    cfg = load_config(None, overrides)
    run = setup(cfg)
    acc = run.accelerator
    if acc.is_main_process:
        print(f"strategy {run.strategy} on {acc.num_processes} process(es), device {acc.device}, precision "
              f"{run.cfg.train.precision}", flush=True)
    # Counted on a fresh model on the meta device: an FSDP model's parameters are shards.
    from rewardforge.models import empty_weights

    with empty_weights():
        whole = run.spec.build_model(cfg, run.tokenizer)
    n_linear, layers, hidden = linear_weights_per_block(whole)
    n_params = sum(p.numel() for p in whole.parameters())
    estimate = estimate_memory(whole, run.cfg, args.max_length, shards=acc.num_processes if run.strategy == "fsdp" else 1)
    del whole
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train(run, progress=False)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), device=acc.device)
    if acc.num_processes > 1 and cuda:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    result: dict = {}
    if acc.is_main_process:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = {r["step"]: r for r in records if r.get("split") == "train" and "elapsed_s" in r}
        last = max(steps)
        w = min(args.warmup, last - 1)  # timed from the end of step w (from the start when w is 0)
        t0, n0 = (steps[w]["elapsed_s"], steps[w]["examples_seen"]) if w in steps else (0.0, 0)
        seconds, pairs = steps[last]["elapsed_s"] - t0, steps[last]["examples_seen"] - n0
        # FLOPs of the sequences as tokenized (prepare() makes every one max_length long)
        seq_lengths = [len(s) for s in (*run.train_data.chosen, *run.train_data.rejected)]
        mean_flops = float(np.mean([training_flops_per_sequence(n_linear, layers, hidden, n) for n in seq_lengths]))
        flops_per_s = 2 * pairs * mean_flops / seconds  # two sequences per pair
        name = torch.cuda.get_device_name(acc.device) if cuda else "cpu"
        peak_tflops = bf16_peak_tflops(name) if cuda else None
        per_device = flops_per_s / acc.num_processes
        result = {"device": name, "processes": acc.num_processes, "parameters": n_params, "steps_timed": f"{w + 1}-{last}",
                  "pairs_per_s": pairs / seconds, "tflops_per_device": per_device / 1e12,
                  "mfu": per_device / (peak_tflops * 1e12) if peak_tflops else None, "peak_bf16_tflops": peak_tflops,
                  "peak_memory_gib": float(peak), "estimated_memory_gib": estimate["total_gib"],
                  "final_loss": steps[last].get("loss"), "max_length": args.max_length,
                  "tokens_per_sequence": float(np.mean(seq_lengths)),
                  "pairs_per_step": args.batch_size * acc.num_processes}
        mfu = f"{100 * result['mfu']:.1f}% of {peak_tflops:.0f} TFLOP/s" if peak_tflops else f"unknown peak ({name})"
        mem = f"{result['peak_memory_gib']:.1f} GiB" if cuda else f"(cpu: peak RSS {peak_rss_mb() / 1024:.1f} GiB)"
        print(f"{n_params / 1e6:.1f}M parameters, {acc.num_processes} x {name}, {result['pairs_per_step']} pairs of "
              f"2 x {result['tokens_per_sequence']:.0f} tokens per step, steps {w + 1}-{last} timed:")
        print(f"  pairs/s {result['pairs_per_s']:.1f} | {result['tflops_per_device']:.3g} TFLOP/s per device | MFU {mfu} | "
              f"peak memory {mem} per process (rewardforge's estimate {estimate['total_gib']:.2f} GiB) | "
              f"loss at the end {result['final_loss']:.4f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="", help="where the backbone, data and run go (default: a temporary directory)")
    p.add_argument("--prepare", action="store_true", help="only write the backbone, tokenizer and data into --workdir")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu hides the GPUs (with --tiny: a smoke test)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 0.5B one")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per process per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--pairs", type=int, default=0, help="synthetic pairs to write (default: enough for the steps on 8 GPUs)")
    p.add_argument("--override", action="append", default=[], help="extra key=value for the training config")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for GPUs
    elif not args.prepare:
        import torch

        if not torch.cuda.is_available():
            print("bench/gpu_train.py: no CUDA GPU is visible (torch.cuda.is_available() is false); run it on a GPU "
                  "machine, or with --device cpu --tiny for the CPU smoke test", file=sys.stderr)
            return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rf-gpu-") as tmp:
        if not args.workdir:
            args.workdir = tmp
        workdir = Path(args.workdir)
        pairs = args.pairs or args.batch_size * 8 * (args.steps + 1) + 64
        if args.prepare or not (workdir / "pairs.jsonl").is_file():
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                print(f"bench/gpu_train.py: {workdir} has no prepared data; run with --prepare first (one process)", file=sys.stderr)
                return 2
            prepare(workdir, args.tiny, pairs, args.max_length)
            if args.prepare:
                return 0
        train_and_report(args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
