#!/usr/bin/env python
"""Listwise vs expanded pairs: the same lists trained as ``listwise`` and as all their pairs with ``binary_ranking``.

Topical-Chat (``../shared/data/rated/topical_chat.json``: 60 dialogues, six responses each rated by
humans; the score is the ``overall`` rating, equal ratings are ties) on the MiniLM encoder. The
dialogues are split once by a hash of the dialogue history into train and validation; both runs
train on the same training dialogues for the same number of epochs:

* listwise: ``model.reward_model_type=listwise`` on the rated rows grouped by dialogue
  (``data.group_by=prompt``, ``data.score_label=overall``), each response encoded once per epoch;
* expanded: every pair of a dialogue's responses with a strictly higher overall rating
  (ties make no pair), ``binary_ranking`` with ``bradley_terry`` (each response encoded K - 1 times).

Both exported models then score the validation dialogues' responses with the same scorer; the
report gives the validation pairwise accuracy over every ordered pair (with its 95% interval), top-1,
Kendall tau and NDCG of each, its time per epoch (the training loop's seconds / epochs) and the
sequences each run encoded in training. The machine's CPU flags are printed first (fp32 runs).

Usage (project root): ``nice -n 10 python bench/listwise.py [--epochs 4] [--seeds 0 1]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared/data/rated/topical_chat.json"


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def split_dialogues(rows: list[dict], val_fraction: float) -> tuple[dict, dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["source"]].append(r)
    train, val = {}, {}
    for src, rs in groups.items():
        h = int(hashlib.sha1(src.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < val_fraction else train)[src] = rs
    return train, val


def expand_pairs(groups: dict[str, list[dict]]) -> list[dict]:
    out = []
    for src, rs in groups.items():
        for a in rs:
            for b in rs:
                if a["scores"]["overall"] > b["scores"]["overall"]:
                    out.append({"prompt": src, "chosen": a["system_output"], "rejected": b["system_output"]})
    return out


def evaluate(model_dir: Path, groups: dict[str, list[dict]]) -> dict:
    import rewardforge
    from rewardforge.eval.metrics import ranking_metrics

    scorer = rewardforge.load(model_dir, batch_size=32)
    rewards, scores = [], []
    for src, rs in groups.items():
        prompts = [[{"role": "user", "content": src}]] * len(rs)
        responses = [[{"role": "assistant", "content": r["system_output"]}] for r in rs]
        rewards.append(scorer.score(prompts, responses))
        scores.append([r["scores"]["overall"] for r in rs])
    return ranking_metrics(rewards, scores)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--list-batch", type=int, default=4, help="lists per batch (listwise)")
    ap.add_argument("--pair-batch", type=int, default=16, help="pairs per batch (expanded)")
    ap.add_argument("--loss", default="plackett_luce", help="plackett_luce or listwise_bradley_terry")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--runs", nargs="+", default=["listwise", "expanded"], choices=["listwise", "expanded"],
                    help="which runs (fp32 on CPU is deterministic: a run repeated with the same seed gives the same model)")
    a = ap.parse_args(argv)
    if not Path(a.data).is_file():
        print(f"{a.data} is missing: this benchmark needs ../shared/data/rated/topical_chat.json beside the project")
        return 2
    from rewardforge.config import load_config
    from rewardforge.train import run_training

    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} logical CPUs, torch threads {a.threads}; a shared machine: "
          "times vary with the other load on it")
    rows = json.load(open(a.data))
    train, val = split_dialogues(rows, 0.2)
    out = Path(a.out or tempfile.mkdtemp(prefix="bench-listwise-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_rated.json").write_text(json.dumps([r for rs in train.values() for r in rs]))
    pairs = expand_pairs(train)
    (out / "train_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    val_pairs = expand_pairs(val)
    (out / "val_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in val_pairs))
    (out / "val_rated.json").write_text(json.dumps([r for rs in val.values() for r in rs]))
    k = np.mean([len(rs) for rs in train.values()])
    print(f"train: {len(train)} dialogues, {sum(len(r) for r in train.values())} responses, {len(pairs)} strict pairs "
          f"(ties make none); validation: {len(val)} dialogues, {len(val_pairs)} pairs; K = {k:g}")
    common = ["model.name_or_path=sentence-transformers/all-MiniLM-L6-v2", f"data.max_length={a.max_length}",
              f"train.epochs={a.epochs}", f"train.learning_rate={a.lr}", "train.warmup_ratio=0.1", "train.precision=fp32",
              f"train.threads={a.threads}", "data.cache_dir=none", "train.log_steps=0"]
    runs = {
        "listwise": ["model.reward_model_type=listwise", f"loss.name={a.loss}", f"data.train=[{out / 'train_rated.json'}]",
                     f"data.validation=[{out / 'val_rated.json'}]", "data.group_by=prompt", "data.score_label=overall",
                     "data.field_map={prompt: source, response: system_output, labels: scores}",
                     f"train.batch_size={a.list_batch}"],
        "expanded": ["model.reward_model_type=binary_ranking", "loss.name=bradley_terry", f"data.train=[{out / 'train_pairs.jsonl'}]",
                     f"data.validation=[{out / 'val_pairs.jsonl'}]", f"train.batch_size={a.pair_batch}"],
    }
    results: dict[str, list[dict]] = defaultdict(list)
    for seed in a.seeds:
        for name, extra in ((n, runs[n]) for n in a.runs):
            s = run_training(load_config(None, [*common, *extra, f"train.seed={seed}", f"output_dir={out / f'{name}-{seed}'}"]),
                             progress=False)
            examples = s["data"]["train_examples"]
            per_example = k if name == "listwise" else 2
            m = evaluate(out / f"{name}-{seed}" / "model", val)
            rec = {"seed": seed, "steps": s["steps"], "train_examples": examples, "load_average_1min_after": os.getloadavg()[0],
                   "sequences_encoded": int(round(s["examples_seen"] * per_example)),
                   "seconds_per_epoch": s["train_seconds"] / a.epochs, **{x: m[x] for x in
                   ("accuracy", "ci_low", "ci_high", "pairs", "top1", "kendall_tau", "ndcg")}}
            results[name].append(rec)
            print(f"{name:9s} seed {seed}: {rec['steps']} steps, {rec['sequences_encoded']} sequences encoded, "
                  f"{rec['seconds_per_epoch']:.1f} s/epoch (load average {rec['load_average_1min_after']:.1f}); validation pairwise accuracy {m['accuracy']:.4f} "
                  f"(95% {m['ci_low']:.3f}-{m['ci_high']:.3f}, {m['pairs']} pairs), top-1 {m['top1']:.3f}, "
                  f"Kendall tau {m['kendall_tau']:.3f}, NDCG {m['ndcg']:.4f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'results.json'}")
    if len(results) < 2:
        return 0
    lw, ex = results["listwise"], results["expanded"]
    acc_l, acc_e = np.mean([r["accuracy"] for r in lw]), np.mean([r["accuracy"] for r in ex])
    seq_ratio = np.mean([r["sequences_encoded"] for r in lw]) / np.mean([r["sequences_encoded"] for r in ex])
    time_ratio = np.mean([r["seconds_per_epoch"] for r in lw]) / np.mean([r["seconds_per_epoch"] for r in ex])
    print(f"mean over seeds {a.seeds}: pairwise accuracy listwise {acc_l:.4f} vs expanded {acc_e:.4f}; encoded sequences "
          f"ratio {seq_ratio:.3f} (1/(K-1) = {1 / (k - 1):.3f}); time per epoch ratio {time_ratio:.3f}")
    print(f"goal (listwise at least as accurate, at <= 1/(K-1) of the sequences): accuracy {'met' if acc_l >= acc_e else 'NOT met'}, "
          f"sequences {'met' if seq_ratio <= 1 / (k - 1) + 1e-9 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
