"""Command line: a thin layer over the Python API. Only here do errors become exit codes.

    rewardforge train CONFIG.yaml [section.key=value ...]
    rewardforge export CHECKPOINT OUT_DIR
    rewardforge score MODEL_DIR [--input FILE] [--output FILE] [--return-text]
    rewardforge eval MODEL_DIR [MODEL_DIR ...] --data FILE [FILE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _user_errors() -> tuple[type[BaseException], ...]:
    from rewardforge.training.checkpoint import CheckpointError
    from rewardforge.config import ConfigError
    from rewardforge.data.readers import DataError
    from rewardforge.models.reward_model import ModelError

    return (ConfigError, DataError, ModelError, CheckpointError, FileNotFoundError, FloatingPointError,
            PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def _error_line(e: BaseException) -> str:
    """One line for a user error; file-system errors name the path, what is wrong and the fix."""
    if isinstance(e, OSError) and getattr(e, "filename", None):
        what = {PermissionError: "cannot write or read it (permission denied)",
                NotADirectoryError: "a part of the path is a file, not a directory",
                IsADirectoryError: "it is a directory where a file is needed",
                FileExistsError: "it already exists",
                FileNotFoundError: "it does not exist"}.get(type(e), e.strerror or str(e))
        return f"{e.filename}: {what}; give another path"
    return str(e)


def cmd_train(args: argparse.Namespace) -> int:
    from rewardforge.config import describe, dump_config, load_config
    from rewardforge.train import run_training

    if args.help_config:
        print(describe())
        return 0
    if args.config is None:
        raise SystemExit("rewardforge train: give a CONFIG.yaml (see configs/) or --help-config for every key")
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        overrides.insert(0, args.config)
        args.config = None
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg))
        return 0
    if args.estimate_memory:
        from rewardforge.train import estimate_for_config

        est = estimate_for_config(cfg, args.processes)
        print(json.dumps(est, indent=2))
        print(f"about {est['total_gib']:.2f} GiB per process ({est['processes']} process(es), strategy "
              f"{est['strategy']}, sequences of {cfg.data.max_length} tokens), plus the framework's own ~1 GiB")
        return 0
    summary = run_training(cfg, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    v = summary["final_validation"]
    print(json.dumps({"output_dir": cfg.output_dir, "steps": summary["steps"], "final_validation": v,
                      "export": summary.get("export", {}).get("path")}, indent=2))
    return 0


def _check_writable_dir(path: str | Path, what: str) -> None:
    """Fail before any work when ``path``'s nearest existing parent is not a writable directory."""
    from rewardforge.data.readers import DataError

    p = Path(path).resolve()
    parent = p if p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise DataError(f"{what} {path}: {parent} is not a writable directory; give another path")


def cmd_export(args: argparse.Namespace) -> int:
    from rewardforge.training.checkpoint import read_config
    from rewardforge.train import export_checkpoint

    read_config(Path(args.checkpoint))  # a missing or wrong checkpoint first, then the destination
    _check_writable_dir(args.out, "export destination")
    path = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from rewardforge.export.hf_import import import_model

    _check_writable_dir(args.out, "import destination")
    meta = import_model(args.hf_dir, args.out, template=args.template, pooling=args.pooling, max_length=args.max_length,
                        truncation=args.truncation, data=args.data or None, attribute_weights=args.attribute_weights)
    stats = (f"reward mean {meta['reward_mean']:.4f}, std {meta['reward_std']:.4f} over {meta['sequences']} responses"
             if meta.get("statistics_from") else "no --data: reward mean 0 / std 1 (normalised rewards equal the raw ones)")
    print(f"imported {args.hf_dir} -> {args.out} ({meta['reward_model_type']}, pooling {meta['pooling']}, template "
          f"{meta['template']}, max_length {meta['max_length']}); {stats}")
    print(f"next: rewardforge score {args.out} | rewardforge eval {args.out} --data FILE | rewardforge serve {args.out}")
    return 0


def _read_score_input(fh, name: str) -> list[tuple[int, dict[str, Any]]]:
    from rewardforge.data.readers import DataError

    rows = []
    for lineno, raw in enumerate(fh.buffer if hasattr(fh, "buffer") else fh, 1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            raise DataError(f"{name}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not ({"prompt", "response"} <= set(obj) or "messages" in obj or "text" in obj):
            raise DataError(f"{name}:{lineno}: each line needs prompt+response, messages, or text; got {obj!r:.80}")
        rows.append((lineno, obj))
    return rows


def cmd_score(args: argparse.Namespace) -> int:
    import rewardforge
    from rewardforge.data.readers import DataError

    if args.output:  # before loading and scoring: a path that cannot be written fails first
        _check_writable_dir(args.output, "--output")
        open(args.output, "a", encoding="utf-8").close()
    scorer = rewardforge.load(args.model_dir, batch_size=args.batch_size, device=args.device,
                              uncertainty_penalty=args.uncertainty_penalty)
    name = args.input or "<stdin>"
    if args.input:
        with open(args.input, "rb") as fh:
            rows = _read_score_input(fh, name)
    else:
        rows = _read_score_input(sys.stdin, name)
    items, where = [], []
    for lineno, obj in rows:
        try:
            if "messages" in obj:
                if not isinstance(obj["messages"], list) or not all(isinstance(m, dict) for m in obj["messages"]):
                    raise DataError("field 'messages' must be a list of {role, content} messages")
                item = {"messages": obj["messages"]}
            elif "text" in obj:
                if not isinstance(obj["text"], str):
                    raise DataError("field 'text' must be a string")
                item = {"text": obj["text"]}
            elif "input_ids" in obj:
                if not isinstance(obj["input_ids"], list) or not all(type(x) is int for x in obj["input_ids"]):
                    raise DataError("field 'input_ids' must be a list of integers")
                item = {"input_ids": obj["input_ids"]}
            else:
                for k in ("prompt", "response"):
                    if not isinstance(obj[k], (str, list)):
                        raise DataError(f"field {k!r} must be a string or a list of messages")
                item = {"prompt": obj["prompt"], "response": obj["response"]}
        except (DataError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{name}:{lineno}: {e}") from None
        items.append(item), where.append(f"{name}:{lineno}")
    try:
        scores = scorer.score_items(items, where=where)
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{name}: {e}") from None
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for i, (lineno, obj) in enumerate(rows):
            rec = {**obj, "reward": float(scores.reward[i]), "reward_normalized": float(scores.normalized[i])}
            if len(scorer.attributes) > 1:
                rec["attributes"] = {a: float(v) for a, v in zip(scorer.attributes, scores.outputs[i])}
            if scores.members is not None:  # an ensemble: reward = reward_mean - --uncertainty-penalty x reward_std
                rec["reward_mean"], rec["reward_std"] = float(scores.mean[i]), float(scores.std[i])
                rec["members"] = [float(v) for v in scores.members[i]]
            if scores.truncated[i]:
                rec["truncated"] = True
            if args.return_text and scores.texts[i] is not None:
                rec["text"] = scores.texts[i]
            if args.return_tokens:
                rec["tokens"] = [int(x) for x in scores.ids[i]]
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    n_trunc = int(scores.truncated.sum())
    print(f"scored {len(rows)} inputs{f'; {n_trunc} truncated to max_length' if n_trunc else ''}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rewardforge.serve import config_from_args, serve

    try:
        config = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"rewardforge serve: error: {e}") from None
    serve(args.model_dir, config)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rewardforge.eval.report import format_table
    from rewardforge.eval.data import parse_field_map, split_models_and_data
    from rewardforge.eval.runner import evaluate_model

    validation_split = False
    if not args.data and len(args.paths) == 1 and (Path(args.paths[0]) / "config.yaml").is_file() \
            and (Path(args.paths[0]) / "model" / "rewardforge.json").is_file():
        # a run directory alone: its validation split (its validation files, or its held-out training prompts)
        from rewardforge.config import read_config_file, source_path

        run_cfg = read_config_file(args.paths[0])["data"]
        args.data = [source_path(e) for e in run_cfg.get("validation") or run_cfg["train"]]
        validation_split = not run_cfg.get("validation")
        print(f"evaluating {args.paths[0]} on its validation split: "
              + (", ".join(args.data) if not validation_split else f"the held-out prompts of {', '.join(args.data)}"))
    models, data = split_models_and_data(args.paths, args.data)
    result = evaluate_model(
        models, data, args.out, fmt=args.format, field_map=parse_field_map(args.field_map), subset_field=args.subset_field,
        strength_field=args.strength_field, sections=args.sections, skip_bad_rows=args.skip_bad_rows, split=args.split,
        limit=args.limit, batch_size=args.batch_size, device=args.device, n_bins=args.bins, top=args.top, progress=not args.quiet,
        validation_split=validation_split,
    )
    print(format_table(result))
    for model, r in result["results"].items():
        for name, d in r["datasets"].items():
            o = d.get("training_overlap")
            if o and o["in_training"]:
                seen, unseen = o["accuracy_in_training"], o["accuracy_unseen"]
                print(f"warning: {o['in_training']} of {o['pairs']} pairs of {name} ({o['share_in_training']:.1%}) have a "
                      f"prompt {model} was trained on: accuracy {seen['accuracy']:.4f} on those, "
                      + (f"{unseen['accuracy']:.4f} on the {unseen['n']} unseen" if unseen else "no unseen pairs")
                      + "; evaluate on held-out data (a run's validation split: rewardforge eval RUN_DIR)")
    if args.update_card:
        from rewardforge.export.card import add_eval_table

        for m in result["models"]:
            card = add_eval_table(m["path"], result, m["name"])
            print(f"added the evaluation table to {card}")
    print(f"\nwrote {os.path.join(args.out, 'report.html')} and metrics.json ({result['seconds']} s)")
    return 0


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from rewardforge import __version__

    p = argparse.ArgumentParser(prog="rewardforge", description="Train, evaluate, export and serve reward models for RLHF.")
    p.add_argument("--version", action="version", version=f"rewardforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a reward model from a YAML config", description="Train, validate and export a reward model.")
    t.add_argument("config", nargs="?", help="YAML config (see configs/); section.key=value overrides follow")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.batch_size=16")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--estimate-memory", action="store_true",
                   help="print the memory one process will need (model built without weights) and exit")
    t.add_argument("--processes", type=int, default=1, help="with --estimate-memory: processes the run will use")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a checkpoint as a Hugging Face model directory")
    e.add_argument("checkpoint", help="a checkpoint directory (OUTPUT/checkpoints/step-N)")
    e.add_argument("out", help="the model directory to write")
    e.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="make a Hugging Face reward model (TRL, OpenRLHF, the Hub) a rewardforge model directory",
                        description="Write a sequence-classification model directory as a rewardforge model directory.")
    im.add_argument("hf_dir", help="a directory saved with save_pretrained (AutoModelForSequenceClassification)")
    im.add_argument("out", help="the model directory to write")
    im.add_argument("--template", default="auto", choices=("auto", "plain", "tokenizer"),
                    help="how conversations are rendered: the tokenizer's chat template (auto, when it has one) or plain "
                    "Human:/Assistant: turns; use the format the model was trained on")
    im.add_argument("--pooling", default="auto", choices=("auto", "last_token", "pooled"), help="where the reward is read")
    im.add_argument("--max-length", type=_positive_int, default=None, help="tokens the model reads (default: the tokenizer's)")
    im.add_argument("--truncation", default="prompt_left", choices=("prompt_left", "response_right"))
    im.add_argument("--data", nargs="+", default=[], metavar="FILE", help="data to measure the reward mean/std on")
    im.add_argument("--attribute-weights", nargs="+", type=float, default=None, help="several outputs: weights of the combined reward")
    im.set_defaults(func=cmd_import)

    s = sub.add_parser("score", help="score JSONL (prompt/response, messages or text) with an exported model")
    s.add_argument("model_dir")
    s.add_argument("--input", help="JSONL file (default: stdin)")
    s.add_argument("--output", help="JSONL file (default: stdout)")
    s.add_argument("--return-text", action="store_true",
                   help="add the text the model read (only the kept part when truncated: tokenizer(text) gives the ids scored)")
    s.add_argument("--return-tokens", action="store_true", help="add the exact token ids the model read")
    s.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per forward pass")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--uncertainty-penalty", type=_nonnegative_float, default=0.0, metavar="LAMBDA",
                   help="ensembles: reward = reward_mean - LAMBDA x reward_std, as `rewardforge serve "
                        "--uncertainty-penalty` (default 0: the members' mean)")
    s.set_defaults(func=cmd_score)

    from rewardforge.serve.config import add_serve_arguments

    v = sub.add_parser("serve", help="serve an exported model over HTTP with dynamic batching",
                       description="Serve MODEL_DIR: POST /v1/score, /get_reward (OpenRLHF), the KServe v2 / Triton "
                       "protocol under /v2 (NeMo-Aligner), /health, /metrics, OpenAPI docs at /docs.")
    v.add_argument("model_dir", help="an exported model directory (with rewardforge.json)")
    add_serve_arguments(v)
    v.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="evaluate models on data: metrics.json, an HTML report with plots, a table",
                        description="Evaluate exported models on pairwise, best-of-N or rated data. Several models are "
                        "compared side by side. Writes OUT/metrics.json, OUT/report.html and OUT/plots/*.png.")
    ev.add_argument("paths", nargs="+", metavar="MODEL_DIR", help="exported model directories (or training output dirs); "
                    "without --data, the data files follow them")
    ev.add_argument("--data", nargs="+", default=[], metavar="FILE", help="data files (.jsonl/.json/.parquet[.gz]), globs or datasets")
    ev.add_argument("--update-card", action="store_true", help="add the evaluation table to each model's README.md (model card)")
    ev.add_argument("--out", default="runs/eval", help="output directory (default: runs/eval)")
    ev.add_argument("--format", default="auto", help="row format (default: detected per file); also best_of_n and lists ({prompt, responses, scores | ranking | best})")
    ev.add_argument("--field-map", action="append", default=[], metavar="OURS=THEIRS[,...]", help="rename columns, e.g. prompt=question")
    ev.add_argument("--subset-field", help="field naming each pair's subset/category (default: subset or category)")
    ev.add_argument("--strength-field", help="numeric preference-strength field (default: margin if present)")
    ev.add_argument("--sections", default="auto", help="auto, none, rewardbench, or a JSON/YAML file {section: [subsets]}")
    ev.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    ev.add_argument("--split", default="train", help="split of a Hugging Face dataset")
    ev.add_argument("--limit", type=int, default=0, help="at most N examples per file (0: all)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ev.add_argument("--bins", type=int, default=10, help="calibration bins")
    ev.add_argument("--top", type=int, default=10, help="disagreeing pairs listed per model comparison")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; rewardforge shows its own progress
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"rewardforge {args.command}: error: {_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # a KeyboardInterrupt carries no message: say what happened
        print(f"rewardforge {args.command}: {str(e) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
