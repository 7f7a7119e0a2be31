"""model.sparse_last_layer: the last layer computed only at the reward tokens gives the same rewards,
gradients and trained weights as the full layer, for every family it covers, and falls back to the
full layer (still exact) where it cannot apply."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import train_variants
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from rewardforge.models import lastlayer
from rewardforge.config import ModelConfig
from rewardforge.export.model_dir import load_reward_model
from rewardforge.models.reward_model import RewardModel, build_model, load_tokenizer
from rewardforge.data.packing import PackedPairCollator, model_kwargs

ENC = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
DEC = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, pad_token_id=0, num_labels=2)
FAMILIES = {
    "bert": (BertForSequenceClassification, lambda: BertConfig(**ENC), "pooled"),
    "roberta": (RobertaForSequenceClassification, lambda: RobertaConfig(**ENC, pad_token_id=1), "pooled"),
    "electra": (ElectraForSequenceClassification, lambda: ElectraConfig(**ENC, embedding_size=16), "pooled"),
    "llama": (LlamaForSequenceClassification, lambda: LlamaConfig(**DEC), "last_token"),
    "mistral": (MistralForSequenceClassification, lambda: MistralConfig(**DEC), "last_token"),
    "qwen2": (Qwen2ForSequenceClassification, lambda: Qwen2Config(**DEC), "last_token"),
    "qwen3": (Qwen3ForSequenceClassification, lambda: Qwen3Config(**DEC, head_dim=8), "last_token"),
}


def pair_of_models(family, attn, **config):
    """(full, sparse): the same random weights, one computing the last layer everywhere."""
    cls, make_config, pooling = FAMILIES[family]
    cfg = make_config()
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    hf = cls(cfg)
    hf.set_attn_implementation(attn)
    full = RewardModel(hf, pooling, sparse_last_layer=False)
    sparse = RewardModel(copy.deepcopy(hf), pooling, sparse_last_layer=True)
    return full, sparse


def batch(padding="right", rows=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 120, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    lengths = [length, length - 3, 2, length - 1][:rows]
    for i, n in enumerate(lengths):
        if padding == "right":
            mask[i, n:] = 0
        else:
            mask[i, : length - n] = 0
    return ids, mask


def rewards_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()  # a different weight per output
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diffs(full, sparse, *args, **kwargs):
    r_full, g_full = rewards_and_grads(full, *args, **kwargs)
    r_sparse, g_sparse = rewards_and_grads(sparse, *args, **kwargs)
    assert r_full.shape == r_sparse.shape
    assert set(g_full) == set(g_sparse), "a parameter got a gradient in one path only"
    scale = max(g.abs().max().item() for g in g_full.values())
    grad = max((g_full[n] - g_sparse[n]).abs().max().item() for n in g_full) / scale
    return (r_full - r_sparse).abs().max().item(), grad


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_last_layer_equals_full(family, attn):
    full, sparse = pair_of_models(family, attn)
    assert sparse.sparse_last_layer and not full.sparse_last_layer
    for padding in ("right", "left"):
        r, g = max_diffs(full, sparse, *batch(padding))
        assert r <= 1e-6, f"{family}/{attn}/{padding}: rewards differ by {r:.2e}"
        assert g <= 1e-5, f"{family}/{attn}/{padding}: gradients differ by {g:.2e} (relative to the largest)"


def test_the_last_layer_really_runs_on_the_reward_tokens_only():
    """The saving is real: the MLP of the last layer sees one row per sequence, the other layers all rows."""
    _, sparse = pair_of_models("llama", "sdpa")
    seen = {}
    for i, layer in enumerate(sparse.hf.model.layers):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, tuple(a[0].shape)))
    ids, mask = batch()
    sparse(ids, mask)
    assert seen == {0: (4, 9, 32), 1: (4, 9, 32), 2: (4, 1, 32)}


def test_without_the_keyword_the_layer_is_unchanged():
    """Calling the transformers model directly (no read positions) still gives every position."""
    full, sparse = pair_of_models("qwen2", "sdpa")
    ids, mask = batch()
    a = full.hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = sparse.hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert a.shape == b.shape == (4, 9, 32) and torch.equal(a, b)
    assert full.state_dict().keys() == sparse.state_dict().keys()
    assert lastlayer.install(sparse.hf) == "decoder"  # idempotent


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_with_gradient_checkpointing(family):
    full, sparse = pair_of_models(family, "sdpa")
    sparse.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    full.train(), sparse.train()
    r, g = max_diffs(full, sparse, *batch())
    assert r <= 1e-6 and g <= 1e-5


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_with_lora(family):
    from peft import LoraConfig, get_peft_model

    full, sparse = pair_of_models(family, "sdpa")
    targets = ["query", "value"] if family == "bert" else ["q_proj", "v_proj"]
    head = "classifier" if family == "bert" else "score"
    models = []
    for m in (full, sparse):
        torch.manual_seed(1)
        peft = get_peft_model(m.model, LoraConfig(r=4, target_modules=targets, modules_to_save=[head], task_type="SEQ_CLS"))
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        models.append(RewardModel(peft, m.pooling, sparse_last_layer=m is sparse))
    assert models[1].sparse_last_layer
    r, g = max_diffs(*models, *batch())
    assert r <= 1e-6 and g <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_shared_prompt_rows(family, attn):
    """Two reward tokens per packed row (train.share_prompt): both read from the reduced last layer."""
    full, sparse = pair_of_models(family, attn)
    rng = np.random.default_rng(0)
    items = []
    for i, (p, c, r) in enumerate([(5, 3, 4), (2, 6, 1), (7, 1, 1)]):
        prompt = rng.integers(2, 120, p)
        items.append({"chosen": np.concatenate([prompt, rng.integers(2, 120, c)]),
                      "rejected": np.concatenate([prompt, rng.integers(2, 120, r)]), "margin": float("nan"), "index": i})
    packed = PackedPairCollator(0)(items)
    r, g = max_diffs(full, sparse, packed["input_ids"], packed["attention_mask"], **model_kwargs(packed))
    assert r <= 1e-6 and g <= 1e-5


def test_a_decoder_read_by_its_own_head_runs_the_full_last_layer():
    """pooling=pooled on a decoder (the transformers head finds the last non-pad token itself, as for
    a TRL-trained model): the last layer must keep every position."""
    cls, make_config, _ = FAMILIES["qwen2"]
    torch.manual_seed(0)
    hf = cls(make_config())
    full = RewardModel(hf, "pooled", sparse_last_layer=False)
    sparse = RewardModel(copy.deepcopy(hf), "pooled", sparse_last_layer=True)
    ids, mask = batch()
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0, which the head looks for
    r, g = max_diffs(full, sparse, ids, mask)
    assert r <= 1e-6 and g <= 1e-5


def test_falls_back_to_the_full_layer_where_it_cannot_apply():
    # feed-forward chunking: the layer runs in full, then the read positions are gathered (still exact)
    full, sparse = pair_of_models("bert", "sdpa", chunk_size_feed_forward=2)
    for layer in (*full.hf.bert.encoder.layer, *sparse.hf.bert.encoder.layer):
        layer.chunk_size_feed_forward = 2
    seen = []
    sparse.hf.bert.encoder.layer[-1].output.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    r, g = max_diffs(full, sparse, *batch(length=8))  # chunking needs a length divisible by the chunk
    assert r <= 1e-6 and g <= 1e-5
    assert seen and all(s[1] == 2 for s in seen), "chunked feed-forward should have run on every position"
    # a family it does not know (GPT-2's fused QKV) keeps the plain path
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, pad_token_id=0))
    assert RewardModel(gpt2, "last_token", sparse_last_layer=True).sparse_last_layer is False


def test_training_and_export_match_the_full_layer(tiny_model, tmp_path):
    """5 optimizer steps with the sparse last layer end at the full layer's weights, and the export
    (loaded with the sparse layer) scores like the model that was trained."""
    summaries, _, diff = train_variants(tiny_model("bert"), tmp_path, {False: ["model.sparse_last_layer=false"],
                                                                       True: ["model.sparse_last_layer=true"]})
    # Adam moves each weight up to lr * steps = 5e-3; rounding differences in tiny gradients stay far below
    assert diff <= 1e-4, f"weights differ by {diff:.2e} after 5 steps"
    a, b = summaries[False]["final_validation"], summaries[True]["final_validation"]
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)

    model, tok, _ = load_reward_model(tmp_path / "variant-True" / "model")
    assert model.sparse_last_layer
    enc = tok(["the quick brown fox", "a reward model reads one token"], padding=True, return_tensors="pt")
    with torch.no_grad():
        fast = model(enc["input_ids"], enc["attention_mask"])
        model.sparse_last_layer = False
        plain = model(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(fast, plain, atol=1e-6)


def test_build_model_reads_the_setting(tiny_model):
    path = str(tiny_model("llama"))
    for value in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(ModelConfig(name_or_path=path, sparse_last_layer=value), load_tokenizer(path), 1)
        assert model.sparse_last_layer is value
    assert ModelConfig().sparse_last_layer is True
