"""model.reward_model_type=listwise: list data, the two list losses on hand numbers, the one-forward list
collator and K-branch packing (exact against the plain forward), ranking metrics, and every path
end to end on tiny models: train, resume bitwise, export, score, eval."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_and_resume, write_jsonl
from safetensors.torch import load_file

import rewardforge
from rewardforge.config import ConfigError, ModelConfig, load_config
from rewardforge.data.lists import ListCollator, build_list_dataset, parse_lists
from rewardforge.data.packing import PackedListCollator, model_kwargs, pack_branches
from rewardforge.data.readers import DataError, Row
from rewardforge.data.synthetic import generate_lists
from rewardforge.data.template import setup_template
from rewardforge.eval import metrics as M
from rewardforge.losses import (
    bradley_terry_loss,
    dense_lists,
    listwise_bradley_terry_loss,
    plackett_luce_loss,
)
from rewardforge.models.reward_model import build_model, load_tokenizer
from rewardforge.registry import resolve_type
from rewardforge.train import run_training

TOPICAL = Path(__file__).resolve().parents[1].parent / "shared/data/rated/topical_chat.json"


def ls(x):  # -log sigmoid
    return math.log1p(math.exp(-x))


def dense(rewards, scores):
    r, y = torch.tensor([rewards], dtype=torch.float64), torch.tensor([scores], dtype=torch.float64)
    return r, y, torch.ones_like(r, dtype=torch.bool)


# ------------------------------------------------------------------ losses


def test_plackett_luce_on_hand_numbers():
    # strict order, r = [2, 1, 0]: (log(e^2 + e^1 + e^0) - 2) + (log(e^1 + e^0) - 1) + 0, over K - 1 = 2 choices
    want = ((math.log(math.e**2 + math.e + 1) - 2) + (math.log(math.e + 1) - 1)) / 2
    assert plackett_luce_loss(*dense([2.0, 1.0, 0.0], [3, 2, 1])).item() == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(0.360434, abs=1e-6)
    # Breslow ties: responses 1 and 2 tie; each meets the tie group {1, 2}
    want_tie = ((math.log(math.e**2 + math.e + 1) - 2) + (math.log(math.e + 1) - 1) + (math.log(math.e + 1) - 0)) / 2
    assert plackett_luce_loss(*dense([2.0, 1.0, 0.0], [3, 1, 1])).item() == pytest.approx(want_tie, abs=1e-12)


def test_plackett_luce_of_two_responses_is_bradley_terry():
    r = torch.tensor([[0.7, -0.4], [0.1, 0.9]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    bt = bradley_terry_loss(torch.tensor([0.7, 0.9], dtype=torch.float64), torch.tensor([-0.4, 0.1], dtype=torch.float64))
    assert plackett_luce_loss(r, y, torch.ones_like(r, dtype=torch.bool)).item() == pytest.approx(bt.item(), abs=1e-12)


def test_listwise_bradley_terry_on_hand_numbers_with_and_without_gap_weights():
    r, y, m = dense([2.0, 1.0, 0.0], [3, 2, 1])  # pairs (0,1) d=1 gap 1, (0,2) d=2 gap 2, (1,2) d=1 gap 1
    assert listwise_bradley_terry_loss(r, y, m).item() == pytest.approx((2 * ls(1) + ls(2)) / 3, abs=1e-12)
    assert listwise_bradley_terry_loss(r, y, m, gap_weight=True).item() == pytest.approx((2 * ls(1) + 2 * ls(2)) / 4, abs=1e-12)
    # ties make no pair: scores [3, 1, 1] leave (0,1) and (0,2)
    assert listwise_bradley_terry_loss(*dense([2.0, 1.0, 0.0], [3, 1, 1])).item() == pytest.approx((ls(1) + ls(2)) / 2, abs=1e-12)


def test_list_losses_weigh_each_list_by_its_example_weight():
    # list 0: r [2, 1, 0] y [3, 2, 1] (nll0 over 2 choices); list 1: r [0.5, 0] y [0, 1] (nll1 over 1 choice)
    r = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, True], [True, True, False]])
    nll0 = (math.log(math.e**2 + math.e + 1) - 2) + (math.log(math.e + 1) - 1)
    nll1 = math.log(1 + math.exp(0.5))
    w = torch.tensor([2.0, 1.0], dtype=torch.float64)
    assert plackett_luce_loss(r, y, m, w).item() == pytest.approx((2 * nll0 + nll1) / (2 * 2 + 1), abs=1e-12)
    assert plackett_luce_loss(r, y, m, torch.ones(2, dtype=torch.float64)).item() == pytest.approx(plackett_luce_loss(r, y, m).item())
    # listwise BT: list 0's three pairs count twice, list 1's one pair (d = -0.5) once
    want = (2 * (2 * ls(1) + ls(2)) + ls(-0.5)) / (2 * 3 + 1)
    assert listwise_bradley_terry_loss(r, y, m, weight=w).item() == pytest.approx(want, abs=1e-12)
    # weight 0 leaves a list out
    assert listwise_bradley_terry_loss(r, y, m, weight=torch.tensor([0.0, 1.0], dtype=torch.float64)).item() == pytest.approx(ls(-0.5))


@pytest.mark.parametrize("members", [[], ["model.ensemble_members=lora", "model.lora_r=4", "train.learning_rate=1e-2"]],
                         ids=["heads", "lora"])
def test_a_listwise_ensemble_trains_and_scores_with_mean_and_members(tiny_model, list_files, tmp_path, members):
    train, val = list_files
    cfg = load_config(None, [f"model.name_or_path={tiny_model('llama')}", "model.reward_model_type=listwise",
                             "model.ensemble_size=3", f"data.train=[{train}]", f"data.validation=[{val}]",
                             "train.max_steps=3", "train.batch_size=2", "data.cache_dir=none", "train.precision=fp32",
                             f"output_dir={tmp_path / 'ens'}", *members])
    summary = run_training(cfg, progress=False)
    assert "ensemble" in summary["final_validation"]
    s = rewardforge.load(tmp_path / "ens" / "model").score_detailed(["Hi"], ["Hello there"])
    assert s.members.shape == (1, 3) and s.mean[0] == pytest.approx(s.members[0].mean(), abs=1e-5)
    assert s.std[0] > 0  # the members differ


def test_rows_of_several_lists_in_any_order_give_the_same_loss_and_finite_gradients():
    # list 0: r [2, 1, 0], y [3, 2, 1]; list 1: r [0.5, 0], y [0, 1]; padding row (-1) ignored
    r = torch.tensor([0.5, 2.0, 9.0, 1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    li = torch.tensor([1, 0, -1, 0, 0, 1])
    y = torch.tensor([0.0, 3.0, float("nan"), 2.0, 1.0, 1.0], dtype=torch.float64)
    rewards, mask, scores = dense_lists(r, li, y)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    nll0 = (math.log(math.e**2 + math.e + 1) - 2) + (math.log(math.e + 1) - 1)
    nll1 = math.log(1 + math.exp(0.5)) - 0.0  # response 1 (r 0) is better than response 0 (r 0.5)
    loss = plackett_luce_loss(rewards, scores, mask)
    assert loss.item() == pytest.approx((nll0 + nll1) / 3, abs=1e-12)
    loss.backward()
    assert torch.isfinite(r.grad).all() and r.grad[2] == 0
    # the same lists expanded to their pairs: listwise BT = the mean BT over all pairs
    c = torch.tensor([2.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    rej = torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    assert listwise_bradley_terry_loss(rewards, scores, mask).item() == pytest.approx(bradley_terry_loss(c, rej).item(), abs=1e-12)


# ------------------------------------------------------------------ metrics


def test_ranking_metrics_on_hand_numbers_and_kendall_tau_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 3, 6).astype(float), rng.integers(0, 4, 6).astype(float)
        want = stats.kendalltau(x, y).statistic
        got = M.kendall_tau(x, y)
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12)
    # NDCG: gains y - min = [2, 0, 1]; the model orders 1, 2, 0: DCG = 0/1 + 1/log2(3) + 2/log2(4); IDCG = 2 + 1/log2(3)
    assert M.ndcg([0.0, 2.0, 1.0], [3, 1, 2]) == pytest.approx((1 / math.log2(3) + 1) / (2 + 1 / math.log2(3)))
    assert M.ndcg([5.0, 1.0, 2.0], [3, 1, 2]) == pytest.approx(1.0)
    m = M.ranking_metrics([[0.0, 2.0, 1.0], [1.0, 1.0]], [[3, 1, 2], [1, 0]])
    assert m["pairs"] == 4 and m["accuracy"] == pytest.approx((0 + 0 + 0 + 0.5) / 4)  # (0>1) (0>2) (2>1) wrong, a tie
    assert m["top1"] == pytest.approx((0 + 0.5) / 2) and m["random_top1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # list 1 is reversed (tau -1); list 2's rewards are constant, so its tau-b is undefined and left out
    assert m["kendall_tau"] == pytest.approx(-1.0) and m["tau_lists"] == 1


# ------------------------------------------------------------------ data


def rows(records, source="f.jsonl"):
    return [Row(r, source, i + 1) for i, r in enumerate(records)]


def test_list_formats_scores_ranking_with_ties_and_best():
    out = list(parse_lists(rows([
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3, 2]},
        {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]},
        {"responses": ["a", "b", "c"], "best": 1, "subset": "x"},
    ])))
    assert [o.scores for o in out] == [[1, 3, 2], [2.0, 1.0, 3.0, 2.0], [0.0, 1.0, 0.0]]
    assert out[0].prompt == [{"role": "user", "content": "p"}] and out[2].prompt == [] and out[2].extra == {"subset": "x"}


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, r"f.jsonl:1: field 'scores' must be a list of 2 numbers"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0]}, r"f.jsonl:1: field 'ranking' leaves out response 1 of 2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0, 1]}, r"field 'ranking' names response 0 twice"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}, r"field 'ranking' holds 2; entries must be indices 0..1"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0], "best": 0}, r"has 'scores' and 'best'; give one of them"),
    ({"prompt": "p", "responses": ["a", ""], "scores": [1, 0]}, r"field 'responses\[1\]' is an empty string"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, float("nan")]}, r"field 'scores\[1\]' must be finite"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, r"a list row needs 'responses' and one of 'scores', 'ranking' or 'best'"),
])
def test_bad_list_rows_are_one_line_naming_file_line_and_field(record, message):
    with pytest.raises(DataError, match=message) as e:
        list(parse_lists(rows([record])))
    assert "\n" not in str(e.value) and "skip_bad_rows" in str(e.value)


def test_grouped_rated_rows_become_lists_and_bad_groups_are_named():
    recs = [{"source": "d1", "out": "x", "scores": {"overall": 2, "other": 5}},
            {"source": "d2", "out": "y", "scores": {"overall": 1}},
            {"source": "d1", "out": "z", "scores": {"overall": 3}},
            {"source": "d1", "out": "w", "scores": {"overall": None}}]
    excluded: dict = {}
    out = list(parse_lists(rows(recs), group_by="prompt", score_label="overall", excluded=excluded,
                           field_map={"prompt": "source", "response": "out", "labels": "scores"}))
    assert [(o.prompt[0]["content"], o.scores) for o in out] == [("d1", [2.0, 3.0]), ("d2", [1.0])]
    assert excluded == {"responses_without_score": 1}
    bad = [{"id": 1, "prompt": "a", "response": "x", "labels": {"s": 1}}, {"id": 1, "prompt": "b", "response": "y", "labels": {"s": 2}}]
    with pytest.raises(DataError, match=r"f.jsonl:2: this row's prompt differs from that of f.jsonl:1, the first row with id='1'"):
        list(parse_lists(rows(bad), group_by="id", score_label="s"))


def test_list_rows_given_to_a_pair_model_say_to_use_listwise():
    from rewardforge.data.formats import parse_rows

    with pytest.raises(DataError, match=r"f.jsonl:1: this row is a list of responses .* model.reward_model_type=listwise"):
        list(parse_rows(rows([{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}])))


def _cfg(tmp_path, data, *extra, model="x"):
    return load_config(None, [f"model.name_or_path={model}", "model.reward_model_type=listwise", f"data.train=[{data}]",
                              "data.cache_dir=none", f"output_dir={tmp_path / 'o'}", *extra])


def test_every_dropped_or_truncated_item_is_counted(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model("bert")))
    setup_template(tok, "auto")
    long = "paris is the capital of france. " * 20
    data = write_jsonl(tmp_path / "l.jsonl", [
        {"prompt": "q", "responses": ["a", "b", "a"], "scores": [2, 1, 0]},        # duplicate response -> 2 left
        {"prompt": "q", "responses": ["only one"], "scores": [1]},                # under 2
        {"prompt": "q", "responses": ["x", "y"], "scores": [1, 1]},               # all tied
        {"prompt": "q", "responses": ["a", "b", "a"], "scores": [2, 1, 0]},        # duplicate list
        {"prompt": "q", "responses": [long + "good", long + "bad", "c"], "scores": [2, 1, 0]},  # identical once truncated
    ])
    ds, report = build_list_dataset(_cfg(tmp_path, data, "data.max_length=24", "data.truncation=response_right"), tok, [str(data)])
    assert report.excluded == {"duplicate_responses": 2, "lists_under_2_responses": 1, "lists_all_tied": 1,
                               "duplicate_lists": 1, "identical_after_truncation": 1}
    assert report.truncation["truncated_response"] == 2 and report.rows_read == 5
    assert len(ds) == 2 and ds.sizes().tolist() == [2, 2] and ds.scores.tolist() == [2, 1, 2, 0]


def test_tokenized_lists_are_cached_and_read_back_the_same(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model("bert")))
    setup_template(tok, "auto")
    data = write_jsonl(tmp_path / "l.jsonl", generate_lists(6, k=3) + [{"prompt": "q", "responses": ["x"], "scores": [1]}])
    cfg = load_config(None, ["model.name_or_path=x", "model.reward_model_type=listwise", f"data.train=[{data}]",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    a, ra = build_list_dataset(cfg, tok, [str(data)])
    b, rb = build_list_dataset(cfg, tok, [str(data)])
    assert not ra.from_cache and rb.from_cache and rb.excluded == ra.excluded == {"lists_under_2_responses": 1}
    assert a.offsets.tolist() == b.offsets.tolist() and a.scores.tolist() == b.scores.tolist()
    assert all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids)) and a.prompt_keys == b.prompt_keys


def test_list_collator_encodes_each_response_once_with_its_list(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model("bert")))
    setup_template(tok, "auto")
    data = write_jsonl(tmp_path / "l.jsonl", generate_lists(5, k=3) + generate_lists(3, seed=1, k=5))
    ds, _ = build_list_dataset(_cfg(tmp_path, data), tok, [str(data)])
    batch = ListCollator(tok.pad_token_id)([ds[0], ds[6]])
    assert batch["input_ids"].shape[0] == 3 + 5
    assert batch["list_index"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and batch["index"].tolist() == [0, 6]
    assert batch["row_index"].tolist() == [0, 1, 2, *range(int(ds.offsets[6]), int(ds.offsets[6]) + 5)]
    assert torch.equal(batch["scores"], torch.from_numpy(np.concatenate([ds[0]["scores"], ds[6]["scores"]])))
    for j, row in enumerate(ds[6]["responses"]):
        assert batch["input_ids"][3 + j, : len(row)].tolist() == row.tolist()


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="data.group_by='prompt' needs data.score_label"):
        _cfg(tmp_path, "d.json", "data.group_by=prompt")
    with pytest.raises(ConfigError, match="listwise predicts one scalar"):
        resolve_type(_cfg(tmp_path, "d.json", "model.attributes=[a, b]"))
    with pytest.raises(ConfigError, match="loss.name='mse' is not available .* choose one of auto, plackett_luce, listwise_bradley_terry"):
        resolve_type(_cfg(tmp_path, "d.json", "loss.name=mse"))
    rt = resolve_type(load_config(None, ["model.name_or_path=x", "model.reward_model_type=regression", "model.attributes=[a]"]))
    with pytest.raises(ConfigError, match="train.share_prompt=true is not available for rated data .* set train.share_prompt=false"):
        rt.packed_collator(0)


# ------------------------------------------------------------------ K-branch packing


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_lists_give_the_plain_rewards_and_gradients(kind, tiny_model, tmp_path):
    path = str(tiny_model(kind))
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig(name_or_path=path), tok, 1)
    model.hf.set_attn_implementation("sdpa")
    setup_template(tok, "auto")
    data = write_jsonl(tmp_path / "l.jsonl", generate_lists(3, k=4) + generate_lists(2, seed=3, k=2))
    ds, _ = build_list_dataset(_cfg(tmp_path, data), tok, [str(data)])
    items = [ds[i] for i in range(len(ds))]
    ids, _, seg, _ = pack_branches([np.asarray(s) for s in items[0]["responses"]])
    assert (seg == 0).sum() > 3 and len(ids) < sum(len(s) for s in items[0]["responses"])  # the prompt once

    def run(collate):
        model.zero_grad(set_to_none=True)
        b = collate(items)
        out = model(b["input_ids"], b["attention_mask"], **model_kwargs(b))[:, 0]
        keep = b["list_index"] >= 0
        rows, r = b["row_index"][keep], out[keep]
        r = r[torch.argsort(rows)]  # dataset row order
        (r * torch.linspace(0.5, 1.5, r.shape[0])).sum().backward()
        return r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, gp = run(ListCollator(tok.pad_token_id))
    packed, gk = run(PackedListCollator(tok.pad_token_id))
    assert packed.shape == plain.shape == (int(ds.offsets[-1]),)
    assert (plain - packed).abs().max().item() < 1e-5
    assert gp.keys() == gk.keys() and max((gp[n] - gk[n]).abs().max().item() for n in gp) < 1e-5


# ------------------------------------------------------------------ end to end


def _args(model_dir, data, out, *extra):
    return [f"model.name_or_path={model_dir}", "model.reward_model_type=listwise", f"data.train=[{data}]",
            "train.batch_size=4", "train.learning_rate=1e-3", "data.cache_dir=none", f"output_dir={out}", "train.precision=fp32",
            *extra]


@pytest.fixture(scope="module")
def list_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lists")
    return write_jsonl(d / "train.jsonl", generate_lists(48, k=4)), write_jsonl(d / "val.jsonl", generate_lists(12, seed=9, k=3))


@pytest.fixture(scope="module")
def resumed_lists(tiny_model, list_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-lists")
    train, val = list_files
    args = _args(tiny_model("bert"), train, root / "a", f"data.validation=[{val}]", "train.max_steps=6", "train.save_steps=3",
                 "model.dropout=0.1", "train.save_total_limit=0", "train.eval_steps=3")
    full, resumed = train_and_resume(root, args, step=3)
    return root, full, resumed


def test_listwise_trains_resumes_bitwise_and_exports_an_ordinary_reward_model(resumed_lists, list_files):
    root, full, resumed = resumed_lists
    assert full["loss"] == "plackett_luce" and full["steps"] == resumed["steps"] == 6
    assert resumed["resumed_from"] == str(root / "b/checkpoints/step-3")
    wa, wb = load_file(root / "a/model/model.safetensors"), load_file(root / "b/model/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert full["final_validation"] == resumed["final_validation"]
    v = full["final_validation"]
    assert v["lists"] == 12 and v["responses"] == 36 and v["pairs"] == 12 * 3 - sum(  # 3 responses: 3 pairs less the tied ones
        sum(1 for i in range(3) for j in range(i + 1, 3) if r["scores"][i] == r["scores"][j]) for r in generate_lists(12, seed=9, k=3))
    records = [json.loads(l) for l in (root / "a/metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "validation" and "kendall_tau" in r and not r.get("final") for r in records)
    meta = json.loads((root / "a/model/rewardforge.json").read_text())
    assert meta["reward_model_type"] == "listwise" and meta["attributes"] == ["reward"]
    # the export scores like any reward model, and reproduces the validation metrics
    scorer = rewardforge.load(root / "a/model", batch_size=5)
    val = [json.loads(l) for l in list_files[1].read_text().splitlines()]
    rewards = [scorer.score([r["prompt"]] * len(r["responses"]), r["responses"]) for r in val]
    m = M.ranking_metrics(rewards, [r["scores"] for r in val])
    for k in ("accuracy", "top1", "kendall_tau", "ndcg"):
        assert m[k] == pytest.approx(v[k], abs=1e-4), k
    all_r = np.concatenate(rewards)
    assert meta["reward_mean"] == pytest.approx(float(all_r.mean()), abs=1e-4)


def test_rewardforge_eval_reads_list_data(resumed_lists, list_files, tmp_path, capsys):
    from rewardforge.cli import main as cli_main

    root, full, _ = resumed_lists
    ranked = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": r["prompt"], "responses": r["responses"],
         "ranking": [j for j in sorted(range(len(r["scores"])), key=lambda j: -r["scores"][j])]}
        for r in generate_lists(6, seed=9, k=3) if len(set(r["scores"])) == 3])
    assert cli_main(["eval", str(root / "a/model"), "--data", str(list_files[1]), str(ranked), "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev/metrics.json").read_text())
    per = next(iter(res["results"].values()))["datasets"]
    scores_ds = per[next(n for n in per if "val" in n)]
    assert scores_ds["kind"] == "lists" and scores_ds["lists"] == 12
    for k in ("accuracy", "top1", "kendall_tau", "ndcg"):
        assert scores_ds[k] == pytest.approx(full["final_validation"][k], abs=1e-4), k
    assert per[next(n for n in per if "ranked" in n)]["kind"] == "lists"
    assert "Ranked lists" in (tmp_path / "ev/report.html").read_text()
    assert "pair acc" in capsys.readouterr().out


def test_listwise_bradley_terry_with_shared_prompt_packing_trains_like_the_plain_batches(tiny_model, list_files, tmp_path):
    train, val = list_files
    out = {}
    for name, extra in {"plain": [], "packed": ["train.share_prompt=true"]}.items():
        args = _args(tiny_model("llama"), train, tmp_path / name, f"data.validation=[{val}]", "train.max_steps=3",
                     "loss.name=listwise_bradley_terry", "loss.gap_weight=true", "model.attn_implementation=sdpa", *extra)
        out[name] = (run_training(load_config(None, args), progress=False), load_file(tmp_path / name / "model/model.safetensors"))
    (sp, wp), (sk, wk) = out["plain"], out["packed"]
    assert sp["loss"] == "listwise_bradley_terry"
    assert max((wp[k] - wk[k]).abs().max().item() for k in wp) < 1e-4
    assert sk["final_validation"]["accuracy"] == pytest.approx(sp["final_validation"]["accuracy"])


@pytest.mark.skipif(not TOPICAL.is_file(), reason=f"{TOPICAL} absent (the shared real data is not beside the project)")
def test_topical_chat_rated_rows_group_into_six_response_lists(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model("bert")))
    setup_template(tok, "auto")
    cfg = load_config("configs/listwise_topical_chat.yaml", [f"model.name_or_path={tiny_model('bert')}", "data.cache_dir=none",
                                                            f"data.train=[{TOPICAL}]"])
    ds, report = build_list_dataset(cfg, tok, list(cfg.data.train))
    assert report.rows_read == 360 and len(ds) == 60
    # the tiny test tokenizer cuts some responses to the same tokens: each such response is counted, none lost
    assert set(report.excluded) <= {"identical_after_truncation"}
    assert int(ds.offsets[-1]) + sum(report.excluded.values()) == 360
    first = json.loads(TOPICAL.read_text())
    first = [r for r in first if r["source"] == first[0]["source"]]
    assert len(first) == 6 and ds.sizes()[0] == 6
    assert ds.scores[:6].tolist() == pytest.approx([r["scores"]["overall"] for r in first])


def test_a_listwise_export_is_served_like_any_reward_model(resumed_lists, list_files):
    import httpx
    from test_serve import LiveServer

    root, _, _ = resumed_lists
    scorer = rewardforge.load(root / "a/model", batch_size=4)
    row = json.loads(list_files[1].read_text().splitlines()[0])
    items = [{"prompt": row["prompt"], "response": r} for r in row["responses"]]
    server = LiveServer(scorer)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/score", json={"items": items})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    served = [x["reward"] for x in r.json()["results"]]
    assert served == pytest.approx(scorer.score([row["prompt"]] * len(row["responses"]), row["responses"]).tolist(), abs=1e-5)


def test_listwise_bf16_master_trains_like_fp32(tiny_model, list_files, tmp_path):
    """bf16 forward/backward over fp32 masters (auto's choice on AVX512-BF16/AMX CPUs) on lists: it learns,
    exports the fp32 masters, and ends where fp32 does (bf16 rounds, so not bitwise; Adam's first steps
    amplify the rounding of tiny gradients, so the weights are compared by what they score)."""
    train, val = list_files
    src = tiny_model("bert")
    common = [f"data.validation=[{val}]", "train.max_steps=12"]
    runs = {p: run_training(load_config(None, _args(src, train, tmp_path / p, *common) + [f"train.precision={p}"]), progress=False)
            for p in ("fp32", "bf16_master")}
    bf16 = load_file(tmp_path / "bf16_master/model/model.safetensors")
    assert {v.dtype for v in bf16.values()} == {torch.float32}
    f, b = runs["fp32"]["final_validation"], runs["bf16_master"]["final_validation"]
    assert runs["bf16_master"]["steps"] == 12 and f["pairs"] == b["pairs"]
    assert b["accuracy"] > 0.8 and abs(f["accuracy"] - b["accuracy"]) <= 0.1, (f["accuracy"], b["accuracy"])
    assert abs(f["ndcg"] - b["ndcg"]) <= 0.05
