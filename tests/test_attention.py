"""rf_eager (rewardforge.models.attention): the same attention as transformers' eager, forward and backward."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from rewardforge.models import attention
from rewardforge.models.attention import _Attention, rf_eager_attention
from rewardforge.config import load_config
from rewardforge.models.reward_model import RewardModel, set_attention
from rewardforge.train import run_training

CPU = torch.device("cpu")


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query
@pytest.mark.parametrize("queries", [5, 1])  # full, and one query (the sparse last layer)
@pytest.mark.parametrize("mask_kind", ["float", "bool", "causal"])
def test_gradients_are_exact_in_float64(kv_heads, queries, mask_kind):
    torch.manual_seed(0)
    b, h, lk, d = 2, 4, 5, 8
    q = torch.randn(b, queries, h, d, dtype=torch.float64).transpose(1, 2).requires_grad_()  # transformers' layout
    k = torch.randn(b, kv_heads, lk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, kv_heads, lk, d, dtype=torch.float64, requires_grad=True)
    allowed = torch.ones(b, 1, queries, lk, dtype=torch.bool)
    allowed[1, ..., 3:] = False  # padding in the second row
    mask = {"float": torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -1e9), "bool": allowed,
            "causal": None}[mask_kind]
    causal = mask_kind == "causal"
    assert torch.autograd.gradcheck(lambda q, k, v: _Attention.apply(q, k, v, mask, 0.3, causal), (q, k, v))


def _reference(q, k, v, mask, causal, scaling):
    """softmax(Q K^T s + mask) V written plainly, for the forward check."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scaling
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1), float("-inf"))
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


def test_forward_equals_the_plain_formula_including_causal_without_a_mask():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, ..., :2] = torch.finfo(torch.float32).min  # left padding
    # as in transformers, a causal module's mask (when given) already carries the causal pattern
    for m, causal in ((mask, False), (None, True), (mask, True)):
        out = _Attention.apply(q, k, v, m, 0.35, causal)
        torch.testing.assert_close(out, _reference(q, k, v, m, causal and m is None, 0.35), atol=1e-6, rtol=1e-5)


def _models(kind):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=1)
        hf, pooling = BertForSequenceClassification(cfg), "pooled"
    else:
        cls, config = {"llama": (LlamaForSequenceClassification, LlamaConfig),
                       "qwen2": (Qwen2ForSequenceClassification, Qwen2Config)}[kind]
        hf = cls(config(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, pad_token_id=0, num_labels=1))
        pooling = "last_token"
    eager = RewardModel(hf, pooling)
    set_attention(eager, "eager", "fp32", CPU)
    fast = RewardModel(copy.deepcopy(hf), pooling)
    set_attention(fast, attention.NAME, "fp32", CPU)
    return eager, fast


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 120, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :4] = 0
    return ids, mask


def _rewards_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    r = model(ids, mask)
    (r * torch.linspace(0.5, 1.5, r.numel()).view_as(r)).sum().backward()
    return r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen2"])
def test_models_give_eager_rewards_and_gradients(kind):
    eager, fast = _models(kind)
    assert fast.config._attn_implementation == attention.NAME
    ids, mask = _batch()
    r_eager, g_eager = _rewards_and_grads(eager, ids, mask)
    r_fast, g_fast = _rewards_and_grads(fast, ids, mask)
    torch.testing.assert_close(r_fast, r_eager, atol=1e-6, rtol=0)
    scale = max(g.abs().max().item() for g in g_eager.values())
    assert g_eager.keys() == g_fast.keys()
    worst = max((g_fast[n] - g_eager[n]).abs().max().item() for n in g_eager) / scale
    assert worst <= 1e-5, f"gradients differ by {worst:.2e} of the largest"


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bf16_matches_eager_to_bf16_rounding(kind):
    eager, fast = _models(kind)
    ids, mask = _batch()
    ref, _ = _rewards_and_grads(eager, ids, mask)  # fp32
    for m in (eager, fast):
        m.to(torch.bfloat16)
    r_eager, g_eager = _rewards_and_grads(eager, ids, mask)
    r_fast, g_fast = _rewards_and_grads(fast, ids, mask)
    # rf_eager in bf16 is no further from fp32 than eager in bf16 (within a rounding step of the rewards)
    step = ref.abs().max().item() * 2 ** -7
    assert (r_fast.float() - ref).abs().max().item() <= (r_eager.float() - ref).abs().max().item() + step
    flat_e = torch.cat([g.float().flatten() for g in g_eager.values()])
    flat_f = torch.cat([g_fast[n].float().flatten() for n in g_eager])
    assert torch.nn.functional.cosine_similarity(flat_e, flat_f, dim=0) > 0.999


def test_attention_dropout_goes_to_the_models_eager_function():
    eager, fast = _models("bert")
    sa = fast.hf.bert.encoder.layer[0].attention.self
    sa.train()
    q = k = v = torch.randn(1, 4, 3, 8)
    torch.manual_seed(5)
    with_dropout, weights = rf_eager_attention(sa, q, k, v, None, scaling=0.3, dropout=0.5)
    assert weights is not None  # eager's (output, probabilities), not rf_eager's (output, None)
    from transformers.models.bert.modeling_bert import eager_attention_forward

    torch.manual_seed(5)
    expected, _ = eager_attention_forward(sa, q, k, v, None, scaling=0.3, dropout=0.5)
    assert torch.equal(with_dropout, expected)


def test_under_autocast_it_runs_eager():
    """train.precision=bf16 with model.attn_implementation=rf_eager: autocast's mixed dtypes go to eager."""
    eager, fast = _models("llama")
    ids, mask = _batch()
    out = {}
    for name, m in (("eager", eager), ("fast", fast)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[name] = _rewards_and_grads(m, ids, mask)
    torch.testing.assert_close(out["fast"][0], out["eager"][0], atol=0, rtol=0)
    assert all(torch.equal(out["fast"][1][n], out["eager"][1][n]) for n in out["eager"][1])


def test_auto_picks_rf_eager_for_bf16_master_on_cpu_for_known_families():
    eager, _ = _models("llama")
    assert set_attention(eager, "auto", "bf16_master", CPU) == attention.NAME
    eager, _ = _models("bert")
    assert set_attention(eager, "auto", "bf16", CPU) == "eager"  # auto leaves other precisions alone
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = RewardModel(GPT2ForSequenceClassification(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2,
                                                                 pad_token_id=0)), "last_token")
    assert set_attention(gpt2, "auto", "bf16_master", CPU) == "eager"  # a family not in MODEL_TYPES


def test_training_with_rf_eager_exports_a_config_without_it(tiny_model, tmp_path):
    from conftest import synthetic_pairs, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(32))
    args = [f"model.name_or_path={tiny_model('bert')}", f"data.train=[{data}]", "train.batch_size=8", "train.max_steps=2",
            "train.precision=bf16_master", "data.cache_dir=none", f"output_dir={tmp_path / 'o'}"]
    summary = run_training(load_config(None, args), progress=False)
    assert summary["final_validation"]["pairs"] > 0
    cfg = json.loads((tmp_path / "o/model/config.json").read_text())
    assert attention.NAME not in json.dumps(cfg)
