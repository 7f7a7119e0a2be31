"""The reward model: where the reward is read, pad tokens, padding invariance, encoder pooling,
freezing, LoRA and gradient checkpointing."""

from __future__ import annotations

import warnings

import pytest
import torch

from rewardforge.config import ModelConfig
from rewardforge.models.reward_model import (
    PAD_TOKEN,
    ModelError,
    RewardModel,
    build_model,
    detect_pooling,
    ensure_pad_token,
    load_tokenizer,
    merged_hf_model,
    resolve_model_path,
    reward_token_index,
)

DECODERS = ["gpt2", "llama", "qwen2"]


def build(tiny_model, kind, seed=0, **options):
    """(RewardModel, tokenizer) for a tiny backbone; the head is seeded so two builds are equal."""
    path = str(tiny_model(kind))
    tok = load_tokenizer(path)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig(name_or_path=path, **options), tok, 1)
    return model, tok


def right_pad(seqs, pad):
    n = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    return ids, mask


def left_pad(seqs, pad):
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


# ------------------------------------------------------------------ reward_token_index


def test_reward_token_index_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert reward_token_index(mask).tolist() == [2, 4, 0]


def test_reward_token_index_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert reward_token_index(mask).tolist() == [4, 4, 4]


def test_reward_token_index_ignores_token_ids_and_dtype():
    # bool masks work the same; a batch can mix left- and right-padded rows
    mask = torch.tensor([[True, True, False], [False, True, True]])
    idx = reward_token_index(mask)
    assert idx.tolist() == [1, 2] and idx.dtype == torch.int64


# ------------------------------------------------------------------ pad tokens


def test_gpt2_gets_a_distinct_pad_token(tiny_model):
    tok = load_tokenizer(str(tiny_model("gpt2")))
    assert tok.pad_token_id == tok.eos_token_id  # the confusing case
    vocab_before = len(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig(name_or_path=str(tiny_model("gpt2"))), tok, 1)
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == vocab_before
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.hf.get_input_embeddings().num_embeddings == len(tok) == vocab_before + 1
    assert model.pooling == "last_token" and model.num_outputs == 1


def test_llama_without_pad_gets_one_and_qwen2_keeps_its_own(tiny_model):
    llama, ltok = build(tiny_model, "llama")
    assert ltok.pad_token == PAD_TOKEN and llama.config.pad_token_id == ltok.pad_token_id
    assert llama.hf.get_input_embeddings().num_embeddings == len(ltok)
    qtok = load_tokenizer(str(tiny_model("qwen2")))
    own = qtok.pad_token_id
    assert ensure_pad_token(qtok, "last_token") is False and qtok.pad_token_id == own != qtok.eos_token_id


def test_encoder_without_pad_token_is_an_error(tiny_model):
    tok = load_tokenizer(str(tiny_model("bert")))
    tok.pad_token = None
    with pytest.raises(ModelError, match="the encoder's tokenizer has no pad token"):
        ensure_pad_token(tok, "pooled")


def test_detect_pooling_and_bad_paths(tiny_model):
    from transformers import AutoConfig

    assert detect_pooling(AutoConfig.from_pretrained(tiny_model("bert"))) == "pooled"
    for kind in DECODERS:
        assert detect_pooling(AutoConfig.from_pretrained(tiny_model(kind))) == "last_token"
    with pytest.raises(ModelError, match="model.name_or_path is empty"):
        resolve_model_path("")
    with pytest.raises(ModelError, match="pooling must be last_token, pooled or mean, got 'max'"):
        RewardModel(torch.nn.Linear(1, 1), "max")


# ------------------------------------------------------------------ padding invariance


@pytest.mark.parametrize("kind", DECODERS)
def test_rewards_do_not_depend_on_padding(tiny_model, kind):
    model, tok = build(tiny_model, kind)
    model.eval()
    a = tok("Human: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes.")["input_ids"]
    b = tok("Paris is the capital")["input_ids"]
    c = a[:5] + [tok.eos_token_id]  # ends with EOS (== the original pad id for gpt2)
    pad = tok.pad_token_id
    with torch.no_grad():
        alone = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, 0].item() for s in (a, b, c)]
        right = model(*right_pad([a, b, c], pad))[:, 0].tolist()
        left = model(*left_pad([a, b, c], pad))[:, 0].tolist()
        # extra padding beyond the longest, too
        ids, mask = right_pad([b + [pad] * 7], pad)
        more = model(ids, torch.tensor([[1] * len(b) + [0] * 7]))[0, 0].item()
    assert len(set(alone)) == 3  # the three sequences really get different rewards
    assert right == pytest.approx(alone, abs=1e-5)
    assert left == pytest.approx(alone, abs=1e-5)
    assert more == pytest.approx(alone[1], abs=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_matches_plain_transformers_after_save(tiny_model, kind, tmp_path):
    """The saved model read by AutoModelForSequenceClassification (pad-id rule) gives the same rewards."""
    from transformers import AutoModelForSequenceClassification

    model, tok = build(tiny_model, kind)
    model.eval()
    model.hf.save_pretrained(tmp_path / "m")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    a = tok("Human: hi\n\nAssistant: hello there")["input_ids"] + [tok.eos_token_id]
    b = tok("Gravity keeps planets in orbit.")["input_ids"]
    ids, mask = right_pad([a, b], tok.pad_token_id)
    with torch.no_grad():
        ours = model(ids, mask)[:, 0]
        theirs = plain(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_encoder_pooled_equals_sequence_classification_logits(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tok = build(tiny_model, "bert")
    assert model.pooling == "pooled"
    model.eval()
    model.hf.save_pretrained(tmp_path / "m")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    enc = tok(["the quick brown fox", "water boils at one hundred degrees celsius"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(enc["input_ids"], enc["attention_mask"])
        theirs = plain(**enc).logits
        # by hand: classifier(dropout(pooler([CLS] hidden state)))
        hidden = plain.bert(**enc).last_hidden_state
        by_hand = plain.classifier(plain.bert.pooler(hidden))
        alone = model(enc["input_ids"][:1, :6], enc["attention_mask"][:1, :6])
    assert ours.shape == (2, 1) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, by_hand, atol=1e-6, rtol=0)
    assert enc["attention_mask"][0].sum() == 6  # "the quick brown fox" + [CLS]/[SEP]
    torch.testing.assert_close(alone[0], ours[0], atol=1e-5, rtol=0)  # right padding does not matter


def test_encoder_mean_pooling_is_the_head_on_the_masked_mean_of_the_last_hidden_states(tiny_model):
    model, tok = build(tiny_model, "bert", pooling="mean")
    assert model.pooling == "mean"
    model.eval()
    enc = tok(["the quick brown fox", "water boils at one hundred degrees celsius"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(enc["input_ids"], enc["attention_mask"])
        hidden = model.hf.bert(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        by_hand = model.hf.classifier((hidden * m).sum(1) / m.sum(1))  # the pooler ([CLS] -> dense -> tanh) unused
        pooled = RewardModel(model.hf, "pooled", sparse_last_layer=False)(enc["input_ids"], enc["attention_mask"])
        alone = model(enc["input_ids"][:1, :6], enc["attention_mask"][:1, :6])
    torch.testing.assert_close(ours, by_hand, atol=1e-6, rtol=0)
    assert (ours - pooled).abs().min() > 1e-4  # a different reading from the pooled [CLS]
    torch.testing.assert_close(alone[0], ours[0], atol=1e-5, rtol=0)  # padding tokens are not averaged in


# ------------------------------------------------------------------ freezing


def test_freeze_layers_fraction_gpt2(tiny_model):
    model, _ = build(tiny_model, "gpt2", freeze_layers_fraction=0.5)
    grad = {n.removeprefix("model.transformer."): p.requires_grad for n, p in model.named_parameters()}
    assert grad["wte.weight"] is False and grad["wpe.weight"] is False  # embeddings
    assert not any(v for k, v in grad.items() if k.startswith("h.0."))  # the lower half of the 2 layers
    assert all(v for k, v in grad.items() if k.startswith("h.1."))
    assert grad["ln_f.weight"] and grad["model.score.weight"]


def test_freeze_layers_fraction_bert_all_layers(tiny_model):
    model, _ = build(tiny_model, "bert", freeze_layers_fraction=1.0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "model.bert.pooler.dense.bias", "model.bert.pooler.dense.weight", "model.classifier.bias", "model.classifier.weight",
    ]


def test_freeze_layers_fraction_rounds_down(tiny_model):
    model, _ = build(tiny_model, "llama", freeze_layers_fraction=0.7)  # int(2 * 0.7) = 1 layer
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.model.embed_tokens.weight" in frozen
    assert any(n.startswith("model.model.layers.0.") for n in frozen)
    assert not any(n.startswith("model.model.layers.1.") for n in frozen)
    unfrozen, _ = build(tiny_model, "llama", freeze_layers_fraction=0.0)
    assert all(p.requires_grad for p in unfrozen.parameters())


# ------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_builds_with_trainable_head(tiny_model, kind):
    model, tok = build(tiny_model, kind, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assert hasattr(model.model, "peft_config")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    # peft keeps a frozen original head and trains a copy, which the forward pass uses
    head = {n: p for n, p in model.head().named_parameters()}
    head_trainable = [p for n, p in head.items() if p.requires_grad]
    assert "modules_to_save.default.weight" in head and head["modules_to_save.default.weight"].requires_grad
    backbone_weights = [n for n, p in model.named_parameters() if "lora_" not in n and "score" not in n]
    assert backbone_weights and not trainable & set(backbone_weights)  # the backbone itself is frozen

    model.train()
    ids, mask = right_pad([tok("Human: hi")["input_ids"], tok("Paris is the capital of France")["input_ids"]], tok.pad_token_id)
    out = model(ids, mask)
    assert out.shape == (2, 1)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    # merging the adapters (what export does) keeps the rewards
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.5)  # make the adapters and the trained head copy matter
        model.eval()
        with_adapters = model(ids, mask)
        merged = RewardModel(merged_hf_model(model), model.pooling).eval()
        assert not hasattr(merged.model, "peft_config")
        torch.testing.assert_close(merged(ids, mask), with_adapters, atol=1e-5, rtol=0)
        base, _ = build(tiny_model, kind)
        assert not torch.allclose(base.eval()(ids, mask), with_adapters, atol=1e-4)


# ------------------------------------------------------------------ gradient checkpointing


def test_gradient_checkpointing_forward_backward(tiny_model):
    plain, tok = build(tiny_model, "gpt2", seed=1)
    ckpt, _ = build(tiny_model, "gpt2", seed=1, gradient_checkpointing=True)
    layers = ckpt.hf.base_model.h
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(layer.gradient_checkpointing for layer in plain.hf.base_model.h)
    calls = []
    for layer in layers:  # count the checkpointed calls our forward makes
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)

    ids, mask = right_pad([tok("Human: hi there\n\nAssistant: hello")["input_ids"], tok("the lazy dog")["input_ids"]], tok.pad_token_id)
    plain.train(), ckpt.train()
    plain(ids, mask).pow(2).sum().backward()
    ckpt(ids, mask).pow(2).sum().backward()
    assert len(calls) == len(layers)
    grads = dict(plain.named_parameters())
    checked = 0
    for name, p in ckpt.named_parameters():
        ref = grads[name].grad
        assert (p.grad is None) == (ref is None), name
        if ref is not None:
            torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-5)
            checked += 1
    assert checked > 10 and grads["model.transformer.h.0.attn.c_attn.weight"].grad.abs().sum() > 0


def test_dropout_override(tiny_model):
    model, _ = build(tiny_model, "gpt2", dropout=0.25)
    cfg = model.config
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.25, 0.25, 0.25)


def test_a_mean_pooled_export_scores_through_rewardforge_and_says_plain_transformers_reads_another_token(tiny_model, tmp_path, capsys):
    import json

    from transformers import AutoModelForSequenceClassification

    import rewardforge
    from conftest import synthetic_pairs, write_jsonl
    from rewardforge.config import load_config
    from rewardforge.train import run_training

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40))
    run_training(load_config(None, [f"model.name_or_path={tiny_model('bert')}", f"data.train=[{data}]", "data.cache_dir=none",
                                    "train.batch_size=8", "train.max_steps=2", "train.precision=fp32",
                                    f"output_dir={tmp_path / 'run'}", "model.pooling=mean"]), progress=False)
    assert "note: model.pooling=mean" in capsys.readouterr().out
    export = tmp_path / "run" / "model"
    meta = json.loads((export / "rewardforge.json").read_text())
    assert meta["pooling"] == "mean" and meta["plain_transformers_reward"] is False
    assert "does not give this model's reward" in (export / "README.md").read_text()
    scorer = rewardforge.load(export)
    assert scorer.model.pooling == "mean"
    text = "Human: How do I boil an egg?\n\nAssistant: Put it in boiling water."
    enc = scorer.tokenizer([text], return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    with torch.no_grad():
        ours = scorer.model(enc["input_ids"], enc["attention_mask"])[0, 0].item()
        by_hand = RewardModel(plain, "mean")(enc["input_ids"], enc["attention_mask"])[0, 0].item()
        theirs = plain(**enc).logits[0, 0].item()
    assert ours == pytest.approx(by_hand, abs=1e-5)
    assert abs(ours - theirs) > 1e-4  # what the card warns about: plain transformers reads the pooled [CLS]
