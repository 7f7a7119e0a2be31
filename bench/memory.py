#!/usr/bin/env python
"""Resident memory over a long training run: does it stay flat?

Trains ``--steps`` optimizer steps (default 3,000) on HH-RLHF pairs of every length (the four files
in ``../shared/data/hh_rlhf``; ``--backbone minilm``, the default, or ``tiny`` for a 2-layer random
BERT when MiniLM is too slow) once per ``--variant``, each in a cold child process, through
rewardforge's own ``setup()`` + ``train()``. Every ``--log-steps`` steps the run logs ``rss_mb`` in
metrics.jsonl; the bench reads it back and prints the resident memory at step 300, at 10%, 50% and
100% of the run, the growth from step 300 to the end and the largest value after step 300 (the goal:
every value after step 300 within 10% of it).

Variants (default ``off,on``: the same run before and after the fix, in one command):

* ``on``: rewardforge's defaults (``train.malloc_trim_steps=10``, ``train.malloc_trim_growth=0.03``:
  ``malloc_trim(0)`` every 10 steps and after any step that leaves RSS 3% above its value after the last one).
* ``on-fixed10``: ``train.malloc_trim_growth=0``: every 10 steps only (the default before the growth check).
* ``on-growth6``: ``train.malloc_trim_growth=0.06``: a looser bound, fewer releases.
* ``on-every-step``: ``train.malloc_trim_steps=1``.
* ``off``: ``train.malloc_trim_steps=0``: glibc's malloc as it comes.
* ``off-arena2``: ``off`` with ``MALLOC_ARENA_MAX=2`` (at most two malloc arenas).
* ``off-mmap128k``: ``off`` with ``MALLOC_MMAP_THRESHOLD_=131072`` (a fixed mmap threshold: every block
  over 128 KiB gets its own mapping, returned to the OS when freed).
* ``off-onednn0``: ``off`` with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`` (no oneDNN primitive cache).
* ``off-pad32``: ``off`` with every batch padded to a multiple of 32 tokens (few distinct shapes).
* ``on-pad32``: ``on`` with the same padding.

Usage (from the project root):

    python bench/memory.py                                    # MiniLM fp32, 3,000 steps, off then on
    python bench/memory.py --steps 600 --variant off --variant off-arena2 --variant off-pad32
    python bench/memory.py --backbone tiny --threads 1 --parallel   # the tiny backbone, both variants at once
    python bench/memory.py --backbone tiny --steps 60         # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh_rlhf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

OFF = ["train.malloc_trim_steps=0"]
# name -> (environment, config overrides, child tweaks)
VARIANTS: dict[str, tuple[dict[str, str], list[str], set[str]]] = {
    "on": ({}, [], set()),
    "on-fixed10": ({}, ["train.malloc_trim_growth=0"], set()),
    "on-growth6": ({}, ["train.malloc_trim_growth=0.06"], set()),
    "on-every-step": ({}, ["train.malloc_trim_steps=1"], set()),
    "off": ({}, OFF, set()),
    "off-arena2": ({"MALLOC_ARENA_MAX": "2"}, OFF, set()),
    "off-mmap128k": ({"MALLOC_MMAP_THRESHOLD_": "131072"}, OFF, set()),
    "off-onednn0": ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, OFF, set()),
    "off-pad32": ({}, OFF, {"pad32"}),
    "on-pad32": ({}, [], {"pad32"}),
}


from cpuinfo import cpu_flags  # noqa: E402 (bench/ is the script's directory)


# ---------------------------------------------------------------------------- child


def _pad_to_multiple(collate, multiple: int):
    import torch

    def padded(items):
        batch = collate(items)
        length = batch["input_ids"].shape[1]
        extra = -length % multiple
        if extra:
            pad_id = getattr(collate, "pad_id", 0)
            rows = batch["input_ids"].shape[0]
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((rows, extra), pad_id, dtype=torch.int64)], 1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(rows, extra, dtype=torch.int64)], 1)
        return batch

    return padded


def child(spec: dict) -> None:
    from rewardforge.config import load_config
    from rewardforge.training.memory import peak_rss_mb, rss_mb
    from rewardforge.train import setup, train

    t0 = time.perf_counter()
    cfg = load_config(None, spec["overrides"])
    run = setup(cfg)
    if "pad32" in spec["tweaks"]:
        run.collate = _pad_to_multiple(run.collate, 32)
    setup_s = time.perf_counter() - t0
    rss_setup = rss_mb()
    timing = train(run, progress=False)
    out = {"setup_s": setup_s, "train_s": timing["train_seconds"], "rss_after_setup_mb": rss_setup,
           "memory_releases": timing["memory_releases"],
           "peak_rss_mb": peak_rss_mb(), "train_examples": len(run.train_data), "precision": run.cfg.train.precision}
    Path(spec["result"]).write_text(json.dumps(out))


# ---------------------------------------------------------------------------- parent


def rss_by_step(metrics: Path) -> dict[int, float]:
    out = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "train" and "rss_mb" in r:
            out[r["step"]] = r["rss_mb"]
    return out


def at(rss: dict[int, float], step: int) -> tuple[int, float]:
    """The logged step closest to ``step`` (at or before it when one is) and its RSS."""
    before = [s for s in rss if s <= step]
    s = max(before) if before else min(rss)
    return s, rss[s]


def start_variant(name: str, args, workdir: Path) -> dict:
    env_extra, overrides, tweaks = VARIANTS[name]
    out_dir = workdir / name
    model = MINILM if args.backbone == "minilm" else str(tiny_bert(workdir / "tiny-bert"))
    overrides = [
        f"model.name_or_path={model}", f"data.train=[{args.data}/*.jsonl.gz]", f"data.validation_fraction={args.validation_fraction}",
        f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        f"train.log_steps={args.log_steps}", f"train.eval_steps={args.eval_steps}", "train.learning_rate=5e-5",
        f"train.precision={args.precision}", f"train.threads={args.threads}", "train.seed=0", f"output_dir={out_dir}",
        *overrides, *args.override,
    ]
    spec = {"overrides": overrides, "tweaks": sorted(tweaks), "result": str(workdir / f"{name}.json")}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra}
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"{name}.stderr", "w"))
    return {"name": name, "proc": proc, "result": Path(spec["result"]), "metrics": out_dir / "metrics.jsonl",
            "stderr": workdir / f"{name}.stderr", "start": time.perf_counter()}


def finish_variant(started: dict) -> dict:
    code = started["proc"].wait()
    if code != 0:
        raise SystemExit(f"variant {started['name']} failed (exit {code}):\n{started['stderr'].read_text()[-4000:]}")
    result = json.loads(started["result"].read_text())
    result["wall_s"] = time.perf_counter() - started["start"]
    result["rss"] = rss_by_step(started["metrics"])
    return result


def tiny_bert(path: Path) -> Path:
    """A 2-layer random BERT with MiniLM's tokenizer (same token ids, a fraction of the compute)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import BertConfig, BertModel

    from rewardforge.models import load_tokenizer

    tok = load_tokenizer(MINILM, False)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=512)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per variant (default 3000)")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeat for several (default: off, on)")
    p.add_argument("--backbone", choices=("minilm", "tiny"), default="minilm")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--precision", default="fp32", help="train.precision (default fp32, as in the issue)")
    p.add_argument("--threads", type=int, default=0, help="train.threads (0: torch's default)")
    p.add_argument("--log-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=0, help="validate every N steps (0: never during the run)")
    p.add_argument("--validation-fraction", type=float, default=0.02)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--override", action="append", default=[], help="extra key=value for every variant")
    p.add_argument("--parallel", action="store_true", help="run the variants at the same time (on a busy machine: "
                   "the memory figures are each process's own, the ms/step then share the cores)")
    p.add_argument("--out", default="", help="write the results here (JSON)")
    p.add_argument("--workdir", default="", help="keep the runs here (default: a temporary directory)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if not list(Path(args.data).glob("*.jsonl.gz")):
        raise SystemExit(f"--data {args.data} holds no *.jsonl.gz files; give the HH-RLHF directory (../shared/data/hh_rlhf)")
    variants = args.variant or ["off", "on"]
    print(cpu_flags(), flush=True)
    print(f"backbone {args.backbone}, {args.steps} steps of {args.batch_size} pairs, max_length {args.max_length}, "
          f"precision {args.precision}, RSS logged every {args.log_steps} steps; variants {', '.join(variants)}", flush=True)
    marks = [("step 300", 300), ("10%", round(args.steps * 0.1)), ("50%", round(args.steps * 0.5)), ("100%", args.steps)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="rf-memory-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.parallel:  # all at once: each its own process, so their heaps are apart; timings then overlap
            started = [start_variant(name, args, workdir) for name in variants]
            done = [finish_variant(s) for s in started]
        else:
            done = [finish_variant(start_variant(name, args, workdir)) for name in variants]
        for name, r in zip(variants, done):
            rss = r["rss"]
            ref_step, ref = at(rss, 300)
            late = [v for s, v in rss.items() if s >= ref_step]
            r["marks"] = {label: at(rss, s) for label, s in marks}
            r["growth_from_300"] = (rss[max(rss)] - ref) / ref
            r["max_growth_from_300"] = (max(late) - ref) / ref
            results[name] = r
            cells = "  ".join(f"{label} (step {s}) {v:,.0f}" for label, (s, v) in r["marks"].items())
            print(f"{name:>12}: RSS MiB  {cells}  | end vs step 300 {r['growth_from_300']:+.1%}, max after 300 "
                  f"{r['max_growth_from_300']:+.1%}, peak {r['peak_rss_mb']:,.0f}; {r['train_s'] / args.steps * 1000:.0f} ms/step "
                  f"({r['precision']}, {r['train_examples']} train pairs; {r['memory_releases']['total']} releases, "
                  f"{r['memory_releases']['by_growth']} of them on growth)", flush=True)
    for name, r in results.items():
        if args.steps <= 300:
            print(f"goal (RSS after step 300 within 10% of its value there) for {name}: not measured (a run of {args.steps} steps)")
            continue
        ok = r["max_growth_from_300"] <= 0.10
        print(f"goal (RSS after step 300 within 10% of its value there) for {name}: {'met' if ok else 'NOT met'} "
              f"(at most {r['max_growth_from_300']:+.1%}, at the end {r['growth_from_300']:+.1%})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "cpu": cpu_flags(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
