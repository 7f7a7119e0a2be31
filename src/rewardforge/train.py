"""The training recipe: ``setup()`` builds everything, ``train()`` is a plain loop.

Built on ``accelerate`` so the same code runs as one process and under ``torchrun`` /
``accelerate launch``. Chosen and rejected sequences go through the model in one forward pass.

Example:
    >>> from rewardforge.config import load_config
    >>> cfg = load_config("configs/quickstart.yaml")          # doctest: +SKIP
    >>> summary = run_training(cfg)                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewardforge.training.checkpoint import (
    TrainerState,
    list_checkpoints,
    read_config,
    read_state,
    resolve_resume,
    save_checkpoint,
)
from rewardforge.config import Config, ConfigError, config_from_dict, ensure_writable_dir, write_config
from rewardforge.data.batching import BatchSampler
from rewardforge.data.datasets import show_progress, split_by_prompt
from rewardforge.data.mixing import describe_sources, mix_sources
from rewardforge.data.readers import DataError
from rewardforge.data.template import setup_template
from rewardforge.training.distributed import (
    MODEL_STATE_DIR,
    full_model_state,
    grad_norm_value,
    load_model_state,
    resolve_strategy,
    shard_model,
)
from rewardforge.training.validation import pair_verdict, predict
from rewardforge.export.model_dir import prompt_fingerprint, reward_statistics, write_model_dir
from rewardforge.training.faults import fault_point
from rewardforge.models.reward_model import load_tokenizer, set_attention
from rewardforge.data.packing import check_share_prompt, model_kwargs
from rewardforge.training.memory import MemoryReleaser, check_free_space, estimate_memory, peak_rss_mb, rss_mb
from rewardforge.training.precision import MasterWeights, effective_precision, precision_reason
from rewardforge.training.ema import EMA_FILE, WeightAverage
from rewardforge.losses import combine
from rewardforge.registry import ResolvedType, resolve_type


@dataclass
class Run:
    """Everything ``setup`` builds for the loop."""

    cfg: Config
    rtype: ResolvedType  # the reward model type resolved for cfg: loss, data kind, collator, outputs, weights
    accelerator: Any
    tokenizer: Any
    template: str
    model: Any
    optimizer: Any
    scheduler: Any
    train_data: Any
    val_data: Any
    train_sampler: BatchSampler
    collate: Any
    total_steps: int
    steps_per_epoch: int
    data_reports: dict[str, Any] = field(default_factory=dict)
    state: TrainerState = field(default_factory=TrainerState)
    resumed_from: str | None = None
    stop_signal: str | None = None
    precision_reason: str = ""
    progress: bool = False  # progress bars for the phases that take time (validation, export statistics)
    trackers: bool = False  # train.report_to trackers were started (accelerate's init_trackers)
    extra_eval: list = field(default_factory=list)  # eval.datasets, loaded once (main process)
    strategy: str = "single"  # single, ddp or fsdp (rewardforge.training.distributed)
    master: MasterWeights | None = None  # train.precision=bf16_master on one process
    ema: WeightAverage | None = None  # train.ema_decay > 0: the average validated and exported

    def averaged(self):
        """The context validation and export run in: the weight average in the model under
        ``train.ema_decay``, else nothing."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def compute(self):
        """The context forward and backward passes run in: bf16 copies of the weights under
        ``train.precision=bf16_master`` on one process (FSDP casts by itself), else nothing."""
        return self.master.compute() if self.master is not None else contextlib.nullcontext()

    def bare_model(self):
        """The model without accelerate's DDP wrapper (an FSDP model is itself)."""
        return self.accelerator.unwrap_model(self.model) if self.strategy != "fsdp" else self.model

    def bare_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def bare_scheduler(self):
        return getattr(self.scheduler, "scheduler", self.scheduler)


def predict_sharded(run: "Run", data, desc: str = "validate") -> dict[str, Any]:
    """Model outputs for every example of ``data``: each process scores its share, rank 0 gets them all.

    With ``run.progress`` the main process shows a bar (``desc``) over its batches.

    Examples are sharded by batch, never padded with duplicates, so metrics count each example once.
    """
    acc, cfg = run.accelerator, run.cfg
    batches = BatchSampler(data.lengths(), cfg.train.validation_batch_size, shuffle=False).batches()
    mine = batches[acc.process_index :: acc.num_processes]
    if run.strategy == "fsdp" and batches:
        # FSDP's forward gathers weights with the other processes: all must run as many batches.
        # The extra ones repeat a batch of this process; their rows are dropped below by index.
        longest = math.ceil(len(batches) / acc.num_processes)
        mine = mine + [batches[0]] * (longest - len(mine))
    loader = torch.utils.data.DataLoader(data, batch_sampler=mine, collate_fn=run.collate)
    with acc.autocast(), run.compute():
        # The unwrapped module: DDP's forward broadcasts buffers, a collective that processes
        # with fewer validation batches would never join.
        pred = predict(run.bare_model(), loader, progress=run.progress and acc.is_main_process, desc=desc,
                       columns=run.rtype.data.columns)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        parts = [p for p in gather_object([pred]) if p]
        pred = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        if pred:
            # Sorted by example; np.unique keeps each example once (FSDP's repeated batches).
            _, first = np.unique(pred["index"], return_index=True)
            pred = {k: v[first] for k, v in pred.items()}
    return pred


def load_data(cfg: Config, rtype: ResolvedType, tokenizer):
    """Build train and validation datasets and their reports (validation split by prompt hash if not given)."""
    train_all, train_report = rtype.build_dataset(cfg, tokenizer, cfg.data.train)
    reports: dict[str, Any] = {"train": train_report.as_dict()}
    if cfg.data.validation:
        val, val_report = rtype.build_dataset(cfg, tokenizer, cfg.data.validation)
        train = train_all
        reports["validation"] = val_report.as_dict()
    else:
        train, val = split_by_prompt(train_all, cfg.data.validation_fraction, seed=0)
        reports["validation"] = {"split_from_train": True, "fraction": cfg.data.validation_fraction}
    # data.train's weights and fractions: training examples only, after the split (validation is never weighted)
    train, reports["train"]["per_source"] = mix_sources(train, cfg.data.train, cfg.train.seed, train_report.per_source)
    reports["train_examples"], reports["validation_examples"] = len(train), len(val)
    if len(train) == 0:
        r = train_report.as_dict()
        why = ("the files hold no rows" if not r["rows_read"] else
               f"{r['rows_read']} rows read, {r['skipped_bad_rows']} bad rows skipped, excluded {r['excluded'] or 'none'}")
        raise DataError(f"no training examples left after reading {', '.join(map(str, cfg.data.train))}: {why}; "
                        "give data.train files with preference pairs or rated responses")
    if len(val) == 0:
        raise DataError(
            "the validation set is empty; give data.validation or raise data.validation_fraction "
            f"(train has {len(train_all)} examples)"
        )
    return train, val, reports


def estimate_for_config(cfg: Config, processes: int = 1) -> dict[str, float]:
    """:func:`~rewardforge.training.memory.estimate_memory` for a config before launching it: the model is built without its weights.

    ``processes`` matters under ``train.strategy=fsdp`` (states are sharded over them); the
    activations assume sequences of ``data.max_length``, the worst case.
    """
    from rewardforge.models.reward_model import empty_weights

    rtype = resolve_type(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    with empty_weights():
        model = rtype.build_model(cfg, tokenizer)
    shards = processes if cfg.train.strategy == "fsdp" and processes > 1 else 1
    # the precision that launch would train in (auto under DDP: bf16, not bf16_master's extra bf16 copy)
    cfg = replace(cfg, train=replace(cfg.train, precision=effective_precision(cfg, processes)))
    return {"processes": processes, "strategy": cfg.train.strategy, **estimate_memory(model, cfg, cfg.data.max_length, shards=shards)}


def _make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = "bf16" if cfg.train.precision == "bf16" else "no"
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    state = AcceleratorState._shared_state
    if state and single and str(state.get("_mixed_precision", precision)) != precision:
        # accelerate keeps one global state per process; a single process (a notebook, a test session)
        # may train in fp32 and then in bf16, so start a fresh state for the new run.
        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True is what makes accelerate use gloo for several CPU processes under torchrun.
    # The scheduler steps once per optimizer step: our global batch is already split across processes.
    from accelerate.utils import ProjectConfiguration

    trackers = trackers_of(cfg)
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "trackers"))
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False,
                       log_with=trackers or None, project_config=project)


# the package each tracker needs, and the extra that installs it
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def trackers_of(cfg: Config) -> list[str]:
    """``train.report_to`` without ``none``; a tracker whose package is missing is an error naming the extra."""
    import importlib.util

    out = [t for t in cfg.train.report_to if t != "none"]
    for t in out:
        module, extra = TRACKER_PACKAGES[t]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to has {t!r} but the {module} package is not installed; install it with "
                              f"pip install 'rewardforge[{extra}]' (or drop {t} from train.report_to)")
    return out


def _hparams(cfg: Config, reports: dict[str, Any]) -> dict[str, Any]:
    """The resolved config and the data report as flat scalar hyperparameters (what every tracker stores)."""
    out: dict[str, Any] = {}

    def put(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                put(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[prefix] = "" if v is None else v
        else:
            out[prefix] = json.dumps(v, default=str)

    put("", cfg.to_dict())
    for k in ("train_examples", "validation_examples"):
        out[f"data_report.{k}"] = reports.get(k, 0)
    tr = reports.get("train", {})
    out["data_report.rows_read"] = tr.get("rows_read", 0)
    out["data_report.skipped_bad_rows"] = tr.get("skipped_bad_rows", 0)
    for reason, n in (tr.get("excluded") or {}).items():
        out[f"data_report.excluded.{reason}"] = n
    for k, n in (tr.get("truncation") or {}).items():
        out[f"data_report.truncation.{k}"] = n
    return out


def _start_trackers(run: "Run") -> None:
    cfg, acc = run.cfg, run.accelerator
    trackers = trackers_of(cfg)
    if not trackers:
        return
    logdir = Path(cfg.output_dir) / "trackers"
    if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI") and acc.is_main_process:
        import mlflow

        # a local file store under output_dir (MLflow 3 asks for an opt-in to it; a database needs a server's packages)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((logdir / "mlruns").resolve().as_uri())
    init = {"wandb": {"dir": os.environ.get("WANDB_DIR", str(logdir))}} if "wandb" in trackers else {}
    if acc.is_main_process:
        logdir.mkdir(parents=True, exist_ok=True)
    acc.init_trackers(Path(cfg.output_dir).name or "rewardforge", config=_hparams(cfg, run.data_reports), init_kwargs=init)
    run.trackers = True


def setup(cfg: Config, *, accelerator=None) -> Run:
    """Build accelerator, tokenizer, model, data, optimizer and scheduler; restore a checkpoint if asked.

    ``cfg`` is not changed: the run keeps a copy with ``train.precision`` resolved (``auto`` -> what it
    means on this machine), which is what ``config.yaml`` records.
    """
    from accelerate.utils import set_seed

    rtype = resolve_type(cfg)  # the type, its loss, data kind and outputs: resolved once, kept on the run
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    requested, precision = cfg.train.precision, effective_precision(cfg)
    cfg = replace(cfg, train=replace(cfg.train, precision=precision))
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.train.strategy != "fsdp"
    why_precision = precision_reason(requested, precision, device_type="cuda" if torch.cuda.is_available() else "cpu", ddp=ddp)
    accelerator = accelerator or _make_accelerator(cfg)
    strategy = _check_strategy(cfg, accelerator)
    if accelerator.is_main_process:
        ensure_writable_dir(Path(cfg.output_dir), "output_dir")
    set_seed(cfg.train.seed)

    tokenizer, model, template = _setup_model(cfg, rtype, accelerator)
    train_data, val_data, reports, sampler, collate = _setup_data(cfg, rtype, tokenizer, accelerator)
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(sampler.plan(accelerator.num_processes)) / accum))
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    if accelerator.is_main_process:
        check_free_space(Path(cfg.output_dir), sum(p.numel() for p in model.parameters()),
                         sum(p.numel() for p in model.parameters() if p.requires_grad), cfg.train.save_total_limit)
    if strategy == "fsdp":
        model = shard_model(model, cfg, accelerator.device)  # before the optimizer: it must see the shards
    optimizer, scheduler = _setup_optimizer(cfg, model, total)
    if strategy != "fsdp":
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    run = Run(cfg, rtype, accelerator, tokenizer, template, model, optimizer, scheduler, train_data, val_data, sampler,
              collate, total, steps_per_epoch, reports, strategy=strategy, precision_reason=why_precision)
    if precision == "bf16_master" and strategy == "single":
        run.master = MasterWeights(run.bare_model(), keep_fp32=(run.bare_model().head(),))
    if cfg.train.ema_decay > 0:
        run.ema = WeightAverage(run.bare_model(), cfg.train.ema_decay)
    _start_trackers(run)
    if cfg.eval.datasets and accelerator.is_main_process:
        from rewardforge.eval.data import load_eval_data

        names = rtype.output_names
        run.extra_eval = load_eval_data(list(cfg.eval.datasets), attributes=names if len(names) > 1 else None,
                                        subset_field=cfg.eval.subset_field or None)
    _restore(run)
    return run


def _check_strategy(cfg: Config, accelerator) -> str:
    """The distributed strategy of this launch, and the settings it cannot run with."""
    strategy = resolve_strategy(cfg, accelerator)
    if strategy == "ddp" and cfg.train.precision == "bf16_master":
        raise ConfigError("train.precision=bf16_master runs on one process or with train.strategy=fsdp (FSDP's "
                          "mixed-precision policy); with DDP use train.precision=bf16 or set train.strategy=fsdp")
    if strategy == "fsdp" and cfg.train.ema_decay:
        raise ConfigError("train.ema_decay is not supported with train.strategy=fsdp (its parameters are sharded); "
                          "use train.strategy=ddp or set train.ema_decay=0")
    if strategy == "fsdp" and cfg.eval.datasets:
        raise ConfigError("eval.datasets is not supported with train.strategy=fsdp; evaluate the export with `rewardforge eval`")
    return strategy


def _setup_model(cfg: Config, rtype: ResolvedType, accelerator):
    """Tokenizer, reward model (attention kernel set) and the installed template."""
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    model = rtype.build_model(cfg, tokenizer)  # may add a pad token: data is tokenized after this
    set_attention(model, cfg.model.attn_implementation, cfg.train.precision, accelerator.device)
    if cfg.train.share_prompt:
        rtype.packed_collator(tokenizer.pad_token_id)  # a data kind without shared-prompt packing: the error and its fix
        check_share_prompt(model)
    return tokenizer, model, setup_template(tokenizer, cfg.data.template)


def _setup_data(cfg: Config, rtype: ResolvedType, tokenizer, accelerator):
    """Train and validation datasets with their reports, the training batch sampler and the collator."""
    with accelerator.main_process_first():  # the others then read the tokenization cache it wrote
        train_data, val_data, reports = load_data(cfg, rtype, tokenizer)
    collate = rtype.packed_collator(tokenizer.pad_token_id) if cfg.train.share_prompt else rtype.collator(tokenizer.pad_token_id)
    sampler = BatchSampler(
        train_data.lengths(), cfg.train.batch_size, shuffle=True, group_by_length=cfg.data.group_by_length, seed=cfg.train.seed
    )
    return train_data, val_data, reports, sampler, collate


def _setup_optimizer(cfg: Config, model, total_steps: int):
    """AdamW (no weight decay on biases and norms; the head at train.head_lr_multiplier times the rate) and the schedule."""
    from transformers import get_scheduler

    lr, head_lr = cfg.train.learning_rate, cfg.train.learning_rate * cfg.train.head_lr_multiplier
    head = {id(p) for p in model.head().parameters()}
    groups: dict[tuple[bool, bool], list] = {(h, d): [] for h in (False, True) for d in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in head and head_lr != lr, p.ndim >= 2)].append(p)
    if not any(groups.values()):
        raise ConfigError("no trainable parameters: lower model.freeze_layers_fraction")
    params = [p for g in groups.values() for p in g]
    # The fused kernel steps all tensors at once (3x faster than per-tensor on CPU; TRL uses it too).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        [{"params": g, "weight_decay": cfg.train.weight_decay if d else 0.0, "lr": head_lr if h else lr}
         for (h, d), g in groups.items() if g or not h],
        lr=lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps, fused=fused,
    )
    sched_name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.lr_scheduler]
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def _restore(run: Run) -> None:
    """Resume from ``train.resume_from`` when it names a checkpoint (or ``auto`` finds one)."""
    cfg, accelerator = run.cfg, run.accelerator
    ckpt = resolve_resume(cfg.train.resume_from, Path(cfg.output_dir))
    if ckpt is None:
        return
    run.state, saved_world, saved_batch = read_state(ckpt)
    _load_state(run, ckpt)
    run.resumed_from = str(ckpt)
    global_batch = cfg.train.batch_size * accelerator.num_processes
    if saved_batch != global_batch:
        # Another global batch size gives another plan: keep the position in examples.
        run.state.batch_in_epoch = run.state.batch_in_epoch * saved_batch // global_batch
    if saved_world != accelerator.num_processes and accelerator.is_main_process:
        print(f"resuming a {saved_world}-process checkpoint with {accelerator.num_processes} processes "
              f"(global batch {saved_batch} -> {global_batch}); processes without a saved RNG stream get a fresh one")
    if accelerator.is_main_process:
        changed = config_changes(ckpt, cfg)
        print(f"resumed from {ckpt} at step {run.state.step} (epoch {run.state.epoch})"
              + (f"; changed since that checkpoint: {', '.join(changed)}" if changed else ""))


def config_changes(ckpt: Path, cfg: Config) -> list[str]:
    """``key old -> new`` for every setting that differs from the checkpoint's config.yaml (resume_from aside)."""
    from rewardforge.training.checkpoint import read_config

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and k in ("model", "data", "loss", "train", "eval"):
                out.update(flat(v, f"{k}."))
            else:
                out[prefix + k] = v
        return out

    try:
        old = flat(read_config(ckpt))
    except Exception:  # noqa: BLE001 - an unreadable saved config: nothing to compare
        return []
    new = flat(cfg.to_dict())
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(new) if k in old and old[k] != new[k] and k != "train.resume_from"]


def _load_state(run: Run, ckpt: Path) -> None:
    """Load model, optimizer, scheduler and this process's RNG stream.

    Weights and optimizer state are resharded to this run's processes and strategy. A process that
    has no saved stream (the run grew) gets a fresh one seeded from its rank.
    """
    from accelerate.checkpointing import load_accelerator_state
    from accelerate.utils import set_seed

    acc = run.accelerator
    if not (ckpt / MODEL_STATE_DIR).is_dir():
        raise ConfigError(f"{ckpt} has no {MODEL_STATE_DIR}/ (written by an older rewardforge?); it cannot be resumed")
    load_model_state(ckpt / MODEL_STATE_DIR, run.bare_model(), run.bare_optimizer())
    # accelerate skips a missing random_states_{rank}.pkl
    load_accelerator_state(str(ckpt), [], [], [run.bare_scheduler()], [], acc.process_index)
    if not (ckpt / f"random_states_{acc.process_index}.pkl").is_file():
        set_seed(run.cfg.train.seed + acc.process_index)
    if run.ema is not None:
        run.ema.load(ckpt / EMA_FILE)


def _log(run: Run, record: dict[str, Any]) -> None:
    """One record to metrics.jsonl, and its numbers to the trackers (``split/name`` at the record's step).
    Every record gets this process's resident memory now and at its peak (MiB)."""
    record = {**record, "rss_mb": round(rss_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if run.accelerator.is_main_process:
        with open(Path(run.cfg.output_dir) / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
    if run.trackers:
        split = record.get("split", "train")
        values: dict[str, float] = {}
        for k, v in record.items():
            if k in ("step", "split", "final"):
                continue
            if isinstance(v, dict):  # per-attribute or per-dataset metrics: one level down
                values.update({f"{split}/{k}/{a}": float(x) for a, x in v.items()
                               if isinstance(x, (int, float)) and not isinstance(x, bool)})
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"{split}/{k}"] = float(v)
        run.accelerator.log(values, step=int(record.get("step", 0)))


def validate(run: Run) -> dict[str, Any]:
    return run.rtype.metrics(predict_sharded(run, run.val_data))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``, returning the total norm before clipping as a float, without
    the scaling pass when it would multiply every gradient by exactly 1 (norm within ``max_norm``).
    That pass reads and writes all gradients (~4 ms of a MiniLM step here); the norm is read on the
    host every step anyway, so skipping it costs no extra synchronisation. DTensor (FSDP) gradients
    work as in torch's own function."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    value = grad_norm_value(norm)
    if max_norm / (value + 1e-6) < 1.0:  # torch's clip coefficient, applied only when it is below 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return value


def train(run: Run, *, progress: bool = True) -> dict[str, Any]:
    """The loop: for each optimizer step, run its micro-batches (forward, loss, backward), then clip and step.

    One optimizer step consumes ``gradient_accumulation_steps`` global micro-steps; a global
    micro-step gives each process one batch of the shared plan. Each process scales its loss by
    ``local_pairs * world_size / window_pairs`` so that the gradient (averaged over processes by DDP)
    is exactly the mean over every pair of the step, whatever the number of processes, and a process
    left without a batch at the end of an epoch contributes zero.
    """
    from tqdm.auto import tqdm

    cfg, acc, model, st = run.cfg, run.accelerator, run.model, run.state
    accum = cfg.train.gradient_accumulation_steps
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    window: dict[str, float] = {}
    t_start = time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=st.step, desc="train", disable=not progress or not acc.is_main_process, dynamic_ncols=True)
    releaser = MemoryReleaser(cfg.train.malloc_trim_steps, cfg.train.malloc_trim_growth)
    model.train()
    while st.step < run.total_steps:
        run.train_sampler.set_epoch(st.epoch)
        plan = run.train_sampler.plan(acc.num_processes)
        group = st.batch_in_epoch  # global micro-steps done in this epoch
        while group < len(plan) and st.step < run.total_steps:
            steps = plan[group : group + accum]
            step_stats, window_pairs, bad = _forward_backward(run, steps, first=group)
            group += len(steps)
            st.batch_in_epoch = group
            st.examples_seen += window_pairs
            # The gradient norm is global (gradients are already averaged), so every process agrees on it.
            grad_norm = clip_gradients(list(model.parameters()), max_norm)
            if not math.isfinite(grad_norm):
                _skip_step(run, bar, bad or f"gradient norm {grad_norm}",
                           f"at step {st.step + 1} (epoch {st.epoch}, batches {group - len(steps)}-{group - 1})")
                continue
            fault_point("train_step")
            run.optimizer.step()
            if run.ema is not None:
                run.ema.update()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            for k, v in step_stats.items():
                window[k] = window.get(k, 0.0) + v
            window["steps"] = window.get("steps", 0) + 1
            bar.update(1)
            bar.set_postfix({**{k: f"{window[k] / max(window['_share'], 1e-12):.3f}" for k in ("loss", "accuracy") if k in window},
                             "rss_mb": f"{rss_mb():.0f}"})
            if cfg.train.log_steps and st.step % cfg.train.log_steps == 0:
                _log_window(run, window, grad_norm, time.perf_counter() - t_start)
                window = {}
            releaser.after_step(st.step)  # after the step's RSS is logged: the log shows what was held before
            _after_step(run, bar)
        if group >= len(plan):
            st.epoch += 1
            st.batch_in_epoch = 0
    bar.close()
    return {"train_seconds": time.perf_counter() - t_start,
            "memory_releases": {"total": releaser.released, "by_growth": releaser.by_growth}}


def _forward_backward(run: Run, steps: list, first: int) -> tuple[dict[str, float], int, str | None]:
    """Forward, loss and backward of one optimizer step's micro-batches (``steps``: global micro-steps, each a
    batch per process). Returns the step's statistics weighted by each batch's share of the step's pairs
    (summed over this process), the pairs of the step, and the first non-finite loss met (or None)."""
    cfg, acc, model, st = run.cfg, run.accelerator, run.model, run.state
    world, rank = acc.num_processes, acc.process_index
    window_pairs = sum(len(b) for g in steps for b in g)
    bad: str | None = None
    stats_sum: dict[str, float] = {}
    for i, g in enumerate(steps):
        mine = g[rank] if rank < len(g) else None
        idx = mine if mine else next(b for b in g if b)[:1]  # no batch left here: one pair at weight 0
        scale = len(mine) * world / window_pairs if mine else 0.0
        batch = run.collate([run.train_data[j] for j in idx])
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        # FSDP reduce-scatters every micro-batch (its gradients are sharded, not accumulated whole).
        ctx = acc.no_sync(model) if i < len(steps) - 1 and run.strategy == "ddp" else contextlib.nullcontext()
        with ctx, run.compute():
            with acc.autocast():
                outputs = model(batch["input_ids"], batch["attention_mask"], **model_kwargs(batch))
                loss, stats = run.rtype.loss_fn(outputs, batch, cfg)
            if not torch.isfinite(loss) and bad is None:
                bad = f"loss {loss.item()} on batch {first + i} of epoch {st.epoch} (process {rank}, examples {idx[:8]})"
            acc.backward(loss * scale)
        share = len(mine) / window_pairs * world if mine else 0.0
        stats_sum["_share"] = stats_sum.get("_share", 0.0) + share
        stats_sum["loss"] = stats_sum.get("loss", 0.0) + loss.item() * share
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * share
    return stats_sum, window_pairs, bad


def _skip_step(run: Run, bar, what: str, where: str) -> None:
    """A non-finite loss or gradient: drop the step's gradients, then stop (``train.nonfinite=stop``, or too
    many skipped) naming the last good checkpoint, or skip the step and log it."""
    cfg, st = run.cfg, run.state
    run.optimizer.zero_grad(set_to_none=True)
    if cfg.train.nonfinite == "stop" or st.skipped_steps >= cfg.train.max_skipped_steps:
        last = list_checkpoints(cfg.output_dir)
        raise FloatingPointError(
            f"non-finite {what} {where}; stopping. The last good checkpoint is "
            f"{last[-1] if last else 'none (no checkpoint saved yet)'}. Lower train.learning_rate, "
            "check the data, or set train.nonfinite=skip to skip such steps"
        )
    st.skipped_steps += 1
    _log(run, {"step": st.step, "epoch": st.epoch, "split": "train", "skipped": True, "reason": f"non-finite {what} {where}"})
    if run.accelerator.is_main_process:
        bar.write(f"skipped optimizer step: non-finite {what} {where}")


def _log_window(run: Run, window: dict[str, float], grad_norm: float, elapsed: float) -> None:
    """The means of the steps since the last log line, over every process, to metrics.jsonl and the trackers."""
    acc, st, world = run.accelerator, run.state, run.accelerator.num_processes
    n = window.pop("steps")
    window.pop("_share", None)
    means = {k: v / n / world for k, v in window.items()}
    if world > 1:  # every process's share, summed
        means = {k: float(acc.reduce(torch.tensor(v, device=acc.device), reduction="sum")) for k, v in means.items()}
    _log(run, {"step": st.step, "epoch": st.epoch, "split": "train", "lr": run.scheduler.get_last_lr()[0], **means,
               "examples_seen": st.examples_seen, "elapsed_s": elapsed, "grad_norm": grad_norm})


def _after_step(run: Run, bar) -> None:
    """Validation, extra evaluation and checkpoints when their step comes; a requested stop saves and raises."""
    cfg, st, acc = run.cfg, run.state, run.accelerator
    if cfg.train.eval_steps and st.step % cfg.train.eval_steps == 0 and st.step < run.total_steps:
        with run.averaged():
            val = validate(run)
            _log(run, {"step": st.step, "epoch": st.epoch, "split": "validation", **val})
            if acc.is_main_process:
                bar.write(_format_val(st.step, val))
            evaluate_extra(run)
    if cfg.train.save_steps and st.step % cfg.train.save_steps == 0 and st.step < run.total_steps:
        _save(run)
    if _stop_requested(run):
        path = _save(run)
        bar.close()
        raise TrainingInterrupted(
            f"stopped by {run.stop_signal or 'a signal on another process'} after step {st.step}; checkpoint saved to "
            f"{path}. Resume with train.resume_from=auto"
        )


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: a checkpoint was saved at the end of the current step."""


def _stop_requested(run: Run) -> bool:
    flag = torch.tensor(1 if run.stop_signal else 0, device=run.accelerator.device)
    if run.accelerator.num_processes > 1:  # every process must agree on when to stop and save
        flag = run.accelerator.reduce(flag, reduction="sum")
    return bool(flag.item())


class _stop_on_signals:
    """While training, SIGINT/SIGTERM ask the loop to checkpoint and stop at the end of the step."""

    def __init__(self, run: Run):
        self.run, self.old = run, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.run.stop_signal:  # a second signal: stop now
            raise KeyboardInterrupt
        self.run.stop_signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


def evaluate_extra(run: Run) -> dict[str, float]:
    """Score ``eval.datasets`` with the live model (main process) and log them as split ``eval``."""
    if not run.extra_eval:
        return {}
    from rewardforge.eval.runner import evaluate_pairs_during_training
    from rewardforge.eval.scores import scorer_from_model

    cfg = run.cfg
    scorer = scorer_from_model(
        run.bare_model(), run.tokenizer, max_length=cfg.data.max_length, truncation=cfg.data.truncation,
        attributes=run.rtype.output_names if len(run.rtype.output_names) > 1 else None, attribute_weights=run.rtype.weights,
        batch_size=cfg.train.validation_batch_size, ensemble_size=run.rtype.ensemble_size,
    )
    with run.accelerator.autocast(), run.compute():
        metrics = evaluate_pairs_during_training(scorer, run.extra_eval, subset_field=cfg.eval.subset_field or None)
    _log(run, {"step": run.state.step, "epoch": run.state.epoch, "split": "eval", **metrics})
    return metrics


def _format_val(step: int, m: dict[str, Any]) -> str:
    if "lists" in m and "accuracy" in m:
        return (f"step {step}: validation pairwise accuracy {m['accuracy']:.4f} ({m['pairs']} pairs in {m['lists']} lists), "
                f"top-1 {m['top1']:.4f}, Kendall tau {m['kendall_tau'] if m['kendall_tau'] is not None else float('nan'):.3f}, "
                f"NDCG {m['ndcg'] if m['ndcg'] is not None else float('nan'):.4f}")
    if "accuracy" in m:
        return f"step {step}: validation accuracy {m['accuracy']:.4f}, loss {m['loss']:.4f}, margin {m['mean_margin']:.3f} ({m['pairs']} pairs)"
    return f"step {step}: validation mse {m.get('mse', float('nan')):.4f}, mae {m.get('mae', float('nan')):.4f}, pearson {m.get('pearson', float('nan')):.3f}"


def _save(run: Run) -> Path:
    return save_checkpoint(run.accelerator, run.cfg.output_dir, run.state, run.cfg.to_dict(), run.tokenizer,
                           model=run.bare_model(), optimizer=run.bare_optimizer(), scheduler=run.bare_scheduler(),
                           strategy=run.strategy, keep=run.cfg.train.save_total_limit,
                           tensors={EMA_FILE: run.ema.state_dict()} if run.ema is not None else None)


def export_run(run: Run, out_dir: str | Path | None = None, pred: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Compute reward statistics on the validation set and write the model directory.

    ``pred`` are the final model's validation predictions when the caller has them already.
    Called by every process; only the main process writes.
    """
    with run.averaged():
        return _export(run, out_dir, pred)


def _export(run: Run, out_dir: str | Path | None, pred: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    cfg = run.cfg
    if pred is None:
        pred = predict_sharded(run, run.val_data, desc="export statistics")
    stats = reward_statistics(run.rtype.mean_predictions(pred), run.rtype.weights)  # of the ensemble's mean
    stats["reward_stats_source"] = f"validation set ({stats['sequences']} sequences)"
    path = Path(out_dir or Path(cfg.output_dir) / "model")
    model = run.bare_model()
    if run.strategy == "fsdp":
        full = full_model_state(model)  # collective; the main process gets the whole state
        if run.accelerator.is_main_process:
            model = run.rtype.build_model(cfg, run.tokenizer)
            model.load_state_dict(full)
    if run.accelerator.is_main_process:
        write_model_dir(
            model, run.tokenizer, path, reward_model_type=cfg.model.reward_model_type,
            attributes=run.rtype.output_names, attribute_weights=run.rtype.weights, max_length=cfg.data.max_length,
            truncation=cfg.data.truncation, template=run.template, stats=stats, base_model=cfg.model.name_or_path,
            save_adapter=cfg.model.lora_save_adapter, ensemble=run.rtype.ensemble_metadata(cfg),
            prompt_fingerprint=prompt_fingerprint(run.train_data.prompt_keys, run.val_data.prompt_keys),
            card_info={"validation": run.rtype.metrics(pred) if pred else None,
                       "data": run.data_reports, "sources": [str(e) for e in cfg.data.train]},
        )
    run.accelerator.wait_for_everyone()
    return path, stats


def run_training(cfg: Config, *, progress: bool = True, export: bool = True) -> dict[str, Any]:
    """Train, validate, checkpoint and export; write ``summary.json``; return the summary."""
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    existed = out.exists()
    try:
        with show_progress(progress):
            run = setup(cfg)
        run.progress = progress
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):  # a run that never started leaves no empty folder
            out.rmdir()
        raise
    cfg, acc = run.cfg, run.accelerator  # the run's copy: train.precision resolved
    memory = _start(run, progress)
    with _stop_on_signals(run):
        timing = train(run, progress=progress)
    with run.averaged():  # the final metrics and the export's statistics (train.ema_decay: of the average)
        final_pred = predict_sharded(run, run.val_data, desc="final validation")
        final = run.rtype.metrics(final_pred)
        _log(run, {"step": run.state.step, "epoch": run.state.epoch, "split": "validation", "final": True, **final})
        extra = evaluate_extra(run)
    verdict = None
    if "chosen" in final_pred and len(run.val_data):
        mean_pred = run.rtype.mean_predictions(final_pred)
        c, r = combine(mean_pred["chosen"], run.rtype.weights), combine(mean_pred["rejected"], run.rtype.weights)
        verdict = pair_verdict(c, r, [len(x) for x in run.val_data.chosen], [len(x) for x in run.val_data.rejected])
    if acc.is_main_process and progress:
        _print_final(run, final, verdict)
    if cfg.train.save_steps:
        _save(run)
    summary: dict[str, Any] = {
        "reward_model_type": cfg.model.reward_model_type,
        "loss": run.rtype.loss_name,
        "steps": run.state.step,
        "epochs_completed": run.state.epoch,
        "examples_seen": run.state.examples_seen,
        "validated_weights": f"exponential moving average (train.ema_decay={cfg.train.ema_decay})" if run.ema else "last",
        "resumed_from": run.resumed_from,
        "final_validation": final,
        "validation_verdict": verdict,
        "data_formats": run.data_reports["train"].get("formats", {}),
        "final_eval": extra,
        "data": run.data_reports,
        "memory_estimate": memory,
        "peak_rss_mb": round(peak_rss_mb(), 1),  # this process's, training and final validation included
    }
    if export:
        summary.update(_export_and_next(run, final_pred, progress))
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["train_seconds"] = timing["train_seconds"]
    summary["memory_releases"] = timing["memory_releases"]  # malloc_trim calls of this process (this session)
    summary["examples_per_second"] = run.state.examples_seen / max(timing["train_seconds"], 1e-9)
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if run.trackers:
        acc.end_training()
    return summary


def _start(run: Run, progress: bool) -> dict[str, Any]:
    """Write the resolved config.yaml and say what is about to run: data, strategy, precision, model and memory."""
    cfg, acc = run.cfg, run.accelerator
    lengths = run.train_data.lengths()
    memory = estimate_memory(run.bare_model(), cfg, int(min(cfg.data.max_length, lengths.max() if len(lengths) else 1)),
                             shards=acc.num_processes if run.strategy == "fsdp" else 1)
    if acc.is_main_process:
        write_config(cfg, cfg.output_dir)  # the resolved config (train.precision as this run trains)
        _print_data(run)
        print(f"strategy: {run.strategy} on {acc.num_processes} process(es), device {acc.device}, precision {cfg.train.precision} "
              f"({run.precision_reason})")
        if run.bare_model().pooling == "mean":
            print("note: model.pooling=mean: the export's reward is read by rewardforge.load, rewardforge serve and the "
                  "TRL/verl integrations; plain transformers (AutoModelForSequenceClassification) would read the pooled "
                  "first token instead and give other rewards (rewardforge.json: plain_transformers_reward false)")
        if run.bare_model().members:
            print(f"note: model.ensemble_members=lora: {len(run.bare_model().members)} LoRA members, one backbone forward "
                  "pass each a step; the export is the base model plus adapters/member_k (peft), read by rewardforge.load, "
                  "rewardforge serve and the TRL/verl integrations, not by plain transformers alone")
        if progress:
            print(f"model: {memory['parameters'] / 1e6:.1f}M parameters ({memory['trainable_parameters'] / 1e6:.1f}M trainable); "
                  f"estimated peak memory per process {memory['total_gib']:.2f} GiB (weights {memory['weights_gib']:.2f}, "
                  f"grads+AdamW {memory['grads_and_optimizer_gib']:.2f}, activations {memory['activations_gib']:.2f})")
    return memory


def _print_final(run: Run, final: dict[str, Any], verdict: dict[str, Any] | None) -> None:
    print(_format_val(run.state.step, final))
    if verdict:
        b = verdict["length_baseline"]
        print(f"validation accuracy {verdict['accuracy']:.4f} (95% interval {verdict['ci95'][0]:.3f}-{verdict['ci95'][1]:.3f}, "
              f"{verdict['pairs']} pairs): {verdict['verdict']}; 'pick the longer response' gets {b['accuracy']:.4f} on "
              f"the same pairs (McNemar p {b['mcnemar_p']:.3g})")


def _export_and_next(run: Run, final_pred: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Export the model; the summary's ``export`` and ``next`` (the commands for this run's model)."""
    path, stats = export_run(run, pred=final_pred)
    nxt = {
        "score": f"echo '{{\"prompt\": \"...\", \"response\": \"...\"}}' | rewardforge score {path}",
        "eval": f"rewardforge eval {path} --data FILE --out {Path(run.cfg.output_dir) / 'eval'}",
        "serve": f"rewardforge serve {path} --port 8000",
    }
    if run.accelerator.is_main_process and progress:
        print(f"exported {path}; next: rewardforge score {path} | rewardforge eval {path} --data FILE | "
              f"rewardforge serve {path}")
    return {"export": {"path": str(path), **{k: stats[k] for k in ("reward_mean", "reward_std", "sequences")}}, "next": nxt}


def _print_data(run: Run) -> None:
    r = run.data_reports
    tr = r["train"]
    print(
        f"data: {r['train_examples']} train / {r['validation_examples']} validation examples from {tr['rows_read']} rows"
        f"{' (cached)' if tr.get('from_cache') else ''}; excluded {tr['excluded'] or 'none'}; "
        f"bad rows skipped {tr['skipped_bad_rows']}; truncated sequences: prompt {tr['truncation'].get('truncated_prompt', 0)}, "
        f"response {tr['truncation'].get('truncated_response', 0)}"
    )
    for line in describe_sources(tr.get("per_source") or []):
        print(line)
    formats = sorted(set((tr.get("formats") or {}).values()))
    if formats:
        print(f"data format: {', '.join(formats)}")
    n_val = r["validation_examples"]
    if n_val < 100:
        print(f"warning: only {n_val} validation examples: an accuracy measured on them has a 95% interval about "
              f"±{1.96 * math.sqrt(0.25 / max(n_val, 1)):.2f} wide; give data.validation or raise data.validation_fraction")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Rebuild the model from a checkpoint (its config, tokenizer and weights) and export it."""
    from accelerate import Accelerator

    checkpoint = Path(checkpoint)
    raw = read_config(checkpoint)
    raw.setdefault("train", {})["resume_from"] = str(checkpoint)
    raw["train"]["max_steps"] = raw["train"].get("max_steps", 0)
    cfg = config_from_dict(raw)
    run = setup(cfg, accelerator=Accelerator(cpu=not torch.cuda.is_available()))
    path, _ = export_run(run, out_dir)
    return path
