#!/usr/bin/env python
"""Data at scale: ``build_dataset`` on HH-RLHF replicated x1, x10, x100 (~850k pairs) with distinct prompts.

For each scale the HH-RLHF test files (``../shared/data/hh_rlhf``, 8,552 pairs) are written k times to one JSONL
file in a temporary directory (outside the repository), copy j > 0 with ``[j] `` put before the first human turn of
both sides, so every copy has its own prompts (none is a duplicate). Then, each in a new process:

* **cold build** (fresh cache directory, ``--num-proc``, default ``data.num_proc``'s): seconds, pairs/s, CPU seconds, and memory:
  the building process's peak RSS (``ru_maxrss``), its RSS before the build (imports + tokenizer), the workers'
  peak RSS, and the peak of the summed PSS of all the build's processes (sampled every 0.25 s with psutil);
* **cached load** (a new process, twice: the first after the data was written also hashes the data files and
  memoizes their hashes, later loads read the memo): ``build_dataset`` seconds, then the validation split;
* **two processes** launched with ``torch.distributed.run`` (RANK/WORLD_SIZE set), each loading the cached dataset
  as training does (``accelerate``'s ``main_process_first``), splitting it, planning an epoch with the training
  sampler and collating every batch of its share: each process's private memory (``Private_Clean`` +
  ``Private_Dirty`` of ``/proc/PID/smaps_rollup``, the increase over the process before loading), its shared
  memory and PSS, and what of the mapped ``data.arrow`` it holds shared and private; private bytes per pair.

At x1 the cold build also runs, interleaved ``--repeats`` times each: one process (the Rust tokenizer's own threads),
one worker process per core (at least 2: what ``data.num_proc`` does), and as many threads in this process, each with
its own copy of the tokenizer (the alternative to processes; fast tokenizers release the GIL in batch calls).

Goals (issue 19, at the largest scale run): peak RSS of the build <= 1.5 GB; private data per training process
<= 1 KB per pair; cached load <= 5 s; cold build >= 2,000 pairs/s on 2 cores. The machine this runs on may be shared:
the load average before and after each step is printed, and timings move with it.

Usage (from the project root):

    python bench/data_scale.py                      # x1 and x10
    python bench/data_scale.py --scales 1 10 100    # and ~850k pairs (about 5-15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh_rlhf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MB = 1024 * 1024


from cpuinfo import cpu_flags  # noqa: E402 (bench/ is the script's directory)


def load() -> str:
    return "load average {:.1f}".format(os.getloadavg()[0])


# ---------------------------------------------------------------------------- data


def write_replicated(files: list[str], k: int, out: Path) -> int:
    """HH-RLHF x k in one JSONL file, copy j > 0 with ``[j] `` opening the first human turn (distinct prompts)."""
    rows = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    with open(out, "w", encoding="utf-8") as fh:
        for j in range(k):
            tag = f"Human: [{j}] "
            for r in rows:
                if j:
                    r = {key: v.replace("Human: ", tag, 1) if key in ("chosen", "rejected") else v for key, v in r.items()}
                fh.write(json.dumps(r) + "\n")
    return len(rows) * k


# ---------------------------------------------------------------------------- memory


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes (Rss, Pss, Shared_Clean, Private_Dirty, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        parts = value.split()
        if parts and parts[-1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def smaps_of_file(path: str, pid: int | str = "self") -> dict[str, int]:
    """The summed smaps fields (bytes) of this process's mappings of ``path``."""
    out: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            inside = len(head) >= 6 and head[5] == path
        elif inside and line.endswith(" kB"):
            key, value = line.split(":", 1)
            out[key] = out.get(key, 0) + int(value.split()[0]) * 1024
    return out


class TreeSampler:
    """Samples the summed RSS and PSS of a process and its descendants (psutil) until stopped; keeps the peaks."""

    def __init__(self, pid: int, every: float = 0.25):
        import psutil

        self.proc, self.every, self.peak_pss, self.peak_rss, self.peak_procs = psutil.Process(pid), every, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                pss = rss = 0
                for p in procs:
                    try:
                        info = p.memory_full_info()
                        pss, rss = pss + info.pss, rss + info.rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that exited between listing and reading
                        pass
                self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
                self.peak_procs = max(self.peak_procs, len(procs))
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- children


def load_tokenizer(backbone: str):
    from rewardforge.data.template import setup_template
    from rewardforge.models import load_tokenizer as rf_load_tokenizer

    tok = rf_load_tokenizer(MINILM if backbone == "minilm" else backbone)
    setup_template(tok, "auto")
    return tok


def thread_tokenizer(threads: int):
    """A ChunkTokenizer that tokenizes chunks in ``threads`` threads of this process (each its own tokenizer copy)."""
    import collections
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from rewardforge.data import tokenize as T

    class ThreadChunkTokenizer(T.ChunkTokenizer):
        def map(self, chunks):
            local = threading.local()

            def work(texts, starts):
                if not hasattr(local, "tok"):
                    local.tok = copy.deepcopy(self.tokenizer)
                return T.tokenize_chunk(local.tok, texts, starts, *self.settings)

            with ThreadPoolExecutor(threads) as pool:
                pending: collections.deque = collections.deque()
                for texts, starts, payload in chunks:
                    pending.append((payload, pool.submit(work, texts, starts)))
                    while len(pending) > threads:
                        p, f = pending.popleft()
                        yield p, f.result()
                while pending:
                    p, f = pending.popleft()
                    yield p, f.result()

    return ThreadChunkTokenizer


def child_build(args) -> dict:
    from rewardforge.data import datasets as D

    tok = load_tokenizer(args.backbone)
    if args.threads:
        D.ChunkTokenizer = thread_tokenizer(args.threads)
    gc.collect()
    rss_before = smaps_rollup()["Rss"]
    t0, c0 = time.perf_counter(), time.process_time()
    ds, rep = D.build_dataset([args.file], tok, kind="pairs", max_length=args.max_length, cache_dir=args.cache,
                              num_proc=1 if args.threads else args.num_proc)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "main_cpu_s": cpu, "workers_cpu_s": children.ru_utime + children.ru_stime,
            "examples": len(ds), "rows_read": rep.rows_read, "processes": rep.processes, "excluded": rep.excluded,
            "truncation": rep.truncation, "from_cache": rep.from_cache, "rss_before": rss_before,
            "maxrss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "maxrss_workers": children.ru_maxrss * 1024}


def child_load(args) -> dict:
    t = time.perf_counter()
    from rewardforge.data.datasets import build_dataset, split_by_prompt
    from rewardforge.data.readers import fingerprint_sources

    tok = load_tokenizer(args.backbone)
    setup_s = time.perf_counter() - t
    gc.collect()  # the collection importing torch leaves due would otherwise land in the load (bench/preprocess.py)
    t = time.perf_counter()
    ds, rep = build_dataset([args.file], tok, kind="pairs", max_length=args.max_length, cache_dir=args.cache)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    train, val = split_by_prompt(ds, 0.1, seed=0)
    split_s = time.perf_counter() - t
    t = time.perf_counter()
    fingerprint_sources([args.file])  # what a load costs where the hashes are not memoized (a read-only cache_dir)
    hash_s = time.perf_counter() - t
    return {"load_s": load_s, "split_s": split_s, "hash_without_memo_s": hash_s, "imports_and_tokenizer_s": setup_s, "from_cache": rep.from_cache,
            "examples": len(ds), "train": len(train), "validation": len(val)}


def child_share(args) -> dict:
    import numpy as np
    from accelerate import PartialState

    from rewardforge.data.batching import BatchSampler, PairCollator
    from rewardforge.data.datasets import build_dataset, split_by_prompt

    state = PartialState(cpu=True)
    tok = load_tokenizer(args.backbone)
    collate = PairCollator(tok.pad_token_id)
    collate([{"chosen": np.array([1, 2], np.int32), "rejected": np.array([1], np.int32), "margin": 0.0, "index": 0}])
    gc.collect()
    before = smaps_rollup()
    t = time.perf_counter()
    with state.main_process_first():  # as train.setup: the main process builds (here: finds the cache), the others map it
        ds, rep = build_dataset([args.file], tok, kind="pairs", max_length=args.max_length, cache_dir=args.cache)
    load_s = time.perf_counter() - t
    train, val = split_by_prompt(ds, 0.1, seed=0)
    sampler = BatchSampler(train.lengths(), 8, shuffle=True, group_by_length=True, seed=42)
    plan = sampler.plan(state.num_processes)
    t, tokens = time.perf_counter(), 0
    for step in plan:  # one epoch of this process's batches, collated as the training loop does
        mine = step[state.process_index]
        if mine:
            tokens += int(collate([train[j] for j in mine])["attention_mask"].sum())
    batches = BatchSampler(val.lengths(), 16, shuffle=False).batches()
    for b in batches[state.process_index :: state.num_processes]:  # validation, sharded by batch
        collate([val[j] for j in b])
    epoch_s = time.perf_counter() - t
    state.wait_for_everyone()  # both processes have read their share before either measures
    after = smaps_rollup()
    arrow = smaps_of_file(str(next(Path(args.cache).glob("*/data.arrow"))))
    priv = lambda m: m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)  # noqa: E731
    out = {"rank": state.process_index, "load_s": load_s, "epoch_collate_s": epoch_s, "pairs": len(ds), "from_cache": rep.from_cache,
           "tokens_collated": tokens, "private_before": priv(before), "private_after": priv(after),
           "private_dirty_increase": after.get("Private_Dirty", 0) - before.get("Private_Dirty", 0),
           "private_increase": priv(after) - priv(before), "shared_after": after.get("Shared_Clean", 0) + after.get("Shared_Dirty", 0),
           "pss_after": after.get("Pss", 0), "rss_after": after.get("Rss", 0), "arrow_rss": arrow.get("Rss", 0),
           "arrow_shared": arrow.get("Shared_Clean", 0) + arrow.get("Shared_Dirty", 0), "arrow_private": priv(arrow),
           "arrow_pss": arrow.get("Pss", 0), "train_batches": len(plan)}
    (Path(args.cache).parent / f"share-rank{state.process_index}.json").write_text(json.dumps(out))  # (stdout interleaves)
    state.wait_for_everyone()
    return out


def run_child(mode: str, args, extra: list[str], sample: bool = False) -> tuple[dict, TreeSampler | None]:
    cmd = [sys.executable, __file__, f"--_{mode}", "--file", args.file, "--cache", args.cache, "--backbone", args.backbone,
           "--max-length", str(args.max_length), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid) if sample else None
    out, err = proc.communicate()
    if sampler:
        sampler.stop()
    if proc.returncode:
        raise SystemExit(f"{mode} child failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), sampler


def run_share(args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--_share",
           "--file", args.file, "--cache", args.cache, "--backbone", args.backbone, "--max-length", str(args.max_length)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode:
        raise SystemExit(f"two-process child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return [json.loads((Path(args.cache).parent / f"share-rank{r}.json").read_text()) for r in range(2)]


# ---------------------------------------------------------------------------- parent


def compare_parallelism(args, workdir: Path, lines: list[str]) -> dict:
    n = max(2, len(os.sched_getaffinity(0)))
    variants = {"1 process (Rust tokenizer threads)": ["--num-proc", "1"],
                f"{n} worker processes (data.num_proc={n})": ["--num-proc", str(n)],
                f"{n} threads, a tokenizer copy each": ["--threads", str(n)]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, extra in variants.items():
            cache = workdir / "cache-compare"
            shutil.rmtree(cache, ignore_errors=True)
            res, _ = run_child("build", argparse.Namespace(**{**vars(args), "cache": str(cache)}), extra)
            times[name].append(res["seconds"])
            cpu[name].append(res["main_cpu_s"] + res["workers_cpu_s"])
    lines.append(f"  cold build of x1 by how it tokenizes ({args.repeats} interleaved runs each; best, then all; {load()} after):")
    for name in variants:
        best = min(times[name])
        lines.append(f"    {name:<48} {best:6.2f} s = {args.pairs / best:7,.0f} pairs/s   (runs {', '.join(f'{t:.2f}' for t in times[name])} s; "
                     f"CPU {min(cpu[name]):.1f} s)")
    return {"seconds": times, "cpu_s": cpu}


def measure_scale(k: int, files: list[str], args, workdir: Path, lines: list[str]) -> dict:
    data = workdir / f"hh_x{k}.jsonl"
    t = time.perf_counter()
    pairs = write_replicated(files, k, data)
    lines.append(f"x{k}: {pairs:,} pairs, {data.stat().st_size / MB:,.0f} MiB of JSONL written in {time.perf_counter() - t:.0f} s; {load()}")
    cache = workdir / f"cache-x{k}"
    sub = argparse.Namespace(**{**vars(args), "file": str(data), "cache": str(cache), "pairs": pairs})
    out: dict = {"pairs": pairs, "jsonl_bytes": data.stat().st_size}
    if k == 1 and args.repeats:
        out["parallelism"] = compare_parallelism(sub, workdir, lines)
    cold, tree = run_child("build", sub, ["--num-proc", str(args.num_proc)], sample=True)
    arrow = next(cache.glob("*/data.arrow"))
    out["cold"] = {**cold, "peak_tree_pss": tree.peak_pss, "peak_tree_rss": tree.peak_rss, "processes_seen": tree.peak_procs,
                   "arrow_bytes": arrow.stat().st_size}
    lines.append(
        f"  cold build, data.num_proc={args.num_proc}: {cold['seconds']:.1f} s = {pairs / cold['seconds']:,.0f} pairs/s "
        f"(CPU {cold['main_cpu_s']:.0f} s main + {cold['workers_cpu_s']:.0f} s workers); {cold['examples']:,} examples, "
        f"excluded {cold['excluded']}; Arrow file {arrow.stat().st_size / MB:,.0f} MiB; {load()}")
    lines.append(
        f"    memory: building process peak RSS {cold['maxrss_main'] / MB:,.0f} MiB ({cold['rss_before'] / MB:,.0f} MiB before the "
        f"build: imports + tokenizer), workers' peak RSS {cold['maxrss_workers'] / MB:,.0f} MiB each at most; peak summed PSS of "
        f"all {tree.peak_procs} processes {tree.peak_pss / MB:,.0f} MiB (summed RSS {tree.peak_rss / MB:,.0f} MiB)")
    loads = [run_child("load", sub, [])[0] for _ in range(args.load_repeats)]
    out["cached"] = loads
    runs = ", ".join(f"{x['load_s']:.2f}" for x in loads)
    lines.append(
        f"  cached load in a new process ({len(loads)} runs): {statistics.median(x['load_s'] for x in loads):.2f} s "
        f"(runs {runs} s; the data files' hashes come from the memo, hashing "
        f"them again would add {statistics.median(x['hash_without_memo_s'] for x in loads):.2f} s); then the validation split "
        f"{statistics.median(x['split_s'] for x in loads):.2f} s ({loads[0]['train']:,} / {loads[0]['validation']:,}); "
        f"imports + tokenizer before it {statistics.median(x['imports_and_tokenizer_s'] for x in loads):.1f} s")
    ranks = run_share(sub)
    out["two_processes"] = ranks
    for r in ranks:
        lines.append(
            f"  rank {r['rank']} of 2 (torch.distributed.run): load {r['load_s']:.2f} s, one epoch of its batches collated in "
            f"{r['epoch_collate_s']:.1f} s; private memory +{r['private_increase'] / MB:,.1f} MiB over the process before "
            f"loading (= {r['private_increase'] / r['pairs']:,.0f} B/pair; anonymous +{r['private_dirty_increase'] / MB:,.1f} MiB), "
            f"shared {r['shared_after'] / MB:,.0f} MiB, PSS {r['pss_after'] / MB:,.0f} MiB; data.arrow mapped: RSS "
            f"{r['arrow_rss'] / MB:,.0f} MiB, of it shared {r['arrow_shared'] / MB:,.0f} MiB, private {r['arrow_private'] / MB:,.1f} MiB")
    return out


def goals(result: dict) -> dict:
    k = max(result["scales"], key=int)
    r = result["scales"][k]
    worst_private = max(x["private_increase"] / x["pairs"] for x in r["two_processes"])
    return {
        "scale": f"x{k} ({r['pairs']:,} pairs)",
        "build_peak_rss_le_1.5GB": {"value_MiB": r["cold"]["maxrss_main"] / MB, "tree_pss_MiB": r["cold"]["peak_tree_pss"] / MB,
                                    "pass": max(r["cold"]["maxrss_main"], r["cold"]["peak_tree_pss"]) <= 1.5e9},
        "private_per_pair_le_1KB": {"value_B": worst_private, "pass": worst_private <= 1024},
        "cached_load_le_5s": {"value_s": statistics.median(x["load_s"] for x in r["cached"]),
                              "hash_s": statistics.median(x["hash_without_memo_s"] for x in r["cached"]),
                              "pass": statistics.median(x["load_s"] for x in r["cached"]) <= 5},
        "cold_ge_2000_pairs_per_s": {"value": r["pairs"] / r["cold"]["seconds"], "pass": r["pairs"] / r["cold"]["seconds"] >= 2000},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="replication factors (100: ~850k pairs)")
    p.add_argument("--backbone", default="minilm", help="minilm or a local model directory (only its tokenizer is used)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--num-proc", type=int, default=None,
                   help="data.num_proc of the builds at each scale (default: data.num_proc's default on this machine)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved x1 runs of each way of tokenizing (0 skips the comparison)")
    p.add_argument("--load-repeats", type=int, default=3, help="cached loads, each in a new process")
    p.add_argument("--workdir", default=None, help="where the replicated data and caches go (default: a new temporary dir, removed)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "data_scale.json"))
    for mode in ("build", "load", "share"):
        p.add_argument(f"--_{mode}", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.num_proc is None:
        from rewardforge.data.datasets import resolve_num_proc

        args.num_proc = resolve_num_proc(None)
    for mode, fn in (("build", child_build), ("load", child_load), ("share", child_share)):
        if getattr(args, f"_{mode}"):
            res = fn(args)
            if mode != "share":
                print(json.dumps(res))
            return 0

    files = sorted(str(f) for f in DEFAULT_DATA.glob("*.jsonl.gz"))
    if not files:
        print(f"SKIP: HH-RLHF data not found in {DEFAULT_DATA}; this benchmark needs ../shared/data/hh_rlhf beside the "
              "project root (see ../shared/data/README.md)")
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rf-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [cpu_flags(), f"data scale: HH-RLHF x{', x'.join(map(str, args.scales))} with distinct prompts; tokenizer "
             f"{args.backbone}, max_length {args.max_length}; data.num_proc={args.num_proc}; work in {workdir}; {load()}"]
    print("\n".join(lines), flush=True)
    result: dict = {"args": vars(args), "cpu": lines[0], "scales": {}}
    try:
        for k in args.scales:
            n = len(lines)
            result["scales"][str(k)] = measure_scale(k, files, args, workdir, lines)
            print("\n".join(lines[n:]), flush=True)
            for f in workdir.glob(f"cache-x{k}"):
                shutil.rmtree(f, ignore_errors=True)
            (workdir / f"hh_x{k}.jsonl").unlink(missing_ok=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["goals"] = goals(result)
    g = result["goals"]
    tail = [f"goals at {g['scale']}:",
            f"  {'PASS' if g['build_peak_rss_le_1.5GB']['pass'] else 'FAIL'}  build peak RSS <= 1.5 GB: building process "
            f"{g['build_peak_rss_le_1.5GB']['value_MiB']:,.0f} MiB, all its processes (summed PSS) {g['build_peak_rss_le_1.5GB']['tree_pss_MiB']:,.0f} MiB",
            f"  {'PASS' if g['private_per_pair_le_1KB']['pass'] else 'FAIL'}  private data per training process <= 1 KB/pair: "
            f"{g['private_per_pair_le_1KB']['value_B']:,.0f} B/pair (the worse of the two processes)",
            f"  {'PASS' if g['cached_load_le_5s']['pass'] else 'FAIL'}  cached load <= 5 s: {g['cached_load_le_5s']['value_s']:.2f} s "
            f"(+{g['cached_load_le_5s']['hash_s']:.2f} s where the data files' hashes are not memoized)",
            f"  {'PASS' if g['cold_ge_2000_pairs_per_s']['pass'] else 'FAIL'}  cold build >= 2,000 pairs/s: "
            f"{g['cold_ge_2000_pairs_per_s']['value']:,.0f} pairs/s ({load()} now: other work on the machine slows every timing)"]
    print("\n".join(tail))
    result["table"] = "\n".join(lines + tail)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
