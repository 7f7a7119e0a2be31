#!/usr/bin/env python
"""Side-by-side training benchmark: rewardforge vs TRL's ``RewardTrainer`` on the same HH-RLHF pairs.

What it does, in one run (each trainer in a cold child process, one after the other):

1. selects ``--pairs`` training and ``--val-pairs`` validation pairs from HH-RLHF (default: the
   harmless-base file in ``../shared/data/hh_rlhf``), split by a hash of the shared prompt so no prompt
   is on both sides; pairs whose chosen and rejected texts are identical carry no preference and are
   left out of the selection for both trainers (counted in the output);
2. measures this machine's matmul peak (a square fp32 GEMM, ``--gemm-size``, best of several reps);
3. trains with TRL (``trl.RewardTrainer``), then with rewardforge (``setup()`` + ``train()``), and then
   (unless ``--skip-kept``) rewardforge again on only the pairs TRL kept, each from a cold process with
   the same backbone, batch size, learning rate, epochs, max length, optimizer, schedule, seed and threads;
4. scores both trained models on the same validation pairs with the same code path
   (``rewardforge.scoring.RewardScorer.score_rendered``: tokenize, truncate ``prompt_left`` to max_length,
   length-sorted batches of 16) -- each model reads its reward the way it was trained (rewardforge: its
   exported ``rewardforge.json`` pooling; TRL: the plain transformers sequence-classification logits) on
   the text each was trained on (rewardforge: its rendered template; TRL: the raw HH text + EOS);
5. times rewardforge's scoring against its training forward pass, per sequence and per token;
6. prints one table and writes everything to ``--out`` (JSON).

Timing: "train time" is the training loop only (TRL: ``trainer.train()``; rewardforge: ``train(run)``);
model load and preprocessing are measured and reported separately. Peak memory is the child's
``ru_maxrss`` (whole process: load + preprocessing + training).

FLOPs (documented convention, as in Kaplan et al. / PaLM's MFU): per sequence of L real tokens,
    forward  = 2 * N * L + 4 * n_layers * d_model * L^2      (N = weights of the nn.Linear layers inside
                                                               the transformer blocks; attention scores
                                                               QK^T and AV counted in full, not halved
                                                               for causal masks)
    training = forward + backward, backward = 2x forward for every block that needs gradients;
               blocks below the lowest trainable block are forward only (frozen-layer adjustment).
Embeddings (lookups), layer norms, the pooler and the 1-output head are left out (< 1%).
"model FLOPs" count real tokens only, for the full model (the same count for both trainers, so the
MFU ratio is the work ratio). "computed FLOPs" count what the batches actually computed: padding
included, and with rewardforge's ``model.sparse_last_layer`` the last layer's query, output and MLP
weights at the read token only (its keys and values, 2 of 12 d^2 per token in BERT, at every token),
and its attention for one query. MFU = model FLOPs / train time / measured GEMM peak; the roofline
("pairs/s at 100% peak") uses the computed FLOPs of the real tokens.

TRL is a benchmark-only dependency (``pip install trl``). Usage (from the project root):

    python bench/train_vs_trl.py                              # MiniLM, 400 pairs, max_length 256
    python bench/train_vs_trl.py --backbone tiny-qwen2 --pairs 200
    python bench/train_vs_trl.py --skip-trl --pairs 1000      # rewardforge only
    python bench/train_vs_trl.py --skip-trl --skip-kept --profile --precision bf16_master   # + where a step's time goes
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh_rlhf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
BACKBONES = ("minilm", "tiny-qwen2", "tiny-llama")


# ---------------------------------------------------------------------------- small helpers


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # no /proc on this system: fall back below
        pass
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def measure_gemm_peak(threads: int, size: int = 2048, reps: int = 5, iters: int = 8, dtype: str = "fp32") -> dict[str, Any]:
    """Best achieved FLOP/s of ``torch.matmul`` on two size x size matrices (best of ``reps``)."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dt)
    b = torch.randn(size, size, generator=g).to(dt)
    for _ in range(2):
        torch.matmul(a, b)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        rates.append(2 * size**3 * iters / (time.perf_counter() - t))
    return {"dtype": dtype, "size": size, "threads": threads, "best_flops": max(rates), "median_flops": sorted(rates)[len(rates) // 2]}


def model_flop_profile(model) -> dict[str, Any]:
    """Per-block matmul weights, hidden size and which blocks need a backward pass (for the FLOP formula)."""
    import torch

    from rewardforge.models.reward_model import transformer_layers

    hf = model
    while hasattr(hf, "model") and not hasattr(hf, "config"):
        hf = hf.model
    if hasattr(hf, "hf"):
        hf = hf.hf
    cfg = hf.config
    n_layers = getattr(cfg, "num_hidden_layers", None)
    layers = transformer_layers(hf, n_layers)
    if layers is None:
        raise RuntimeError("cannot find the transformer blocks for the FLOP count")
    per_layer, trainable = [], []
    for layer in layers:
        per_layer.append(sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)))
        trainable.append(any(p.requires_grad for p in layer.parameters()))
    layer_ids = {id(p) for p in layers.parameters()}
    below_trainable = any(p.requires_grad for n, p in hf.named_parameters() if "embed" in n and id(p) not in layer_ids)
    # A block needs input gradients (backward through its activations) when it or any lower block,
    # or the embeddings, is trainable; weight gradients only when it is trainable itself.
    need_input_grad, seen = [], below_trainable
    for t in trainable:
        seen = seen or t
        need_input_grad.append(seen)
    hidden = getattr(cfg.get_text_config(), "hidden_size", None) or getattr(cfg, "d_model")
    # rewardforge's sparse last layer: keys and values at every token, the rest at the read token only
    sparse_kv = None
    if getattr(model, "sparse_last_layer", False):
        sparse_kv = sum(m.weight.numel() for n, m in layers[-1].named_modules()
                        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("key", "value", "k_proj", "v_proj"))
    return {"linear_params_per_layer": per_layer, "trainable": trainable, "needs_backward": need_input_grad,
            "hidden_size": int(hidden), "n_layers": len(per_layer), "block_linear_params": int(sum(per_layer)),
            "sparse_last_layer_kv_params": sparse_kv}


def sequence_flops(prof: dict[str, Any], L: int, training: bool = True, computed: bool = False) -> float:
    """FLOPs of one sequence of L tokens (see the module docstring for the formula); ``computed``:
    what the trainer runs (the sparse last layer reads one token), else the full model's count."""
    d = prof["hidden_size"]
    kv = prof.get("sparse_last_layer_kv_params") if computed else None
    n = len(prof["linear_params_per_layer"])
    total = 0.0
    for i, (p, tr, need) in enumerate(zip(prof["linear_params_per_layer"], prof["trainable"], prof["needs_backward"])):
        if kv is not None and i == n - 1:
            lin, att = 2.0 * (kv * L + (p - kv)), 4.0 * d * L
        else:
            lin, att = 2.0 * p * L, 4.0 * d * L * L
        total += lin + att
        if training:
            if tr:
                total += lin  # weight gradients
            if need:
                total += lin + 2.0 * att  # activation gradients (through the matmuls and attention)
    return total



class TokenCounter:
    """Wraps a collate function; counts sequences, real and padded tokens and FLOPs of every batch."""

    def __init__(self, fn):
        self.fn = fn
        self.active = True
        self.batches = 0
        self.sequences = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.lengths: list[list[int]] = []  # per batch: real lengths; padded length = max

    def __call__(self, *a, **k):
        out = self.fn(*a, **k)
        if self.active:
            mask = out["attention_mask"]
            lens = mask.sum(-1).tolist()
            self.batches += 1
            self.sequences += len(lens)
            self.real_tokens += int(sum(lens))
            self.padded_tokens += int(mask.numel())
            self.lengths.append([int(x) for x in lens] + [int(mask.shape[1])])
        return out

    def flops(self, prof: dict[str, Any]) -> tuple[float, float, float]:
        """(model FLOPs on real tokens, FLOPs computed including padding, FLOPs computed on real tokens)."""
        real = padded = computed_real = 0.0
        for row in self.lengths:
            lens, width = row[:-1], row[-1]
            real += sum(sequence_flops(prof, L) for L in lens)
            computed_real += sum(sequence_flops(prof, L, computed=True) for L in lens)
            padded += len(lens) * sequence_flops(prof, width, computed=True)
        return real, padded, computed_real


class ForwardTimer:
    """Forward-pass wall time and sequences, from module hooks (training mode only)."""

    def __init__(self, module):
        self.seconds = 0.0
        self.calls = 0
        self.sequences = 0
        self.active = True
        self._t = 0.0
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, mod, args, kwargs):
        if self.active and mod.training:
            self._t = time.perf_counter()

    def _post(self, mod, args, kwargs, out):
        if self.active and mod.training:
            self.seconds += time.perf_counter() - self._t
            self.calls += 1
            ids = args[0] if args else kwargs.get("input_ids")
            self.sequences += int(ids.shape[0])


def read_hh(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def hh_prompt_end(chosen: str, rejected: str) -> int:
    """Character where the responses start: the end of the last shared '\\n\\nAssistant:' marker."""
    n = 0
    m = min(len(chosen), len(rejected))
    while n < m and chosen[n] == rejected[n]:
        n += 1
    marker = "\n\nAssistant:"
    i = chosen.rfind(marker, 0, n)
    if i < 0:
        return n
    j = i + len(marker)
    if j < len(chosen) and chosen[j] == " ":
        j += 1
    return min(j, n) if j <= n else i + len(marker)


def select_pairs(files: list[Path], n_train: int, n_val: int, val_fraction: float) -> tuple[list[dict], list[dict], dict]:
    """First n_train / n_val pairs in file order on each side of a prompt-hash split (no prompt on both sides)."""
    train, val, identical, seen = [], [], 0, 0
    for f in files:
        for row in read_hh(f):
            seen += 1
            c, r = row["chosen"], row["rejected"]
            if c == r:
                identical += 1
                continue
            key = c[: hh_prompt_end(c, r)]
            h = int(hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF
            side = val if h < val_fraction else train
            want = n_val if side is val else n_train
            if len(side) < want:
                side.append({"chosen": c, "rejected": r})
            if len(train) >= n_train and len(val) >= n_val:
                break
        if len(train) >= n_train and len(val) >= n_val:
            break
    if len(train) < n_train or len(val) < n_val:
        raise SystemExit(f"not enough pairs in {[str(f) for f in files]}: got {len(train)} train / {len(val)} validation; "
                         "lower --pairs/--val-pairs or add --data files")
    return train, val, {"rows_scanned": seen, "identical_pairs_skipped": identical, "val_fraction": val_fraction}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def build_tiny_decoder(kind: str, out: Path, texts: list[str], seed: int = 0) -> Path:
    """A randomly initialised Qwen2 or Llama (6 x 384, MiniLM-sized blocks) with a BPE tokenizer trained on ``texts``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModel, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if kind == "tiny-llama":  # BOS added by the tokenizer, EOS </s>, no pad token (like Llama)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
        cfg = LlamaConfig(vocab_size=len(fast), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
    else:  # Qwen2-like: EOS <|im_end|>, pad <|endoftext|> (distinct from EOS)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        cfg = Qwen2Config(vocab_size=len(fast), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- workers (child processes)


def _worker_env(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker_trl(spec: dict) -> dict:
    t_import = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers import logging as hf_logging
    from transformers.trainer_utils import set_seed

    import trl
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference, suppress_seqcls_warning
    from trl.trainer.utils import create_model_from_path

    _worker_env(spec)
    hf_logging.set_verbosity_error()
    import_s = time.perf_counter() - t_import
    rows = [json.loads(line) for line in open(spec["train_file"], encoding="utf-8")]

    t0 = time.perf_counter()
    set_seed(spec["seed"])
    with suppress_seqcls_warning():  # exactly how RewardTrainer loads a model given by path
        model = create_model_from_path(spec["model_path"], AutoModelForSequenceClassification, num_labels=1,
                                       dtype="float32", trust_remote_code=False,
                                       **({"attn_implementation": spec["trl_attn"]} if spec.get("trl_attn") else {}))
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    # TRL appends the EOS token to standard-text examples; encoders (MiniLM) have none, and TRL then
    # fails (str.endswith(None)), so such tokenizers get their end-of-sequence marker [SEP] as EOS.
    eos_token = None if tok.eos_token is not None else (tok.sep_token or None)
    pad_token = tok.pad_token or (eos_token or tok.eos_token)  # TRL's rule: pad, else EOS
    tok.pad_token = pad_token
    load_s = time.perf_counter() - t0
    rss_after_load = rss_mib()

    precision = spec["precision"]
    args = RewardConfig(
        output_dir=spec["trl_output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        num_train_epochs=spec["epochs"],
        max_length=spec["max_length"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        # optim: TRL's default (adamw_torch_fused, the same AdamW math in one fused kernel)
        # TRL's defaults are gradient_checkpointing=True and bf16=True; matched to rewardforge unless --trl-defaults
        # TRL has no bf16-master mode: for --precision bf16_master it runs its bf16 (autocast).
        **({} if spec.get("trl_defaults") else {"gradient_checkpointing": False, "bf16": precision != "fp32", "fp16": False}),
        disable_dropout=spec["dropout_off"],
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
        eos_token=eos_token,
    )
    config_used = {k: getattr(args, k) for k in (
        "per_device_train_batch_size", "learning_rate", "num_train_epochs", "max_length", "lr_scheduler_type", "warmup_steps",
        "weight_decay", "max_grad_norm", "optim", "gradient_checkpointing", "bf16", "disable_dropout", "eval_strategy",
        "save_strategy", "logging_steps", "seed", "dataloader_num_workers", "eos_token", "pad_to_multiple_of")}
    config_used = {k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v) for k, v in config_used.items()}
    config_used["pad_token"] = pad_token
    collator = TokenCounter(DataCollatorForPreference(pad_token_id=tok.convert_tokens_to_ids(pad_token)))

    ds = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"], "pair_id": i} for i, r in enumerate(rows)])
    t1 = time.perf_counter()
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, data_collator=collator)
    preprocess_s = time.perf_counter() - t1
    kept = sorted(int(i) for i in trainer.train_dataset["pair_id"])
    fwd = ForwardTimer(trainer.model)
    prof = model_flop_profile(trainer.model)

    t2, c2 = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t2, time.process_time() - c2
    fwd.active = collator.active = False
    peak = peak_rss_mib()
    real_flops, padded_flops, computed_flops = collator.flops(prof)

    t3 = time.perf_counter()
    save_dir = Path(spec["save_dir"])
    trainer.save_model(str(save_dir))
    tok.save_pretrained(save_dir)
    (save_dir / "bench_text_format.json").write_text(json.dumps({"eos_appended": tok.eos_token if eos_token is None else eos_token}))
    save_s = time.perf_counter() - t3
    n_used = len(kept)
    return {
        "trainer": f"trl {trl.__version__} RewardTrainer",
        "save_dir": str(save_dir),
        "config": config_used,
        "pairs_given": len(rows),
        "pairs_used": n_used,
        "pairs_dropped": len(rows) - n_used,
        "drop_reason": f"chosen or rejected longer than max_length={spec['max_length']} tokens (TRL filters, never truncates)",
        "kept_pair_ids": kept,
        "pairs_trained": int(round(n_used * spec["epochs"])),
        "optimizer_steps": int(out.global_step),
        "train_loss": float(out.training_loss),
        "import_s": import_s,
        "load_s": load_s,
        "preprocess_s": preprocess_s,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "save_s": save_s,
        "forward_s": fwd.seconds,
        "forward_sequences": fwd.sequences,
        "sequences": collator.sequences,
        "real_tokens": collator.real_tokens,
        "padded_tokens": collator.padded_tokens,
        "model_flops": real_flops,
        "padded_flops": padded_flops,
        "computed_flops": computed_flops,
        "flop_profile": {k: v for k, v in prof.items() if k != "linear_params_per_layer"},
        "rss_after_load_mib": rss_after_load,
        "peak_rss_mib": peak,
        "torch_threads": torch.get_num_threads(),
    }


# Where a training step's time goes (--profile): torch.profiler's self time per operator, in groups.
OP_GROUPS = (
    ("linear-layer matmuls (mm, addmm)", ("aten::mm", "aten::addmm")),
    ("attention matmuls (bmm, baddbmm) and sdpa kernels", ("aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                                           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")),
    ("softmax, forward and backward", ("aten::_softmax", "aten::_softmax_backward_data")),
    ("AdamW and zero_grad", ("aten::_fused_adamw_", "Optimizer.")),
    ("copies and casts", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("fills (zeros, embedding gradient)", ("aten::fill_", "aten::zero_", "aten::zeros", "aten::embedding_dense_backward")),
    ("activations and norms (GELU, SiLU, LayerNorm)", ("aten::gelu", "aten::gelu_backward", "aten::silu", "aten::silu_backward",
                                                       "aten::native_layer_norm", "aten::native_layer_norm_backward")),
    ("elementwise and reductions (add, mul, sub, sum, norm)", ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub",
                                                              "aten::sub_", "aten::div", "aten::div_", "aten::sum", "aten::mean",
                                                              "aten::pow", "aten::rsqrt", "aten::linalg_vector_norm")),
)


def step_time_breakdown(events, steps: int) -> dict[str, Any]:
    """Group ``torch.profiler`` key averages by ``OP_GROUPS`` (self CPU time of the calling thread:
    an operator's wall time, its OpenMP threads included); the rest is Python, autograd and small ops."""
    total = sum(e.self_cpu_time_total for e in events)
    groups = {name: 0.0 for name, _ in OP_GROUPS}
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    for e in events:
        for name, ops in OP_GROUPS:
            if any(e.key == op or (op.endswith(".") and e.key.startswith(op)) for op in ops):
                groups[name] += e.self_cpu_time_total
                break
    groups["everything else (Python, autograd, small ops)"] = total - sum(groups.values())
    ms = lambda us: us / 1e3 / max(steps, 1)  # noqa: E731
    return {
        "steps": steps,
        "total_ms_per_step": ms(total),
        "groups_ms_per_step": {k: ms(v) for k, v in groups.items()},
        "top_ops_ms_per_step": [(e.key, ms(e.self_cpu_time_total), e.count) for e in top],
    }


def worker_rewardforge(spec: dict) -> dict:
    t_import = time.perf_counter()
    import torch

    import rewardforge
    from rewardforge.config import load_config
    from rewardforge.train import export_run, setup, train

    _worker_env(spec)
    import_s = time.perf_counter() - t_import
    overrides = [
        f"model.name_or_path={spec['model_name']}",
        f"model.dropout={0.0 if spec['dropout_off'] else 'null'}",
        f"data.train=[{spec['train_file']}]",
        f"data.validation=[{spec['val_file']}]",
        f"data.max_length={spec['max_length']}",
        f"data.cache_dir={spec['cache_dir']}",
        f"train.batch_size={spec['batch_size']}",
        f"train.learning_rate={spec['lr']}",
        f"train.epochs={spec['epochs']}",
        "train.lr_scheduler=linear",
        "train.warmup_ratio=0.0",
        "train.weight_decay=0.0",
        "train.max_grad_norm=1.0",
        f"train.precision={spec['precision']}",
        "train.eval_steps=0",
        "train.save_steps=0",
        "train.log_steps=10",
        f"train.seed={spec['seed']}",
        f"train.threads={spec['threads']}",
        f"output_dir={spec['output_dir']}",
    ] + list(spec.get("extra_overrides") or [])
    cfg = load_config(None, overrides)

    t0 = time.perf_counter()
    run = setup(cfg)
    setup_s = time.perf_counter() - t0
    rep = run.data_reports
    preprocess_s = float(rep["train"].get("seconds", 0.0)) + float(rep.get("validation", {}).get("seconds", 0.0) or 0.0)
    rss_after_setup = rss_mib()
    counter = TokenCounter(run.collate)
    run.collate = counter
    fwd = ForwardTimer(run.model)
    prof = model_flop_profile(run.model)

    profiler = None
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        profiler.start()
    t1, c1 = time.perf_counter(), time.process_time()
    train(run, progress=False)
    train_s, train_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    breakdown = None
    if profiler is not None:
        profiler.stop()
        breakdown = step_time_breakdown(profiler.key_averages(), int(run.state.step))
    counter.active = fwd.active = False
    peak = peak_rss_mib()
    real_flops, padded_flops, computed_flops = counter.flops(prof)

    export = None
    save_s = 0.0
    if spec.get("save_dir"):
        t2 = time.perf_counter()
        path, stats = export_run(run, spec["save_dir"])
        save_s = time.perf_counter() - t2
        export = str(path)
    n_given = sum(1 for _ in open(spec["train_file"], encoding="utf-8"))
    n_used = len(run.train_data)
    tr = rep["train"]
    return {
        "trainer": f"rewardforge {rewardforge.__version__} (setup + train)",
        "config": cfg.to_dict(),
        "pairs_given": n_given,
        "pairs_used": n_used,
        "pairs_dropped": n_given - n_used,
        "excluded": tr.get("excluded", {}),
        "truncation": tr.get("truncation", {}),
        "pairs_trained": int(run.state.examples_seen),
        "optimizer_steps": int(run.state.step),
        "import_s": import_s,
        "load_s": setup_s - preprocess_s,  # setup() minus data building: model/tokenizer load, optimizer, accelerate
        "preprocess_s": preprocess_s,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "save_s": save_s,
        "export_dir": export,
        "forward_s": fwd.seconds,
        "forward_sequences": fwd.sequences,
        "sequences": counter.sequences,
        "real_tokens": counter.real_tokens,
        "padded_tokens": counter.padded_tokens,
        "model_flops": real_flops,
        "padded_flops": padded_flops,
        "computed_flops": computed_flops,
        "flop_profile": {k: v for k, v in prof.items() if k != "linear_params_per_layer"},
        "rss_after_load_mib": rss_after_setup,
        "peak_rss_mib": peak,
        "torch_threads": torch.get_num_threads(),
        "step_time_breakdown": breakdown,
    }


def _accuracy(chosen, rejected) -> float:
    import numpy as np

    from rewardforge.eval.metrics import win_rate

    d = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
    return float(win_rate(d)) if len(d) else 0.0


def worker_eval(spec: dict) -> dict:
    """Score the validation pairs with both models through RewardScorer.score_rendered; time scoring."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewardforge.data.batching import pad_sequences
    from rewardforge.data.formats import parse_rows
    from rewardforge.data.readers import read_rows
    from rewardforge.data.tokenize import TruncationStats, tokenize_texts
    from rewardforge.models.reward_model import RewardModel
    from rewardforge.scoring import RewardScorer, load

    _worker_env(spec)
    L = spec["max_length"]
    raw = [json.loads(line) for line in open(spec["val_file"], encoding="utf-8")]
    n = len(raw)
    result: dict[str, Any] = {"val_pairs": n}

    def score(scorer: RewardScorer, texts: list[str], starts: list[int]) -> tuple[np.ndarray, float, int]:
        scorer.score_rendered(texts[:16], starts[:16])  # warm-up (kernel selection)
        t = time.perf_counter()
        s = scorer.score_rendered(texts, starts)
        return s.reward, time.perf_counter() - t, int(s.num_tokens.sum())

    # TRL model: its own text (raw HH dialogue + the EOS it appended), HF's own reward reading.
    trl_keep_mask = None
    if spec.get("trl_dir"):
        d = Path(spec["trl_dir"])
        tok = AutoTokenizer.from_pretrained(d)
        eos = json.loads((d / "bench_text_format.json").read_text())["eos_appended"]
        hf = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
        scorer = RewardScorer(RewardModel(hf, "pooled"), tok, {"max_length": L, "truncation": "prompt_left"}, device="cpu", batch_size=16)
        texts, starts = [], []
        for side in ("chosen", "rejected"):
            for r in raw:
                texts.append(r[side] if r[side].endswith(eos) else r[side] + eos)
                starts.append(hh_prompt_end(r["chosen"], r["rejected"]))
        full_len = np.array([len(x) for x in tok(texts, add_special_tokens=True)["input_ids"]])
        trl_keep_mask = (full_len[:n] <= L) & (full_len[n:] <= L)  # the validation pairs TRL itself would keep
        rewards, secs, toks = score(scorer, texts, starts)
        result["trl"] = {"accuracy": _accuracy(rewards[:n], rewards[n:]),
                         "accuracy_on_trl_kept": _accuracy(rewards[:n][trl_keep_mask], rewards[n:][trl_keep_mask]),
                         "scoring_s": secs, "sequences": 2 * n, "tokens": toks}
        result["val_pairs_trl_would_keep"] = int(trl_keep_mask.sum())
        del hf, scorer

    # rewardforge model: the exported directory through the public loader.
    scorer = load(spec["rf_dir"], device="cpu", batch_size=16)
    texts, starts = [], []
    pairs = list(parse_rows(read_rows(spec["val_file"]), "auto"))
    assert len(pairs) == n, (len(pairs), n)
    for side in ("chosen", "rejected"):
        for p in pairs:
            t, s = scorer.renderer.render(p.prompt, getattr(p, side), p.where)
            texts.append(t), starts.append(s)
    rewards, secs, toks = score(scorer, texts, starts)
    rf = {"accuracy": _accuracy(rewards[:n], rewards[n:]), "scoring_s": secs, "sequences": 2 * n, "tokens": toks,
          "scoring_sequences_per_s": 2 * n / secs, "scoring_tokens_per_s": toks / secs}
    if trl_keep_mask is not None:
        rf["accuracy_on_trl_kept"] = _accuracy(rewards[:n][trl_keep_mask], rewards[n:][trl_keep_mask])

    # Like-for-like timing on the same sequences (the first --timing-pairs validation pairs, both sides),
    # interleaved over rounds so that load from other processes hits every method alike; best round counts:
    #   score_rendered: the public scoring path (tokenize + truncate + no-grad forward, batches of 16)
    #   grad forward:   the same padded batches through the model in train mode with autograd on, i.e.
    #                   training's forward pass (no backward)
    #   no-grad forward: the same batches, eval mode, torch.no_grad (scoring without tokenization)
    k = min(spec["timing_pairs"], n)
    tt = texts[:k] + texts[n : n + k]
    ts = starts[:k] + starts[n : n + k]
    ids, _ = tokenize_texts(scorer.tokenizer, tt, ts, L, "prompt_left", TruncationStats())
    order = np.argsort([-len(x) for x in ids], kind="stable")
    batches = [pad_sequences([ids[i] for i in order[s : s + 16]], scorer.tokenizer.pad_token_id) for s in range(0, len(ids), 16)]
    model = scorer.model
    times = {"score_rendered": [], "grad_forward": [], "nograd_forward": []}
    for _ in range(spec["timing_rounds"]):
        t = time.perf_counter()
        scorer.score_rendered(tt, ts)
        times["score_rendered"].append(time.perf_counter() - t)
        model.train()
        t = time.perf_counter()
        for b in batches:
            model(*b)
        times["grad_forward"].append(time.perf_counter() - t)
        model.eval()
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(*b)
        times["nograd_forward"].append(time.perf_counter() - t)
    rf.update({"timing_sequences": len(tt), "timing_tokens": int(sum(len(x) for x in ids)), "timing_batches": len(batches),
               "timing_rounds_s": times, **{f"{m}_best_s": min(v) for m, v in times.items()}})
    result["rewardforge"] = rf
    result["peak_rss_mib"] = peak_rss_mib()
    return result


WORKERS = {"trl": worker_trl, "rewardforge": worker_rewardforge, "eval": worker_eval}


def run_worker(name: str, spec: dict, workdir: Path, tag: str | None = None) -> dict:
    """Run one worker in a fresh Python process; return its result (raise with the log tail on failure)."""
    tag = tag or name
    spec_path, result_path, log_path = workdir / f"spec_{tag}.json", workdir / f"result_{tag}.json", workdir / f"{tag}.log"
    spec = dict(spec, result_file=str(result_path))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore", DISABLE_MLFLOW_INTEGRATION="TRUE",
               WANDB_DISABLED="true", TQDM_DISABLE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path)]
    print(f"  [{tag}] running in a cold process ...", flush=True)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t
    if rc != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"worker {tag} failed (exit {rc}); log {log_path}:\n{tail}")
    res = json.loads(result_path.read_text())
    res["process_wall_s"] = wall
    print(f"  [{tag}] done in {wall:.1f} s", flush=True)
    return res


def worker_main(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = WORKERS[name](spec)
    Path(spec["result_file"]).write_text(json.dumps(res, indent=1, default=str))


# ---------------------------------------------------------------------------- report


def _fmt(v, spec="{:.2f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return spec.format(v)


def format_breakdown(profiled: dict) -> str:
    b = profiled["step_time_breakdown"]
    lines = [f"where a rewardforge training step goes (torch.profiler, a separate cold run of {b['steps']} steps: "
             f"{profiled['train_s']:.2f} s with the profiler on; self time of each operator, ms per step):"]
    total = b["total_ms_per_step"]
    for name, v in b["groups_ms_per_step"].items():
        lines.append(f"  {name:<58s} {v:8.1f} ms  {v / total:6.1%}")
    lines.append(f"  {'total':<58s} {total:8.1f} ms")
    lines.append("  top operators: " + ", ".join(f"{k} {v:.1f} ms ({n // max(b['steps'], 1)}/step)" for k, v, n in b["top_ops_ms_per_step"][:8]))
    return "\n".join(lines)


def build_report(args, meta: dict, trl: dict | None, rf: dict, rf_kept: dict | None, ev: dict, peak: float) -> tuple[str, dict]:
    lines: list[str] = []
    cols = [("TRL RewardTrainer", trl), ("rewardforge", rf)]
    if rf_kept is not None:
        cols.append(("rewardforge, TRL-kept", rf_kept))
    derived: dict[str, dict] = {}
    for label, r in cols:
        if r is None:
            continue
        d = {
            "pairs_per_s": r["pairs_trained"] / r["train_s"],
            "real_tokens_per_s": r["real_tokens"] / r["train_s"],
            "padding_fraction": 1 - r["real_tokens"] / max(r["padded_tokens"], 1),
            "model_flops_per_s": r["model_flops"] / r["train_s"],
            "padded_flops_per_s": r["padded_flops"] / r["train_s"],
            "mfu": r["model_flops"] / r["train_s"] / peak,
            "hfu_incl_padding": r["padded_flops"] / r["train_s"] / peak,
            "forward_share": r["forward_s"] / r["train_s"],
            "train_forward_sequences_per_s": r["forward_sequences"] / r["forward_s"] if r["forward_s"] else None,
            "train_forward_real_tokens_per_s": r["real_tokens"] / r["forward_s"] if r["forward_s"] else None,
            # pairs/s this run would reach at 100% of the GEMM peak with zero padding (same real tokens)
            "roofline_pairs_per_s": r["pairs_trained"] / (r.get("computed_flops", r["model_flops"]) / peak),
        }
        derived[label] = d
    trl_d = derived.get("TRL RewardTrainer")

    def row(name, fn, fmt="{:.2f}"):
        vals = []
        for label, r in cols:
            if r is None:
                vals.append("-")
                continue
            try:
                vals.append(_fmt(fn(r, derived[label]), fmt))
            except (KeyError, TypeError, ZeroDivisionError):
                vals.append("-")
        lines.append(f"{name:<40}" + "".join(f"{v:>24}" for v in vals))

    lines.append("=" * (40 + 24 * len(cols)))
    lines.append(f"{'':<40}" + "".join(f"{label:>24}" for label, _ in cols))
    lines.append("-" * (40 + 24 * len(cols)))
    row("pairs given", lambda r, d: str(r["pairs_given"]), "{}")
    row("pairs used (trained on)", lambda r, d: str(r["pairs_used"]), "{}")
    row("pairs dropped", lambda r, d: f"{r['pairs_dropped']} ({100 * r['pairs_dropped'] / r['pairs_given']:.1f}%)", "{}")
    row("sequences truncated (prompt/response)", lambda r, d: f"{r['truncation'].get('truncated_prompt', 0)}/{r['truncation'].get('truncated_response', 0)}" if "truncation" in r else "0 (drops)", "{}")
    row("optimizer steps", lambda r, d: str(r["optimizer_steps"]), "{}")
    row("train time (s)", lambda r, d: r["train_s"])
    row("train CPU time, all threads (s)", lambda r, d: r["train_cpu_s"])
    row("pairs/s", lambda r, d: d["pairs_per_s"])
    row("pairs per CPU-second", lambda r, d: r["pairs_trained"] / r["train_cpu_s"], "{:.3f}")
    if trl_d:
        row("speed-up vs TRL (pairs/s ratio)", lambda r, d: d["pairs_per_s"] / trl_d["pairs_per_s"], "{:.2f}x")
    row("real tokens trained", lambda r, d: str(r["real_tokens"]), "{}")
    row("padding (share of computed tokens)", lambda r, d: 100 * d["padding_fraction"], "{:.1f}%")
    row("real tokens/s", lambda r, d: d["real_tokens_per_s"], "{:.0f}")
    row("forward share of train time", lambda r, d: 100 * d["forward_share"], "{:.0f}%")
    row("model GFLOP/s (real tokens)", lambda r, d: d["model_flops_per_s"] / 1e9, "{:.1f}")
    row("MFU vs measured GEMM peak", lambda r, d: 100 * d["mfu"], "{:.1f}%")
    row("computed GFLOP/s incl. padding", lambda r, d: d["padded_flops_per_s"] / 1e9, "{:.1f}")
    row("pairs/s at 100% peak, no padding", lambda r, d: d["roofline_pairs_per_s"])
    row("model load (s)", lambda r, d: r["load_s"])
    row("preprocess (s)", lambda r, d: r["preprocess_s"])
    row("RSS after load+preprocess (MiB)", lambda r, d: r["rss_after_load_mib"], "{:.0f}")
    row("peak RSS (MiB)", lambda r, d: r["peak_rss_mib"], "{:.0f}")
    row("final train loss", lambda r, d: r.get("train_loss"), "{:.4f}")
    lines.append("-" * (40 + 24 * len(cols)))
    n_val = ev["val_pairs"]
    acc_all = [ev.get("trl", {}).get("accuracy"), ev["rewardforge"]["accuracy"]]
    acc_kept = [ev.get("trl", {}).get("accuracy_on_trl_kept"), ev["rewardforge"].get("accuracy_on_trl_kept")]
    lines.append(f"{f'val accuracy, all {n_val} pairs':<40}" + "".join(f"{_fmt(v, '{:.4f}'):>24}" for v in acc_all))
    if ev.get("val_pairs_trl_would_keep") is not None:
        k = ev["val_pairs_trl_would_keep"]
        lines.append(f"{f'val accuracy, {k} pairs TRL keeps':<40}" + "".join(f"{_fmt(v, '{:.4f}'):>24}" for v in acc_kept))
    lines.append("=" * (40 + 24 * len(cols)))

    # scoring vs training forward
    e = ev["rewardforge"]
    rfd = derived["rewardforge"]
    lines.append("scoring vs training forward (rewardforge):")
    lines.append(f"  score_rendered (tokenize + no-grad forward, batch 16), {e['sequences']} val sequences: "
                 f"{e['scoring_sequences_per_s']:.1f} seq/s, {e['scoring_tokens_per_s']:.0f} tok/s "
                 f"(all {e['sequences']} validation sequences, one pass)")
    lines.append(f"  training forward inside the training run (train mode, autograd on, {rf['forward_sequences'] // max(rf['optimizer_steps'], 1)} seq/batch): "
                 f"{rfd['train_forward_sequences_per_s']:.1f} seq/s, {rfd['train_forward_real_tokens_per_s']:.0f} real tok/s")
    ts_ = e["timing_sequences"]
    lines.append(f"  same {ts_} val sequences ({e['timing_batches']} batches of 16, best of {len(e['timing_rounds_s']['grad_forward'])} interleaved rounds): "
                 f"score_rendered {ts_ / e['score_rendered_best_s']:.1f} seq/s, training-style forward (train mode, autograd on) "
                 f"{ts_ / e['grad_forward_best_s']:.1f} seq/s, no-grad forward {ts_ / e['nograd_forward_best_s']:.1f} seq/s")
    score_vs_train_tok = e["scoring_tokens_per_s"] / rfd["train_forward_real_tokens_per_s"]
    score_vs_same = e["grad_forward_best_s"] / e["score_rendered_best_s"]
    lines.append(f"  scoring / training-forward throughput: {score_vs_same:.2f}x per sequence (same sequences); "
                 f"{score_vs_train_tok:.2f}x per real token against the forward passes inside the training run")

    # goals
    goals = {}
    if trl is not None:
        sp = rfd["pairs_per_s"] / trl_d["pairs_per_s"]
        goals["speedup_ge_3x"] = {"value": sp, "pass": sp >= 3.0}
        if rf_kept is not None:
            spk = derived["rewardforge, TRL-kept"]["pairs_per_s"] / trl_d["pairs_per_s"]
            goals["speedup_on_trl_kept_pairs"] = {"value": spk, "pass": spk >= 3.0}
        dacc = ev["rewardforge"]["accuracy"] - ev["trl"]["accuracy"]
        goals["accuracy_not_worse_than_trl_minus_1pt"] = {"value": dacc, "pass": dacc >= -0.01}
        goals["peak_memory_le_trl"] = {"value": rf["peak_rss_mib"] / trl["peak_rss_mib"], "pass": rf["peak_rss_mib"] <= trl["peak_rss_mib"]}
    goals["zero_pairs_dropped"] = {"value": rf["pairs_dropped"], "pass": rf["pairs_dropped"] == 0}
    goals["scoring_ge_training_forward_per_sequence"] = {"value": score_vs_same, "pass": score_vs_same >= 1.0}
    lines.append("goals:")
    for k, v in goals.items():
        val = v["value"]
        lines.append(f"  {'PASS' if v['pass'] else 'FAIL'}  {k}: {val:.3f}" if isinstance(val, float) else f"  {'PASS' if v['pass'] else 'FAIL'}  {k}: {val}")
    return "\n".join(lines), {"derived": derived, "goals": goals}


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=400, help="training pairs (default 400)")
    p.add_argument("--val-pairs", type=int, default=400, help="validation pairs, prompt-disjoint from training (default 400)")
    p.add_argument("--data", nargs="+", default=None,
                   help="HH-RLHF .jsonl.gz files (default: ../shared/data/hh_rlhf/harmless-base.test.jsonl.gz); 'all' = the four files")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of prompts (by hash) on the validation side")
    p.add_argument("--backbone", default="minilm", help="minilm | tiny-qwen2 | tiny-llama | a local model directory")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per batch (both trainers)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--precision", choices=("fp32", "bf16", "bf16_master"), default="fp32",
                   help="rewardforge's train.precision; TRL runs fp32 for fp32 and its bf16 (autocast, it has no other) for both bf16 modes")
    p.add_argument("--trl-attn", default=None,
                   help="attn_implementation for TRL's model (default: transformers' default, sdpa, as TRL users get); "
                        "e.g. eager, to see how much of the gap is rewardforge's kernel choice")
    p.add_argument("--keep-dropout", action="store_true", help="keep the checkpoint's dropout (default: off in both, TRL's default)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process (default: all cores)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--timing-pairs", type=int, default=32, help="validation pairs used to time scoring vs training forward")
    p.add_argument("--timing-rounds", type=int, default=3, help="interleaved rounds of that timing (best counts)")
    p.add_argument("--repeat", type=int, default=1,
                   help="train each side this many times, alternating TRL / rewardforge (cold processes); the fastest run of each counts")
    p.add_argument("--trl-defaults", action="store_true",
                   help="run TRL with its own defaults for bf16 (True) and gradient_checkpointing (True) instead of matching rewardforge")
    p.add_argument("--skip-trl", action="store_true", help="train only rewardforge")
    p.add_argument("--skip-kept", action="store_true", help="skip the rewardforge run on only the pairs TRL keeps")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, train rewardforge once more under torch.profiler and print where a step's time goes "
                        "(the profiled run is not timed against TRL)")
    p.add_argument("--rf-override", action="append", default=[], help="extra rewardforge config override (section.key=value); repeatable")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "train_vs_trl.json"), help="JSON results file")
    p.add_argument("--workdir", default=None, help="where models/data/logs go (default: a temp dir, removed unless --keep-workdir)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.spec)
        return 0

    if args.data is None:
        files = [DEFAULT_DATA / "harmless-base.test.jsonl.gz"]
    elif args.data == ["all"]:
        files = sorted(DEFAULT_DATA.glob("*.jsonl.gz"))
    else:
        files = [Path(f) for f in args.data]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        print(f"SKIP: HH-RLHF data not found ({missing or DEFAULT_DATA}); this benchmark needs ../shared/data/hh_rlhf "
              "beside the project root (see ../shared/data/README.md)")
        return 0
    if not args.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("SKIP: trl is not installed; it is a benchmark-only dependency: pip install trl (or run with --skip-trl)")
            return 0

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rf-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        train_rows, val_rows, sel = select_pairs(files, args.pairs, args.val_pairs, args.val_fraction)
        train_file, val_file = workdir / "train.jsonl", workdir / "val.jsonl"
        write_jsonl(train_file, train_rows)
        write_jsonl(val_file, val_rows)

        from rewardforge.models.reward_model import resolve_model_path

        if args.backbone == "minilm":
            model_name, model_path, backbone_desc = MINILM, resolve_model_path(MINILM), f"{MINILM} (pretrained encoder, offline package)"
        elif args.backbone in ("tiny-qwen2", "tiny-llama"):
            model_path = str(build_tiny_decoder(args.backbone, workdir / args.backbone,
                                                [r[k] for r in train_rows for k in ("chosen", "rejected")], seed=args.seed))
            model_name = model_path
            backbone_desc = f"{args.backbone}: random {args.backbone.split('-')[1]} decoder, 6 blocks x 384, BPE 8192 trained on the train pairs"
        else:
            model_name = model_path = args.backbone
            backbone_desc = args.backbone

        print(f"rewardforge vs TRL: {args.pairs} train / {args.val_pairs} validation pairs from {', '.join(f.name for f in files)}; "
              f"backbone {backbone_desc}; max_length {args.max_length}, batch {args.batch_size} pairs, lr {args.lr}, "
              f"{args.epochs:g} epoch(s), {args.precision}, {args.threads} threads; workdir {workdir}", flush=True)
        gemm_dtype = "fp32" if args.precision == "fp32" else "bf16"
        gemm = [measure_gemm_peak(args.threads, args.gemm_size, dtype=gemm_dtype)]
        print(f"  GEMM peak ({args.gemm_size}^3 {args.precision}, {args.threads} threads): {gemm[0]['best_flops'] / 1e9:.1f} GFLOP/s", flush=True)

        base = {"threads": args.threads, "seed": args.seed, "max_length": args.max_length, "batch_size": args.batch_size,
                "lr": args.lr, "epochs": args.epochs, "precision": args.precision, "dropout_off": not args.keep_dropout,
                "train_file": str(train_file), "val_file": str(val_file), "model_path": model_path, "model_name": model_name}
        trl_runs, rf_runs, kept_runs = [], [], []
        kept_file = workdir / "train_trl_kept.jsonl"
        for rnd in range(args.repeat):
            sfx = f"_{rnd + 1}" if args.repeat > 1 else ""
            if not args.skip_trl:
                trl_runs.append(run_worker("trl", dict(base, trl_defaults=args.trl_defaults, trl_attn=args.trl_attn, trl_output_dir=str(workdir / "trl_out"),
                                                       save_dir=str(workdir / f"trl_model{sfx}")), workdir, tag=f"trl{sfx}"))
            rf_runs.append(run_worker("rewardforge", dict(base, cache_dir=str(workdir / f"rf_cache{sfx}"), output_dir=str(workdir / f"rf_out{sfx}"),
                                                          save_dir=str(workdir / f"rf_model{sfx}"), extra_overrides=args.rf_override),
                                      workdir, tag=f"rewardforge{sfx}"))
            if trl_runs and not args.skip_kept:
                write_jsonl(kept_file, [train_rows[i] for i in trl_runs[0]["kept_pair_ids"]])
                kept_runs.append(run_worker("rewardforge", dict(base, train_file=str(kept_file), cache_dir=str(workdir / f"rf_cache_kept{sfx}"),
                                                                output_dir=str(workdir / f"rf_out_kept{sfx}"), save_dir=None,
                                                                extra_overrides=args.rf_override), workdir, tag=f"rewardforge_kept{sfx}"))
        profiled = None
        if args.profile:
            profiled = run_worker("rewardforge", dict(base, cache_dir=str(workdir / "rf_cache_prof"), output_dir=str(workdir / "rf_out_prof"),
                                                      save_dir=None, profile=True, extra_overrides=args.rf_override),
                                  workdir, tag="rewardforge_profile")
        fastest = lambda runs: min(runs, key=lambda r: r["train_s"]) if runs else None  # noqa: E731
        trl_res, rf_res, rf_kept = fastest(trl_runs), fastest(rf_runs), fastest(kept_runs)
        all_train_s = {"trl": [r["train_s"] for r in trl_runs], "rewardforge": [r["train_s"] for r in rf_runs],
                       "rewardforge_trl_kept": [r["train_s"] for r in kept_runs]}
        ev = run_worker("eval", dict(base, timing_pairs=args.timing_pairs, timing_rounds=args.timing_rounds, trl_dir=trl_runs[0]["save_dir"] if trl_runs else None,
                                         rf_dir=rf_runs[0]["export_dir"]), workdir)
        gemm.append(measure_gemm_peak(args.threads, args.gemm_size, dtype=gemm_dtype))
        peak = max(g["best_flops"] for g in gemm)

        table, extra = build_report(args, sel, trl_res, rf_res, rf_kept, ev, peak)
        gemm_list = ", ".join(f"{g['best_flops'] / 1e9:.1f}" for g in gemm)
        header = [
            "",
            f"data: {files[0].parent}/{'{' + ','.join(f.name for f in files) + '}' if len(files) > 1 else files[0].name}; "
            f"{args.pairs} train + {args.val_pairs} validation pairs, prompt-disjoint (hash of the shared prompt, "
            f"{args.val_fraction:.0%} of prompts to validation); {sel['identical_pairs_skipped']} pairs with identical "
            f"chosen/rejected text skipped for both (no preference signal)",
            f"backbone: {backbone_desc}",
            f"both: max_length {args.max_length}, batch {args.batch_size} pairs (2x{args.batch_size} sequences in one forward), "
            f"AdamW lr {args.lr} (betas 0.9/0.999, eps 1e-8, weight decay 0), linear decay without warmup, grad clip 1.0, "
            f"{args.epochs:g} epoch(s), {args.precision}, dropout {'kept' if args.keep_dropout else 'off'}, seed {args.seed}, "
            f"{args.threads} torch threads, no eval and no checkpoints during training, each in a cold process",
            "TRL: RewardTrainer(model=AutoModelForSequenceClassification(num_labels=1)), RewardConfig with "
            + ("TRL's own defaults gradient_checkpointing=True, bf16=True (--trl-defaults), " if args.trl_defaults else
               f"gradient_checkpointing=False, bf16={args.precision != 'fp32'} (TRL defaults: True, True), ")
            + f"attention {args.trl_attn or 'transformers default (sdpa)'}, "
            + "optim adamw_torch_fused (TRL default), no group_by_length (TRL default), "
            "EOS appended to each text (MiniLM: [SEP]), pairs over max_length dropped by TRL's filter",
            "rewardforge: setup()+train() with its defaults otherwise (length-grouped batches, prompt_left truncation, "
            "reward from the pooled output / last real token)",
            f"validation: both models scored on the same {args.val_pairs} pairs by RewardScorer.score_rendered "
            f"(prompt_left truncation to {args.max_length}, batches of 16), each on its own training text format",
            f"GEMM peak: {peak / 1e9:.1f} GFLOP/s ({args.gemm_size}^3 {gemm_dtype} torch.matmul, best of 5x8, measured "
            f"before and after: {gemm_list})",
            f"runs: each trainer trained {args.repeat}x, alternating, fastest run shown; train times (s): "
            + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in all_train_s.items() if v),
            "FLOPs per sequence of L tokens: 6*N*L + 12*n_layers*d*L^2 (N = block nn.Linear weights; fwd 2NL + 4 n_layers d L^2, bwd 2x fwd)",
        ]
        text = "\n".join(header) + "\n" + table
        if profiled is not None:
            text += "\n" + format_breakdown(profiled)
        print(text)
        out = {
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec")},
            "environment": {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "torch": __import__("torch").__version__, "transformers": __import__("transformers").__version__,
                            "trl": None if args.skip_trl else __import__("trl").__version__,
                            "load_average": os.getloadavg()},
            "data": {"files": [str(f) for f in files], **sel},
            "backbone": backbone_desc,
            "gemm": gemm,
            "gemm_peak_flops": peak,
            "trl": {k: v for k, v in (trl_res or {}).items() if k != "kept_pair_ids"} or None,
            "trl_kept_pair_ids": trl_res["kept_pair_ids"] if trl_res else None,
            "rewardforge": rf_res,
            "rewardforge_trl_kept": rf_kept,
            "all_train_s": all_train_s,
            "rewardforge_profiled": profiled,
            "eval": ev,
            **extra,
            "table": text,
            "total_wall_s": time.perf_counter() - t_all,
        }
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"results: {out_path} (total {out['total_wall_s']:.0f} s)")
    finally:
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
