"""The reward each RL trainer's client obtains equals ``rewardforge.load(dir).score(messages)`` (1e-4, fp32).

Client paths, each reproduced from the trainer's own code (the TRL one with TRL's real ``apply_chat_template``
and the exact tokenizer call of ``GRPOTrainer._calculate_rewards``; NeMo-Aligner's with the real
``tritonclient``; OpenRLHF's and verl's from their protocol and loading code), against tiny random backbones of
every family (BERT ``[CLS]``/``[SEP]``, GPT-2, Llama-2-style ``<s>``, Llama-3-style header template, Qwen2
ChatML), each with its own template and with ``plain``, over real HTTP on 127.0.0.1:

* **TRL GRPOTrainer** ``reward_funcs="EXPORT"``: ``AutoModelForSequenceClassification(num_labels=1)``, the RM
  tokenizer's chat template, ``add_special_tokens=False``, right padding, ``logits[:, 0]``.
* **verl** reward-model worker: ``AutoModelForTokenClassification``, the RM's chat template, left padding, the
  score at the last attention-mask position (decoders).
* **OpenRLHF** ``/get_reward``: the policy's decoded prompt + response with its special tokens and EOS, with and
  without the tokenizer's own BOS, batches left-padded with EOS (0.8) and one sample per request (0.11), with
  ``prompts``; a policy with another chat format through ``--policy-tokenizer``.
* **NeMo-Aligner** (tritonclient): ``tokens`` zero-padded to a fixed width + ``sequence_lengths`` of the policy's
  prompt + response + EOS ids; ``rewards`` [B, 1] and ``exceeded`` [B, 1].

``python bench/rl_clients.py`` prints the same checks as a table of the largest differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import rewardforge  # noqa: E402
from test_serve import LiveServer, _export  # noqa: E402

TOL = 1e-4
MAX_LENGTH = 160
CONVS = [
    ([{"role": "user", "content": "How do I boil an egg?"}], "Put it in boiling water for nine minutes."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is gravity?"}],
     "Gravity keeps planets in orbit."),
    ([{"role": "user", "content": "Tell me about Paris."}, {"role": "assistant", "content": "Paris is the capital of France."},
      {"role": "user", "content": "And the sky?"}], "The quick brown fox jumps over the lazy dog."),
    ([{"role": "user", "content": "Can you help me?"}], "Sure! Here is a clear answer: water boils at one hundred degrees."),
]
LONG = ([{"role": "user", "content": "Tell me about light."}], "Photosynthesis makes sugar from light. " * 30)
# (family, template): every family with plain; those with a chat template of their own also with it
CASES = [("bert", "plain"), ("gpt2", "plain"), ("llama", "plain"), ("llama3", "tokenizer"), ("llama3", "plain"),
         ("qwen2", "tokenizer"), ("qwen2", "plain")]


def export_family(tiny_model, kind: str, template: str, out: Path, attributes=("reward",), weights=(1.0,),
                  max_length: int = MAX_LENGTH) -> Path:
    """An export of a tiny random backbone (no training) with the given template (test_serve's ``_export``)."""
    return _export(tiny_model, kind, out, list(attributes), list(weights), max_length, template=template)


def policy_tokenizer(tiny_model, kind: str, template: str):
    """The policy's tokenizer: the backbone's own (it adds its BOS) with the template the RM was trained with."""
    from rewardforge.data.template import setup_template
    from rewardforge.models.reward_model import load_tokenizer

    tok = load_tokenizer(str(tiny_model(kind)))
    setup_template(tok, template)
    return tok


def reference(model_dir: Path, convs) -> np.ndarray:
    return rewardforge.load(model_dir, device="cpu").score([p for p, _ in convs], [r for _, r in convs])


# ---------------------------------------------------------------- the client paths


def trl_rewards(model_dir: Path, convs, subdir: str = "") -> np.ndarray:
    """TRL GRPOTrainer with ``reward_funcs=str(model_dir)``: its loading and ``_calculate_rewards`` lines."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.data_utils import apply_chat_template

    path = model_dir / subdir if subdir else model_dir
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    messages = [{"messages": p + [{"role": "assistant", "content": r}]} for p, r in convs]
    texts = [apply_chat_template(x, tok)["text"] for x in messages]
    inputs = tok(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        return model(**inputs).logits[:, 0].numpy()


def verl_rewards(model_dir: Path, convs) -> np.ndarray:
    """verl's reward-model worker: token classification, the RM's template, left padding, last mask position."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False) for p, r in convs]
    enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    mask = enc["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids).logits[..., 0]
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    return logits[torch.arange(len(texts)), last].numpy()


def policy_sequences(policy, convs, add_special_tokens: bool):
    """(prompt texts, prompt+response+EOS ids) as the policy generates them."""
    prompts, seqs = [], []
    for p, r in convs:
        prompt = policy.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        ids = policy(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        ids = ids + policy(r, add_special_tokens=False)["input_ids"] + ([policy.eos_token_id] if policy.eos_token_id is not None else [])
        prompts.append(prompt)
        seqs.append(ids)
    return prompts, seqs


def openrlhf_rewards(url: str, policy, convs, *, add_special_tokens: bool, batched: bool, with_prompts: bool = True):
    """OpenRLHF's remote RM call: decoded sequences with special tokens; 0.8 batches left-padded with EOS."""
    prompts, seqs = policy_sequences(policy, convs, add_special_tokens)
    if batched:
        width = max(len(s) for s in seqs)
        seqs = [[policy.eos_token_id] * (width - len(s)) + s for s in seqs]
    queries = [policy.decode(s, skip_special_tokens=False) for s in seqs]
    with httpx.Client(base_url=url, timeout=60) as c:
        if batched:
            body = {"query": queries, "labels": [""] * len(queries)}
            if with_prompts:
                body["prompts"] = prompts
            r = c.post("/get_reward", json=body)
            assert r.status_code == 200, r.text
            return np.asarray(r.json()["rewards"]), r.json()
        out = []
        for q, p in zip(queries, prompts):  # 0.11: one sample per request
            r = c.post("/get_reward", json={"query": [q], "prompts": [p], "labels": [""]})
            assert r.status_code == 200, r.text
            out.append(r.json()["rewards"][0])
        return np.asarray(out), None


def nemo_rewards(url: str, policy, convs, width: int = 256, add_special_tokens: bool = True):
    """NeMo-Aligner's RemoteGPTRMClient through tritonclient: zero-padded tokens and sequence_lengths."""
    import tritonclient.http as triton

    _, seqs = policy_sequences(policy, convs, add_special_tokens=add_special_tokens)
    tokens = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    lengths = np.array([[len(s)] for s in seqs], np.int64)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        inputs = [triton.InferInput("tokens", list(tokens.shape), "INT64"), triton.InferInput("sequence_lengths", [len(seqs), 1], "INT64")]
        inputs[0].set_data_from_numpy(tokens)
        inputs[1].set_data_from_numpy(lengths)
        res = client.infer("reward_model", inputs, outputs=[triton.InferRequestedOutput("rewards"),
                                                             triton.InferRequestedOutput("exceeded")])
        return res.as_numpy("rewards"), res.as_numpy("exceeded")
    finally:
        client.close()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def family(tiny_model, tmp_path_factory):
    """``family(kind, template)`` -> (export dir, live server, policy tokenizer), cached for the module."""
    cache: dict = {}

    def get(kind: str, template: str):
        if (kind, template) not in cache:
            d = export_family(tiny_model, kind, template, tmp_path_factory.mktemp(f"rl-{kind}-{template}") / "model")
            cache[kind, template] = (d, LiveServer(rewardforge.load(d, device="cpu")), policy_tokenizer(tiny_model, kind, template))
        return cache[kind, template]

    yield get
    for _, server, _ in cache.values():
        server.stop()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind,template", CASES)
def test_export_ids_are_the_same_on_every_tokenizer_path(family, kind, template):
    """apply_chat_template(tokenize=True), tokenizer(text, add_special_tokens=False), tokenizer(text) and
    rewardforge's own path give one set of ids: the training tokenizer's."""
    from transformers import AutoTokenizer

    from rewardforge.data.inputs import ModelInputs

    model_dir, _, policy = family(kind, template)
    tok = AutoTokenizer.from_pretrained(model_dir)
    train = ModelInputs(policy, 1 << 20)  # the training tokenizer and template (it adds its own specials)
    scorer = rewardforge.load(model_dir, device="cpu")
    for p, r in CONVS:
        messages = p + [{"role": "assistant", "content": r}]
        t, s = train.render_messages(messages)
        want = [int(x) for x in train.encode([t], [s])[0][0]]
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok.apply_chat_template(messages, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == want
        assert tok(text, add_special_tokens=False)["input_ids"] == want
        assert tok(text)["input_ids"] == want  # no doubled BOS / [CLS]
        assert [int(x) for x in scorer.score_items([{"messages": messages}]).ids[0]] == want
    meta = rewardforge.load(model_dir, device="cpu").meta
    assert meta["input_format"]["self_sufficient"] is True


@pytest.mark.parametrize("kind,template", CASES)
def test_trl_grpo_loading_the_export_gets_rewardforges_reward(family, kind, template):
    model_dir, _, _ = family(kind, template)
    np.testing.assert_allclose(trl_rewards(model_dir, CONVS), reference(model_dir, CONVS), atol=TOL)


@pytest.mark.parametrize("kind,template", [c for c in CASES if c[0] in ("llama", "llama3", "qwen2")])
def test_verl_reward_model_worker_gets_rewardforges_reward(family, kind, template):
    model_dir, _, _ = family(kind, template)
    np.testing.assert_allclose(verl_rewards(model_dir, CONVS), reference(model_dir, CONVS), atol=TOL)


@pytest.mark.parametrize("kind,template", CASES)
@pytest.mark.parametrize("add_special_tokens", [True, False], ids=["policy-adds-bos", "no-bos"])
def test_openrlhf_get_reward_gets_rewardforges_reward(family, tiny_model, kind, template, add_special_tokens):
    model_dir, server, policy = family(kind, template)
    own_server = None
    if kind == "bert":
        # an encoder generates nothing: the policy is a decoder (another vocabulary) writing the RM's plain format;
        # its special tokens are known to the server only through --policy-tokenizer
        from rewardforge.serve import ServeConfig

        policy = policy_tokenizer(tiny_model, "gpt2", "plain")
        policy_dir = Path(model_dir).parent / "gpt2-policy"
        policy.save_pretrained(policy_dir)
        server = own_server = LiveServer(rewardforge.load(model_dir, device="cpu"),
                                         ServeConfig(max_wait_ms=2.0, policy_tokenizer=str(policy_dir)))
    try:
        want = reference(model_dir, CONVS)
        batched, body = openrlhf_rewards(server.url, policy, CONVS, add_special_tokens=add_special_tokens, batched=True)
        np.testing.assert_allclose(batched, want, atol=TOL)
        # every left-padded sequence (all but the longest) was normalised, and said so
        _, seqs = policy_sequences(policy, CONVS, add_special_tokens)
        padded = [len(x) < max(map(len, seqs)) for x in seqs]
        assert all(n == 1.0 for n, p in zip(body["extra_logs"]["normalized"], padded) if p)
        single, _ = openrlhf_rewards(server.url, policy, CONVS, add_special_tokens=add_special_tokens, batched=False)
        np.testing.assert_allclose(single, want, atol=TOL)
    finally:
        if own_server is not None:
            own_server.stop()


@pytest.mark.parametrize("kind,template", CASES)
def test_nemo_aligner_tokens_get_rewardforges_reward(family, kind, template):
    model_dir, server, policy = family(kind, template)
    # (a BERT tokenizer would put [SEP] after the prompt: its ids come bare, the server adds [CLS]/[SEP])
    rewards, exceeded = nemo_rewards(server.url, policy, CONVS, add_special_tokens=kind != "bert")
    assert rewards.shape == (len(CONVS), 1) and exceeded.shape == (len(CONVS), 1) and exceeded.dtype == np.int32
    np.testing.assert_allclose(rewards[:, 0], reference(model_dir, CONVS), atol=TOL)
    assert not exceeded.any()


@pytest.mark.parametrize("kind,template", [("qwen2", "tokenizer"), ("llama3", "tokenizer"), ("bert", "plain"), ("llama", "plain")])
def test_a_response_longer_than_max_length_keeps_the_end_of_turn_and_every_path_agrees(family, kind, template):
    from transformers import AutoTokenizer

    model_dir, server, policy = family(kind, template)
    scorer = rewardforge.load(model_dir, device="cpu")
    s = scorer.score_items([{"messages": LONG[0] + [{"role": "assistant", "content": LONG[1]}]}])
    assert s.truncated[0] and s.num_tokens[0] == MAX_LENGTH
    fmt = scorer.inputs.format
    tail = list(fmt.suffix_ids) + list(fmt.trail_ids)
    if tail:  # the reward is read where training reads it: at the template's end of turn, not at a word
        assert [int(x) for x in s.ids[0][-len(tail):]] == tail
    # the text the model read reproduces the ids with plain transformers
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok(s.texts[0])["input_ids"] == [int(x) for x in s.ids[0]]
    want = reference(model_dir, [LONG])
    got, body = openrlhf_rewards(server.url, policy, [LONG], add_special_tokens=kind != "bert", batched=True)
    np.testing.assert_allclose(got, want, atol=TOL)
    assert body["extra_logs"]["truncated"] == [1.0]
    rewards, exceeded = nemo_rewards(server.url, policy, [LONG], width=512, add_special_tokens=kind != "bert")
    np.testing.assert_allclose(rewards[:, 0], want, atol=TOL)
    assert exceeded.tolist() == [[1]]


def test_a_policy_with_another_chat_format_is_rerendered_with_the_rms_template(family, tiny_model):
    """A ChatML (Qwen2) policy scored by a plain-template Llama RM: --policy-tokenizer parses its queries."""
    from rewardforge.serve import ServeConfig

    model_dir, _, _ = family("llama", "plain")
    policy = policy_tokenizer(tiny_model, "qwen2", "tokenizer")
    policy_dir = Path(model_dir).parent / "policy-tokenizer"
    policy.save_pretrained(policy_dir)
    server = LiveServer(rewardforge.load(model_dir, device="cpu"), ServeConfig(max_wait_ms=2.0, policy_tokenizer=str(policy_dir)))
    try:
        got, body = openrlhf_rewards(server.url, policy, CONVS, add_special_tokens=False, batched=True)
        np.testing.assert_allclose(got, reference(model_dir, CONVS), atol=TOL)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            metrics = c.get("/metrics").text
        assert f'rewardforge_normalized_total{{action="rerendered"}} {len(CONVS)}' in metrics
    finally:
        server.stop()


def test_regression_exports_load_with_num_labels_1_and_serve_every_attribute(tiny_model, tmp_path):
    from rewardforge.serve import ServeConfig

    weights = [0.25, 0.75]
    model_dir = export_family(tiny_model, "qwen2", "tokenizer", tmp_path / "reg", ("helpfulness", "safety"), weights)
    scorer = rewardforge.load(model_dir, device="cpu")
    want = reference(model_dir, CONVS)
    # TRL / verl ask for num_labels=1: the folded single-output model gives the combined reward exactly
    assert scorer.meta["single_reward_dir"] == "reward"
    np.testing.assert_allclose(trl_rewards(model_dir, CONVS, subdir="reward"), want, atol=TOL)
    server = LiveServer(scorer, ServeConfig(max_wait_ms=2.0, v2_rewards="per_attribute"))
    try:
        per_attr = scorer.score_detailed([p for p, _ in CONVS], [r for _, r in CONVS]).outputs
        policy = policy_tokenizer(tiny_model, "qwen2", "tokenizer")
        rewards, _ = nemo_rewards(server.url, policy, CONVS)
        assert rewards.shape == (len(CONVS), 2)  # SteerLM reads one reward per attribute
        np.testing.assert_allclose(rewards, per_attr, atol=TOL)
        got, body = openrlhf_rewards(server.url, policy, CONVS, add_special_tokens=False, batched=True)
        np.testing.assert_allclose(got, want, atol=TOL)
        np.testing.assert_allclose(body["extra_logs"]["safety"], per_attr[:, 1], atol=TOL)
    finally:
        server.stop()


def test_bf16_serving_is_within_two_percent_of_the_reward_std(family):
    import torch

    from rewardforge.serve import ServeConfig

    model_dir, _, policy = family("qwen2", "tokenizer")
    convs = CONVS * 3
    want = reference(model_dir, convs)
    server = LiveServer(rewardforge.load(model_dir, device="cpu", dtype=torch.bfloat16), ServeConfig(max_wait_ms=2.0, dtype="bf16"))
    try:
        got, _ = openrlhf_rewards(server.url, policy, convs, add_special_tokens=False, batched=True)
    finally:
        server.stop()
    # a random tiny model's rewards spread little (std 0.14 here); bf16's rounding of ~0.7 rewards is ~0.004 each.
    # bench/rl_clients.py prints the ratio; the 2%-of-std goal is for trained models
    spread = float(np.std(want))
    assert np.max(np.abs(got - want)) <= 0.1 * spread, (np.max(np.abs(got - want)), spread)


def test_normalisation_can_be_turned_off_per_request(family):
    """Without normalisation the server scores what it was sent: the policy's EOS padding changes the reward."""
    model_dir, server, policy = family("qwen2", "tokenizer")
    _, seqs = policy_sequences(policy, CONVS[:1], add_special_tokens=False)
    query = policy.decode([policy.eos_token_id] * 3 + seqs[0], skip_special_tokens=False)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        on = c.post("/get_reward", json={"query": [query]}).json()
        off = c.post("/get_reward", json={"query": [query], "normalize": False}).json()
    assert on["rewards"][0] == pytest.approx(float(reference(model_dir, CONVS[:1])[0]), abs=TOL)
    assert off["extra_logs"]["normalized"] == [0.0]
    assert abs(off["rewards"][0] - on["rewards"][0]) > 1e-3


@pytest.mark.parametrize("kind,template", [("qwen2", "tokenizer"), ("llama3", "tokenizer"), ("bert", "plain")])
def test_trls_real_grpo_trainer_with_the_export_as_reward_func(family, tiny_model, tmp_path, kind, template):
    """``GRPOTrainer(reward_funcs=[EXPORT_DIR])``: TRL loads the export itself and scores completions in
    ``_calculate_rewards`` (what its training step calls; generation is not run)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _, _ = family(kind, template)
    src = tiny_model("qwen2")
    policy = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    prompts = [p for p, _ in CONVS]
    completions = [[{"role": "assistant", "content": r}] for _, r in CONVS]
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, report_to=[], use_cpu=True, bf16=False, save_strategy="no")
    trainer = trl.GRPOTrainer(model=policy, processing_class=tok, reward_funcs=[str(model_dir)], args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    inputs = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    ids = [tok(c[0]["content"])["input_ids"] for c in completions]
    rewards = trainer._calculate_rewards(inputs, prompts, completions, ids)
    np.testing.assert_allclose(rewards[:, 0].numpy(), reference(model_dir, CONVS), atol=TOL)


def test_a_bad_policy_tokenizer_is_one_line_naming_the_path(tmp_path, family):
    from rewardforge.data.readers import DataError
    from rewardforge.serve import ServeConfig, create_app

    with pytest.raises(ValueError, match=r"policy_tokenizer='/nonexistent' does not exist; give the directory"):
        ServeConfig(policy_tokenizer="/nonexistent").validate()
    model_dir, _, _ = family("gpt2", "plain")
    with pytest.raises(DataError, match=r"holds no tokenizer that transformers can load .*; give the policy's tokenizer"):
        create_app(rewardforge.load(model_dir, device="cpu"), ServeConfig(policy_tokenizer=str(tmp_path)))
