"""RL-trainer reward functions (rewardforge.integrations) against a real ``rewardforge serve``.

Real HTTP on 127.0.0.1: uvicorn in a thread serving tiny exported models (a GPT-2 binary model with
pad == eos and the plain template, a Qwen2 regression model with a chat template). Every reward is
compared with the offline scorer, ``rewardforge.load(dir).score(prompts, responses)``, within 1e-4:
the TRL functions (sync and async, conversational and plain strings, chunked), the verl functions,
and TRL's own ``GRPOTrainer._calculate_rewards`` on a tiny random Qwen2 policy built here (it is
the method TRL's training step calls to score completions; the test calls it directly rather than
running generation). Retries on 503 go through a small stub proxy that answers 503 + Retry-After
before forwarding to the real server; errors are checked for their one-line message.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import pickle
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import rewardforge  # noqa: E402
from rewardforge.integrations import RewardFunctionError  # noqa: E402
from rewardforge.integrations import verl as rf_verl  # noqa: E402
from rewardforge.integrations.trl import AsyncRewardForgeReward, RewardForgeReward  # noqa: E402
from test_serve import HOST, LiveServer, _export  # noqa: E402

TOL = 1e-4
PROMPTS = ["How do I boil an egg?", "What is gravity?", "Why is the sky blue?", "Tell me about Paris.",
           "How far is the Moon?", "Can you help me?", "Say something."]
RESPONSES = ["Put it in boiling water for nine minutes.", "That is a stupid question. Go away.",
             "Sure! Here is a clear answer: water boils at one hundred degrees.", "I cannot help with that request.",
             "Gravity keeps planets in orbit.", "Photosynthesis makes sugar from light. " * 6, "Paris."]


def conv_prompts() -> list[list[dict]]:
    out = []
    for i, p in enumerate(PROMPTS):
        msgs = [{"role": "user", "content": p}]
        if i % 3 == 1:  # some with a system turn and an earlier exchange
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}] + msgs
        out.append(msgs)
    return out


def conv_completions() -> list[list[dict]]:
    return [[{"role": "assistant", "content": r}] for r in RESPONSES]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model, tmp_path_factory):
    return _export(tiny_model, "gpt2", tmp_path_factory.mktemp("integ") / "gpt2", ["reward"], [1.0], 32)


@pytest.fixture(scope="module")
def qwen_dir(tiny_model, tmp_path_factory):
    return _export(tiny_model, "qwen2", tmp_path_factory.mktemp("integ") / "qwen2", ["helpfulness", "safety"], [0.7, 0.3], 48)


@pytest.fixture(scope="module")
def gpt2_scorer(gpt2_dir):
    return rewardforge.load(gpt2_dir, device="cpu")


@pytest.fixture(scope="module")
def qwen_scorer(qwen_dir):
    return rewardforge.load(qwen_dir, device="cpu")


@pytest.fixture(scope="module")
def gpt2_server(gpt2_scorer):
    s = LiveServer(gpt2_scorer)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def qwen_server(qwen_scorer):
    s = LiveServer(qwen_scorer)
    yield s
    s.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Flaky:
    """A stub in front of a real server: the first ``fail`` POSTs get 503 + Retry-After: 0, the rest
    are forwarded; ``status`` overrides the failure status (e.g. 401)."""

    def __init__(self, target: str, fail: int, status: int = 503):
        self.posts, stub = 0, self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                stub.posts += 1
                if stub.posts <= fail:
                    data = json.dumps({"error": "queue full" if status == 503 else "bad key"}).encode()
                    self.send_response(status)
                    if status == 503:
                        self.send_header("Retry-After", "0")
                else:
                    r = httpx.post(target + self.path, content=body, headers={"content-type": "application/json"}, timeout=30)
                    data = r.content
                    self.send_response(r.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0, atol=tol)


# ---------------------------------------------------------------- TRL reward functions


def test_sync_trl_reward_equals_scorer_conversational_and_strings(gpt2_server, gpt2_scorer):
    fn = RewardForgeReward(gpt2_server.url)
    assert fn.__name__ == "rewardforge"
    got = fn(prompts=conv_prompts(), completions=conv_completions(), completion_ids=[[1]] * len(PROMPTS),
             trainer_state=None, log_extra=lambda *a: None, some_column=list(range(len(PROMPTS))))
    assert isinstance(got, list) and all(type(x) is float for x in got) and len(got) == len(PROMPTS)
    close(got, gpt2_scorer.score(conv_prompts(), conv_completions()))
    assert len(set(np.round(got, 3))) > 3  # the inputs really score differently
    # plain strings: one user turn and one assistant turn, rendered by the server
    close(fn(prompts=PROMPTS, completions=RESPONSES), gpt2_scorer.score(PROMPTS, RESPONSES))
    # strings="text": verbatim prompt + completion, as TRL's own reward-model path does
    texts = RewardForgeReward(gpt2_server.url, strings="text", name="rf_text")(PROMPTS, RESPONSES)
    close(texts, gpt2_scorer.score_texts([p + r for p, r in zip(PROMPTS, RESPONSES)]))
    fn.close()


def test_chunking_keeps_order_and_normalized(gpt2_server, gpt2_scorer):
    want = gpt2_scorer.score_detailed(PROMPTS, RESPONSES)
    fn = RewardForgeReward(gpt2_server.url, chunk_size=2)  # 7 items: 4 requests
    close(fn(PROMPTS, RESPONSES), want.reward)
    close(RewardForgeReward(gpt2_server.url, chunk_size=3, normalized=True)(PROMPTS, RESPONSES), want.normalized)
    close(fn(PROMPTS[::-1], RESPONSES[::-1]), want.reward[::-1])
    assert fn([], []) == []


def test_async_trl_reward_equals_scorer(gpt2_server, gpt2_scorer, qwen_server, qwen_scorer):
    fn = AsyncRewardForgeReward(gpt2_server.url, chunk_size=2, max_concurrency=3)  # chunks concurrently

    async def run():
        a = await fn(prompts=conv_prompts(), completions=conv_completions(), completion_ids=None)
        b = await fn(prompts=PROMPTS, completions=RESPONSES)
        q = await AsyncRewardForgeReward(qwen_server.url)(prompts=conv_prompts(), completions=conv_completions())
        await fn.aclose()
        return a, b, q

    a, b, q = asyncio.run(run())
    close(a, gpt2_scorer.score(conv_prompts(), conv_completions()))
    close(b, gpt2_scorer.score(PROMPTS, RESPONSES))
    close(q, qwen_scorer.score(conv_prompts(), conv_completions()))
    # a second event loop gets its own client (the first loop's is bound to a closed loop)
    close(asyncio.run(fn(PROMPTS, RESPONSES)), gpt2_scorer.score(PROMPTS, RESPONSES))


def test_regression_attribute_and_combined(qwen_server, qwen_scorer):
    s = qwen_scorer.score_detailed(conv_prompts(), conv_completions())
    close(RewardForgeReward(qwen_server.url)(conv_prompts(), conv_completions()), s.reward)
    help_fn = RewardForgeReward(qwen_server.url, attribute="helpfulness")
    assert help_fn.__name__ == "rewardforge_helpfulness"
    close(help_fn(conv_prompts(), conv_completions()), s.outputs[:, 0])
    with pytest.raises(RewardFunctionError, match="no attribute 'honesty'.*helpfulness, safety"):
        RewardForgeReward(qwen_server.url, attribute="honesty")(PROMPTS[:1], RESPONSES[:1])
    with pytest.raises(ValueError, match="either normalized or attribute"):
        RewardForgeReward(qwen_server.url, attribute="safety", normalized=True)


def test_log_metric_truncated_share(gpt2_server):
    logged = []
    fn = RewardForgeReward(gpt2_server.url)
    long_prompt = " ".join(PROMPTS * 4)  # past max_length=32
    fn([long_prompt, PROMPTS[0]], RESPONSES[:2], log_metric=lambda name, value: logged.append((name, value)))
    assert logged == [("rewardforge/truncated_frac", 0.5)]


def test_content_blocks_and_tool_fields(gpt2_server, gpt2_scorer):
    fn = RewardForgeReward(gpt2_server.url)
    prompts = [[{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}]]
    completions = [[{"role": "assistant", "content": RESPONSES[0], "tool_calls": None}]]
    close(fn(prompts, completions), gpt2_scorer.score(PROMPTS[:1], RESPONSES[:1]))
    with pytest.raises(ValueError, match="must end with the assistant"):
        fn([[{"role": "user", "content": "hi"}]], [[{"role": "user", "content": "again"}]])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        fn(PROMPTS[:2], RESPONSES[:1])


def test_retries_on_503_then_scores(gpt2_server, gpt2_scorer):
    stub = Flaky(gpt2_server.url, fail=2)
    try:
        got = RewardForgeReward(stub.url, retries=3)(PROMPTS, RESPONSES)
        close(got, gpt2_scorer.score(PROMPTS, RESPONSES))
        assert stub.posts == 3
        stub.posts = 0
        got = asyncio.run(AsyncRewardForgeReward(stub.url, retries=3)(PROMPTS, RESPONSES))
        close(got, gpt2_scorer.score(PROMPTS, RESPONSES))
        assert stub.posts == 3
    finally:
        stub.close()
    stub = Flaky(gpt2_server.url, fail=10)
    try:
        with pytest.raises(RewardFunctionError, match=r"stayed busy after 1 retries \(HTTP 503: queue full\)") as e:
            RewardForgeReward(stub.url, retries=1)(PROMPTS, RESPONSES)
        assert e.value.status == 503 and "\n" not in str(e.value) and stub.posts == 2
    finally:
        stub.close()


def test_clear_errors(gpt2_server):
    url = f"http://{HOST}:{free_port()}"  # nothing listens there
    for fn in (RewardForgeReward(url), AsyncRewardForgeReward(url)):
        t0 = time.time()
        with pytest.raises(RewardFunctionError, match=f"cannot reach the reward server at {url}.*rewardforge serve") as e:
            out = fn(PROMPTS[:2], RESPONSES[:2])
            if asyncio.iscoroutine(out):
                asyncio.run(out)
        assert e.value.status == 0 and "\n" not in str(e.value) and time.time() - t0 < 10
    stub = Flaky(gpt2_server.url, fail=1, status=401)
    try:
        with pytest.raises(RewardFunctionError, match="refused the request \\(HTTP 401.*REWARDFORGE_API_KEY"):
            RewardForgeReward(stub.url)(PROMPTS[:1], RESPONSES[:1])
    finally:
        stub.close()


def test_functions_pickle(gpt2_server, gpt2_scorer):
    fn = RewardForgeReward(gpt2_server.url)
    fn(PROMPTS[:1], RESPONSES[:1])  # a live client inside
    again = pickle.loads(pickle.dumps(fn))
    close(again(PROMPTS, RESPONSES), gpt2_scorer.score(PROMPTS, RESPONSES))
    a = pickle.loads(pickle.dumps(AsyncRewardForgeReward(gpt2_server.url)))
    close(asyncio.run(a(PROMPTS, RESPONSES)), gpt2_scorer.score(PROMPTS, RESPONSES))
    assert pickle.loads(pickle.dumps(rf_verl._CLIENTS)).clients == {}


# ---------------------------------------------------------------- TRL's GRPOTrainer


def test_grpo_trainer_reward_path_accepts_the_functions(qwen_server, qwen_scorer, tiny_model, tmp_path):
    """TRL's own GRPOTrainer, built on a tiny random Qwen2 policy, scores completions with both
    functions through ``_calculate_rewards`` (what its training step calls); names, the async
    path (TRL's event-loop thread) and ``log_metric`` included."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl.trainer.utils import get_callable_name, is_async_callable

    src = tiny_model("qwen2")
    policy = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    prompts, completions = conv_prompts()[:4], conv_completions()[:4]
    ds = Dataset.from_list([{"prompt": p, "topic": f"t{i}"} for i, p in enumerate(prompts)])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, report_to=[], use_cpu=True, bf16=False, logging_steps=1,
                          save_strategy="no")
    sync_fn, async_fn = RewardForgeReward(qwen_server.url), AsyncRewardForgeReward(qwen_server.url, name="rf_async")
    assert is_async_callable(async_fn) and not is_async_callable(sync_fn)
    assert get_callable_name(sync_fn) == "rewardforge" and get_callable_name(async_fn) == "rf_async"
    trainer = trl.GRPOTrainer(model=policy, processing_class=tok, reward_funcs=[sync_fn, async_fn], args=args,
                              train_dataset=ds)
    assert trainer.reward_func_names == ["rewardforge", "rf_async"]
    inputs = [{"prompt": p, "completion": c, "topic": f"t{i}"} for i, (p, c) in enumerate(zip(prompts, completions))]
    ids = [tok(c[0]["content"])["input_ids"] for c in completions]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, ids)
    want = qwen_scorer.score(prompts, completions)
    assert tuple(rewards.shape) == (4, 2)
    close(rewards[:, 0].tolist(), want)
    close(rewards[:, 1].tolist(), want)
    assert set(trainer._pending_metrics) == {"rewardforge/truncated_frac", "rf_async/truncated_frac"}


# ---------------------------------------------------------------- verl


def test_verl_compute_score_equals_scorer(gpt2_server, gpt2_scorer, qwen_server, qwen_scorer, monkeypatch):
    monkeypatch.setenv("REWARDFORGE_URL", gpt2_server.url)
    want = gpt2_scorer.score(PROMPTS, RESPONSES)
    single = [rf_verl.compute_score("hh", r, "", {"prompt": p, "index": i}) for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
    assert all(type(x) is float for x in single)
    close(single, want)
    # the batch reward manager's call, with verl's numpy object arrays and extras
    infos = np.array([{"prompt": p, "rollout_reward_scores": {}} for p in PROMPTS], dtype=object)
    batch = rf_verl.compute_score_batch(data_sources=np.array(["hh"] * len(PROMPTS), dtype=object),
                                        solution_strs=RESPONSES, ground_truths=[None] * len(PROMPTS),
                                        extra_infos=infos, chunk_size=3)
    close(batch, want)
    # chat-message prompts (parquet gives arrays of dicts), url and normalized as reward_kwargs
    conv = [{"prompt": np.array(p, dtype=object)} for p in conv_prompts()]
    got = rf_verl.compute_score_batch(None, RESPONSES, None, conv, url=qwen_server.url, normalized="true",
                                      reward_router_address=None)
    close(got, qwen_scorer.score_detailed(conv_prompts(), conv_completions()).normalized)
    got = rf_verl.compute_score(None, RESPONSES[0], None, {"question": PROMPTS[0]}, prompt_key="question")
    close([got], want[:1])


def test_verl_clear_errors(monkeypatch):
    monkeypatch.setenv("REWARDFORGE_URL", f"http://{HOST}:{free_port()}")
    with pytest.raises(RewardFunctionError, match=r"extra_info\['prompt'\] is missing.*add each row's prompt"):
        rf_verl.compute_score("hh", "an answer", "", {"index": 3})
    with pytest.raises(RewardFunctionError, match=r"missing \(row 1 of the batch\)"):
        rf_verl.compute_score_batch(["a", "b"], ["x", "y"], [None, None], [{"prompt": "p"}, {}])
    with pytest.raises(RewardFunctionError, match="rewardforge verl reward: cannot reach the reward server"):
        rf_verl.compute_score("hh", "an answer", "", {"prompt": "a question"})
