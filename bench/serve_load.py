"""Load test for ``rewardforge serve``: dynamic batching vs answering one request at a time.

    python bench/serve_load.py runs/quickstart/model [--concurrency 1,8,64] [--duration 20] [--dtypes fp32,bf16]
        [--variant NAME='--flags'] [--json out.json]

Starts ``rewardforge serve`` subprocesses on 127.0.0.1 (traffic never leaves loopback) with the
same model, and drives ``POST /v1/score`` with one item (prompt + response) per request, the way a
policy trainer scoring each sample on its own does, at each concurrency level. For each dtype in
--dtypes (``--dtype`` of the servers) two servers run, identical but for batching:

* ``batching/DTYPE``: the default server (micro-batches up to --max-batch-items, grouped by length);
* ``one_at_a_time/DTYPE``: the same server, model, dtype and threads with ``--max-batch-items 1
  --max-wait-ms 0``, i.e. every request gets its own forward pass, as OpenRLHF's ``serve_rm`` app does.

``--variant NAME='--flags'`` adds a batching server with extra flags (compared with the one-at-a-time
server of its dtype) for tuning. Inputs mix short, medium and long (truncated at the model's
max_length) prompt/response pairs from the quickstart data. For each concurrency the servers are
measured in alternating short rounds (--rounds), so load from other processes on the machine falls
on all alike; each (server, concurrency) is bounded by --requests and --duration (at most 60 s). The
client is a minimal keep-alive HTTP/1.1 client on asyncio so that it costs the shared CPU little; the
CPU used by the client, by the server under test (and by its model thread, per request) and by
everything else on the machine is measured and printed.
Prints throughput (requests/s) and p50/p99 latency, the batching / one-at-a-time throughput ratio per
dtype and concurrency (and bf16 batching / fp32 one-at-a-time, labelled as such), the machine's load
average, and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_bodies(data_file: Path, n: int, seed: int) -> list[bytes]:
    """n request bodies of one item each, lengths mixed: 50% short, 30% medium, 20% long."""
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    bodies = []
    for _ in range(n):
        row = rng.choice(rows)
        response = rng.choice([row["chosen"], row["rejected"]])
        prompt = row["prompt"]
        u = rng.random()
        if u < 0.3:  # medium: a longer answer
            response = " ".join([response] * 3)
        elif u < 0.5:  # long: past max_length, truncated by the server
            prompt = " ".join([prompt] * 6)
            response = " ".join([response] * 8)
        bodies.append(json.dumps({"items": [{"prompt": prompt, "response": response}]}).encode())
    return bodies


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds_path(path: Path) -> float:
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_cpu_seconds(pid: int) -> float:
    return proc_cpu_seconds_path(Path(f"/proc/{pid}/stat"))  # every thread of the process


def model_thread_cpu_seconds(pid: int) -> float:
    """CPU seconds of the server's model thread, named "rewardforge-batcher" by the server (the OpenMP
    workers it starts for --threads > 1 inherit the name)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith("rewardforge-bat"):
                total += proc_cpu_seconds_path(task / "stat")
        except OSError:  # the thread ended meanwhile: its time is gone from the count either way
            pass
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    total = sum(v[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


class Server:
    def __init__(self, model_dir: str, extra: list[str], log_path: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "rewardforge", "serve", model_dir, "--host", HOST, "--port", str(self.port),
               "--log-level", "warning", *extra]
        self.log = open(log_path, "w")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.cmd = cmd

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:  # not listening yet: wait and poll again
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def cpu_seconds(self) -> tuple[float, float]:
        """(all threads, the model thread) user + system CPU seconds the server process has used."""
        return proc_cpu_seconds(self.proc.pid), model_thread_cpu_seconds(self.proc.pid)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _request(reader, writer, body: bytes) -> int:
    writer.write(b"POST /v1/score HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (HOST.encode(), len(body)) + body)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    await reader.readexactly(length)
    return status


async def drive(port: int, bodies: list[bytes], concurrency: int, max_requests: int, duration: float,
                warmup: int) -> dict:
    """Closed loop: `concurrency` connections, each sending its next request when the last one returns."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))
    deadline = [0.0]
    started = [0]
    answered = [0]  # every request answered, warmup included (for CPU per request)

    async def worker(wid: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for k in range(warmup):
                await _request(reader, writer, bodies[(wid * 7919 + k) % len(bodies)])
                answered[0] += 1
            await barrier.wait()
            while time.perf_counter() < deadline[0]:
                i = next(counter)
                if i >= max_requests:
                    break
                started[0] += 1
                t0 = time.perf_counter()
                status = await _request(reader, writer, bodies[i % len(bodies)])
                answered[0] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            writer.close()

    class Barrier:  # start the clock when every connection is warm
        def __init__(self, n):
            self.n, self.event, self.t0 = n, asyncio.Event(), 0.0

        async def wait(self):
            self.n -= 1
            if self.n == 0:
                self.t0 = time.perf_counter()
                deadline[0] = self.t0 + duration
                self.event.set()
            await self.event.wait()

    barrier = Barrier(concurrency)
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - barrier.t0, "answered": answered[0]}


def summarize(concurrency: int, latencies: list[float], errors: int, seconds: float) -> dict:
    latencies = sorted(latencies)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": round(seconds, 3),
            "throughput_rps": round(len(latencies) / seconds, 2) if seconds > 0 else 0.0,
            "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
            "mean_ms": round(sum(latencies) / max(len(latencies), 1) * 1000, 2)}


def batch_stats(metrics_text: str) -> dict:
    out = {}
    for line in metrics_text.splitlines():
        for key, name in (("rewardforge_batch_size_sum", "items"), ("rewardforge_batch_size_count", "batches")):
            if line.startswith(key + " "):
                out[name] = float(line.split()[1])
    return out


def parse_variants(values: list[str]) -> dict[str, list[str]]:
    out = {}
    for v in values:
        name, sep, flags = v.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant wants NAME='--flags', got {v!r}")
        out[name] = flags.split()
    return out


def flag_value(flags: list[str], name: str, default: str) -> str:
    value = default
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f.split("=", 1)[1]
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", default=str(ROOT / "runs/quickstart/model"))
    p.add_argument("--concurrency", default="1,8,64", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=3000, help="most measured requests per (server, concurrency)")
    p.add_argument("--duration", type=float, default=20.0, help="most measured seconds per (server, concurrency), <= 60")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per connection before each round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per concurrency level (duration split among them)")
    p.add_argument("--data", default=str(ROOT / "examples/quickstart/validation.jsonl"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="batching,one_at_a_time", help="which of the two servers to run per dtype")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated --dtype values; a server pair per dtype")
    p.add_argument("--batching-args", default="", help="extra serve flags for the batching servers only")
    p.add_argument("--common-args", default="", help="extra serve flags for every server, e.g. '--threads 1'")
    p.add_argument("--variant", action="append", default=[], metavar="NAME='--flags'",
                   help="another batching server with these extra flags (after --common-args), e.g. "
                   "t2='--dtype bf16 --threads 2'; compared with the one-at-a-time server of its --dtype")
    p.add_argument("--json", default="serve_load.json", help="where to write the results")
    p.add_argument("--log-dir", default=None, help="server logs (default: a temp dir)")
    args = p.parse_args(argv)
    duration = min(args.duration, 60.0)
    levels = [int(x) for x in args.concurrency.split(",") if x]
    bodies = make_bodies(Path(args.data), 2048, args.seed)
    log_dir = Path(args.log_dir or os.environ.get("TMPDIR", "/tmp")) / "rewardforge-serve-load"
    log_dir.mkdir(parents=True, exist_ok=True)
    common = args.common_args.split()
    wanted = [m for m in args.modes.split(",") if m]
    servers_args: dict[str, list[str]] = {}
    dtype_of: dict[str, str] = {}
    for d in [x for x in args.dtypes.split(",") if x]:
        if "batching" in wanted:
            servers_args[f"batching/{d}"] = common + ["--dtype", d] + args.batching_args.split()
        if "one_at_a_time" in wanted:
            servers_args[f"one_at_a_time/{d}"] = common + ["--dtype", d, "--max-batch-items", "1", "--max-wait-ms", "0"]
    for name, flags in parse_variants(args.variant).items():
        servers_args[name] = common + flags
    for name, flags in servers_args.items():
        dtype_of[name] = flag_value(flags, "--dtype", "fp32")
    names = list(servers_args)
    rounds = max(1, args.rounds)
    results: dict[str, list[dict]] = {m: [] for m in names}
    load_at_start = round(os.getloadavg()[0], 2)
    print(f"1-minute load average at start: {load_at_start} on {os.cpu_count()} CPUs", flush=True)
    for name in names:
        print(f"  {name}: rewardforge serve MODEL {' '.join(servers_args[name])}", flush=True)
    servers: dict[str, Server] = {}
    try:
        for name in names:  # one at a time: loading models side by side on a small machine only slows each
            servers[name] = Server(args.model_dir, servers_args[name], log_dir / f"{name.replace('/', '_')}.log")
            servers[name].wait_ready()
        for c in levels:
            acc = {m: {"latencies": [], "errors": 0, "seconds": 0.0, "items": 0.0, "batches": 0.0, "client_cpu": 0.0,
                       "server_cpu": 0.0, "model_cpu": 0.0, "answered": 0, "machine_busy": 0.0, "machine_total": 0.0}
                   for m in names}
            for k in range(rounds):  # alternate the servers in short rounds: load from elsewhere hits all alike
                for m in (names if k % 2 == 0 else names[::-1]):
                    before = batch_stats(servers[m].metrics())
                    cpu0, (scpu0, mcpu0), (busy0, tot0) = time.process_time(), servers[m].cpu_seconds(), machine_cpu()
                    r = asyncio.run(drive(servers[m].port, bodies, c, max(1, args.requests // rounds), duration / rounds,
                                          args.warmup))
                    cpu1, (scpu1, mcpu1), (busy1, tot1) = time.process_time(), servers[m].cpu_seconds(), machine_cpu()
                    after = batch_stats(servers[m].metrics())
                    a = acc[m]
                    a["latencies"] += r["latencies"]
                    a["errors"] += r["errors"]
                    a["seconds"] += r["seconds"]
                    a["items"] += after.get("items", 0) - before.get("items", 0)
                    a["batches"] += after.get("batches", 0) - before.get("batches", 0)
                    # CPU over the whole round, warmup included (the wall time below is too)
                    a["client_cpu"] += cpu1 - cpu0
                    a["server_cpu"] += scpu1 - scpu0
                    a["model_cpu"] += mcpu1 - mcpu0
                    a["answered"] += r["answered"]
                    a["machine_busy"] += busy1 - busy0
                    a["machine_total"] += tot1 - tot0
            for m in names:
                a = acc[m]
                r = summarize(c, a["latencies"], a["errors"], a["seconds"])
                r["mean_batch_size"] = round(a["items"] / a["batches"], 2) if a["batches"] else None
                wall = a["machine_total"] / (os.cpu_count() or 1)  # seconds of wall time the rounds took
                if wall > 0:  # in CPU cores busy on average: this server, the client, and the machine as a whole
                    r["server_cores"] = round(a["server_cpu"] / wall, 2)
                    r["client_cores"] = round(a["client_cpu"] / wall, 2)
                    r["machine_cores_busy"] = round(a["machine_busy"] / wall, 2)
                    r["other_cores"] = round(max(0.0, r["machine_cores_busy"] - r["server_cores"] - r["client_cores"]), 2)
                if a["answered"]:  # CPU per request: robust to how much of the machine others left us
                    r["server_cpu_ms_per_request"] = round(a["server_cpu"] / a["answered"] * 1000, 2)
                    r["model_thread_cpu_ms_per_request"] = round(a["model_cpu"] / a["answered"] * 1000, 2)
                r["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # other work on the machine skews results
                results[m].append(r)
                print(f"{m:>22} c={c:<3} {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  mean batch {r['mean_batch_size']}  ({r['requests']} requests, "
                      f"{r['errors']} errors; cores busy: server {r.get('server_cores')}, client {r.get('client_cores')}, "
                      f"others {r.get('other_cores')}; server CPU/request {r.get('server_cpu_ms_per_request')} ms, of "
                      f"which model thread {r.get('model_thread_cpu_ms_per_request')} ms; load {r['loadavg_1m_after']})",
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()

    def rps(name: str, i: int) -> float:
        rs = results.get(name) or []
        return rs[i]["throughput_rps"] if i < len(rs) else float("nan")

    comparisons = []  # (label, numerator server, denominator server)
    for name in names:
        base = f"one_at_a_time/{dtype_of[name]}"
        if not name.startswith("one_at_a_time/") and base in results:
            comparisons.append((f"{name} / {base}", name, base))
    if "batching/bf16" in results and "one_at_a_time/fp32" in results:
        comparisons.append(("batching/bf16 / one_at_a_time/fp32 (dtypes differ)", "batching/bf16", "one_at_a_time/fp32"))

    print()
    header = f"{'server':>22} | " + " | ".join(f"c={c}: {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}" for c in levels)
    print(header)
    print("-" * len(header))
    for m in names:
        cells = []
        for i, c in enumerate(levels):
            r = results[m][i] if i < len(results[m]) else {}
            cells.append(f"{'':>{len(f'c={c}:')}} {r.get('throughput_rps', float('nan')):>7.1f} "
                         f"{r.get('p50_ms', float('nan')):>8.1f} {r.get('p99_ms', float('nan')):>8.1f}")
        print(f"{m:>22} | " + " | ".join(cells))
    ratios: dict[str, dict[str, float]] = {}
    if comparisons:
        print()
        print("throughput ratios: " + ", ".join(f"c={c}" for c in levels))
        for label, num, den in comparisons:
            ratios[label] = {str(c): round(rps(num, i) / rps(den, i), 2) if rps(den, i) else float("nan")
                             for i, c in enumerate(levels)}
            print(f"  {label:<52} " + "  ".join(f"{ratios[label][str(c)]:6.2f}" for c in levels))
    out = {"model_dir": args.model_dir, "loadavg_1m_at_start": load_at_start, "server_args": servers_args,
           "items_per_request": 1, "duration_limit_s": duration, "rounds": rounds, "request_limit": args.requests,
           "cpu_count": os.cpu_count(), "results": results, "throughput_ratio": ratios}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
