#!/usr/bin/env python
"""A single reward model vs a head ensemble at the same budget: accuracy, time, and what the disagreement says.

    python bench/ensemble.py                                   # configs/hh_minilm.yaml vs hh_minilm_ensemble.yaml
    python bench/ensemble.py --max-steps 150                   # a reduced budget (say so when you quote it)
    python bench/ensemble.py --json runs/bench_ensemble.json
    python bench/ensemble.py --interleaved 12                  # only the time ratio, steps alternating

Both runs train in this process one after the other (single first), with the same data, validation split,
seed, batch size, learning-rate schedule and steps; only ``model.ensemble_size`` (and the bootstrap) differ.
``--interleaved N`` measures only the time ratio, less exposed to other load on a shared machine: both models
are set up, then their training steps alternate (single, ensemble, single, ...) on the same batches, N each,
and the ratio of the median step times (after 2 warm-up steps each) is printed.
In-loop validation and checkpoints are turned off in both (``train.eval_steps=0 train.save_steps=0``) so the
time ratio is that of training steps; the final validation runs after the timed loop. "train time" is the
loop's ``train_seconds`` (summary.json). On a shared machine the ratio moves with the other load: run it
where nothing else runs for a figure to quote.

Printed: the CPU flags (avx2 / avx512_bf16 / amx), both validation accuracies with their 95% Wilson
intervals, the time ratio, and the ensemble's accuracy per uncertainty quintile (the members' standard
deviation of the pair's margin), the AUROC of that standard deviation for the wrong pairs and the calibration
(ECE) of P(chosen > rejected) with and without the ensemble.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def cpu_flags() -> dict[str, bool]:
    """avx2 / avx512_bf16 / amx of this CPU, for the printed line and the JSON (bench/cpuinfo.py reads them)."""
    from cpuinfo import cpu_features

    flags = cpu_features()[1]
    return {"avx2": "avx2" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags)}


def ci(v: dict) -> str:
    lo, hi = v["ci95"]
    return f"{v['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}, {v['pairs']} pairs)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--single", default=str(ROOT / "configs/hh_minilm.yaml"))
    p.add_argument("--ensemble", default=str(ROOT / "configs/hh_minilm_ensemble.yaml"))
    p.add_argument("--max-steps", type=int, default=0, help="a reduced budget: this many steps for both (0: the configs')")
    p.add_argument("--out", default=str(ROOT / "runs/bench_ensemble"), help="where both runs write")
    p.add_argument("--json", default="", help="also write the figures here")
    p.add_argument("--override", action="append", default=[], help="extra section.key=value for both runs")
    p.add_argument("--interleaved", type=int, default=0, help="only time N alternating steps of each model")
    p.add_argument("--only", choices=("single", "ensemble"), help="train only this one (e.g. an ensemble variant "
                   "with --override model.ensemble_init=shared against a single run measured before)")
    args = p.parse_args()

    import torch

    from rewardforge.config import load_config
    from rewardforge.data.datasets import show_progress
    from rewardforge.ensemble import member_rewards
    from rewardforge.eval.metrics import calibration, ensemble_pair_report, win_rate, wilson_interval
    from rewardforge.train import predict_sharded, setup, train

    flags = cpu_flags()
    print(f"cpu: {os.cpu_count()} cores, " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags.items())
          + f"; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    os.chdir(ROOT)  # the configs name ../shared/data relative to the project root
    common = ["train.eval_steps=0", "train.save_steps=0", *args.override]
    if args.max_steps:
        common.append(f"train.max_steps={args.max_steps}")
    if args.interleaved:
        return interleaved(args, common)
    results = {}
    for name, path in (("single", args.single), ("ensemble", args.ensemble)):
        if args.only and name != args.only:
            continue
        cfg = load_config(path, [*common, f"output_dir={Path(args.out) / name}"])
        with show_progress(False):
            run = setup(cfg)
        seconds = train(run, progress=False)["train_seconds"]
        pred = predict_sharded(run, run.val_data, desc="final validation")
        k, w = run.rtype.ensemble_size, run.rtype.weights
        margins = (member_rewards(pred["chosen"], w, k) - member_rewards(pred["rejected"], w, k)).reshape(len(pred["chosen"]), k)
        d = margins.mean(1)
        acc = float(win_rate(d))
        lo, hi = wilson_interval(acc * len(d), len(d))
        r = {"K": k, "steps": run.state.step, "train_seconds": seconds, "pairs": int(len(d)), "accuracy": acc,
             "ci95": [lo, hi], "ece": calibration(d)["ece"], "nll": calibration(d)["nll"]}
        if k > 1:
            r["ensemble"] = ensemble_pair_report(margins)
        results[name] = r
        print(f"{name}: K={k}, {r['steps']} steps, train {seconds:.1f} s; validation accuracy {ci(r)}", flush=True)
        del run

    if args.only:
        if args.only == "ensemble":
            report_uncertainty(results["ensemble"]["ensemble"])
        write_json(args, flags, results)
        return
    single, ens = results["single"], results["ensemble"]
    ratio = ens["train_seconds"] / single["train_seconds"]
    e = ens["ensemble"]
    diff = ens["accuracy"] - single["accuracy"]
    print()
    print(f"budget: {'train.max_steps=' + str(args.max_steps) if args.max_steps else 'the configs (1 epoch)'}: "
          f"{single['steps']} steps of {load_config(args.single).train.batch_size} pairs each")
    print(f"single   accuracy {ci(single)}")
    print(f"ensemble accuracy {ci(ens)}  (difference {100 * diff:+.2f} points; goal >= -0.5)")
    print(f"members' accuracy: {', '.join(f'{a:.4f}' for a in e['member_accuracy'])}")
    print(f"train time: single {single['train_seconds']:.1f} s, ensemble {ens['train_seconds']:.1f} s, "
          f"ratio {ratio:.3f} (goal <= 1.2)")
    report_uncertainty(e, single["ece"])
    write_json(args, flags, results, ratio=ratio)


def write_json(args, flags: dict, results: dict, **extra) -> None:
    """``--json``: the CPU, the budget and every run's figures (and the time ratio when both ran)."""
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": flags, "max_steps": args.max_steps, **extra, **results},
                                              indent=2, default=str) + "\n")


def report_uncertainty(e: dict, single_ece: float | None = None) -> None:
    print("ensemble accuracy by uncertainty quintile (std of the members' margins; Q1 = least uncertain):")
    for b in e["uncertainty_bins"]:
        print(f"  Q{b['bin'] + 1}: std {b['low']:.4f}-{b['high']:.4f}, {b['n']} pairs, accuracy {b['accuracy']:.4f} "
              f"(95% CI {b['ci_low']:.4f}-{b['ci_high']:.4f})")
    q1, q5 = e["uncertainty_bins"][0], e["uncertainty_bins"][-1]
    apart = ("below, the 95% intervals apart" if q5["ci_high"] < q1["ci_low"] else
             "ABOVE, the 95% intervals apart (the wrong way)" if q5["ci_low"] > q1["ci_high"] else "the 95% intervals overlap")
    print(f"20% most uncertain {q5['accuracy']:.4f} vs 20% least uncertain {q1['accuracy']:.4f}: {apart}")
    print(f"AUROC of the std for a wrong pair: {e['auroc_std_wrong']:.4f} ({e['wrong_pairs']} wrong pairs)")
    print("ensemble accuracy by flip-probability quintile (Phi(-|mean margin| / std); Q1 = least uncertain): "
          + ", ".join(f"Q{b['bin'] + 1} {b['accuracy']:.4f} ({b['ci_low']:.4f}-{b['ci_high']:.4f})" for b in e["flip_bins"]))
    print(f"AUROC for a wrong pair: flip probability {e['auroc_flip_wrong']:.4f}; the mean margin's size alone "
          f"(-|d|, what one model knows) {e['auroc_margin_wrong']:.4f}")
    c = e["calibration"]
    print(f"ECE of P(chosen > rejected): single model {'n/a' if single_ece is None else f'{single_ece:.4f}'}; ensemble: "
          f"member_0 {c['member_0']['ece']:.4f}, mean reward {c['mean_reward']['ece']:.4f}, members' mean probability "
          f"{c['ensemble']['ece']:.4f}")


def interleaved(args, common: list[str]) -> None:
    import numpy as np

    from rewardforge.config import load_config
    from rewardforge.data.datasets import show_progress
    from rewardforge.train import setup, train

    runs = {}
    for name, path in (("single", args.single), ("ensemble", args.ensemble)):
        cfg = load_config(path, [*common, f"train.max_steps={args.interleaved}", f"output_dir={Path(args.out) / ('t-' + name)}"])
        with show_progress(False):
            runs[name] = setup(cfg)
    times: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(args.interleaved):
        for name, run in runs.items():
            run.total_steps = run.state.step + 1  # train() runs to total_steps: one more step
            times[name].append(train(run, progress=False)["train_seconds"])
    med = {n: float(np.median(t[2:] if len(t) > 2 else t)) for n, t in times.items()}
    for n, t in times.items():
        print(f"{n}: step seconds {', '.join(f'{x:.2f}' for x in t)}; median after warm-up {med[n]:.3f}")
    print(f"interleaved step-time ratio ensemble / single: {med['ensemble'] / med['single']:.3f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
