"""Shared fixtures: tiny random backbones (GPT-2, Llama, Qwen2, BERT) built from configs, no downloads.

``tiny_model("gpt2")`` returns a directory holding a randomly initialised model and a small
tokenizer trained here on a fixed corpus, loadable with ``AutoModel*/AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CORPUS = [
    "Human: How do I boil an egg? Assistant: Put it in boiling water for nine minutes.",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Sure! Here is a clear answer: water boils at one hundred degrees.",
    "That is a stupid question. Go away. I cannot help with that request.",
    "Gravity keeps planets in orbit. Photosynthesis makes sugar from light.",
    "helpfulness safety coherence verbosity correctness overall score rating",
] * 20

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
FAMILIES = ("bert", "gpt2", "llama", "llama3", "qwen2")  # tiny backbones with each real family's special tokens


def make_tokenizer(kind: str):
    """A small fast tokenizer for ``kind``: 'bert' (WordPiece, [CLS]/[SEP]) or a byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        # The vocabulary is built here, not by tokenizers' WordPieceTrainer: that trainer's vocabulary
        # differs from process to process, so the same text got other ids (and gradient-tolerance
        # tests other inputs) in each run. Here: specials, every character (also as a ## suffix
        # piece), then the corpus words by count; words outside it split into characters.
        norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        counts: dict[str, int] = {}
        for text in CORPUS:
            for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
                counts[word] = counts.get(word, 0) + 1
        chars = sorted({c for w in counts for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\":;-()"))
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
        seen = set(vocab)
        vocab += [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in seen]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer = norm
        tok.pre_tokenizer = pre
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    if kind == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "llama":  # adds BOS like Llama tokenizers, no pad token
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")
    if kind == "llama3":  # adds <|begin_of_text|> and its template writes it too (the doubled-BOS trap); no pad
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        t.chat_template = LLAMA3
        return t
    if kind == "qwen2":  # chat template, pad distinct from eos
        t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        t.chat_template = CHATML
        return t
    # gpt2: eos only; pad set equal to eos, the case that confuses pad-id based reward reading
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_config(kind: str, vocab_size: int):
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if kind in ("llama", "llama3"):
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    if kind == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=256, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    raise ValueError(kind)


def build_tiny_model(kind: str, path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    tok = make_tokenizer(kind)
    cfg = make_config(kind, len(tok))
    model = AutoModel.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model(kind)`` -> directory of a tiny random backbone (cached per session)."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return cache[kind]

    return get


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    from rewardforge.data.synthetic import generate

    return generate(n, seed)


def train_variants(model_dir, tmp_path, variants: dict, *common: str, pairs: int = 64, steps: int = 5):
    """Train the same short run once per variant (name -> extra overrides) on the same synthetic pairs;
    returns ``({name: summary}, {name: exported weights}, max |weight difference| between the first two)``.
    The runs are fp32 (tight comparisons) unless ``common`` or a variant sets ``train.precision``."""
    from safetensors.torch import load_file

    from rewardforge.config import load_config
    from rewardforge.train import run_training

    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(pairs))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(16, seed=5))
    summaries, weights = {}, {}
    for name, extra in variants.items():
        out = tmp_path / f"variant-{name}"
        args = [f"model.name_or_path={model_dir}", f"data.train=[{data}]", f"data.validation=[{val}]",
                "train.batch_size=8", "train.learning_rate=1e-3", f"train.max_steps={steps}", "data.cache_dir=none",
                f"output_dir={out}", "train.precision=fp32", *common, *extra]
        summaries[name] = run_training(load_config(None, args), progress=False)
        weights[name] = load_file(out / "model/model.safetensors")
    a, b = list(weights.values())[:2]
    assert a.keys() == b.keys()
    return summaries, weights, max((a[k] - b[k]).abs().max().item() for k in a)


def train_and_resume(root: Path, args: list[str], step: int) -> tuple[dict, dict]:
    """Summaries of an uninterrupted run (``args`` with ``output_dir={root}/a``) and of the same run in
    ``{root}/b`` resumed from a copy of the first one's step-``step`` checkpoint."""
    import shutil

    from rewardforge.config import load_config
    from rewardforge.train import run_training

    full = run_training(load_config(None, args), progress=False)
    (root / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / f"a/checkpoints/step-{step}", root / f"b/checkpoints/step-{step}")
    again = [a.replace(str(root / "a"), str(root / "b")) for a in args] + ["train.resume_from=auto"]
    return full, run_training(load_config(None, again), progress=False)


def rated_rows(n: int, seed: int = 0) -> list[dict]:
    """Regression rows whose labels depend on the response (learnable): helpfulness, safety."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        rows.append({
            "prompt": f"Question {rng.randrange(40)}: " + rng.choice(["How do I boil an egg?", "What is gravity?", "Why is the sky blue?"]),
            "response": "Sure! Here is a clear answer." if good else "That is a stupid question. Go away.",
            "labels": {"helpfulness": 4.0 if good else 1.0, "safety": 3.5 if good else 2.0},
        })
    return rows


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")
