"""`rewardforge eval`: the Python API, the HTML report and its sections, the CLI, model comparison,
bad and empty data, and the in-training hook — on tiny models trained here for a few steps."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from conftest import rated_rows, synthetic_pairs, write_jsonl

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SECTION_IDS = ["accuracy", "sections", "calibration", "length", "distributions", "strength", "best-of-n", "regression",
               "comparison", "mistakes", "data"]


def _train(backbone: Path, out: Path, train: Path, val: Path, steps: int, extra: list[str] = ()) -> Path:
    from rewardforge.config import load_config
    from rewardforge.train import run_training

    cfg = load_config(None, [f"model.name_or_path={backbone}", f"data.train=[{train}]", f"data.validation=[{val}]",
                             f"train.max_steps={steps}", "train.batch_size=8", "train.learning_rate=1e-3",
                             f"output_dir={out}", "data.cache_dir=none", "data.max_length=128", *extra])
    run_training(cfg, progress=False)
    return out / "model"


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory):
    """Two binary checkpoints (5 and 10 steps), one regression model, and evaluation files of every kind."""
    root = tmp_path_factory.mktemp("eval")
    bb = tiny_model("gpt2")
    tr = write_jsonl(root / "train.jsonl", synthetic_pairs(48, 0))
    va = write_jsonl(root / "val.jsonl", synthetic_pairs(16, 1))
    rt = write_jsonl(root / "rtrain.jsonl", rated_rows(32, 0))
    rv = write_jsonl(root / "rval.jsonl", rated_rows(16, 1))
    rng = random.Random(0)
    pairs = synthetic_pairs(40, 2)
    for p in pairs:
        p["margin"] = rng.choice([1, 2, 3])
    pairs.append({"prompt": "Q?", "chosen": "same answer", "rejected": "same answer", "subset": "duplicates"})
    bon = []
    for p in synthetic_pairs(10, 3):
        resp = [p["rejected"], p["chosen"], "Hard to say really."]
        rng.shuffle(resp)
        bon.append({"prompt": p["prompt"], "responses": resp, "best": resp.index(p["chosen"]), "subset": p["subset"]})
    (root / "empty.jsonl").write_text("")
    return {
        "root": root,
        "a": _train(bb, root / "a", tr, va, 3),
        "b": _train(bb, root / "b", tr, va, 10),
        "reg": _train(bb, root / "reg", rt, rv, 3, ["model.reward_model_type=regression", "model.attributes=[helpfulness,safety]"]),
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
        "bon": write_jsonl(root / "bon.jsonl", bon),
        "rated": write_jsonl(root / "rated.jsonl", rated_rows(12, 5)),
        "empty": root / "empty.jsonl",
    }


@pytest.fixture(scope="module")
def compared(env):
    """Both checkpoints on pairs + best-of-N + an empty file, through the Python API."""
    from rewardforge.eval import evaluate_model

    out = env["root"] / "cmp"
    result = evaluate_model([env["a"], env["b"]], [str(env["pairs"]), str(env["bon"]), str(env["empty"])], out, progress=False)
    return result, out


def test_metrics_json_has_every_number(compared):
    result, out = compared
    on_disk = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN
    assert on_disk["results"].keys() == result["results"].keys()
    a = result["results"][result["models"][0]["name"]]["datasets"]
    pairs = a["pairs"]
    assert pairs["overall"]["n"] == 40 and 0 <= pairs["overall"]["accuracy"] <= 1
    assert pairs["overall"]["ci_low"] <= pairs["overall"]["accuracy"] <= pairs["overall"]["ci_high"]
    assert set(pairs["subsets"]) >= {"rude", "refusal", "vague", "off_topic"}
    assert pairs["calibration"]["ece"] is not None and len(pairs["calibration"]["bins"]) == 10
    assert pairs["length"]["longer_baseline"] is not None and pairs["length"]["reward_length_pearson"] is not None
    assert pairs["strength"]["field"] == "margin" and [lv["label"] for lv in pairs["strength"]["levels"]] == ["1", "2", "3"]
    assert a["bon"]["kind"] == "best_of_n" and a["bon"]["n"] == 10 and a["bon"]["random_baseline"] == pytest.approx(1 / 3)
    assert result["length_unit"] == "tokens"


def test_empty_subset_and_empty_file_are_reported(compared):
    from rewardforge.eval.report import format_table

    result, _ = compared
    a = result["results"][result["models"][0]["name"]]["datasets"]
    # the only 'duplicates' pair has identical responses: excluded, and its subset reported with no pairs
    assert a["pairs"]["subsets"]["duplicates"] == {"n": 0, "accuracy": None, "ci_low": None, "ci_high": None, "wins": 0, "ties": 0, "losses": 0}
    ds = {d["name"]: d for d in result["datasets"]}
    assert ds["pairs"]["excluded"] == {"identical_responses": 1}
    assert ds["empty"]["kind"] == "empty" and a["empty"]["overall"]["n"] == 0
    table = format_table(result)
    assert re.search(r"duplicates\s+0\s+–", table)
    assert "empty: 0 rows read" in table


def test_report_is_self_contained_and_has_every_section(compared):
    result, out = compared
    page = (out / "report.html").read_text()
    for sid in SECTION_IDS:  # shown in full, or listed under "Not measured" with how to get it
        assert f'<section id="{sid}"' in page, sid
    measured = page.split('id="not-measured"')[0]
    for sid in ("accuracy", "calibration", "length", "distributions", "strength", "best-of-n", "comparison", "mistakes", "data"):
        assert f'<section id="{sid}">' in measured, sid
    assert '<section id="regression" class="skip">' in page and '<section id="sections" class="skip">' in page
    for text in ("95% CI", "reliability diagram", "ECE", "temperature T", "longer baseline", "acc. | rejected longer",
                 "reward distributions", "accuracy by strength", "top-1", "McNemar", "where they disagree most",
                 "most confident mistakes", "identical_responses: 1", "No rated (regression) data"):
        assert text in page, text
    # offline: every image is embedded, nothing is fetched
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<script" not in page
    imgs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(imgs) == len(pngs) >= 6
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert {"accuracy.png", "calibration_pairs.png", "length_pairs.png", "distributions_pairs.png", "strength_pairs.png"} <= {p.name for p in pngs}


def test_comparison_of_two_checkpoints(compared):
    result, _ = compared
    names = [m["name"] for m in result["models"]]
    assert len(names) == 2 and names[0] != names[1]
    cmp = result["comparison"]["against"][names[1]]["pairs"]
    assert cmp["a_only"] + cmp["b_only"] + cmp["both"] + cmp["neither"] == 40
    assert 0 <= cmp["agreement"] <= 1 and 0 <= cmp["mcnemar_p"] <= 1
    for d in cmp["disagreements"]:  # they really disagree, ordered by standardised margin gap
        assert (d["margin_a"] > 0) != (d["margin_b"] > 0) and d["prompt"] and d["chosen"]
    gaps = [abs(d["z_a"] - d["z_b"]) for d in cmp["disagreements"]]
    assert gaps == sorted(gaps, reverse=True)


def test_regression_model_rated_and_pairs(env):
    from rewardforge.eval import evaluate_model

    out = env["root"] / "reg_out"
    result = evaluate_model(env["reg"], [str(env["rated"]), str(env["pairs"])], out, progress=False)
    m = result["results"][result["models"][0]["name"]]["datasets"]
    rated = m["rated"]["attributes"]
    assert set(rated) == {"helpfulness", "safety"}
    for st in rated.values():
        assert st["n"] == 12 and st["mse"] >= 0 and st["mae"] >= 0 and -1 <= st["pearson"] <= 1 and -1 <= st["spearman"] <= 1
    assert m["pairs"]["overall"]["n"] == 40  # pairs scored through the weighted combination
    page = (out / "report.html").read_text()
    assert "Spearman" in page and "predicted vs true" in page
    assert any(p.name.startswith("regression_") for p in (out / "plots").glob("*.png"))


def test_cli_on_a_tiny_model(env, capsys):
    from rewardforge.cli import main

    out = env["root"] / "cli_out"
    rc = main(["eval", str(env["a"]), "--data", str(env["pairs"]), str(env["bon"]), "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
    lines = printed.splitlines()
    assert any(re.match(r"pairs\s+all\s+40\s+\d+\.\d%", ln) for ln in lines), printed
    for subset in ("off_topic", "refusal", "rude", "vague"):
        assert any(ln.split()[:1] == [subset] for ln in lines), subset
    assert "best-of-N" in printed and "report.html" in printed
    # data told apart from models without --data
    rc = main(["eval", str(env["a"]), str(env["pairs"]), "--out", str(out / "positional"), "--quiet", "--limit", "8"])
    assert rc == 0 and (out / "positional" / "report.html").is_file()


def test_cli_errors_are_one_line(env, tmp_path, capsys):
    from rewardforge.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [synthetic_pairs(1)[0], {"prompt": "x", "chosen": 3, "rejected": "y"}, "{oops"])
    rc = main(["eval", str(env["a"]), "--data", str(bad), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{bad}:2" in err[0] and "'chosen'" in err[0]
    rc = main(["eval", str(env["a"]), "--data", str(bad), "--out", str(tmp_path / "o"), "--quiet", "--skip-bad-rows"])
    assert rc == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["datasets"][0]["skipped_bad_rows"] == 2
    capsys.readouterr()
    for argv, needle in (
        (["eval", str(env["a"]), "--out", str(tmp_path / "x")], "no evaluation data"),
        (["eval", str(tmp_path), "--data", str(bad)], "not an exported model"),
        (["eval", str(env["a"]), "--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["eval", str(env["a"]), "--data", str(env["rated"])], "regression model"),
        (["eval", str(env["a"]), "--data", str(env["pairs"]), "--sections", str(tmp_path / "nope.json")], "sections"),
        (["eval", str(env["a"]), "--data", str(env["pairs"]), "--out", str(bad)], "not writable"),
    ):
        assert main(argv if "--out" in argv else argv + ["--out", str(tmp_path / "never")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "never").exists()  # nothing written when the input is wrong


def test_section_mapping_and_rewardbench_auto(env, tmp_path):
    from rewardforge.eval import evaluate_model

    rows = synthetic_pairs(24, 4)
    for i, r in enumerate(rows):
        r["subset"] = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "hep-go"][i % 4]
    data = write_jsonl(tmp_path / "rb.jsonl", rows)
    res = evaluate_model(env["a"], [str(data)], None, progress=False)
    sec = res["results"][res["models"][0]["name"]]["sections"]
    assert set(sec["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert sec["sections"]["Chat"]["n"] == 6 and "alpacaeval-hard" in sec["sections"]["Chat"]["missing"]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"Hard": ["mt-bench-hard", "hep-go"], "Gone": ["nothing"]}))
    res = evaluate_model(env["a"], [str(data)], tmp_path / "o", sections=str(mapping), progress=False)
    sec = res["results"][res["models"][0]["name"]]["sections"]
    assert sec["sections"]["Hard"]["n"] == 12 and sec["sections"]["Gone"]["score"] is None
    assert "Gone" in (tmp_path / "o" / "report.html").read_text()


def test_evaluate_during_training_with_in_memory_model(env):
    import rewardforge
    from rewardforge.eval import evaluate_pairs_during_training, load_eval_data, scorer_from_model

    data = load_eval_data([str(env["pairs"]), str(env["bon"])])
    scorer = rewardforge.load(env["a"], device="cpu")
    flat = evaluate_pairs_during_training(scorer, data)
    assert 0 <= flat["eval/pairs/accuracy"] <= 1 and flat["eval/pairs/pairs"] == 40
    assert "eval/pairs/rude/accuracy" in flat and "eval/bon/top1" in flat and "eval/pairs/ece" in flat
    # a live model: same numbers, and its training mode is left as it was
    model = scorer.model
    model.train()
    live = scorer_from_model(model, scorer.tokenizer, max_length=scorer.max_length, truncation=scorer.truncation)
    assert model.training
    flat2 = evaluate_pairs_during_training(live, data, prefix="val")
    assert model.training
    assert flat2["val/pairs/accuracy"] == pytest.approx(flat["eval/pairs/accuracy"])


@pytest.mark.skipif(not (SHARED / "hh_rlhf" / "harmless-base.test.jsonl.gz").is_file(),
                    reason="real data ../shared/data/hh_rlhf is absent (only on the project's test machines)")
def test_real_hh_rlhf_sample(env, tmp_path):
    from rewardforge.eval import evaluate_model

    res = evaluate_model(env["a"], [str(SHARED / "hh_rlhf" / "harmless-base.test.jsonl.gz")], tmp_path, limit=24, progress=False)
    ds = res["datasets"][0]
    assert ds["format"] == "implicit_prompt" and ds["name"] == "harmless-base.test"
    st = res["results"][res["models"][0]["name"]]["datasets"]["harmless-base.test"]
    assert st["overall"]["n"] + ds["excluded"].get("identical_responses", 0) >= 24 - 1
    assert st["length"]["mean_length_chosen"] > 0


def test_best_of_n_rows_are_checked_like_training_data(tmp_path):
    from rewardforge.data.readers import DataError
    from rewardforge.eval import load_eval_data

    good = {"prompt": "Q?", "responses": ["a", [{"role": "assistant", "content": "b"}]], "best": 1, "subset": "s"}
    path = write_jsonl(tmp_path / "bon.jsonl", [good, {**good, "best": 2}, {**good, "responses": ["only one"]}, {**good, "best": True}])
    with pytest.raises(DataError, match=r"bon.jsonl:2: field 'best' must be the index \(0\.\.1\)"):
        load_eval_data([str(path)])
    ds = load_eval_data([str(path)], skip_bad_rows=True)[0]
    assert ds.kind == "best_of_n" and len(ds.items) == 1 and ds.skipped == {"bad_row": 3}
    assert ds.items[0].responses[0] == [{"role": "assistant", "content": "a"}] and ds.items[0].extra == {"subset": "s"}
    # renamed columns and a forced format
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "Q?", "answers": ["a", "b", "c"], "winner": 2}])
    ds = load_eval_data([str(renamed)], field_map={"prompt": "question", "responses": "answers", "best": "winner"})[0]
    assert ds.kind == "best_of_n" and ds.items[0].best == 2


def test_the_report_headline_says_whether_the_accuracy_is_a_result():
    from rewardforge.eval.report import verdict

    assert verdict({"ci_low": 0.489, "ci_high": 0.556}, 0.547).startswith("not distinguishable from chance; within the interval")
    assert verdict({"ci_low": 0.61, "ci_high": 0.67}, 0.55) == "better than chance; above the pick-the-longer-response baseline (55.0%)"
    assert verdict({"ci_low": 0.52, "ci_high": 0.58}, 0.908).endswith("below the pick-the-longer-response baseline (90.8%)")
