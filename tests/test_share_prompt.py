"""train.share_prompt: one packed row per pair (common prefix once, then both branches) gives the
same rewards and gradients as the plain two-sequence batch, and the same trained weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import synthetic_pairs, train_variants, write_jsonl

from rewardforge.config import ConfigError, ModelConfig, load_config
from rewardforge.data.batching import PairCollator
from rewardforge.data.datasets import build_dataset
from rewardforge.data.template import setup_template
from rewardforge.models.reward_model import build_model, load_tokenizer
from rewardforge.data.formats import common_prefix_length
from rewardforge.data.packing import PackedPairCollator, model_kwargs, pack_pair, packed_mask
from rewardforge.train import run_training

DECODERS = ["gpt2", "llama", "qwen2"]
ATOL = 1e-5


def build(tiny_model, kind, attn="sdpa", **options):
    path = str(tiny_model(kind))
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig(name_or_path=path, **options), tok, 1)
    model.hf.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    return model, tok


def pairs_from_text(tok, triples):
    """Pair items tokenized as the text prompt+response (so BPE may merge across the boundary)."""
    items = []
    for i, (p, c, r) in enumerate(triples):
        items.append({"chosen": np.array(tok(p + c)["input_ids"]), "rejected": np.array(tok(p + r)["input_ids"]),
                      "margin": float("nan"), "index": i, "prompt_tokens": len(tok(p)["input_ids"])})
    return items


def dataset_items(tok, tmp_path, n, max_length, seed=0):
    setup_template(tok, "auto")
    f = write_jsonl(tmp_path / f"pairs-{seed}-{max_length}.jsonl", synthetic_pairs(n, seed=seed))
    ds, _ = build_dataset([str(f)], tok, kind="pairs", max_length=max_length, cache_dir="none")
    return [ds[i] for i in range(len(ds))]


def rewards_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch["attention_mask"], **model_kwargs(batch))
    (out * torch.linspace(0.5, 1.5, out.shape[0])[:, None]).sum().backward()  # a different weight per row
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def compare(model, pad_id, items):
    """(max |reward diff|, max |grad diff|) between the plain and the packed batch of ``items``."""
    plain, g_plain = rewards_and_grads(model, PairCollator(pad_id)(items))
    packed, g_packed = rewards_and_grads(model, PackedPairCollator(pad_id)(items))
    assert packed.shape == plain.shape == (2 * len(items), 1)
    assert set(g_plain) == set(g_packed)
    missing = [n for n, g in g_plain.items() if g is None]
    assert not missing, f"no gradient for {missing}"
    grad_diff = max((g_plain[n] - g_packed[n]).abs().max().item() for n in g_plain)
    return (plain - packed).abs().max().item(), grad_diff


def test_pack_pair_layout():
    ids, pos, seg, c_at, r_at = pack_pair(np.array([5, 6, 7, 8]), np.array([5, 6, 9]))
    assert ids.tolist() == [5, 6, 7, 8, 9] and pos.tolist() == [0, 1, 2, 3, 2] and seg.tolist() == [0, 0, 1, 1, 2]
    assert (c_at, r_at) == (3, 4)
    # identical sides, or one side a prefix of the other: each branch keeps its own last token
    ids, pos, seg, c_at, r_at = pack_pair(np.array([5, 6]), np.array([5, 6, 7]))
    assert ids.tolist() == [5, 6, 6, 7] and pos.tolist() == [0, 1, 1, 2] and (c_at, r_at) == (1, 3)
    assert common_prefix_length(np.array([1, 2]), np.array([3])) == 0
    m = packed_mask(torch.tensor([[0, 0, 1, 1, 2, -1]]))[0, 0]
    assert m[4].tolist() == [True, True, False, False, True, False]  # rejected sees the prefix and itself, never chosen
    assert m[3].tolist() == [True, True, True, True, False, False]
    assert m[5].tolist() == [False] * 5 + [True] and not m[:5, 5].any()  # padding is isolated


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", DECODERS)
def test_packed_rewards_and_gradients_equal_plain(kind, attn, tiny_model, tmp_path):
    model, tok = build(tiny_model, kind, attn)
    pad = tok.pad_token_id
    long_prompt = "Human: " + " ".join(["The quick brown fox jumps over the lazy dog. Paris is the capital of France."] * 4)
    cases = {
        "long shared prompt": pairs_from_text(tok, [(long_prompt + " Assistant:", " Sure! Here is a clear answer.", " Go away."),
                                                    (long_prompt + " Why? Assistant:", " Gravity keeps planets in orbit.", " No.")]),
        "bpe boundary": pairs_from_text(tok, [("How do I boil", "ing water work?", " an egg?"),
                                              ("The quick brown fo", "x jumps", "o bar"), ("Sure! Here is a clear answ", "er: water", "ering")]),
        "identical and prefix sides": pairs_from_text(tok, [("Paris is", " the capital", " the capital"), ("Paris is", " the", " the capital")]),
        "templated, padded": dataset_items(tok, tmp_path, 12, 256)[:6],
        "truncated": dataset_items(tok, tmp_path, 12, 24, seed=3)[:6],
    }
    assert any(len(it["chosen"]) == 24 or len(it["rejected"]) == 24 for it in cases["truncated"])
    short = [common_prefix_length(it["chosen"], it["rejected"]) < it["prompt_tokens"] for it in cases["bpe boundary"]]
    assert any(short), "no pair whose common prefix is shorter than its prompt"
    lengths = [len(PackedPairCollator(pad)([it])["input_ids"][0]) for it in cases["templated, padded"]]
    assert len(set(lengths)) > 1  # rows of different lengths: the batch is padded
    worst = {}
    for name, items in cases.items():
        items = [{k: v for k, v in it.items() if k != "prompt_tokens"} for it in items]
        r, g = compare(model, pad, items)
        worst[name] = (r, g)
        assert r <= ATOL and g <= ATOL, f"{kind}/{attn} {name}: reward diff {r:.2e}, grad diff {g:.2e}"
    print(f"\n{kind}/{attn} max |reward diff|, max |grad diff|: " + "; ".join(f"{k} {r:.1e} {g:.1e}" for k, (r, g) in worst.items()))


def test_packed_with_lora_equals_plain(tiny_model):
    model, tok = build(tiny_model, "llama", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    for n, p in model.named_parameters():  # LoRA B starts at 0: make the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    items = pairs_from_text(tok, [("How do I boil", "ing water work?", " an egg?"), ("Paris is", " the capital of France.", " a dog.")])
    r, g = compare(model, tok.pad_token_id, [{k: v for k, v in it.items() if k != "prompt_tokens"} for it in items])
    assert r <= ATOL and g <= ATOL


def test_training_with_share_prompt_ends_with_the_same_weights(tiny_model, tmp_path):
    summaries, _, diff = train_variants(tiny_model("qwen2"), tmp_path, {False: ["train.share_prompt=false"],
                                                                        True: ["train.share_prompt=true"]},
                                        "train.gradient_accumulation_steps=2", pairs=96)
    print(f"\nmax |weight diff| after 5 steps (share_prompt on vs off): {diff:.2e}")
    assert diff <= 1e-4
    a, b = summaries[False]["final_validation"], summaries[True]["final_validation"]
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], abs=1e-4)

    # the saving: real tokens computed, and tokens including padding, over the training pairs
    tok = load_tokenizer(str(tiny_model("qwen2")))
    model, tok = build(tiny_model, "qwen2")  # adds the pad token the data was tokenized with
    items = dataset_items(tok, tmp_path, 96, 512)
    pad = tok.pad_token_id
    real_plain = real_packed = padded_plain = padded_packed = 0
    for i in range(0, len(items), 8):
        plain, packed = PairCollator(pad)(items[i:i + 8]), PackedPairCollator(pad)(items[i:i + 8])
        real_plain += int(packed["tokens_plain"])
        real_packed += int(packed["tokens_packed"])
        assert int(plain["attention_mask"].sum()) == int(packed["tokens_plain"])
        padded_plain += plain["input_ids"].numel()
        padded_packed += packed["input_ids"].numel()
    print(f"tokens computed: real {real_packed} packed vs {real_plain} plain ({real_packed / real_plain:.2f}x); "
          f"with padding {padded_packed} vs {padded_plain} ({padded_packed / padded_plain:.2f}x)")
    assert real_packed < real_plain


def test_share_prompt_is_refused_where_it_cannot_work(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24))
    base = [f"data.train=[{data}]", "data.cache_dir=none", f"output_dir={tmp_path / 'o'}", "train.share_prompt=true", "train.max_steps=1"]
    with pytest.raises(ConfigError, match="share_prompt"):
        load_config(None, [f"model.name_or_path={tiny_model('bert')}", "model.pooling=pooled", *base])
    with pytest.raises(ConfigError, match="share_prompt.*decoder"):  # auto pooling detects the encoder
        run_training(load_config(None, [f"model.name_or_path={tiny_model('bert')}", *base]), progress=False)
    rated = write_jsonl(tmp_path / "rated.jsonl", [{"prompt": "Q", "response": "A", "labels": {"helpfulness": 1.0}}] * 8)
    with pytest.raises(ConfigError, match="share_prompt.*pair"):
        run_training(load_config(None, [f"model.name_or_path={tiny_model('gpt2')}", "model.reward_model_type=regression",
                                        "model.attributes=[helpfulness]", *base, f"data.train=[{rated}]"]), progress=False)
    assert load_config(None, []).train.share_prompt is False  # opt-in
