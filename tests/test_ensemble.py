"""Ensembles (model.ensemble_size): bootstrap weights, weighted losses, train + bitwise resume, export (plain
transformers and the reward/ mean head), scoring, the score CLI, every server endpoint, eval metrics and report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rewardforge
from conftest import rated_rows, synthetic_pairs, train_and_resume, write_jsonl
from rewardforge.cli import main as cli_main
from rewardforge.config import ConfigError, load_config
from rewardforge.ensemble import bootstrap_weights, ensemble_loss, head_labels, summarize
from rewardforge.eval import metrics as M
from rewardforge.losses import bradley_terry_loss, bt_loss, masked_mse_loss
from rewardforge.train import run_training

K = 3


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.train=[{data}]", "train.batch_size=8", "train.learning_rate=1e-3",
            "data.cache_dir=none", f"output_dir={out}", "train.precision=fp32", f"model.ensemble_size={K}", *extra]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(160))


@pytest.fixture(scope="module")
def resume_runs(tiny_model, pairs_file, tmp_path_factory):
    """An uninterrupted 8-step ensemble run and one resumed from its step-4 checkpoint (dropout on)."""
    root = tmp_path_factory.mktemp("ens-resume")
    args = _args(tiny_model("llama"), pairs_file, root / "a", "train.max_steps=8", "train.save_steps=4",
                 "model.dropout=0.1", "train.save_total_limit=0", "train.eval_steps=4")
    full, resumed = train_and_resume(root, args, step=4)
    return root, full, resumed


# ---------------------------------------------------------------- bootstrap weights and losses


def test_bootstrap_weights_depend_only_on_seed_index_and_member_and_are_poisson_1():
    w = bootstrap_weights(0, np.arange(200_000), 2)
    assert w.shape == (200_000, 2) and w.dtype == np.float32
    assert np.array_equal(bootstrap_weights(0, [7, 3], 2), w[[7, 3]])  # any batch order or grouping
    assert np.array_equal(bootstrap_weights(0, torch.tensor([5]), 2), w[[5]])
    assert not np.array_equal(bootstrap_weights(1, np.arange(1000), 2), w[:1000])  # the seed matters
    assert not np.array_equal(w[:, 0], w[:, 1])  # each member its own weights
    for k in range(2):  # Poisson(1): mean 1, variance 1, P(0) = P(1) = 1/e
        assert abs(w[:, k].mean() - 1) < 0.01 and abs(w[:, k].var() - 1) < 0.02
        assert abs((w[:, k] == 0).mean() - math.exp(-1)) < 0.005 and abs((w[:, k] == 1).mean() - math.exp(-1)) < 0.005
    assert abs(np.corrcoef(w[:, 0], w[:, 1])[0, 1]) < 0.01
    assert np.array_equal(bootstrap_weights(0, [1, 2], 3, "none"), np.ones((2, 3), np.float32))


def test_weighted_losses_on_hand_numbers():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    w = torch.tensor([2.0, 0.0])
    # mean(w * -log sigmoid(d)) with d = [1, -1]: (2 * log(1 + e^-1) + 0) / 2
    assert bradley_terry_loss(c, r, weight=w).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert torch.equal(bradley_terry_loss(c, r, weight=torch.ones(2)), bradley_terry_loss(c, r))
    # centering: coef * mean(w * (c + r)^2) = 0.5 * (2 * 9 + 0) / 2
    got = bradley_terry_loss(c, r, center_coef=0.5, weight=w).item()
    assert got == pytest.approx(math.log1p(math.exp(-1)) + 4.5, abs=1e-6)
    pred, labels = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, float("nan")], [1.0, 1.0]])
    # (3 * 1^2 + 1 * (1 + 1)) / 3 present labels
    assert masked_mse_loss(pred, labels, torch.tensor([3.0, 1.0])).item() == pytest.approx(5 / 3)


def test_ensemble_loss_is_the_mean_of_each_members_bootstrap_weighted_loss():
    cfg = load_config(None, ["model.name_or_path=x", "model.ensemble_size=3", "loss.name=regular_bradley_terry"])
    outputs = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0], [0.0, 1.0, 1.0], [1.0, -2.0, 0.0]])  # 2 pairs x 3 members
    batch = {"index": torch.tensor([11, 4]), "margin": torch.tensor([float("nan")] * 2)}
    fn = ensemble_loss(bt_loss, 3, seed=5, kind="poisson")
    loss, stats = fn(outputs, batch, cfg)
    w = bootstrap_weights(5, [11, 4], 3)
    d = outputs[:2] - outputs[2:]
    want = np.mean([np.mean(w[:, k] * np.log1p(np.exp(-d[:, k].numpy()))) for k in range(3)])
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(float(M.win_rate(d.mean(1)).item()))


def test_bad_ensemble_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"model.ensemble_size must be >= 1"):
        load_config(None, ["model.name_or_path=x", "model.ensemble_size=0"])
    with pytest.raises(ConfigError, match=r"model.ensemble_bootstrap='bag' is not valid; choose one of poisson, none"):
        load_config(None, ["model.name_or_path=x", "model.ensemble_bootstrap=bag"])


def test_a_loss_without_example_weights_cannot_train_an_ensemble():
    from rewardforge.losses import PAIR_LOSSES
    from rewardforge.registry import RewardModelSpec, register_reward_model_type, resolve_type, unregister_reward_model_type

    def unweighted(outputs, batch, cfg):
        return outputs.mean(), {}

    register_reward_model_type(RewardModelSpec("unweighted_test", {"plain": unweighted}, "plain", {"plain": "pairs"}))
    try:
        cfg = load_config(None, ["model.name_or_path=x", "model.reward_model_type=unweighted_test", "model.ensemble_size=2"])
        with pytest.raises(ConfigError, match=r"model.ensemble_size=2 needs a loss that takes per-example weights.*"
                                              r"takes_example_weight"):
            resolve_type(cfg)
        assert resolve_type(load_config(None, ["model.name_or_path=x", "model.reward_model_type=unweighted_test"])).ensemble_size == 1
    finally:
        unregister_reward_model_type("unweighted_test")
    assert all(getattr(f, "takes_example_weight", False) for f in PAIR_LOSSES.values())


def test_summarize_and_labels():
    s = summarize(np.array([[1.0, 2.0, 3.0, 6.0]]), [0.5, 0.5], size=2, penalty=2.0)  # members (1,2) and (3,6)
    assert s.members.tolist() == [[1.5, 4.5]] and s.mean.tolist() == [3.0] and s.std.tolist() == [1.5]
    assert s.reward.tolist() == [0.0] and s.outputs.tolist() == [[2.0, 4.0]]
    assert head_labels(["a", "b"], 2) == ["member_0/a", "member_0/b", "member_1/a", "member_1/b"]


# ---------------------------------------------------------------- eval metrics on hand numbers


def test_auroc_on_hand_numbers_and_against_sklearn():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert M.auroc([1.0, 1.0], [0, 1]) == 0.5  # a tie counts one half
    assert M.auroc([1.0, 2.0], [1, 1]) is None
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 300).astype(float), rng.random(300) < 0.3
    assert M.auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s))


def test_accuracy_by_uncertainty_on_hand_numbers():
    margins = [1, 1, -1, 1, -1, 0]
    unc = [0.6, 0.1, 0.5, 0.2, 0.4, 0.3]
    bins = M.accuracy_by_uncertainty(margins, unc, n_bins=3)
    # sorted by uncertainty: (0.1, 1) (0.2, 1) | (0.3, 0) (0.4, -1) | (0.5, -1) (0.6, 1)
    assert [b["n"] for b in bins] == [2, 2, 2]
    assert [b["accuracy"] for b in bins] == [1.0, 0.25, 0.5]
    assert (bins[0]["low"], bins[0]["high"]) == (0.1, 0.2)
    lo, hi = M.wilson_interval(0.5, 2)
    assert (bins[1]["ci_low"], bins[1]["ci_high"]) == (lo, hi)


def test_ensemble_pair_report_on_hand_numbers():
    m = np.array([[1.0, 3.0], [-1.0, -1.0], [2.0, -4.0], [0.5, 0.5]])  # 4 pairs x 2 members
    r = M.ensemble_pair_report(m, n_bins=2)
    # mean margins [2, -1, -1, 0.5], stds [1, 0, 3, 0]; wrong: pairs 1 and 2
    assert r["accuracy"] == 0.5 and r["member_accuracy"] == [0.75, 0.5]
    assert [b["accuracy"] for b in r["uncertainty_bins"]] == [0.5, 0.5]  # (0: -1, 0: 0.5) | (1: 2, 3: -1)
    # wrong stds {0, 3} vs right stds {1, 0}: 3>1, 3>0, 0=0 (half), 0<1 -> 2.5 / 4
    assert r["auroc_std_wrong"] == 0.625
    # flip = Phi(-|d|/u): [Phi(-2), 0 (u 0, d -1), Phi(-1/3), 0 (u 0)]; wrong {0, Phi(-1/3)=0.369} vs right
    # {Phi(-2)=0.023, 0}: 0<0.023, 0=0 (half), 0.369 > both -> 2.5 / 4
    assert r["auroc_flip_wrong"] == 0.625
    assert [b["accuracy"] for b in r["flip_bins"]] == [0.5, 0.5]  # (1: -1, 3: 0.5) | (0: 2, 2: -1)
    # -|d|: wrong {-1, -1} vs right {-2, -0.5}: -1 > -2 twice, -1 < -0.5 twice -> 2 / 4
    assert r["auroc_margin_wrong"] == 0.5
    p = (M.sigmoid(m[:, 0]) + M.sigmoid(m[:, 1])) / 2
    assert M.sigmoid(M.ensemble_probability_margin(m)) == pytest.approx(p)
    assert r["calibration"]["ensemble"]["ece"] == pytest.approx(M.calibration(np.log(p / (1 - p)))["ece"])
    assert r["calibration"]["member_0"]["ece"] == pytest.approx(M.calibration(m[:, 0])["ece"])


# ---------------------------------------------------------------- train, resume, export


def test_resume_gives_the_same_ensemble_bitwise(resume_runs):
    root, full, resumed = resume_runs
    assert resumed["resumed_from"] == str(root / "b/checkpoints/step-4")
    wa, wb = load_file(root / "a/model/model.safetensors"), load_file(root / "b/model/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert full["final_validation"] == resumed["final_validation"]
    ens = full["final_validation"]["ensemble"]
    assert ens["size"] == K and len(ens["members"]["accuracy"]) == K and len(ens["uncertainty_bins"]) == 5
    assert full["final_validation"]["accuracy"] == ens["accuracy"]  # the base metrics are the ensemble mean's


def test_export_loads_in_plain_transformers_and_reward_folder_is_the_mean(resume_runs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _, _ = resume_runs
    model_dir = root / "a/model"
    meta = json.loads((model_dir / "rewardforge.json").read_text())
    assert meta["ensemble"]["size"] == K and meta["ensemble"]["members"] == ["member_0", "member_1", "member_2"]
    assert meta["single_reward_dir"] == "reward"
    assert "| ensemble | 3 heads on one backbone (poisson bootstrap)" in (model_dir / "README.md").read_text()
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert hf.config.num_labels == K and hf.config.id2label == {0: "member_0", 1: "member_1", 2: "member_2"}
    head = hf.score.weight
    assert not torch.equal(head[0], head[1])  # the members differ
    single = AutoModelForSequenceClassification.from_pretrained(model_dir / "reward", num_labels=1).eval()
    torch.testing.assert_close(single.score.weight, head.mean(0, keepdim=True), rtol=0, atol=1e-7)

    scorer = rewardforge.load(model_dir)
    prompts, responses = ["How do I boil an egg?", "What is gravity?"], ["Boil it for nine minutes.", "Go away."]
    s = scorer.score_detailed(prompts, responses)
    assert s.members.shape == (2, K) and s.outputs.shape == (2, 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok([scorer.render(p, r)[0] for p, r in zip(prompts, responses)], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**enc).logits.numpy()
        mean_logit = single(**AutoTokenizer.from_pretrained(model_dir / "reward")(
            [scorer.render(p, r)[0] for p, r in zip(prompts, responses)], padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(logits, s.members, atol=1e-5)
    np.testing.assert_allclose(s.mean, logits.mean(1), atol=1e-5)
    np.testing.assert_allclose(s.std, logits.std(1), atol=1e-5)
    np.testing.assert_allclose(mean_logit[:, 0].numpy(), s.mean, atol=1e-5)  # num_labels=1 loaders get the mean
    np.testing.assert_allclose(s.reward, s.mean, atol=0)
    pen = rewardforge.load(model_dir, uncertainty_penalty=0.5).score_detailed(prompts, responses)
    np.testing.assert_allclose(pen.reward, s.mean - 0.5 * s.std, atol=1e-6)
    assert meta["reward_std"] > 0
    np.testing.assert_allclose(pen.normalized, (pen.reward - meta["reward_mean"]) / meta["reward_std"], atol=1e-5)


def test_regression_ensemble_exports_members_by_attribute(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "rated.jsonl", rated_rows(80))
    s = run_training(load_config(None, _args(tiny_model("qwen2"), data, tmp_path / "o", "train.max_steps=4",
                                             "model.reward_model_type=regression", "model.attributes=[helpfulness,safety]",
                                             "model.attribute_weights=[0.7,0.3]", "model.ensemble_size=2")), progress=False)
    v = s["final_validation"]
    assert {"helpfulness", "safety", "mse"} <= set(v) and len(v["ensemble"]["members"]["mse"]) == 2
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o/model")
    assert hf.config.num_labels == 4
    assert list(hf.config.id2label.values()) == ["member_0/helpfulness", "member_0/safety", "member_1/helpfulness", "member_1/safety"]
    single = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o/model/reward")
    w = torch.tensor([0.35, 0.15, 0.35, 0.15])  # attribute weights / K on every member
    torch.testing.assert_close(single.score.weight[0], w @ hf.score.weight, rtol=0, atol=1e-6)
    d = rewardforge.load(tmp_path / "o/model").score_detailed(["What is gravity?"], ["Sure! Here is a clear answer."])
    assert d.outputs.shape == (1, 2) and d.members.shape == (1, 2)
    assert d.mean[0] == pytest.approx(0.7 * d.outputs[0, 0] + 0.3 * d.outputs[0, 1], abs=1e-5)


# ---------------------------------------------------------------- score CLI, serve, eval


def test_score_cli_gives_mean_std_members_and_the_penalty(resume_runs, tmp_path, capsys):
    root, _, _ = resume_runs
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "What is gravity?", "response": "It keeps planets in orbit."}])
    assert cli_main(["score", str(root / "a/model"), "--input", str(inp), "--uncertainty-penalty", "2"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["members"]) == K
    assert rec["reward_mean"] == pytest.approx(float(np.mean(rec["members"])), abs=1e-5)
    assert rec["reward_std"] == pytest.approx(float(np.std(rec["members"])), abs=1e-5)
    assert rec["reward"] == pytest.approx(rec["reward_mean"] - 2 * rec["reward_std"], abs=1e-5)


def test_a_penalty_on_a_single_model_is_a_one_line_error(tiny_model, pairs_file, tmp_path, capsys):
    run_training(load_config(None, _args(tiny_model("gpt2"), pairs_file, tmp_path / "o", "train.max_steps=1",
                                         "model.ensemble_size=1")), progress=False)
    assert "ensemble" not in json.loads((tmp_path / "o/model/rewardforge.json").read_text())  # size 1: today's model
    d = rewardforge.load(tmp_path / "o/model").score_texts(["hello"])
    assert d.shape == (1,) and rewardforge.load(tmp_path / "o/model").score_items([{"text": "hello"}]).members is None
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    capsys.readouterr()
    assert cli_main(["score", str(tmp_path / "o/model"), "--input", str(inp), "--uncertainty-penalty", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs an ensemble" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli_main(["score", str(tmp_path / "o/model"), "--uncertainty-penalty", "-1"])
    assert "must be >= 0" in capsys.readouterr().err


def test_every_endpoint_serves_mean_std_members_and_the_penalised_reward(resume_runs):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import LiveServer

    from rewardforge.errors import ModelError
    from rewardforge.serve import ServeConfig, create_app

    root, _, _ = resume_runs
    scorer = rewardforge.load(root / "a/model", device="cpu")
    items = [{"prompt": "How do I boil an egg?", "response": "Boil it."}, {"prompt": "Hi", "response": "Go away."}]
    want = scorer.score_items(items)
    server = LiveServer(scorer, ServeConfig(max_wait_ms=2.0, uncertainty_penalty=0.5))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            res = c.post("/v1/score", json={"items": items}).json()["results"]
            texts = [scorer.render(it["prompt"], it["response"])[0] for it in items]
            gr = c.post("/get_reward", json={"query": texts}).json()
            v2 = c.post("/v2/models/reward_model/infer", json={
                "inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [2, 1], "data": texts}]}).json()
            meta = c.get("/v2/models/reward_model").json()
        from rewardforge.client import RewardClient

        with RewardClient(server.url) as rc:
            typed = rc.score_detailed([it["prompt"] for it in items], [it["response"] for it in items])
    finally:
        server.stop()
    penalised = want.mean - 0.5 * want.std
    for i, t in enumerate(typed):  # the client's typed fields: the same numbers, nothing left in extra
        assert (t.reward_mean, t.reward_std) == (pytest.approx(float(want.mean[i]), abs=1e-5), pytest.approx(float(want.std[i]), abs=1e-5))
        np.testing.assert_allclose(t.members, want.members[i], atol=1e-5)
        assert t.reward == pytest.approx(float(penalised[i]), abs=1e-5) and not {"reward_mean", "reward_std", "members"} & set(t.extra)
    for i, r in enumerate(res):
        assert r["reward"] == pytest.approx(float(penalised[i]), abs=1e-5)
        assert r["reward_mean"] == pytest.approx(float(want.mean[i]), abs=1e-5)
        assert r["reward_std"] == pytest.approx(float(want.std[i]), abs=1e-5)
        np.testing.assert_allclose(r["members"], want.members[i], atol=1e-5)
    np.testing.assert_allclose(gr["rewards"], penalised, atol=1e-5)
    np.testing.assert_allclose(gr["extra_logs"]["reward_std"], want.std, atol=1e-5)
    np.testing.assert_allclose([gr["extra_logs"][f"member_{k}"] for k in range(K)], want.members.T, atol=1e-5)
    out = {o["name"]: o for o in v2["outputs"]}
    assert out["members"]["shape"] == [2, K] and out["reward_std"]["shape"] == [2, 1]
    np.testing.assert_allclose(out["rewards"]["data"], penalised, atol=1e-5)
    np.testing.assert_allclose(out["reward_mean"]["data"], want.mean, atol=1e-5)
    assert {"name": "members", "datatype": "FP32", "shape": [-1, K]} in meta["outputs"]
    single = rewardforge.load(root / "a/model")
    single.ensemble_size = 1  # what a one-member model looks like to the server
    with pytest.raises(ModelError, match="--uncertainty-penalty 0.5 needs an ensemble"):
        create_app(single, ServeConfig(uncertainty_penalty=0.5))
    with pytest.raises(ValueError, match="uncertainty_penalty must be a number >= 0"):
        ServeConfig(uncertainty_penalty=-1).validate()


def test_eval_reports_uncertainty_quintiles_auroc_and_calibration(resume_runs, tmp_path):
    from rewardforge.eval.runner import evaluate_model

    root, _, _ = resume_runs
    data = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(40, seed=3))
    result = evaluate_model([str(root / "a/model")], [str(data)], tmp_path / "report", progress=False)
    name = next(iter(result["results"]))
    ds = next(iter(result["results"][name]["datasets"].values()))
    e = ds["ensemble"]
    assert e["pairs"] == 40 and len(e["uncertainty_bins"]) == 5 and sum(b["n"] for b in e["uncertainty_bins"]) == 40
    assert set(e["calibration"]) == {"member_0", "mean_reward", "ensemble"}
    assert e["accuracy"] == pytest.approx(ds["overall"]["accuracy"])  # the report's reward is the ensemble mean
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Ensemble uncertainty" in html and "AUROC std→wrong" in html and "AUROC flip→wrong" in html
    assert 0.0 <= e["auroc_flip_wrong"] <= 1.0 and len(e["flip_bins"]) == 5


def test_any_type_whose_loss_weighs_examples_becomes_an_ensemble():
    """A registered type (here a weighted hinge, standing in for a new kind such as listwise) gets the wrapper too,
    also when its spec overrides resolve()."""
    from rewardforge.losses import takes_example_weight, weighted_mean
    from rewardforge.registry import RewardModelSpec, register_reward_model_type, resolve_type, unregister_reward_model_type

    @takes_example_weight
    def hinge(outputs, batch, cfg):
        b = outputs.shape[0] // 2
        return weighted_mean((1 - (outputs[:b, 0] - outputs[b:, 0])).clamp(min=0), batch.get("example_weight")), {}

    class OwnResolve(RewardModelSpec):
        def resolve(self, cfg):
            from rewardforge.registry import ResolvedType, get_data_kind

            return ResolvedType(self, "hinge", hinge, get_data_kind("pairs"), ["reward"], [1.0])

    register_reward_model_type(OwnResolve("hinge_test", {"hinge": hinge}, "hinge", {"hinge": "pairs"}))
    try:
        cfg = load_config(None, ["model.name_or_path=x", "model.reward_model_type=hinge_test", "model.ensemble_size=2"])
        rt = resolve_type(cfg)
        assert rt.ensemble_size == 2 and rt.output_names == ["reward"]
        outputs = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # 1 pair, 2 members: margins 2 and -0.5
        loss, _ = rt.loss_fn(outputs, {"index": torch.tensor([0]), "margin": torch.tensor([float("nan")])}, cfg)
        w = bootstrap_weights(cfg.train.seed, [0], 2)[0]
        assert loss.item() == pytest.approx((w[0] * 0.0 + w[1] * 1.5) / 2)
        m = rt.metrics({"chosen": np.array([[2.0, 0.0]]), "rejected": np.array([[0.0, 0.5]]), "index": np.array([0])})
        assert m["accuracy"] == 1.0 and m["ensemble"]["member_accuracy"] == [1.0, 0.0]  # mean margin 0.75 > 0
    finally:
        unregister_reward_model_type("hinge_test")


def test_shared_init_starts_every_head_from_the_same_weights(tiny_model):
    from rewardforge.models.reward_model import load_tokenizer
    from rewardforge.registry import resolve_type

    path = tiny_model("gpt2")
    for init, same in (("shared", True), ("independent", False)):
        cfg = load_config(None, [f"model.name_or_path={path}", "model.ensemble_size=3", f"model.ensemble_init={init}"])
        w = resolve_type(cfg).build_model(cfg, load_tokenizer(str(path))).head().weight
        assert w.shape[0] == 3 and torch.equal(w[0], w[2]) == same and torch.equal(w[1], w[2]) == same
    with pytest.raises(ConfigError, match="trains K identical heads; choose one"):
        load_config(None, ["model.name_or_path=x", "model.ensemble_size=2", "model.ensemble_init=shared",
                           "model.ensemble_bootstrap=none"])
