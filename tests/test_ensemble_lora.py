"""LoRA ensembles (model.ensemble_members=lora): K peft adapters on one frozen backbone, each member with its own
head columns. Train + bitwise resume, every member trained, export (base model + adapters/member_k), the peft
recipe of the model card against rewardforge.load, the server, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rewardforge
from conftest import synthetic_pairs, train_and_resume, write_jsonl
from rewardforge.config import ConfigError, load_config

K = 3
PROMPTS, RESPONSES = ["How do I boil an egg?", "What is gravity?"], ["Boil it for nine minutes.", "Go away."]


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.train=[{data}]", "train.batch_size=8", "train.learning_rate=1e-2",
            "data.cache_dir=none", f"output_dir={out}", "train.precision=fp32", f"model.ensemble_size={K}",
            "model.ensemble_members=lora", "model.lora_r=4", *extra]


@pytest.fixture(scope="module")
def lora_runs(tiny_model, tmp_path_factory):
    """An uninterrupted 6-step LoRA-ensemble run and one resumed from its step-3 checkpoint (LoRA dropout on)."""
    root = tmp_path_factory.mktemp("lora-ens")
    data = write_jsonl(root / "pairs.jsonl", synthetic_pairs(96))
    base = tiny_model("llama")
    args = _args(base, data, root / "a", "train.max_steps=6", "train.save_steps=3", "model.lora_dropout=0.1",
                 "train.save_total_limit=0", "train.eval_steps=3")
    full, resumed = train_and_resume(root, args, step=3)
    return root, base, full, resumed


def _adapters(model_dir: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(model_dir / f"adapters/member_{k}/adapter_model.safetensors") for k in range(K)]


def test_resume_gives_the_same_lora_ensemble_bitwise(lora_runs):
    root, _, full, resumed = lora_runs
    assert resumed["resumed_from"] == str(root / "b/checkpoints/step-3")
    for a, b in zip([load_file(root / "a/model/model.safetensors"), *_adapters(root / "a/model")],
                    [load_file(root / "b/model/model.safetensors"), *_adapters(root / "b/model")]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert full["final_validation"] == resumed["final_validation"]
    ens = full["final_validation"]["ensemble"]
    assert ens["size"] == K and len(ens["members"]["accuracy"]) == K


def test_every_member_trains_its_own_adapter_and_the_backbone_stays_frozen(lora_runs):
    root, base, _, _ = lora_runs
    adapters = _adapters(root / "a/model")
    keys = sorted(adapters[0])
    assert keys and all(sorted(a) == keys for a in adapters)
    lora_b = [k for k in keys if "lora_B" in k]
    assert lora_b  # peft starts B at zero: a B that moved got gradients in the steps every member shares
    for k, a in enumerate(adapters):
        assert all(a[key].abs().max() > 0 for key in lora_b), f"member_{k}'s adapter never trained"
    for i in range(K):
        for j in range(i + 1, K):
            assert any(not torch.equal(adapters[i][key], adapters[j][key]) for key in keys), (i, j)
    exported, original = load_file(root / "a/model/model.safetensors"), load_file(base / "model.safetensors")
    layers = [k for k in original if k.startswith("layers.")]  # saved by AutoModel: no "model." prefix
    assert layers and all(torch.equal(exported[f"model.{k}"], original[k]) for k in layers)  # LoRA: the base is frozen
    assert not any("embed" in key for a in adapters for key in a)  # the base export holds the (resized) embeddings
    head = exported["score.weight"]
    assert head.shape[0] == K and not torch.equal(head, torch.zeros_like(head))


def test_export_scores_like_the_peft_recipe_of_its_model_card(lora_runs):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _, _, _ = lora_runs
    model_dir = root / "a/model"
    meta = json.loads((model_dir / "rewardforge.json").read_text())
    ens = meta["ensemble"]
    assert ens["members_kind"] == "lora" and ens["member_adapters"] == [f"member_{k}" for k in range(K)]
    assert meta["plain_transformers_reward"] is False and "single_reward_dir" not in meta
    assert not (model_dir / "reward").exists()  # no one model holds the mean of K adapters
    card = (model_dir / "README.md").read_text()
    assert "3 LoRA adapters on one backbone" in card and "PeftModel.from_pretrained" in card
    assert "Plain transformers reads the same reward" not in card

    scorer = rewardforge.load(model_dir)
    s = scorer.score_detailed(PROMPTS, RESPONSES)
    assert s.members.shape == (2, K) and s.outputs.shape == (2, 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok([scorer.render(p, r)[0] for p, r in zip(PROMPTS, RESPONSES)], padding=True, return_tensors="pt")
    by_recipe = []
    for k in range(K):  # the card's recipe: the base model with member k's adapter, its column k
        m = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model_dir),
                                      model_dir / f"adapters/member_{k}").eval()
        with torch.no_grad():
            by_recipe.append(m(**enc).logits[:, k].numpy())
    by_recipe = np.stack(by_recipe, 1)
    np.testing.assert_allclose(s.members, by_recipe, atol=1e-5)
    assert np.all(s.std > 0)  # the members disagree
    np.testing.assert_allclose(s.mean, by_recipe.mean(1), atol=1e-5)
    np.testing.assert_allclose(s.std, by_recipe.std(1), atol=1e-5)
    pen = rewardforge.load(model_dir, uncertainty_penalty=0.5).score_detailed(PROMPTS, RESPONSES)
    np.testing.assert_allclose(pen.reward, s.mean - 0.5 * s.std, atol=1e-6)


def test_a_lora_ensemble_export_missing_an_adapter_is_a_one_line_error(lora_runs, tmp_path):
    import shutil

    from rewardforge.errors import ModelError

    root, _, _, _ = lora_runs
    broken = tmp_path / "model"
    shutil.copytree(root / "a/model", broken)
    shutil.rmtree(broken / "adapters/member_1")
    with pytest.raises(ModelError, match="is a LoRA ensemble but .* lacks the adapters of member_1; export the run again"):
        rewardforge.load(broken)


def test_the_server_returns_every_lora_member(lora_runs):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import LiveServer

    from rewardforge.serve import ServeConfig

    root, _, _, _ = lora_runs
    scorer = rewardforge.load(root / "a/model", device="cpu")
    items = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
    want = scorer.score_items(items)
    server = LiveServer(scorer, ServeConfig(max_wait_ms=2.0, uncertainty_penalty=0.5))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            res = c.post("/v1/score", json={"items": items}).json()["results"]
    finally:
        server.stop()
    np.testing.assert_allclose([r["members"] for r in res], want.members, atol=1e-6)
    np.testing.assert_allclose([r["reward"] for r in res], want.mean - 0.5 * want.std, atol=1e-5)


def test_each_member_reads_its_own_columns_for_several_attributes(tiny_model):
    """A regression LoRA ensemble (K=2 members x 2 attributes): member k's outputs are columns 2k, 2k+1 of the
    head on the backbone with adapter k, exactly what peft gives with only that adapter set."""
    from rewardforge.models.reward_model import load_tokenizer
    from rewardforge.registry import resolve_type

    path = tiny_model("qwen2")
    cfg = load_config(None, [f"model.name_or_path={path}", "model.reward_model_type=regression",
                             "model.attributes=[helpfulness,safety]", "model.ensemble_size=2",
                             "model.ensemble_members=lora", "model.lora_r=4", "model.lora_dropout=0"])
    model = resolve_type(cfg).build_model(cfg, load_tokenizer(str(path))).eval()
    assert model.members == ("member_0", "member_1") and model.num_outputs == 4
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero (every adapter the identity): make the members differ
    ids = torch.randint(3, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        out = model(ids, mask)
        want = []
        for k in range(2):
            model.model.set_adapter(f"member_{k}")
            logits = model.hf(input_ids=ids, attention_mask=mask,
                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            want.append(logits[:, 2 * k : 2 * k + 2])
    torch.testing.assert_close(out, torch.cat(want, -1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :2], out[:, 2:])


def test_bad_lora_ensemble_settings_are_one_line_errors():
    for extra, match in ((["model.ensemble_size=3"], "needs the members' LoRA rank: set model.lora_r"),
                         (["model.lora_r=4"], "needs an ensemble: set model.ensemble_size=K"),
                         (["model.ensemble_size=2", "model.lora_r=4", "train.strategy=fsdp"], "not supported with train.strategy=fsdp"),
                         (["model.ensemble_members=adapters"], "model.ensemble_members='adapters' is not valid; choose one of heads, lora")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["model.name_or_path=x", *(["model.ensemble_members=lora"] if "adapters" not in extra[-1] else []), *extra])


def test_the_memory_estimate_counts_one_backbone_pass_per_lora_member(tiny_model):
    from rewardforge.models.reward_model import load_tokenizer
    from rewardforge.registry import resolve_type
    from rewardforge.training.memory import estimate_memory

    path = tiny_model("qwen2")
    est = {}
    for members in ("heads", "lora"):
        cfg = load_config(None, [f"model.name_or_path={path}", "model.ensemble_size=3", f"model.ensemble_members={members}",
                                 "model.lora_r=4", "train.precision=fp32"])
        est[members] = estimate_memory(resolve_type(cfg).build_model(cfg, load_tokenizer(str(path))), cfg, 64)
    assert est["lora"]["activations_gib"] == pytest.approx(3 * est["heads"]["activations_gib"])
    # K adapters and the head against one shared adapter and the head
    assert est["lora"]["trainable_parameters"] > est["heads"]["trainable_parameters"]


def test_eval_reports_the_lora_members_disagreement(lora_runs, tmp_path):
    from rewardforge.eval.runner import evaluate_model

    root, _, _, _ = lora_runs
    data = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(30, seed=3))
    result = evaluate_model([str(root / "a/model")], [str(data)], tmp_path / "report", progress=False)
    ds = next(iter(next(iter(result["results"].values()))["datasets"].values()))
    e = ds["ensemble"]
    assert e["pairs"] == 30 and sum(b["n"] for b in e["uncertainty_bins"]) == 30
    assert len(e["member_accuracy"]) == K and e["accuracy"] == pytest.approx(ds["overall"]["accuracy"])
    scores = rewardforge.load(root / "a/model").score_detailed(PROMPTS, RESPONSES)
    assert np.all(scores.std > 0)  # the report's std is that of members that differ


def test_rewardforge_export_of_a_checkpoint_gives_the_runs_own_export(lora_runs, tmp_path):
    from rewardforge.cli import main as cli_main

    root, _, _, _ = lora_runs
    assert cli_main(["export", str(root / "a/checkpoints/step-6"), str(tmp_path / "exported")]) == 0
    for a, b in zip([load_file(root / "a/model/model.safetensors"), *_adapters(root / "a/model")],
                    [load_file(tmp_path / "exported/model.safetensors"), *_adapters(tmp_path / "exported")]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = rewardforge.load(tmp_path / "exported").score_detailed(PROMPTS, RESPONSES)
    np.testing.assert_allclose(s.members, rewardforge.load(root / "a/model").score_detailed(PROMPTS, RESPONSES).members, atol=0)
