#!/usr/bin/env python
"""train.share_prompt benchmark: a training step (forward, backward, AdamW) plain vs packed, interleaved.

On ``--pairs`` HH-RLHF pairs (helpful-base test file by default) with bench/train_vs_trl.py's
tiny-qwen2 backbone (random 6 x 384 Qwen2, BPE tokenizer trained on the texts), batches of
``--batch-size`` pairs grouped by length as the trainer does. Every batch is run both ways, one
after the other (order alternating), so machine load hits both alike. Reports tokens computed (real
and with padding), the time per step of each and the ratio, and the largest reward difference of
the two paths on the first batch. Usage (project root): ``python bench/share_prompt.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent.parent / "shared/data/hh_rlhf/helpful-base.test.jsonl.gz"))
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from train_vs_trl import build_tiny_decoder

    from rewardforge.config import ModelConfig
    from rewardforge.data.batching import BatchSampler, PairCollator
    from rewardforge.data.datasets import build_dataset
    from rewardforge.data.template import setup_template
    from rewardforge.losses import bradley_terry_loss
    from rewardforge.models.reward_model import build_model, load_tokenizer
    from rewardforge.data.packing import PackedPairCollator, model_kwargs

    with gzip.open(args.data, "rt") as fh:
        rows = [json.loads(line) for _, line in zip(range(args.pairs), fh)]
    tmp = Path(tempfile.mkdtemp(prefix="share-prompt-"))
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = build_tiny_decoder("tiny-qwen2", tmp / "model", [t for r in rows for t in (r["chosen"], r["rejected"])])
    tok = load_tokenizer(str(model_dir))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig(name_or_path=str(model_dir)), tok, 1)
    setup_template(tok, "auto")
    ds, _ = build_dataset([str(tmp / "pairs.jsonl")], tok, kind="pairs", max_length=args.max_length, cache_dir="none")
    batches = BatchSampler(ds.lengths(), args.batch_size, seed=0).batches()
    collate = {"plain": PairCollator(tok.pad_token_id), "packed": PackedPairCollator(tok.pad_token_id)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    with torch.no_grad():
        first = [ds[j] for j in batches[0]]
        outs = {k: model(b["input_ids"], b["attention_mask"], **model_kwargs(b)) for k, c in collate.items() for b in [c(first)]}
    reward_diff = (outs["plain"] - outs["packed"]).abs().max().item()

    def step(batch):
        t0 = time.perf_counter()
        out = model(batch["input_ids"], batch["attention_mask"], **model_kwargs(batch))
        n = out.shape[0] // 2
        bradley_terry_loss(out[:n, 0], out[n:, 0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    secs = {"plain": 0.0, "packed": 0.0}
    real = {"plain": 0, "packed": 0}
    padded = {"plain": 0, "packed": 0}
    step(collate["plain"](first))  # warm-up
    for r in range(args.rounds):
        for i, idx in enumerate(batches):
            items = [ds[j] for j in idx]
            order = ("plain", "packed") if (i + r) % 2 == 0 else ("packed", "plain")
            for kind in order:
                batch = collate[kind](items)
                secs[kind] += step(batch)
                if r == 0:
                    real[kind] += int(batch["attention_mask"].sum())
                    padded[kind] += batch["input_ids"].numel()
    steps = len(batches) * args.rounds
    result = {
        "pairs": len(ds), "batch_size": args.batch_size, "steps_each": steps, "threads": args.threads,
        "real_tokens": real, "padded_tokens": padded,
        "real_token_ratio_packed_over_plain": round(real["packed"] / real["plain"], 3),
        "padded_token_ratio_packed_over_plain": round(padded["packed"] / padded["plain"], 3),
        "seconds_per_step": {k: round(v / steps, 4) for k, v in secs.items()},
        "speedup_plain_over_packed": round(secs["plain"] / secs["packed"], 3),
        "max_reward_diff_first_batch": reward_diff,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
