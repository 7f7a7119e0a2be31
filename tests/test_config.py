"""Config: YAML + dotted overrides, type coercion, unknown keys and bad values named in the error."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from rewardforge.config import Config, ConfigError, apply_overrides, config_from_dict, describe, load_config, valid_keys
from rewardforge.registry import get_reward_model_spec

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------ loading and overrides


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.train.batch_size == 8
    assert cfg.model.reward_model_type == "binary_ranking"
    assert cfg.data.max_length == 512
    assert cfg.output_dir == "runs/reward_model"


def test_yaml_then_overrides_win(tmp_path):
    p = write(tmp_path, "model:\n  name_or_path: gpt2\ntrain:\n  batch_size: 4\n  seed: 1\noutput_dir: a\n")
    cfg = load_config(p, ["train.batch_size=16", "output_dir=b"])
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.train.batch_size == 16  # override beats the file
    assert cfg.train.seed == 1  # untouched file value kept
    assert cfg.output_dir == "b"


def test_override_into_empty_yaml_section(tmp_path):
    # `train:` with nothing under it is YAML null; an override must still be able to fill the section.
    p = write(tmp_path, "train:\nmodel:\n  name_or_path: x\n")
    cfg = load_config(p, ["train.batch_size=3"])
    assert cfg.train.batch_size == 3
    assert load_config(p).train.batch_size == 8


def test_type_coercion():
    cfg = load_config(
        None,
        [
            "train.learning_rate=1e-5",  # YAML 1.1 reads this as a string; coerced to float
            "train.batch_size=4.0",  # an integral float is a valid int
            "train.epochs=2",  # int -> float field
            "data.train=a.jsonl,b.jsonl",  # comma list
            "data.validation=[v.jsonl]",  # YAML list
            "data.field_map={prompt: source, chosen: good}",
            "model.dropout=none",  # Optional[float]
            "model.gradient_checkpointing=yes",
            "model.attributes=[helpfulness, safety]",
            "model.attribute_weights=[1, 3]",
            "model.name_or_path=123",  # stays a string
            "data.cache_dir=none",  # a plain string, not None
        ],
    )
    assert cfg.train.learning_rate == pytest.approx(1e-5) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.data.validation == ["v.jsonl"]
    assert cfg.data.field_map == {"prompt": "source", "chosen": "good"}
    assert cfg.model.dropout is None
    assert cfg.model.gradient_checkpointing is True
    assert cfg.model.attributes == ["helpfulness", "safety"]
    assert cfg.model.attribute_weights == [1.0, 3.0] and all(isinstance(w, float) for w in cfg.model.attribute_weights)
    assert cfg.model.name_or_path == "123"
    assert cfg.data.cache_dir == "none"
    assert load_config(None, ["model.dropout=0.1"]).model.dropout == pytest.approx(0.1)
    assert load_config(None, ["data.train="]).data.train == []
    assert load_config(None, ["model.gradient_checkpointing=off"]).model.gradient_checkpointing is False


def test_to_dict_round_trips():
    cfg = load_config(None, ["train.batch_size=3", "model.attributes=[a, b]", "model.reward_model_type=regression"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_describe_lists_every_key_with_help():
    text = describe()
    for key in valid_keys():
        assert key.split(".")[-1] in text
    assert "Maximum tokens per sequence" in text


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "override, bad, want",
    [
        ("train.batchsize=4", None, "train.batch_size"),
        ("train.lerning_rate=1", None, "train.learning_rate"),
        ("model.pooling_mode=x", None, "model.pooling"),
        ("train.max_lenght=4", None, "data.max_length"),  # right key, wrong section
        ("trian.seed=1", "trian", "train"),  # misspelt section: named, and the section suggested
        ("ouptut_dir=x", "ouptut_dir", "output_dir"),
    ],
)
def test_unknown_key_names_it_and_suggests(override, bad, want):
    bad = bad or override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{bad}'; did you mean '{want}'\?") as e:
        load_config(None, [override])
    section = bad.split(".")[0]
    # the listing: only the keys of the section named (or the sections, for a misspelt section)
    assert (f"Keys of {section}: {section}." in str(e.value)) if "." in bad else ("Sections: model, data" in str(e.value))


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'\. Sections: ") as e:
        load_config(None, ["zzz=1"])
    assert "did you mean" not in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'a\.b\.c'"):
        load_config(None, ["a.b.c=1"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = write(tmp_path, "train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.batch_sise'; did you mean 'train\.batch_size'\?"):
        load_config(p)
    p = write(tmp_path, "dataa:\n  max_length: 4\n", "d.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key 'dataa'; did you mean 'data'\?"):
        load_config(p)


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'train\.batch_size' must look like section\.key=value"):
        load_config(None, ["train.batch_size"])
    with pytest.raises(ConfigError, match=r"override 'model=3' sets a whole section; set one key with model\.KEY=value"):
        load_config(None, ["model=3"])
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config file '.*bad\.yaml' is not valid YAML"):
        load_config(write(tmp_path, "model: [\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"must be a mapping of sections, got list"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"), ["train.seed=1"])
    with pytest.raises(ConfigError, match=r"config section 'model' must be a mapping of keys, got 3"):
        load_config(write(tmp_path, "model: 3\n", "sec.yaml"))
    with pytest.raises(ConfigError, match=r"cannot set model\.x: 'model' is not a section"):
        apply_overrides({"model": 3}, ["model.x=1"])


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.batch_size=4.5"], r"train\.batch_size expects an integer, got 4\.5"),
        (["train.batch_size=abc"], r"train\.batch_size expects an integer, got 'abc'"),
        (["train.batch_size=true"], r"train\.batch_size expects a number, got True"),
        (["train.learning_rate=fast"], r"train\.learning_rate expects a number, got 'fast'"),
        (["model.gradient_checkpointing=maybe"], r"model\.gradient_checkpointing expects true or false, got 'maybe'"),
        (["data.field_map=[a]"], r"data\.field_map expects a mapping like \{a: b\}, got \['a'\]"),
        (["model.name_or_path=[a]"], r"model\.name_or_path expects a string, got \['a'\]"),
        (["model.attribute_weights=[1, x]"], r"model\.attribute_weights expects a number, got 'x'"),
        # choices
        (["model.pooling=max"], r"model\.pooling='max' is not valid; choose one of auto, last_token, pooled, mean"),
        (["data.truncation=middle"], r"data\.truncation='middle' is not valid; choose one of prompt_left, response_right"),
        (["train.lr_scheduler=step"], r"train\.lr_scheduler='step' is not valid; choose one of cosine, linear, constant"),
        (["train.precision=fp16"], r"train\.precision='fp16' is not valid; choose one of auto, fp32, bf16"),
        (["data.format=csv"], r"data\.format='csv' is not valid; choose one of auto, explicit, implicit_prompt"),
        (["data.template=chatml"], r"data\.template='chatml' is not valid; choose one of auto, plain, tokenizer"),
        # ranges
        (["train.batch_size=0"], r"train\.batch_size must be > 0, got 0"),
        (["train.gradient_accumulation_steps=-1"], r"train\.gradient_accumulation_steps must be > 0, got -1"),
        (["data.max_length=0"], r"data\.max_length must be > 0, got 0"),
        (["model.freeze_layers_fraction=1.5"], r"model\.freeze_layers_fraction must be in \[0, 1\], got 1\.5"),
        (["data.validation_fraction=0"], r"data\.validation_fraction must be in \(0, 1\) when data\.validation is empty, got 0\.0"),
        (["data.validation_fraction=1"], r"data\.validation_fraction must be in \(0, 1\)"),
        (["train.learning_rate=0"], r"train\.learning_rate must be a finite number > 0, got 0\.0"),
        (["train.learning_rate=.nan"], r"train\.learning_rate must be a finite number > 0, got nan"),
        (["train.warmup_ratio=1"], r"train\.warmup_ratio must be in \[0, 1\), got 1\.0"),
        # conflicting attribute options
        (
            ["model.attributes=[a, b]", "model.attribute_weights=[1]"],
            r"model\.attribute_weights has 1 values but model\.attributes names 2; give one weight per attribute",
        ),
        (["model.attributes=[a, a]"], r"model\.attributes has duplicate names: \['a', 'a'\]"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_validation_fraction_irrelevant_when_validation_given():
    cfg = load_config(None, ["data.validation_fraction=0", "data.validation=[v.jsonl]"])
    assert cfg.data.validation == ["v.jsonl"]


def test_direct_construction_is_validated():
    from rewardforge.config import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.batch_size must be > 0"):
        Config(train=TrainConfig(batch_size=0))


# ------------------------------------------------------------------ shipped configs


SHIPPED = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))


def test_there_are_shipped_configs():
    assert any(Path(p).name == "quickstart.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: Path(p).name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.name_or_path, "a shipped config must name its backbone"
    assert cfg.data.train, "a shipped config must name its training data"
    spec = get_reward_model_spec(cfg.model.reward_model_type)
    spec.check(cfg)  # the loss and attributes fit the type
    # The file round-trips: overriding nothing changes nothing.
    assert load_config(path, [f"output_dir={cfg.output_dir}"]) == cfg


@pytest.mark.parametrize("key,ours", [("train.per_device_train_batch_size", "train.batch_size"),
                                      ("train.num_train_epochs", "train.epochs"), ("train.lr", "train.learning_rate"),
                                      ("train.per_device_eval_batch_size", "train.eval_batch_size"),
                                      ("model.model_name_or_path", "model.name_or_path")])
def test_trl_and_hf_names_get_rewardforges_name(key, ours):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}': rewardforge calls it {ours}"):
        load_config(None, [f"{key}=1"])


def test_an_unknown_key_lists_only_its_sections_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.batch_sise=4"])
    msg = str(e.value)
    assert "did you mean 'train.batch_size'?" in msg and "Keys of train: train.epochs" in msg
    assert "data.max_length" not in msg and "model." not in msg


# ------------------------------------------------------------------ data entries with weights (data.train mappings)


def test_data_entries_are_paths_or_mappings_from_yaml_and_overrides(tmp_path):
    from rewardforge.config import DataSource

    p = write(tmp_path, "data:\n  train:\n    - a.jsonl\n    - {path: b.jsonl, weight: 2, max_rows: 100}\n    - path: c.jsonl\n      weight: 0.5\n")
    with pytest.raises(ConfigError, match=r"data\.train\[0\] has no weight but data\.train\[1\] has one"):
        load_config(p)  # weights on every entry or on none
    p = write(tmp_path, "data:\n  train:\n    - {path: b.jsonl, weight: 2, max_rows: 100}\n    - path: c.jsonl\n      weight: 0.5\n")
    assert load_config(p).data.train == [DataSource("b.jsonl", weight=2.0, max_rows=100), DataSource("c.jsonl", weight=0.5)]
    cfg = load_config(None, ["data.train=[a.jsonl, {path: b.jsonl, fraction: 0.25, max_rows: 10}]", "data.num_proc=2"])
    assert cfg.data.train == ["a.jsonl", DataSource("b.jsonl", fraction=0.25, max_rows=10)] and cfg.data.num_proc == 2
    assert str(cfg.data.train[1]) == "b.jsonl"
    assert cfg.to_dict()["data"]["train"] == ["a.jsonl", {"path": "b.jsonl", "fraction": 0.25, "max_rows": 10}]
    assert config_from_dict(cfg.to_dict()) == cfg
    assert load_config(None, ["data.train={path: a.jsonl, max_rows: 5}"]).data.train == [DataSource("a.jsonl", max_rows=5)]
    assert load_config(None).data.num_proc is None  # one per core


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train=[{path: a.jsonl, wieght: 2}]"],
         r"unknown config key 'data\.train\[0\]\.wieght'; did you mean 'weight'\? An entry takes path, weight, fraction, max_rows"),
        (["data.train=[{weight: 2}]"], r"data\.train\[0\] has no path; give one, e\.g\. \{path: pairs\.jsonl, weight: 2\}"),
        (["data.train=[{path: a.jsonl, weight: 0}]"], r"data\.train\[0\]\.weight must be a finite number > 0, got 0\.0"),
        (["data.train=[{path: a.jsonl, weight: heavy}]"], r"data\.train\[0\]\.weight expects a number, got 'heavy'"),
        (["data.train=[{path: a.jsonl, fraction: 1.5}]"], r"data\.train\[0\]\.fraction must be in \(0, 1\], got 1\.5; to repeat"),
        (["data.train=[{path: a.jsonl, max_rows: 0}]"], r"data\.train\[0\]\.max_rows must be > 0, got 0"),
        (["data.train=[{path: a.jsonl, max_rows: 2.5}]"], r"data\.train\[0\]\.max_rows expects an integer, got 2\.5"),
        (["data.train=[{path: a.jsonl, weight: 1}, b.jsonl]"],
         r"data\.train\[1\] has no weight but data\.train\[0\] has one; .* give every entry a weight \(e\.g\. \{path: b\.jsonl, weight: 1\}\) or none"),
        (["data.train=[{path: a.jsonl, weight: 1, fraction: 0.5}, {path: b.jsonl, weight: 1}]"],
         r"data\.train\[0\]\.fraction with weights on data\.train: choose one"),
        (["data.validation=[{path: v.jsonl, fraction: 0.5}]"],
         r"data\.validation\[0\]\.fraction: validation data is never weighted .* remove fraction \(max_rows is allowed\)"),
        (["data.train=7"], r"data\.train expects a list of paths or \{path: \.\.\.\} mappings, got 7"),
        (["data.num_proc=-1"], r"data\.num_proc must be >= 0 \(0 or 1: one process\) or null \(one per core\), got -1"),
    ],
)
def test_bad_data_entries_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
