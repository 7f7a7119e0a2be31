"""rewardforge serve under stress and attack, on 127.0.0.1 only.

* a soak: thousands of requests at concurrency 64 against the CLI server in a subprocess, 10% of
  them malformed, oversized or unauthorised: every valid answer equals the offline scorer's, in
  input order; every bad one gets its own 4xx; no 5xx; the server's RSS stays flat;
* slow clients (headers, then a trickle or nothing) never hold up other requests' batches and get
  a 408 at --body-timeout-s; clients that disconnect mid-request are dropped from the queue;
* the OpenAPI schema fuzzed with schemathesis: no 5xx, every response as documented;
* security defaults: loopback bind, the bearer token on every non-health route compared with
  ``hmac.compare_digest``, and error bodies that never carry a path or a traceback.

``pytest -s`` prints the soak's figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import (  # noqa: E402,F401 - binary_dir and binary_scorer are fixtures
    HOST,
    PROMPTS,
    RESPONSES,
    Gate,
    LiveServer,
    binary_dir,
    binary_scorer,
    offline,
    post_in_thread,
    wait_for,
    wait_healthy,
)

from rewardforge.serve import ServeConfig  # noqa: E402

KEY = "soak-key-0123456789abcdef"
INFER = "/v2/models/reward_model/infer"
# an absolute POSIX path of two or more parts, as a leaked file name would look
ABS_PATH = re.compile(r"(?<![\w:/])/(?:[\w.-]+/)+[\w.-]+")


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def raw_send(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A raw client: sends ``head`` (request line + headers, CRLF-terminated lines) and ``body``."""
    s = socket.create_connection((HOST, port), timeout=10)
    s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return s


def post_head(path: str, length: int, key: str | None = None) -> str:
    auth = f"Authorization: Bearer {key}\n" if key else ""
    return f"POST {path} HTTP/1.1\nHost: {HOST}\nContent-Type: application/json\n{auth}Content-Length: {length}\n"


def read_response(s: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 response with a Content-Length."""
    s.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(body) < n:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body[:n]


def infer_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [len(texts), 1], "data": [[t] for t in texts]}],
            "outputs": [{"name": "rewards", "parameters": {"binary_data": False}}]}


# ---------------------------------------------------------------- soak


SOAK_REQUESTS = 2400  # upper bound; the time limit below may stop it earlier
SOAK_WARMUP = 300  # requests before the starting RSS is read
SOAK_SECONDS = 45.0  # sending stops here whatever the count
SOAK_CONCURRENCY = 64
SOAK_MIN_DONE = 1200  # fewer than this in SOAK_SECONDS and the test fails: the server is stuck, not slow
RSS_GROWTH_LIMIT = 16 * 2**20  # RSS at the end may exceed RSS after warm-up by at most this
SOAK_LIMITS = dict(max_body_bytes=32_768, max_items_per_request=8, max_item_tokens=64)

# every kind of bad request in the soak, and the status it must get
BAD_KINDS = {
    "malformed_json": 400,
    "wrong_type": 422,
    "empty_items": 422,
    "body_too_large": 413,
    "too_many_items": 413,
    "too_many_tokens": 413,
    "v2_malformed": 400,
    "missing_token": 401,
    "wrong_token": 401,
}


def _soak_plan(pool_pairs, pool_texts, n: int, seed: int = 0):
    """[(kind, path, body bytes, headers, expected rewards or expected status)]: 90% valid, 10% bad."""
    rng = random.Random(seed)
    good = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad_kinds = list(BAD_KINDS)
    plan = []
    for k in range(n):
        if rng.random() < 0.10:
            kind = bad_kinds[k % len(bad_kinds)] if rng.random() < 0.5 else rng.choice(bad_kinds)
            headers, path = dict(good), "/v1/score"
            one = {"items": [pool_pairs[0][0]]}
            if kind == "malformed_json":
                body = b'{"items": [{"text": "an unfinished'
            elif kind == "wrong_type":
                body = json.dumps({"items": [{"text": rng.randrange(100)}]}).encode()
            elif kind == "empty_items":
                body = b'{"items": []}'
            elif kind == "body_too_large":
                body = json.dumps({"items": [{"text": "x" * (SOAK_LIMITS["max_body_bytes"] + 1000)}]}).encode()
            elif kind == "too_many_items":
                body = json.dumps({"items": [pool_pairs[i][0] for i in range(9)]}).encode()
            elif kind == "too_many_tokens":
                body = json.dumps({"items": [{"text": "gravity keeps planets in orbit " * 40}]}).encode()
            elif kind == "v2_malformed":
                path = INFER
                body = json.dumps({"inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}).encode()
            elif kind == "missing_token":
                headers.pop("Authorization")
                body = json.dumps(one).encode()
            else:  # wrong_token: one character off, same length
                headers["Authorization"] = "Bearer " + KEY[:-1] + ("x" if KEY[-1] != "x" else "y")
                body = json.dumps(one).encode()
            plan.append((kind, path, body, headers, BAD_KINDS[kind]))
            continue
        r = rng.random()
        if r < 0.7:
            picks = [pool_pairs[rng.randrange(len(pool_pairs))] for _ in range(rng.randint(1, 4))]
            body = json.dumps({"items": [it for it, _ in picks]}).encode()
            plan.append(("score", "/v1/score", body, good, [w for _, w in picks]))
        elif r < 0.85:
            picks = [pool_texts[rng.randrange(len(pool_texts))] for _ in range(rng.randint(1, 3))]
            body = json.dumps({"query": [t for t, _ in picks], "prompts": ["ignored"] * len(picks)}).encode()
            plan.append(("get_reward", "/get_reward", body, good, [w for _, w in picks]))
        else:
            picks = [pool_texts[rng.randrange(len(pool_texts))] for _ in range(rng.randint(1, 3))]
            plan.append(("v2_infer", INFER, json.dumps(infer_body([t for t, _ in picks])).encode(), good, [w for _, w in picks]))
    return plan


def _check_answer(kind: str, expected, resp: httpx.Response) -> str | None:
    """None when ``resp`` is the right answer to the planned request, else why not."""
    if isinstance(expected, int):  # a bad request: exactly its 4xx, with an error message
        if resp.status_code != expected:
            return f"{kind}: got {resp.status_code}, want {expected}: {resp.text[:200]}"
        if not isinstance(resp.json().get("error"), str):
            return f"{kind}: no error message"
        return None
    if resp.status_code != 200:
        return f"{kind}: got {resp.status_code}: {resp.text[:200]}"
    body = resp.json()
    if kind == "score":
        got = [r["reward"] for r in body["results"]]
    elif kind == "get_reward":
        got = body["rewards"]
    else:
        got = body["outputs"][0]["data"]
    if len(got) != len(expected) or not np.allclose(got, expected, atol=1e-4, rtol=0):
        return f"{kind}: rewards {got} != offline {expected}"
    return None


def _rss(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:  # Linux without psutil
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the RSS")


def _listening_addresses(pid: int, port: int) -> set[str]:
    """The addresses ``pid`` listens on (psutil), or that anything listens on ``port`` on (/proc/net)."""
    try:
        import psutil

        return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except ImportError:
        out = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as fh:
                for line in fh.readlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    ip, p = local.split(":")
                    if state == "0A" and int(p, 16) == port:  # LISTEN
                        out.add(socket.inet_ntoa(bytes.fromhex(ip)[::-1]) if len(ip) == 8 else ip)
        return out


def test_soak_thousands_of_mixed_requests_at_concurrency_64(binary_dir, binary_scorer, tmp_path):
    # distinct items, each scored once offline; the plan refers to them
    pool_items = [{"prompt": f"{PROMPTS[i % 6]} (question {i})", "response": RESPONSES[(i * 5) % 6]} for i in range(36)]
    pair_ref = offline(binary_scorer, pool_items).reward
    texts = [binary_scorer.render(it["prompt"], it["response"])[0] for it in pool_items[:24]]
    text_ref = offline(binary_scorer, [{"text": t} for t in texts]).reward
    pool_pairs = [(it, float(w)) for it, w in zip(pool_items, pair_ref)]
    pool_texts = [(t, float(w)) for t, w in zip(texts, text_ref)]
    assert len(np.unique(np.round(pair_ref, 3))) > 24  # the rewards tell the items apart: order matters
    plan = _soak_plan(pool_pairs, pool_texts, SOAK_REQUESTS)

    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("REWARDFORGE_API_KEY", None)
    limits = [a for k, v in SOAK_LIMITS.items() for a in ("--" + k.replace("_", "-"), str(v))]
    with open(log_path, "wb") as log_fh:  # no --host: the default must be loopback
        proc = subprocess.Popen([sys.executable, "-m", "rewardforge", "serve", str(binary_dir), "--port", str(port),
                                 "--api-key", KEY, "--threads", "1", "--log-level", "warning", *limits],
                                stdout=log_fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            wait_healthy(c, proc, 90, log_path.read_text)
        assert _listening_addresses(proc.pid, port) == {HOST}

        results: list = [None] * len(plan)
        rss: dict[str, int] = {}
        peak = [0]
        stop_sampling = threading.Event()

        def sample():  # peak RSS while the soak runs
            while not stop_sampling.wait(0.25):
                peak[0] = max(peak[0], _rss(proc.pid))

        async def run(indices: list[int], t_stop: float) -> None:
            queue: asyncio.Queue = asyncio.Queue()
            for i in indices:
                queue.put_nowait(i)
            limits_ = httpx.Limits(max_connections=SOAK_CONCURRENCY, max_keepalive_connections=SOAK_CONCURRENCY)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits_) as client:
                async def worker():
                    while not queue.empty() and time.monotonic() < t_stop:
                        i = queue.get_nowait()
                        _, path, body, headers, _ = plan[i]
                        try:
                            results[i] = await client.post(path, content=body, headers=headers)
                        except httpx.HTTPError as e:  # a transport failure is a failure too
                            results[i] = e

                await asyncio.gather(*(worker() for _ in range(SOAK_CONCURRENCY)))

        t0 = time.monotonic()
        asyncio.run(run(list(range(SOAK_WARMUP)), t0 + SOAK_SECONDS))
        rss["start"] = _rss(proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t1 = time.monotonic()
        asyncio.run(run(list(range(SOAK_WARMUP, len(plan))), t0 + SOAK_SECONDS))
        wall, wall_total = time.monotonic() - t1, time.monotonic() - t0
        stop_sampling.set()
        sampler.join()
        rss["end"] = _rss(proc.pid)
        rss["peak"] = max(peak[0], rss["end"])

        with httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {KEY}"}) as c:
            wait_for(lambda: metric_values(c.get("/metrics").text)["rewardforge_inflight_requests"] == 0)
            metrics = metric_values(c.get("/metrics").text)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    server_log = log_path.read_text()

    done = [i for i, r in enumerate(results) if r is not None]
    statuses = [results[i].status_code for i in done if isinstance(results[i], httpx.Response)]
    bad_sent: dict[str, int] = {}
    for i in done:
        if isinstance(plan[i][4], int):
            bad_sent[plan[i][0]] = bad_sent.get(plan[i][0], 0) + 1
    n_bad = sum(bad_sent.values())
    n_4xx = sum(400 <= s < 500 for s in statuses)
    n_5xx = sum(s >= 500 for s in statuses)
    mib = 2**20
    print(f"\nsoak: {len(done)} requests in {wall_total:.1f} s ({len(done) - SOAK_WARMUP} after warm-up in {wall:.1f} s, "
          f"{(len(done) - SOAK_WARMUP) / wall:.0f} req/s) at concurrency {SOAK_CONCURRENCY}; "
          f"valid {len(done) - n_bad}, bad {n_bad} {dict(sorted(bad_sent.items()))}; "
          f"4xx {n_4xx}, 5xx {n_5xx}, transport errors {len(done) - len(statuses)}; "
          f"server RSS after warm-up {rss['start'] / mib:.1f} MiB, end {rss['end'] / mib:.1f} MiB "
          f"(+{(rss['end'] - rss['start']) / mib:.1f}), peak {rss['peak'] / mib:.1f} MiB")

    assert len(done) >= min(SOAK_MIN_DONE, len(plan)), f"only {len(done)} requests in {SOAK_SECONDS} s"
    problems = [f"#{i} " + (repr(results[i]) if not isinstance(results[i], httpx.Response)
                            else (_check_answer(plan[i][0], plan[i][4], results[i]) or ""))
                for i in done]
    problems = [p for p in problems if not p.endswith(" ")]
    assert not problems, f"{len(problems)} wrong answers, e.g. {problems[:5]}"
    assert n_5xx == 0 and n_4xx == n_bad and set(bad_sent) == set(BAD_KINDS)
    # the server counted the same: a 200 per valid request, the 4xx per kind, no 5xx, nothing left queued
    assert not any(k.startswith("rewardforge_requests_total") and 'status="5' in k for k in metrics)
    n_valid = {kind: sum(plan[i][0] == kind for i in done) for kind in ("score", "get_reward", "v2_infer")}
    assert metrics['rewardforge_requests_total{route="/v1/score",status="200"}'] == n_valid["score"]
    assert metrics['rewardforge_requests_total{route="/get_reward",status="200"}'] == n_valid["get_reward"]
    assert metrics['rewardforge_requests_total{route="/v2/models/{name}/infer",status="200"}'] == n_valid["v2_infer"]
    assert metrics['rewardforge_rejected_total{reason="unauthorized"}'] == bad_sent["missing_token"] + bad_sent["wrong_token"]
    assert metrics["rewardforge_queue_depth"] == 0 and metrics["rewardforge_inflight_requests"] == 0
    assert rss["end"] - rss["start"] <= RSS_GROWTH_LIMIT, rss
    assert code in (0, -signal.SIGTERM), server_log
    assert "Traceback" not in server_log and "ERROR" not in server_log, server_log


# ---------------------------------------------------------------- slow and vanishing clients


def test_slow_clients_neither_hold_up_batches_nor_keep_their_connection(binary_scorer):
    # a long max_wait_ms: a batch that waited for the slow clients' requests would take 3 s
    cfg = ServeConfig(max_wait_ms=3000, body_timeout_s=2.0)
    server = LiveServer(binary_scorer, cfg)
    item = {"prompt": PROMPTS[0], "response": RESPONSES[0]}
    body = json.dumps({"items": [item]}).encode()
    want = float(offline(binary_scorer, [item]).reward[0])
    sockets: list[socket.socket] = []
    trickler = finisher = None
    stop = threading.Event()
    try:
        t_start = time.monotonic()
        # headers and part of the body, then nothing
        for _ in range(3):
            sockets.append(raw_send(server.port, post_head("/v1/score", len(body)), body[:10]))
        # headers, then the body one byte every 0.1 s: it is still arriving at the deadline
        trickler = raw_send(server.port, post_head("/v1/score", len(body)))

        def trickle():
            for b in body[:-1]:
                if stop.wait(0.1):
                    return
                try:
                    trickler.send(bytes([b]))
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        # a slow client that does finish in time is answered normally, and at once
        finisher = raw_send(server.port, post_head("/v1/score", len(body)), body[:5])
        time.sleep(0.3)
        t = time.monotonic()
        finisher.sendall(body[5:])
        status, _, fbody = read_response(finisher)
        assert status == 200 and json.loads(fbody)["results"][0]["reward"] == pytest.approx(want, abs=1e-4)
        assert time.monotonic() - t < 1.0
        with httpx.Client(base_url=server.url, timeout=30) as c:
            latencies = []
            for _ in range(10):
                t = time.monotonic()
                r = c.post("/v1/score", json={"items": [item]})
                latencies.append(time.monotonic() - t)
                assert r.status_code == 200 and r.json()["results"][0]["reward"] == pytest.approx(want, abs=1e-4)
            assert max(latencies) < 1.0, latencies  # not max_wait_ms=3000: nobody waits for the slow ones
            for s in sockets + [trickler]:  # 408 at body_timeout_s from their first byte, and the connection closed
                status, headers, ebody = read_response(s, timeout=10)
                assert status == 408 and "body_timeout_s=2" in json.loads(ebody)["error"]
                assert headers.get("connection") == "close"
                try:
                    assert s.recv(1) == b""  # closed by the server
                except ConnectionResetError:
                    pass
            assert time.monotonic() - t_start < 8
            stop.set()
            m = metric_values(c.get("/metrics").text)
            assert m['rewardforge_rejected_total{reason="body_timeout"}'] == 4
            assert m['rewardforge_requests_total{route="/v1/score",status="408"}'] == 4
            assert m["rewardforge_queue_depth"] == 0 and m["rewardforge_inflight_requests"] == 0
            assert server.batcher._expected == 0
    finally:
        stop.set()
        for s in sockets + [trickler, finisher]:
            if s is not None:
                s.close()
        server.stop()


def test_clients_that_disconnect_mid_request_are_dropped_and_others_still_answered(binary_scorer):
    server = LiveServer(binary_scorer, ServeConfig(max_wait_ms=0, max_batch_items=4))
    gate = Gate(server.batcher.model)
    server.batcher.model = gate
    metrics = server.app.state.metrics
    items = [{"prompt": PROMPTS[i], "response": RESPONSES[i]} for i in range(4)]
    four = json.dumps({"items": items}).encode()
    results: list = []
    try:
        items_before = metrics.items.value()
        a = post_in_thread(server.url + "/v1/score", {"items": items[:1]}, results)
        assert gate.entered.wait(10)  # A is in the model, which stays blocked
        # B sends a whole request and hangs up before reading the answer, while its 4 sequences are queued
        b = raw_send(server.port, post_head("/v1/score", len(four)), four)
        wait_for(lambda: server.batcher.queue_depth == 4 and server.batcher.inflight == 2)
        b.close()
        # B's handler notices and gives up its place: its sequences will be skipped, not scored
        wait_for(lambda: server.batcher.inflight == 1)
        # C hangs up in the middle of its body; a burst of others send whole requests and hang up at once
        c_sock = raw_send(server.port, post_head("/v1/score", len(four)), four[:20])
        c_sock.close()
        burst = [raw_send(server.port, post_head("/v1/score", len(four)), four) for _ in range(16)]
        for s in burst:
            s.close()
        wait_for(lambda: metrics.requests.value("/v1/score", "499") == 18)
        # the 499 is counted as each handler gives up; its place in the batcher is freed just after (a race
        # seen once under load): every one of them must still give it up, leaving only A
        wait_for(lambda: server.batcher.inflight == 1)
        gate.release.set()
        a.join(30)
        assert [r.status_code for r in results] == [200]
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/score", json={"items": items})
            assert r.status_code == 200
            np.testing.assert_allclose([x["reward"] for x in r.json()["results"]], offline(binary_scorer, items).reward,
                                       atol=1e-4)
            m = metric_values(c.get("/metrics").text)
        assert m["rewardforge_queue_depth"] == 0 and m["rewardforge_inflight_requests"] == 0
        assert server.batcher._pending_tokens == 0 and server.batcher._expected == 0
        assert metrics.items.value() - items_before == 1 + 4  # A and the last request: nothing for the hung-up ones
    finally:
        gate.release.set()
        server.stop()


# ---------------------------------------------------------------- schema fuzzing


try:
    import schemathesis
    from hypothesis import HealthCheck, settings

    if int(schemathesis.__version__.split(".")[0]) < 4:  # the pytest loaders and check names below are 4.x's
        schemathesis = None
except ImportError:  # pragma: no cover - the test extra has both
    schemathesis = None

FUZZ_CALLS: dict = {"n": 0, "statuses": {}}  # what the fuzzer sent, printed at the end


@pytest.fixture(scope="module")
def fuzz_server(binary_scorer):
    cfg = ServeConfig(max_wait_ms=1, api_key=KEY, max_body_bytes=65_536, max_items_per_request=16, max_queue_items=256)
    s = LiveServer(binary_scorer, cfg)
    yield s
    s.stop()
    if FUZZ_CALLS["n"]:
        print(f"\nschemathesis: {FUZZ_CALLS['n']} calls, statuses {dict(sorted(FUZZ_CALLS['statuses'].items()))}")


@pytest.fixture
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})


if schemathesis is not None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    FUZZ_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
                   response_schema_conformance, negative_data_rejection, ignored_auth]

    @schemathesis.pytest.from_fixture("api_schema").parametrize()
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def test_openapi_schema_fuzz(case, fuzz_server):
        if case.method == "POST" and case.path_parameters:  # fuzz the v2 inference body, not just the model name
            case.path_parameters = {**case.path_parameters, "name": "reward_model"}
            if "version" in case.path_parameters:
                case.path_parameters["version"] = "1"
        response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=FUZZ_CHECKS, timeout=30)
        FUZZ_CALLS["n"] += 1
        FUZZ_CALLS["statuses"][response.status_code] = FUZZ_CALLS["statuses"].get(response.status_code, 0) + 1
        assert response.status_code < 500
        if response.status_code >= 400:
            body = response.text
            assert "Traceback" not in body and not ABS_PATH.search(body), body
else:

    @pytest.mark.skip(reason="needs schemathesis >= 4 (the test extra)")
    def test_openapi_schema_fuzz():
        pass


# ---------------------------------------------------------------- security defaults


def test_defaults_bind_loopback_only():
    import argparse

    from rewardforge.serve import make_server
    from rewardforge.serve.config import add_serve_arguments, config_from_args

    assert ServeConfig().host == "127.0.0.1" and ServeConfig().api_key is None
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert config_from_args(p.parse_args([])).host == "127.0.0.1"
    assert make_server(object(), ServeConfig()).config.host == "127.0.0.1"
    cfg = ServeConfig()
    for name in ("max_body_bytes", "max_items_per_request", "max_item_tokens", "max_queue_items", "body_timeout_s"):
        assert 0 < getattr(cfg, name) < float("inf"), name  # every input size and wait is bounded by default
    with pytest.raises(ValueError, match="body_timeout_s"):
        ServeConfig(body_timeout_s=0).validate()


def _every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app serves, docs included."""
    out = []
    for r in app.routes:
        path = r.path.replace("{name}", "reward_model").replace("{version}", "1")
        for m in sorted(getattr(r, "methods", None) or ()):
            if m != "HEAD":
                out.append((m, path))
    return out


def test_bearer_token_on_every_route_compared_in_constant_time(binary_scorer, monkeypatch):
    import hmac

    from rewardforge.serve import app as app_module

    monkeypatch.delenv("REWARDFORGE_API_KEY", raising=False)
    key = "s3cret-clé"  # non-ASCII: compared as UTF-8 bytes
    server = LiveServer(binary_scorer, ServeConfig(max_wait_ms=1, api_key=key))
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    text = binary_scorer.render(PROMPTS[0], RESPONSES[0])[0]
    bodies = {"/v1/score": {"items": [{"text": text}]}, "/get_reward": {"query": [text]},
              INFER: infer_body([text]), "/v2/models/reward_model/versions/1/infer": infer_body([text])}
    routes = _every_route(server.app)
    assert {("POST", "/v1/score"), ("POST", "/get_reward"), ("POST", INFER), ("GET", "/metrics"), ("GET", "/docs"),
            ("GET", "/openapi.json"), ("GET", "/v2/models/reward_model/config")} <= set(routes)
    public = {"/health", "/v2/health/live", "/v2/health/ready"}
    right = "Bearer " + key
    wrong = ["", "Bearer", "Bearer wrong", "Bearer " + key[:-1], "Bearer " + key + "x", "Basic " + key, key,
             "Bearer " + key.upper(), "Token " + key]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            def call(method, path, auth):
                headers = {"Authorization": auth.encode()} if auth else {}
                return c.request(method, path, json=bodies.get(path), headers=headers)

            for method, path in routes:
                ok = call(method, path, right)
                assert ok.status_code == 200, (method, path, ok.status_code, ok.text)
                assert call(method, path, "bearer " + key).status_code == 200  # the scheme is case-insensitive
                for auth in wrong:
                    r = call(method, path, auth)
                    if path in public:
                        assert r.status_code == 200, (path, auth)  # probes stay open (documented)
                    else:
                        assert r.status_code == 401, (method, path, auth, r.status_code)
                        assert r.headers["www-authenticate"] == "Bearer"
                        assert r.json() == {"error": "missing or wrong API key; send 'Authorization: Bearer KEY'"}
            # unknown paths too: no 404 that would tell a stranger what exists
            assert c.get("/nope").status_code == 401 and c.get("/nope", headers={"Authorization": right.encode()}).status_code == 404
    finally:
        server.stop()
    assert calls and all(b == key.encode() for _, b in calls)
    assert (key.encode(), key.encode()) in calls


def test_error_bodies_never_leak_paths_or_tracebacks(binary_dir, binary_scorer, caplog):
    server = LiveServer(binary_scorer, ServeConfig(max_wait_ms=1, max_items_per_request=4, max_item_tokens=40,
                                                   max_body_bytes=4000))
    service, batcher = server.app.state.service, server.app.state.batcher
    secret = str(binary_dir / "model.safetensors")
    text = binary_scorer.render(PROMPTS[0], RESPONSES[0])[0]
    requests = [("POST", "/v1/score", {"items": [{"text": text}]}), ("POST", "/get_reward", {"query": [text]}),
                ("POST", INFER, infer_body([text]))]

    def leaks(body: str) -> bool:
        return "Traceback" in body or str(binary_dir) in body or bool(ABS_PATH.search(body)) or "Error:" in body

    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            # every GET answer and every 4xx: no path anywhere
            for method, path in _every_route(server.app):
                if method == "GET" and path != "/docs":
                    assert str(binary_dir) not in c.get(path).text, path
            bad = [{"items": []}, {"items": [{"text": 5}]}, {"items": [{"txt": "a"}]}, {"items": [{"input_ids": [10**6]}]},
                   {"items": [{"messages": [{"role": "user", "content": "hi"}]}]}, {"items": [{"text": "a"}] * 5},
                   {"items": [{"text": "word " * 100}]}, {"items": [{"text": "x" * 5000}]}]
            for payload in bad:
                r = c.post("/v1/score", json=payload)
                assert 400 <= r.status_code < 500 and not leaks(r.text), r.text
            for body in (b"{", b"[" * 3000, json.dumps({"inputs": [{"name": "tokens", "datatype": ["INT64"], "shape": [1]}]}).encode(),
                         json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [2**40, 2**40], "data": []}]}).encode(),
                         json.dumps({"inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]}).encode(),
                         json.dumps({**infer_body([text]), "parameters": "binary"}).encode(),
                         json.dumps({**infer_body([text]), "outputs": [{"name": ["rewards"]}]}).encode()):
                r = c.post(INFER, content=body)
                assert r.status_code == 400 and not leaks(r.text), (body[:80], r.status_code, r.text)
            r = c.post(INFER, content=b"{}", headers={"Inference-Header-Content-Length": b"\xb2"})  # a non-ASCII digit
            assert r.status_code == 400, r.text
            # an input name echoed in the message, with a lone surrogate: the body is still valid UTF-8
            r = c.post(INFER, content=json.dumps({"inputs": [{"name": "x\ud800", "datatype": "BYTES", "shape": [1]}]}).encode())
            assert r.status_code == 400 and "unknown input 'x?'" in r.json()["error"], r.text

            # a bug while preparing the request: generic 500, traceback in the log
            def broken(*a, **kw):
                raise OSError(2, "No such file or directory", secret)

            original = service.prepare
            service.prepare = broken
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="rewardforge.serve"):
                for method, path, payload in requests:
                    r = c.request(method, path, json=payload)
                    assert r.status_code == 500 and r.headers["content-type"] == "application/json", (path, r.text)
                    assert r.json() == {"error": "internal server error; the details are in the server log"}
                    assert not leaks(r.text)
            service.prepare = original
            logged = [rec for rec in caplog.records if rec.name == "rewardforge.serve" and rec.exc_info]
            assert len(logged) == 3 and all(secret in str(rec.exc_info[1]) for rec in logged)
            assert all(path in rec.getMessage() for rec, (_, path, _) in zip(logged, requests))

            # the model itself fails: the request gets a generic 500, the log the exception
            def failing_model(ids, mask):
                raise RuntimeError(f"CUDA error reading {secret}")

            model = batcher.model
            batcher.model = failing_model
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="rewardforge.serve"):
                for method, path, payload in requests:
                    r = c.request(method, path, json=payload)
                    assert r.status_code == 500 and not leaks(r.text), r.text
                    assert "server log" in r.json()["error"]
            batcher.model = model
            assert sum(secret in str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info) == 3
            # and the server is fine afterwards
            assert c.post("/v1/score", json={"items": [{"text": text}]}).status_code == 200
    finally:
        server.stop()


def test_openapi_documents_errors_and_bearer_auth(binary_scorer):
    from rewardforge.serve import create_app

    plain = create_app(binary_scorer, ServeConfig()).openapi()
    keyed = create_app(binary_scorer, ServeConfig(api_key="k")).openapi()
    assert "securitySchemes" not in plain["components"]
    assert keyed["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in keyed["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "500" in codes
            if path in ("/health", "/v2/health/live", "/v2/health/ready"):
                assert "security" not in op and "401" not in codes
            else:
                assert op["security"] == [{"bearer": []}] and "401" in codes
            if method == "post":
                assert {"400", "408", "413", "422", "503"} <= codes
    score = keyed["paths"]["/v1/score"]["post"]["responses"]["422"]
    assert score["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "HTTPValidationError" not in keyed["components"]["schemas"]
    assert keyed["paths"][INFER.replace("reward_model", "{name}")]["post"]["requestBody"]["content"]["application/json"]
