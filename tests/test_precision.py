"""train.precision=bf16_master (bf16 compute over fp32 master weights) and the attention choice.

What users rely on: the fast mode trains the same model as fp32 up to bf16 rounding, never lets
the master weights, the gradient accumulation or the optimizer drop to bf16, leaves frozen weights
untouched, resumes bitwise, and refuses the one strategy it cannot run under (DDP).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_pairs, write_jsonl
from rewardforge.config import ConfigError, load_config
from rewardforge.models.reward_model import ModelError, build_model, load_tokenizer, set_attention
from rewardforge.training.precision import MasterWeights
from rewardforge.train import run_training, setup


def _model(src, **model_overrides):
    cfg = load_config(None, [f"model.name_or_path={src}", *(f"model.{k}={v}" for k, v in model_overrides.items())])
    tok = load_tokenizer(str(src))
    torch.manual_seed(0)
    return build_model(cfg.model, tok, 1), tok


def _batch(tok, n=6):
    rows = synthetic_pairs(n, seed=3)
    texts = [r["prompt"] + " " + r[k] for r in rows for k in ("chosen", "rejected")]
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _master(model):
    return MasterWeights(model, keep_fp32=(model.head(),))


def _loss(model, ids, mask):
    r = model(ids, mask)[:, 0]
    return -torch.nn.functional.logsigmoid(r[0::2] - r[1::2]).mean()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _flat(g):
    return torch.cat([v.flatten() for v in g.values()])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_master_weights_are_fp32_between_passes_and_bf16_inside(kind, tiny_model):
    model, tok = _model(tiny_model(kind))
    ids, mask = _batch(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    master = _master(model)
    head = {id(p) for p in model.head().parameters()}
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    fp32 = head | {id(p) for m in tables for p in m.parameters()}
    with master.compute():
        assert {p.dtype for p in model.parameters() if id(p) not in fp32} == {torch.bfloat16}
        assert {p.dtype for p in model.head().parameters()} == {torch.float32}  # rewards keep fp32 resolution
        # embedding tables stay fp32 (no copy per pass); the rows they return are bf16
        assert tables and {m.weight.dtype for m in tables} == {torch.float32}
        seen = {}
        h = model.hf.base_model.register_forward_hook(lambda m, a, out: seen.update(dtype=out[0].dtype))
        e = tables[0].register_forward_hook(lambda m, a, out: seen.update(rows=out.dtype))
        _loss(model, ids, mask).backward()
        h.remove(), e.remove()
    assert seen["dtype"] == torch.bfloat16  # activations are bf16, not autocast's fp32 residual stream
    assert seen["rows"] == torch.bfloat16
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[n]), n  # no step: master untouched
        assert p.grad is not None and p.grad.dtype == torch.float32, n


@pytest.fixture(scope="module")
def spread_bert(tmp_path_factory):
    """A tiny BERT whose rewards differ between inputs (std ~0.1): at the default init (0.02) the
    tiny random encoder gives every input the same pooled vector up to 1e-5, below bf16's (and
    autocast's) resolution, which no real encoder does."""
    from transformers import AutoModel

    from conftest import make_config, make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer("bert")
    cfg = make_config("bert", len(tok))
    cfg.initializer_range = 0.2
    path = tmp_path_factory.mktemp("spread-bert")
    AutoModel.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bf16_master_gradients_match_fp32_as_closely_as_autocast(kind, tiny_model, spread_bert):
    """The bf16 gradient is fp32's up to bf16 rounding, no further off than autocast's."""
    model, tok = _model(spread_bert if kind == "bert" else tiny_model(kind))
    ids, mask = _batch(tok)
    _loss(model, ids, mask).backward()
    ref = _flat(_grads(model))
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, ids, mask)
    loss.backward()
    auto = _flat(_grads(model))
    model.zero_grad(set_to_none=True)
    with _master(model).compute():
        _loss(model, ids, mask).backward()
    o2 = _flat(_grads(model))
    err_auto = ((auto - ref).norm() / ref.norm()).item()
    err_o2 = ((o2 - ref).norm() / ref.norm()).item()
    assert torch.nn.functional.cosine_similarity(o2, ref, dim=0) > 0.995
    assert err_o2 < 0.05 and err_o2 < 4 * err_auto + 0.01, (err_o2, err_auto)


def test_micro_batches_accumulate_in_fp32(tiny_model):
    model, tok = _model(tiny_model("llama"))
    ids, mask = _batch(tok, 8)
    master = _master(model)
    parts = []
    for sl in (slice(0, 8), slice(8, 16)):
        with master.compute():
            _loss(model, ids[sl], mask[sl]).backward()
        parts.append(_grads(model))
        model.zero_grad(set_to_none=True)
    for sl in (slice(0, 8), slice(8, 16)):
        with master.compute():
            _loss(model, ids[sl], mask[sl]).backward()
    for n, g in _grads(model).items():
        assert g.dtype == torch.float32
        # fp32 sum of the two bf16 gradients, not a bf16 running sum
        assert torch.equal(g, parts[0][n] + parts[1][n]), n


def _args(src, data, out, *extra):
    return [f"model.name_or_path={src}", f"data.train=[{data}]", "train.batch_size=8", "train.learning_rate=1e-3",
            "data.cache_dir=none", f"output_dir={out}", "train.precision=bf16_master", *extra]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(160))


def test_bf16_master_training_learns_resumes_bitwise_and_exports_fp32(tiny_model, pairs_file, tmp_path):
    src = tiny_model("llama")
    args = _args(src, pairs_file, tmp_path / "a", "train.max_steps=8", "train.save_steps=4", "train.save_total_limit=0",
                 "train.warmup_ratio=0", "train.gradient_accumulation_steps=2")
    full = run_training(load_config(None, args), progress=False)
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step-4", tmp_path / "b/checkpoints/step-4")
    resumed = run_training(load_config(None, [a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in args]
                                       + ["train.resume_from=auto"]), progress=False)
    wa, wb = load_file(tmp_path / "a/model/model.safetensors"), load_file(tmp_path / "b/model/model.safetensors")
    assert {v.dtype for v in wa.values()} == {torch.float32}  # the export holds the fp32 masters
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert full["final_validation"] == resumed["final_validation"]
    assert full["final_validation"]["accuracy"] > 0.8  # the synthetic pairs are learnable
    # the fp32 run on the same settings lands on nearly the same model
    ref = run_training(load_config(None, [a.replace(str(tmp_path / "a"), str(tmp_path / "c")) for a in args]
                                   + ["train.precision=fp32"]), progress=False)
    assert abs(ref["final_validation"]["accuracy"] - full["final_validation"]["accuracy"]) <= 0.1


def test_frozen_and_lora_base_weights_never_change(tiny_model, pairs_file, tmp_path):
    from transformers import AutoModel

    src = tiny_model("qwen2")
    run_training(load_config(None, _args(src, pairs_file, tmp_path / "f", "train.max_steps=3", "train.warmup_ratio=0",
                                         "model.freeze_layers_fraction=0.5")), progress=False)
    before = AutoModel.from_pretrained(src).state_dict()
    after = load_file(tmp_path / "f/model/model.safetensors")
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["layers.0.mlp.up_proj.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], before["embed_tokens.weight"])
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["layers.1.mlp.up_proj.weight"])
    s = run_training(load_config(None, _args(src, pairs_file, tmp_path / "l", "train.max_steps=3", "train.warmup_ratio=0",
                                             "model.lora_r=4")), progress=False)
    assert s["final_validation"]["loss"] == s["final_validation"]["loss"]  # finite, not NaN


def test_bf16_master_with_gradient_checkpointing_gives_the_same_weights(tiny_model, pairs_file, tmp_path):
    """Recomputation in the backward pass runs on the same bf16 copies as the forward."""
    src = tiny_model("qwen2")
    base = _args(src, pairs_file, tmp_path / "p", "train.max_steps=2", "train.warmup_ratio=0")
    run_training(load_config(None, base), progress=False)
    run_training(load_config(None, [a.replace(str(tmp_path / "p"), str(tmp_path / "x")) for a in base]
                             + ["model.gradient_checkpointing=true"]), progress=False)
    wp, wx = load_file(tmp_path / "p/model/model.safetensors"), load_file(tmp_path / "x/model/model.safetensors")
    for k in wp:
        torch.testing.assert_close(wx[k], wp[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_master_shared_prompt_rows_give_the_plain_gradients(attn, tiny_model, tmp_path):
    """Packed [prompt | chosen | rejected] rows in bf16 stay as close to fp32 as the plain rows in bf16."""
    from test_share_prompt import build, dataset_items, rewards_and_grads

    from rewardforge.data.batching import PairCollator
    from rewardforge.data.packing import PackedPairCollator

    model, tok = build(tiny_model, "qwen2", attn)
    items = dataset_items(tok, tmp_path, 12, 256)[:6]
    plain, packed = PairCollator(tok.pad_token_id)(items), PackedPairCollator(tok.pad_token_id)(items)
    r_ref, g_ref = rewards_and_grads(model, plain)
    with _master(model).compute():
        r_plain, g_plain = rewards_and_grads(model, plain)
    with _master(model).compute():
        r_packed, g_packed = rewards_and_grads(model, packed)
    ref = _flat(g_ref)
    err_plain = ((_flat(g_plain) - ref).norm() / ref.norm()).item()
    err_packed = ((_flat(g_packed) - ref).norm() / ref.norm()).item()
    assert err_packed < 0.05 and err_packed < 2 * err_plain + 0.01, (err_packed, err_plain)
    d_plain, d_packed = (r_plain - r_ref).abs().max().item(), (r_packed - r_ref).abs().max().item()
    assert d_packed < 2 * d_plain + 1e-4, (d_packed, d_plain)


def test_bf16_master_under_ddp_is_refused_with_the_fix(tiny_model, pairs_file, tmp_path, monkeypatch):
    import rewardforge.train as train_mod

    monkeypatch.setattr(train_mod, "resolve_strategy", lambda cfg, acc: "ddp")
    with pytest.raises(ConfigError, match="train.strategy=fsdp"):
        setup(load_config(None, _args(tiny_model("gpt2"), pairs_file, tmp_path / "d")))


def test_attention_auto_is_eager_math_for_bf16_master_on_cpu_and_default_otherwise(tiny_model):
    cpu = torch.device("cpu")
    for precision, want in (("bf16_master", "rf_eager"), ("bf16", "sdpa"), ("fp32", "sdpa")):
        model, _ = _model(tiny_model("llama"))
        assert set_attention(model, "auto", precision, cpu) == want
        assert model.config._attn_implementation == want
    model, _ = _model(tiny_model("llama"))
    with pytest.raises(ModelError, match="model.attn_implementation='nonsense'"):
        set_attention(model, "nonsense", "fp32", cpu)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_eager_and_sdpa_give_the_same_rewards(kind, tiny_model):
    model, tok = _model(tiny_model(kind))
    ids, mask = _batch(tok)
    with torch.no_grad():
        sdpa = model(ids, mask)
        set_attention(model, "eager", "fp32", torch.device("cpu"))
        eager = model(ids, mask)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_exported_config_does_not_pin_the_training_attention(tiny_model, pairs_file, tmp_path):
    import json

    run_training(load_config(None, _args(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=1")), progress=False)
    cfg = json.loads((tmp_path / "o/model/config.json").read_text())
    assert cfg.get("attn_implementation") in (None, "sdpa") and cfg.get("_attn_implementation") in (None, "sdpa")


@pytest.mark.parametrize("native, device, ddp, expected", [
    (True, "cpu", False, "bf16_master"), (True, "cpu", True, "bf16"), (True, "cuda", False, "bf16"),
    (False, "cpu", False, "fp32"), (False, "cuda", True, "fp32"),
])
def test_precision_auto_resolves_by_hardware_and_launch(native, device, ddp, expected, monkeypatch):
    import rewardforge.training.precision as prec

    monkeypatch.setattr(prec, "native_bf16", lambda device_type: native)
    assert prec.resolve_precision("auto", device_type=device, ddp=ddp) == expected
    for explicit in ("fp32", "bf16", "bf16_master"):  # an explicit choice is kept
        assert prec.resolve_precision(explicit, device_type=device, ddp=ddp) == explicit


def test_native_bf16_on_this_cpu_matches_its_flags():
    from pathlib import Path

    from rewardforge.training.precision import native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "flags" not in cpuinfo.read_text():
        pytest.skip("no /proc/cpuinfo flags to compare with (not Linux x86)")
    flags = set(next(l for l in cpuinfo.read_text().splitlines() if l.startswith("flags")).split(":", 1)[1].split())
    assert native_bf16("cpu") == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("native", [True, False])
def test_default_precision_is_resolved_at_setup_and_recorded(native, tiny_model, pairs_file, tmp_path, monkeypatch):
    import rewardforge.training.precision as prec

    monkeypatch.setattr(prec, "native_bf16", lambda device_type: native)
    args = [a for a in _args(tiny_model("bert"), pairs_file, tmp_path / "o", "train.max_steps=2") if not a.startswith("train.precision")]
    cfg = load_config(None, args)
    assert cfg.train.precision == "auto"
    run = setup(cfg)
    assert run.cfg.train.precision == ("bf16_master" if native else "fp32")
    assert (run.master is not None) == native
    del run
    import yaml

    run_training(load_config(None, args), progress=False)
    saved = yaml.safe_load((tmp_path / "o/config.yaml").read_text())  # the run's config, as it ran
    assert saved["train"]["precision"] == ("bf16_master" if native else "fp32")


def test_memory_estimate_uses_the_precision_auto_gives_that_launch(tiny_model, monkeypatch):
    """--estimate-memory --processes N: under DDP auto means bf16 (no bf16 weight copy), on one process bf16_master."""
    import rewardforge.training.precision as prec
    from rewardforge.train import estimate_for_config

    monkeypatch.setattr(prec, "native_bf16", lambda device_type: True)
    src = tiny_model("llama")
    auto = load_config(None, [f"model.name_or_path={src}"])
    explicit = {p: load_config(None, [f"model.name_or_path={src}", f"train.precision={p}"]) for p in ("bf16", "bf16_master")}
    assert estimate_for_config(auto, 2)["weights_gib"] == pytest.approx(estimate_for_config(explicit["bf16"], 2)["weights_gib"])
    assert estimate_for_config(auto, 1)["weights_gib"] == pytest.approx(estimate_for_config(explicit["bf16_master"], 1)["weights_gib"])
    assert estimate_for_config(auto, 1)["weights_gib"] > estimate_for_config(auto, 2)["weights_gib"]
    assert auto.train.precision == "auto"  # the caller's config is left as it was


def test_the_run_says_why_it_picked_its_precision():
    from rewardforge.training.precision import precision_reason

    assert precision_reason("fp32", "fp32", device_type="cpu", ddp=False) == "train.precision=fp32, as set"
    assert "no native bf16 math (no AVX512-BF16 or AMX)" in precision_reason("auto", "fp32", device_type="cpu", ddp=False)
    assert "over fp32 master weights" in precision_reason("auto", "bf16_master", device_type="cpu", ddp=False)
    assert "DDP" in precision_reason("auto", "bf16", device_type="cpu", ddp=True)
