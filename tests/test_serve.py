"""rewardforge serve: real HTTP on 127.0.0.1 (uvicorn in a thread, and the CLI in a subprocess).

Every endpoint, tritonclient.http against the v2 protocol, order under concurrency, 503 when the
queue is full, each 4xx, auth, graceful shutdown and parity with the offline scorer.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import rewardforge  # noqa: E402
from rewardforge.serve import ServeConfig, create_app, make_server  # noqa: E402

HOST = "127.0.0.1"
PROMPTS = ["How do I boil an egg?", "What is gravity?", "Why is the sky blue?", "Tell me about Paris.",
           "How far is the Moon?", "Can you help me?"]
RESPONSES = ["Put it in boiling water for nine minutes.", "That is a stupid question. Go away.",
             "Sure! Here is a clear answer: water boils at one hundred degrees.", "I cannot help with that request.",
             "Gravity keeps planets in orbit.", "Photosynthesis makes sugar from light. " * 6]


# ---------------------------------------------------------------- fixtures


def _export(tiny_model, kind: str, out: Path, attributes: list[str], weights: list[float], max_length: int,
            template: str = "auto") -> Path:
    """An exported model directory from a tiny random backbone (no training: fast)."""
    import torch

    from rewardforge.config import ModelConfig
    from rewardforge.data.template import setup_template
    from rewardforge.export.model_dir import write_model_dir
    from rewardforge.models.reward_model import build_model, load_tokenizer

    src = str(tiny_model(kind))
    tok = load_tokenizer(src)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name_or_path=src), tok, len(attributes), attributes)
    with torch.no_grad():  # spread the random rewards so different inputs score clearly differently
        for p in model.head().parameters():
            p.mul_(20.0)
    template = setup_template(tok, template)
    return write_model_dir(
        model, tok, out, reward_model_type="regression" if len(attributes) > 1 else "binary_ranking",
        attributes=attributes, attribute_weights=weights, max_length=max_length, truncation="prompt_left",
        template=template, stats={"reward_mean": 0.25, "reward_std": 0.5}, base_model=src,
    )


@pytest.fixture(scope="module")
def binary_dir(tiny_model, tmp_path_factory):
    """A decoder (Llama: BOS added, pad token added at export) with a scalar reward and the plain template."""
    return _export(tiny_model, "llama", tmp_path_factory.mktemp("serve") / "llama", ["reward"], [1.0], 32)


@pytest.fixture(scope="module")
def encoder_dir(tiny_model, tmp_path_factory):
    return _export(tiny_model, "bert", tmp_path_factory.mktemp("serve") / "bert", ["reward"], [1.0], 32)


@pytest.fixture(scope="module")
def regression_dir(tiny_model, tmp_path_factory):
    return _export(tiny_model, "qwen2", tmp_path_factory.mktemp("serve") / "qwen2", ["helpfulness", "safety"], [0.7, 0.3], 48)


@pytest.fixture(scope="module")
def binary_scorer(binary_dir):
    return rewardforge.load(binary_dir, device="cpu")


@pytest.fixture(scope="module")
def regression_scorer(regression_dir):
    return rewardforge.load(regression_dir, device="cpu")


class LiveServer:
    """uvicorn serving ``create_app(scorer, config)`` on a free loopback port, in a background thread."""

    def __init__(self, scorer, config: ServeConfig | None = None):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        self.config = replace(config or ServeConfig(max_wait_ms=2.0), host=HOST, port=self.port, log_level="warning")
        self.app = create_app(scorer, self.config)
        self.server = make_server(self.app, self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://{HOST}:{self.port}"

    @property
    def batcher(self):
        return self.app.state.batcher

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def binary_server(binary_scorer):
    s = LiveServer(binary_scorer)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def regression_server(regression_scorer):
    s = LiveServer(regression_scorer)
    yield s
    s.stop()


def offline(scorer, items: list[dict], normalize: bool = True):
    """The offline scorer's Scores for items of the native endpoint."""
    return scorer.score_items(items, normalize=normalize)


class Gate:
    """Wraps a model so forward passes block until released (to hold requests in flight)."""

    def __init__(self, model):
        self.model, self.entered, self.release = model, threading.Event(), threading.Event()

    def __call__(self, input_ids, mask):
        self.entered.set()
        assert self.release.wait(30), "gate never released"
        return self.model(input_ids, mask)


def post_in_thread(url: str, payload: dict, results: list, headers: dict | None = None) -> threading.Thread:
    def run():
        with httpx.Client(timeout=30) as c:
            results.append(c.post(url, json=payload, headers=headers or {}))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def wait_healthy(client, proc: subprocess.Popen, timeout: float, log=lambda: "") -> None:
    """Poll ``GET /health`` on a server subprocess until it answers 200; fail with its log if it dies."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, log()
        assert time.time() < deadline, "server did not come up"
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.01)


# ---------------------------------------------------------------- native endpoint


def test_score_matches_offline_scorer_for_every_item_form(binary_server, binary_scorer):
    long_prompt = " ".join(PROMPTS * 4)  # past max_length=32: truncated like the offline scorer
    items = [
        {"prompt": PROMPTS[0], "response": RESPONSES[0]},
        {"messages": [{"role": "user", "content": PROMPTS[1]}, {"role": "assistant", "content": RESPONSES[2]}]},
        {"prompt": [{"role": "user", "content": PROMPTS[2]}], "response": RESPONSES[4]},
        {"text": "Human: hi\n\nAssistant: hello there"},
        {"prompt": long_prompt, "response": RESPONSES[3]},
    ]
    with httpx.Client(base_url=binary_server.url, timeout=30) as c:
        r = c.post("/v1/score", json={"items": items + [{"input_ids": [2, 10, 11, 12, 3]}], "return_text": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "reward_model"
    results = body["results"]
    ref = offline(binary_scorer, items)
    for i, res in enumerate(results[:-1]):
        assert res["reward"] == pytest.approx(float(ref.reward[i]), abs=1e-4)
        assert res["reward_normalized"] == pytest.approx(float(ref.normalized[i]), abs=1e-4)
        assert res["num_tokens"] == int(ref.num_tokens[i])
        assert res["truncated"] == bool(ref.truncated[i])
        assert res["text"] == ref.texts[i]
        assert "attributes" not in res
    assert results[4]["truncated"] and results[4]["num_tokens"] == 32
    assert results[0]["reward_normalized"] == pytest.approx((results[0]["reward"] - 0.25) / 0.5, abs=1e-4)
    # the text item had no BOS: normalisation gave it the one the model was trained with
    assert results[3]["normalized"] == ["added_lead"] and results[3]["text"].startswith("<s>Human: hi")
    # token ids: normalised by default (the lead BOS added), verbatim with "normalize": false
    import torch

    bos = binary_scorer.tokenizer.bos_token_id
    with torch.no_grad():
        verbatim = binary_scorer.model(torch.tensor([[2, 10, 11, 12, 3]]), torch.ones(1, 5, dtype=torch.long))[0, 0].item()
        with_bos = binary_scorer.model(torch.tensor([[bos, 2, 10, 11, 12, 3]]), torch.ones(1, 6, dtype=torch.long))[0, 0].item()
    assert results[5]["reward"] == pytest.approx(with_bos, abs=1e-4)
    assert results[5]["num_tokens"] == 6 and results[5]["text"] is None and results[5]["normalized"] == ["added_lead"]
    with httpx.Client(base_url=binary_server.url, timeout=30) as c:
        r = c.post("/v1/score", json={"items": [{"input_ids": [2, 10, 11, 12, 3]}], "normalize": False,
                                      "return_tokens": True})
    res = r.json()["results"][0]
    assert res["reward"] == pytest.approx(verbatim, abs=1e-4) and res["tokens"] == [2, 10, 11, 12, 3]


def test_encoder_model_parity(encoder_dir):
    scorer = rewardforge.load(encoder_dir, device="cpu")
    server = LiveServer(scorer)
    items = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            results = c.post("/v1/score", json={"items": items}).json()["results"]
    finally:
        server.stop()
    ref = offline(scorer, items)
    np.testing.assert_allclose([r["reward"] for r in results], ref.reward, atol=1e-4)
    np.testing.assert_allclose([r["reward_normalized"] for r in results], ref.normalized, atol=1e-4)
    assert [r["num_tokens"] for r in results] == ref.num_tokens.tolist()


def test_regression_model_returns_every_attribute_and_the_weighted_combination(regression_server, regression_scorer):
    items = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
    with httpx.Client(base_url=regression_server.url, timeout=30) as c:
        results = c.post("/v1/score", json={"items": items}).json()["results"]
    ref = offline(regression_scorer, items)
    for i, res in enumerate(results):
        assert set(res["attributes"]) == {"helpfulness", "safety"}
        assert res["attributes"]["helpfulness"] == pytest.approx(float(ref.outputs[i, 0]), abs=1e-4)
        assert res["attributes"]["safety"] == pytest.approx(float(ref.outputs[i, 1]), abs=1e-4)
        combined = 0.7 * res["attributes"]["helpfulness"] + 0.3 * res["attributes"]["safety"]
        assert res["reward"] == pytest.approx(combined, abs=1e-4)
        assert res["reward"] == pytest.approx(float(ref.reward[i]), abs=1e-4)
        assert res["reward_normalized"] == pytest.approx(float(ref.normalized[i]), abs=1e-4)


def test_order_is_preserved_under_concurrency_and_requests_are_batched(binary_server, binary_scorer):
    rng = np.random.default_rng(0)
    requests = []
    for k in range(48):
        n = int(rng.integers(1, 5))
        requests.append([{"prompt": f"{PROMPTS[(k + j) % 6]} (case {k}.{j})",
                          "response": RESPONSES[int(rng.integers(0, 6))] * int(rng.integers(1, 3))} for j in range(n)])
    flat = [it for req in requests for it in req]
    ref = offline(binary_scorer, flat).reward
    assert len(np.unique(np.round(ref, 3))) > len(flat) // 2  # the rewards tell inputs apart
    batches_before = binary_server.app.state.metrics.batches.value()

    async def run():
        async with httpx.AsyncClient(base_url=binary_server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=48)) as c:
            return await asyncio.gather(*(c.post("/v1/score", json={"items": req}) for req in requests))

    responses = asyncio.run(run())
    got = []
    for resp, req in zip(responses, requests):
        assert resp.status_code == 200, resp.text
        res = resp.json()["results"]
        assert len(res) == len(req)
        got += [r["reward"] for r in res]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    batches = binary_server.app.state.metrics.batches.value() - batches_before
    assert batches < len(flat)  # sequences from different requests shared forward passes


# ---------------------------------------------------------------- OpenRLHF


def test_get_reward_openrlhf_protocol(binary_server, binary_scorer):
    texts = [binary_scorer.render(p, r)[0] for p, r in zip(PROMPTS, RESPONSES)]
    pad = binary_scorer.tokenizer.pad_token
    queries = [pad * 3 + texts[0]] + texts[1:]  # left padding from OpenRLHF's decoded sequences is dropped
    with httpx.Client(base_url=binary_server.url, timeout=30) as c:
        r = c.post("/get_reward", json={"query": queries, "prompts": PROMPTS, "labels": [""] * 6},
                   headers={"Content-Type": "application/json"})
        single = c.post("/get_reward", json={"query": texts[1]})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"rewards", "scores", "extra_logs"}
    assert r.json()["scores"] == r.json()["rewards"]
    assert set(r.json()["extra_logs"]) == {"truncated", "num_tokens", "normalized"}
    assert r.json()["extra_logs"]["normalized"][0] == 1.0  # the left padding was stripped
    np.testing.assert_allclose(r.json()["rewards"], binary_scorer.score_texts(texts), atol=1e-4)
    assert single.json()["rewards"] == pytest.approx([float(binary_scorer.score_texts([texts[1]])[0])], abs=1e-4)


# ---------------------------------------------------------------- KServe v2 / Triton


def test_tritonclient_http_against_the_v2_protocol(binary_server, binary_scorer):
    tc = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    texts = [binary_scorer.render(p, r)[0] for p, r in zip(PROMPTS, RESPONSES)]
    want = binary_scorer.score_texts(texts)
    client = tc.InferenceServerClient(url=f"{HOST}:{binary_server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("reward_model")
        assert not client.is_model_ready("other_model")
        meta = client.get_model_metadata("reward_model")
        assert meta["name"] == "reward_model"
        assert {"name": "sentences", "datatype": "BYTES", "shape": [-1, -1]} in meta["inputs"]
        assert meta["outputs"] == [{"name": "rewards", "datatype": "FP32", "shape": [-1, 1]},
                                   {"name": "exceeded", "datatype": "INT32", "shape": [-1, 1]}]
        config = client.get_model_config("reward_model")
        assert config["max_batch_size"] > 0 and config["output"][0]["data_type"] == "TYPE_FP32"
        assert client.get_model_repository_index() == [{"name": "reward_model", "version": "1", "state": "READY"}]
        assert client.get_server_metadata()["name"] == "rewardforge"

        # NeMo-Aligner's encoding: [B, 1] bytes, binary tensors both ways (the stock client's default)
        sentences = np.char.encode(np.array(texts)[..., np.newaxis], "utf-8")
        inp = tc.InferInput("sentences", sentences.shape, "BYTES")
        inp.set_data_from_numpy(sentences)
        res = client.infer("reward_model", [inp])
        assert res.as_numpy("rewards").shape == (6, 1) and res.as_numpy("rewards").dtype == np.float32
        np.testing.assert_allclose(res.as_numpy("rewards")[:, 0], want, atol=1e-4)

        # JSON tensors both ways, explicit output, gzip body
        obj = np.array([t.encode() for t in texts], dtype=np.object_)
        inp = tc.InferInput("sentences", [6], "BYTES")
        inp.set_data_from_numpy(obj, binary_data=False)
        out = tc.InferRequestedOutput("rewards", binary_data=False)
        res = client.infer("reward_model", [inp], outputs=[out], request_compression_algorithm="gzip", request_id="r1")
        assert res.get_response()["id"] == "r1"
        np.testing.assert_allclose(res.as_numpy("rewards")[:, 0], want, atol=1e-4)

        # tokens + sequence_lengths, right-padded with 0 as NeMo-Aligner sends them
        from rewardforge.data.tokenize import TruncationStats, tokenize_texts

        ids, _ = tokenize_texts(binary_scorer.tokenizer, texts[:3], [len(t) for t in texts[:3]],
                                binary_scorer.max_length, binary_scorer.truncation, TruncationStats())
        width = max(len(x) for x in ids)
        tokens = np.zeros((3, width), np.int64)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = x
        lengths = np.array([[len(x)] for x in ids], np.int64)
        t_in = tc.InferInput("tokens", tokens.shape, "INT64")
        t_in.set_data_from_numpy(tokens)
        l_in = tc.InferInput("sequence_lengths", lengths.shape, "INT64")
        l_in.set_data_from_numpy(lengths)
        res = client.infer("reward_model", [t_in, l_in], outputs=[tc.InferRequestedOutput("rewards")])
        np.testing.assert_allclose(res.as_numpy("rewards")[:, 0], want[:3], atol=1e-4)

        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_metadata("nope")
        bad = tc.InferInput("prompts", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="unknown input 'prompts'"):
            client.infer("reward_model", [bad])
        with pytest.raises(InferenceServerException, match="unknown output"):
            client.infer("reward_model", [inp], outputs=[tc.InferRequestedOutput("logits")])
    finally:
        client.close()


def test_v2_regression_outputs_attributes(regression_server, regression_scorer):
    tc = pytest.importorskip("tritonclient.http")
    texts = [regression_scorer.render(p, r)[0] for p, r in zip(PROMPTS, RESPONSES)]
    ref = regression_scorer.score_rendered(texts)
    client = tc.InferenceServerClient(url=f"{HOST}:{regression_server.port}")
    try:
        inp = tc.InferInput("sentences", [6, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
        res = client.infer("reward_model", [inp])
        np.testing.assert_allclose(res.as_numpy("rewards")[:, 0], ref.reward, atol=1e-4)
        np.testing.assert_allclose(res.as_numpy("attributes"), ref.outputs, atol=1e-4)
    finally:
        client.close()


def test_v2_malformed_requests_get_400_with_an_error_message(binary_server):
    url = f"{binary_server.url}/v2/models/reward_model/infer"
    cases = [
        (b"not json", {}),
        (json.dumps({"inputs": []}).encode(), {}),
        (json.dumps({"inputs": [{"name": "sentences", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(), {}),
        (json.dumps({"inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}).encode(), {}),
        (json.dumps({"inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [1],
                                 "parameters": {"binary_data_size": 100}}]}).encode(), {"Inference-Header-Content-Length": "80"}),
        (json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]},
                                {"name": "sequence_lengths", "datatype": "INT64", "shape": [1, 1], "data": [5]}]}).encode(), {}),
    ]
    with httpx.Client(timeout=30) as c:
        for body, headers in cases:
            r = c.post(url, content=body, headers=headers)
            assert r.status_code == 400, (body, r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"]
        ok = c.post(url, json={"inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [1], "data": ["hi there"]}]})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 1]


# ---------------------------------------------------------------- bad input, limits, auth


def test_each_4xx_names_the_problem_and_the_server_keeps_serving(binary_scorer):
    cfg = ServeConfig(max_body_bytes=4000, max_items_per_request=4, max_item_tokens=40, max_queue_items=64, max_wait_ms=1)
    server = LiveServer(binary_scorer, cfg)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            def check(resp, status, *words):
                assert resp.status_code == status, resp.text
                msg = resp.json()["error"]
                for w in words:
                    assert w in msg, msg

            check(c.post("/v1/score", content=b'{"items": [', headers={"Content-Type": "application/json"}), 400, "malformed JSON")
            check(c.post("/v1/score", content=b""), 400, "empty")
            check(c.post("/v1/score", json={"items": []}), 422, "empty")
            check(c.post("/v1/score", json={"items": "hello"}), 422, "items")
            check(c.post("/v1/score", json={"items": [{"text": 5}]}), 422, "items.0.text")
            check(c.post("/v1/score", json={"items": [{"text": "a", "prompt": "b", "response": "c"}]}), 422, "exactly one")
            check(c.post("/v1/score", json={"items": [{"prompt": "b"}]}), 422, "both prompt and response")
            check(c.post("/v1/score", json={"items": [{"txt": "a"}]}), 422, "txt")
            check(c.post("/v1/score", json={"items": [{"input_ids": [1, "2"]}]}), 422, "input_ids")
            check(c.post("/v1/score", json={"items": [{"input_ids": [10**6]}]}), 422, "vocabulary")
            check(c.post("/v1/score", json={"items": [{"input_ids": [2**70]}]}), 422, "64 bits")
            check(c.post("/v1/score", json={"items": [{"input_ids": []}]}), 422, "non-empty")
            check(c.post("/v1/score", json={"items": [{"messages": [{"role": "user", "content": "hi"}]}]}), 422, "assistant")
            check(c.post("/v1/score", json={"items": [{"text": "a"}] * 5}), 413, "max_items_per_request=4")
            check(c.post("/v1/score", json={"items": [{"text": "word " * 100}]}), 413, "max_item_tokens=40")
            check(c.post("/v1/score", json={"items": [{"input_ids": [5] * 41}]}), 413, "max_item_tokens=40")
            # token ids over max_length are truncated as text is (the lead kept, the oldest tokens cut)
            over = c.post("/v1/score", json={"items": [{"input_ids": [5] * 33}], "return_tokens": True}).json()["results"][0]
            assert over["truncated"] and over["num_tokens"] == 32 and over["tokens"][0] == binary_scorer.tokenizer.bos_token_id
            check(c.post("/v1/score", json={"items": [{"text": "x" * 5000}]}), 413, "max_body_bytes=4000")

            def chunks():  # no Content-Length: the limit is enforced while reading
                for _ in range(10):
                    yield b" " * 1000

            check(c.post("/v1/score", content=chunks()), 413, "max_body_bytes")
            check(c.post("/get_reward", json={"query": [1, 2]}), 422, "query")
            empty = c.post("/get_reward", json={"query": []})  # OpenRLHF's empty shard: answered, never refused
            assert empty.status_code == 200 and empty.json()["rewards"] == [] and empty.json()["scores"] == []
            check(c.post("/get_reward", json={}), 422, "query")
            assert c.get("/v1/score").status_code == 405
            assert c.get("/nope").status_code == 404
            ok = c.post("/v1/score", json={"items": [{"prompt": "hi", "response": "hello"}]})
            assert ok.status_code == 200
            metrics = c.get("/metrics").text
            assert 'rewardforge_rejected_total{reason="too_many_items"} 1' in metrics
            assert 'rewardforge_requests_total{route="/v1/score",status="413"}' in metrics
    finally:
        server.stop()


def test_queue_full_gives_503_with_retry_after(binary_scorer):
    cfg = ServeConfig(max_queue_items=4, max_items_per_request=4, max_batch_items=4, max_wait_ms=0)
    server = LiveServer(binary_scorer, cfg)
    gate = Gate(server.batcher.model)
    server.batcher.model = gate
    results: list = []
    four = {"items": [{"prompt": PROMPTS[i], "response": RESPONSES[i]} for i in range(4)]}
    try:
        a = post_in_thread(server.url + "/v1/score", four, results)
        assert gate.entered.wait(10)  # the first request is in the model
        b = post_in_thread(server.url + "/v1/score", four, results)
        wait_for(lambda: server.batcher.queue_depth == 4)  # the second fills the queue
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/score", json={"items": [{"text": "one more"}]})
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
            assert "max_queue_items=4" in r.json()["error"]
            assert c.get("/health").json()["queue_depth"] == 4  # health answers while the model is busy
        gate.release.set()
        a.join(30), b.join(30)
        assert [x.status_code for x in results] == [200, 200]
        assert server.app.state.metrics.rejected.value("queue_full") == 1
    finally:
        gate.release.set()
        server.stop()


def test_api_key_is_required_except_for_health(binary_scorer, monkeypatch):
    monkeypatch.setenv("REWARDFORGE_API_KEY", "s3cret")
    server = LiveServer(binary_scorer, ServeConfig(max_wait_ms=1))
    payload = {"items": [{"text": "hi"}]}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/score", json=payload)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["error"]
            assert c.post("/v1/score", json=payload, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.post("/get_reward", json={"query": ["hi"]}).status_code == 401
            assert c.get("/metrics").status_code == 401
            assert c.get("/openapi.json").status_code == 401
            assert c.get("/v2/models/reward_model").status_code == 401
            assert c.get("/health").status_code == 200
            assert c.get("/v2/health/ready").status_code == 200
            good = {"Authorization": "Bearer s3cret"}
            assert c.post("/v1/score", json=payload, headers=good).status_code == 200
            assert c.get("/v2/models/reward_model", headers=good).status_code == 200
        from rewardforge.serve.client import RewardClient, RewardServerError

        with RewardClient(server.url) as rc:  # reads the key from the environment
            assert len(rc.score_texts(["hi"])) == 1
        with RewardClient(server.url, api_key="wrong") as rc:
            with pytest.raises(RewardServerError) as e:
                rc.score_texts(["hi"])
            assert e.value.status == 401
    finally:
        server.stop()


# ---------------------------------------------------------------- operations


def test_health_metrics_and_openapi(binary_server):
    with httpx.Client(base_url=binary_server.url, timeout=30) as c:
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["ready"] is True
        c.post("/v1/score", json={"items": [{"text": "hello"}, {"text": "hello there, friend"}]})
        m = c.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        text = m.text
        for name in ("rewardforge_requests_total", "rewardforge_request_latency_seconds_bucket",
                     "rewardforge_batch_size_bucket", "rewardforge_queue_depth", "rewardforge_inflight_requests",
                     "rewardforge_queue_wait_seconds_count", "rewardforge_batch_latency_seconds_sum", "rewardforge_items_total"):
            assert name in text, name
        assert 'rewardforge_requests_total{route="/v1/score",status="200"}' in text
        for line in text.splitlines():  # every sample line is "name{labels} number"
            if line and not line.startswith("#"):
                float(line.rsplit(" ", 1)[1])
        # scraped with prometheus_client's own text parser: the same names and labels, the standard collectors
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["rewardforge_requests"].type == "counter"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["rewardforge_requests"].samples}
        assert samples[("rewardforge_requests_total", (("route", "/v1/score"), ("status", "200")))] >= 1
        assert families["rewardforge_batch_size"].type == "histogram" and families["rewardforge_queue_depth"].type == "gauge"
        assert {"process_resident_memory_bytes", "python_info"} <= {s.name for f in families.values() for s in f.samples}
        spec = c.get("/openapi.json").json()
        assert {"/v1/score", "/get_reward", "/health", "/metrics", "/v2/models/{name}/infer"} <= set(spec["paths"])
        assert "ScoreRequest" in spec["components"]["schemas"]
        assert c.get("/docs").status_code == 200


def test_graceful_shutdown_finishes_in_flight_requests(binary_scorer):
    server = LiveServer(binary_scorer, ServeConfig(max_wait_ms=0, max_batch_items=2))
    gate = Gate(server.batcher.model)
    server.batcher.model = gate
    results: list = []
    threads = [post_in_thread(server.url + "/v1/score", {"items": [{"text": f"request {i}"}]}, results) for i in range(4)]
    try:
        assert gate.entered.wait(10)
        wait_for(lambda: server.batcher.inflight == 4)
        server.server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        gate.release.set()
        for t in threads:
            t.join(30)
        server.thread.join(30)
        assert not server.thread.is_alive()
        assert [r.status_code for r in results] == [200] * 4
        assert not server.batcher.running
    finally:
        gate.release.set()
        server.stop()


# ---------------------------------------------------------------- clients


def test_sync_and_async_clients(binary_server, binary_scorer):
    from rewardforge.serve.client import AsyncRewardClient, RewardClient, RewardServerError

    prompts, responses = PROMPTS[:5], RESPONSES[:5]
    want = binary_scorer.score(prompts, responses)
    with RewardClient(binary_server.url, chunk_size=2) as c:
        assert c.health()["ready"]
        np.testing.assert_allclose(c.score(prompts, responses), want, atol=1e-4)
        detailed = c.score_detailed(prompts, responses)
        assert [d.num_tokens for d in detailed] == list(binary_scorer.score_detailed(prompts, responses).num_tokens)
        assert all(d.reward_mean is None and d.reward_std is None and d.members is None for d in detailed)  # one model
        np.testing.assert_allclose(c.score(prompts, responses, normalized=True), (want - 0.25) / 0.5, atol=1e-4)
        with pytest.raises(RewardServerError, match="422"):
            c.score_items([{"text": 5}])
        with pytest.raises(ValueError):
            c.score(prompts, responses[:2])
        # normalize passes through: the BOS-less text gets the model's BOS only when normalisation is on
        raw = "Human: hi\n\nAssistant: hello there"
        on, off = c.score_items([{"text": raw}])[0], c.score_items([{"text": raw}], normalize=False)[0]
        assert on.num_tokens == off.num_tokens + 1 and on.extra["normalized"] == ["added_lead"]
        assert off.reward == pytest.approx(float(binary_scorer.score_texts([raw], normalize=False)[0]), abs=1e-4)

    async def run():
        async with AsyncRewardClient(binary_server.url, chunk_size=2) as ac:
            assert (await ac.health())["ready"]
            return await ac.score(prompts, responses)

    np.testing.assert_allclose(asyncio.run(run()), want, atol=1e-4)
    with RewardClient(f"http://{HOST}:1", timeout=2) as c:
        with pytest.raises(RewardServerError, match="cannot reach"):
            c.health()


# ---------------------------------------------------------------- batcher and config


def test_batcher_groups_by_length_and_keeps_the_oldest_first():
    from rewardforge.serve.batcher import DynamicBatcher, _Item, _Request

    b = DynamicBatcher(lambda ids, mask: None, 0, 1, max_batch_items=3, max_batch_tokens=10_000, max_padding=0.25)
    req = _Request(6, 1, None, None)  # type: ignore[arg-type]
    for i, n in enumerate([50, 3, 48, 5, 52, 4]):
        b._pending.append(_Item(np.zeros(n, np.int32), req, i, float(i)))
        b._pending_tokens += n
    first = b._take()
    assert [it.length for it in first] == [50, 48, 52]  # the oldest (50) with its nearest lengths
    assert [it.length for it in b._take()] == [3, 5, 4]
    b2 = DynamicBatcher(lambda ids, mask: None, 0, 1, max_batch_items=8, max_batch_tokens=100, max_padding=1.0)
    for i, n in enumerate([40, 40, 40, 10]):
        b2._pending.append(_Item(np.zeros(n, np.int32), req, i, float(i)))
        b2._pending_tokens += n
    assert [it.length for it in b2._take()] == [40, 40]  # a third would make 3 x 40 > 100 padded tokens
    assert [it.length for it in b2._take()] == [40, 10]
    assert b2._take() == [] and b2._pending_tokens == 0
    b3 = DynamicBatcher(lambda ids, mask: None, 0, 1, max_batch_items=8, max_padding=0.25)
    for i, n in enumerate([40, 10, 36, 12]):
        b3._pending.append(_Item(np.zeros(n, np.int32), req, i, float(i)))
        b3._pending_tokens += n
    assert [it.length for it in b3._take()] == [40, 36]  # 10 or 12 would make the batch mostly padding
    assert [it.length for it in b3._take()] == [10, 12]


def test_serve_config_validation_and_cli_flags():
    import argparse

    from rewardforge.serve.config import add_serve_arguments, config_from_args

    with pytest.raises(ValueError, match="max_items_per_request"):
        ServeConfig(max_items_per_request=10, max_queue_items=5).validate()
    with pytest.raises(ValueError, match="max_wait_ms"):
        ServeConfig(max_wait_ms=-1).validate()
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    cfg = config_from_args(p.parse_args(["--max-batch-items", "8", "--max-wait-ms", "2.5", "--compat-reward", "normalized"]))
    assert (cfg.max_batch_items, cfg.max_wait_ms, cfg.compat_reward, cfg.host) == (8, 2.5, "normalized", "127.0.0.1")
    with pytest.raises(SystemExit):
        p.parse_args(["--compat-reward", "other"])
    assert cfg.resolved_max_padding("cpu") == 0.15 and cfg.resolved_max_padding("cuda:0") == 0.5
    assert config_from_args(p.parse_args(["--max-padding", "0.3"])).resolved_max_padding("cpu") == 0.3


def test_new_serve_options_validate_and_resolve():
    import argparse

    import torch

    from rewardforge.serve.config import add_serve_arguments, config_from_args

    for bad, match in (({"max_connections": 0}, "max_connections"), ({"threads": 0}, "threads"),
                       ({"tokens_per_thread": -1}, "tokens_per_thread"), ({"dtype": "int8"}, "dtype")):
        with pytest.raises(ValueError, match=match):
            ServeConfig(**bad).validate()
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    cfg = config_from_args(p.parse_args(["--dtype", "bf16", "--max-connections", "5", "--threads", "3",
                                         "--tokens-per-thread", "0"]))
    assert (cfg.dtype, cfg.max_connections, cfg.threads, cfg.tokens_per_thread) == ("bf16", 5, 3, 0)
    assert cfg.torch_dtype() is torch.bfloat16 and ServeConfig().torch_dtype() is torch.float32
    assert cfg.resolved_threads("cpu") == 3  # an explicit value always wins
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "int8"])
    default = config_from_args(p.parse_args([]))
    assert (default.dtype, default.max_connections, default.threads, default.tokens_per_thread) == ("fp32", 1024, None, 256)
    assert default.resolved_threads("cpu") == torch.get_num_threads() and default.resolved_threads("cuda:0") is None


def test_batcher_gives_a_forward_pass_one_thread_per_tokens_per_thread():
    import torch

    from rewardforge.serve.batcher import DynamicBatcher, _Item, _Request

    b = DynamicBatcher(lambda ids, mask: None, 0, 1, threads=4, tokens_per_thread=100)
    req = _Request(10, 1, None, None)  # type: ignore[arg-type]
    seen: list[int] = []

    def worker():  # the setting is per OS thread, as on the batcher's worker
        for lengths in ([50], [100, 100], [90, 60, 90, 30], [100] * 10, [20]):
            b._set_threads([_Item(np.zeros(n, np.int32), req, i, 0.0) for i, n in enumerate(lengths)])
            seen.append(torch.get_num_threads())

    main_threads = torch.get_num_threads()
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1, 2, 3, 4, 1]  # padded tokens // 100, between 1 and threads
    assert torch.get_num_threads() == main_threads  # the caller's (event loop's) setting is untouched


def test_create_app_refuses_a_model_in_another_dtype(binary_scorer):
    with pytest.raises(ValueError, match="dtype=bf16"):
        create_app(binary_scorer, ServeConfig(dtype="bf16"))


# Documented in the README: bf16 rewards stay within this share of the fp32 rewards' standard deviation
# (measured: quickstart MiniLM at most 0.034 = 0.022 std over 912 inputs; the tiny Llama here 0.018 std).
BF16_TOLERANCE = 0.05


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_bf16_serving_stays_within_the_documented_tolerance_of_fp32(kind, encoder_dir, binary_dir):
    import torch

    model_dir = encoder_dir if kind == "encoder" else binary_dir
    fp32 = rewardforge.load(model_dir, device="cpu")
    bf16 = rewardforge.load(model_dir, device="cpu", dtype=torch.bfloat16)
    server = LiveServer(bf16, ServeConfig(dtype="bf16", max_wait_ms=5))
    items = [{"prompt": p, "response": r} for p in PROMPTS for r in RESPONSES]

    async def run():  # several requests at once, so sequences of different lengths share padded batches
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/score", json={"items": items[k:k + 6]}) for k in range(0, 36, 6)))
        return [res for r in rs for res in r.json()["results"]]

    try:
        results = asyncio.run(run())
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/health").json()["dtype"] == "bf16"
    finally:
        server.stop()
    ref = offline(fp32, items)
    got = np.array([r["reward"] for r in results])
    diff = np.abs(got - ref.reward)
    assert diff.max() > 0  # it did run in bf16
    assert [r["num_tokens"] for r in results] == ref.num_tokens.tolist()
    if kind == "decoder":  # rewards spread like a trained model's (std 1.5)
        assert diff.max() <= BF16_TOLERANCE * ref.reward.std(), (diff.max(), ref.reward.std())
        scale = BF16_TOLERANCE * ref.reward.std()
    else:  # the random tiny BERT scores every input almost alike (std 4e-4): bound by the rewards' size instead
        np.testing.assert_allclose(got, ref.reward, rtol=BF16_TOLERANCE)  # measured 0.018
        scale = BF16_TOLERANCE * np.abs(ref.reward).max()
    # the same bf16 model offline agrees with the server up to batch composition
    np.testing.assert_allclose(got, offline(bf16, items).reward, atol=scale)


def _raw_get(sock: socket.socket, path: str = "/health") -> tuple[int, dict[str, str], bytes]:
    """One keep-alive HTTP/1.1 GET on an open socket: (status, headers, body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_max_connections_answers_the_connection_past_the_limit_with_503(binary_scorer):
    server = LiveServer(binary_scorer, ServeConfig(max_connections=2))
    open_ = server.server.server_state.connections
    socks = []

    def connect() -> socket.socket:
        s = socket.create_connection((HOST, server.port), timeout=10)
        socks.append(s)
        return s

    try:
        a, b = connect(), connect()
        assert _raw_get(a)[0] == 200 and _raw_get(b)[0] == 200  # two kept-alive connections: at the limit
        c = connect()
        status, headers, body = _raw_get(c)
        assert status == 503 and headers["connection"] == "close" and body == b"Service Unavailable"
        assert c.recv(1) == b""  # uvicorn closed the extra connection
        wait_for(lambda: len(open_) == 2)
        assert _raw_get(a)[0] == 200  # the connections within the limit are served again
        a.close()
        wait_for(lambda: len(open_) == 1)
        assert _raw_get(connect())[0] == 200 and _raw_get(b)[0] == 200  # a freed slot takes a new connection
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_one_at_a_time_batcher_takes_the_oldest_live_sequence():
    from rewardforge.serve.batcher import DynamicBatcher, _Item, _Request

    b = DynamicBatcher(lambda ids, mask: None, 0, 1, max_batch_items=1)
    live, dead = _Request(3, 1, None, None), _Request(1, 1, None, None)  # type: ignore[arg-type]
    dead.dead = True  # its client went away
    for i, (n, req) in enumerate([(30, dead), (50, live), (3, live), (7, live)]):
        b._pending.append(_Item(np.zeros(n, np.int32), req, i, float(i)))
        b._pending_tokens += n
    assert [[it.length for it in b._take()] for _ in range(3)] == [[50], [3], [7]]  # arrival order, never grouped
    assert b._take() == [] and b._pending_tokens == 0


def test_cli_serve_subprocess_binds_loopback_and_stops_on_sigterm(binary_dir, binary_scorer):
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("REWARDFORGE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "rewardforge", "serve", str(binary_dir), "--port", str(port),
                             "--compat-reward", "normalized", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=10) as c:
            wait_healthy(c, proc, 60, lambda: proc.stdout.read().decode())
            text = binary_scorer.render(PROMPTS[0], RESPONSES[0])[0]
            r = c.post("/get_reward", json={"query": [text]})
            assert r.json()["rewards"] == pytest.approx([float(binary_scorer.score_rendered([text]).normalized[0])], abs=1e-4)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gzip_helper_rejects_decompression_bombs():
    from rewardforge.serve.service import ServeError
    from rewardforge.serve.triton import _decompress

    bomb = gzip.compress(b"\0" * 100_000)
    with pytest.raises(ServeError, match="max_body_bytes=1000"):
        _decompress(bomb, "gzip", 1000)
    assert _decompress(gzip.compress(b"abc"), "gzip", 1000) == b"abc"
