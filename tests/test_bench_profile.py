"""bench/train_vs_trl.py --profile: the step-time breakdown puts each operator's time in its group."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_vs_trl", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_breakdown_groups_real_profiler_events(bench):
    a, w = torch.randn(256, 128), torch.randn(128, 128, requires_grad=True)
    q = torch.randn(8, 64, 16)
    opt = torch.optim.AdamW([w], lr=1e-3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):  # two "steps"
            y = torch.nn.functional.gelu(a @ w)
            s = torch.softmax(torch.bmm(q, q.transpose(1, 2)), -1)
            (y.sum() + s.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    events = prof.key_averages()
    b = bench.step_time_breakdown(events, steps=2)
    g = b["groups_ms_per_step"]
    assert set(g) == {name for name, _ in bench.OP_GROUPS} | {"everything else (Python, autograd, small ops)"}

    def ms(*keys):
        return sum(e.self_cpu_time_total for e in events if e.key in keys) / 1e3 / 2

    assert g["linear-layer matmuls (mm, addmm)"] == pytest.approx(ms("aten::mm", "aten::addmm"))
    assert g["linear-layer matmuls (mm, addmm)"] > 0
    assert g["attention matmuls (bmm, baddbmm) and sdpa kernels"] == pytest.approx(ms("aten::bmm", "aten::baddbmm"))
    assert g["softmax, forward and backward"] == pytest.approx(ms("aten::_softmax", "aten::_softmax_backward_data"))
    assert g["softmax, forward and backward"] > 0
    assert g["activations and norms (GELU, SiLU, LayerNorm)"] == pytest.approx(ms("aten::gelu", "aten::gelu_backward"))
    # record_function ranges such as "Optimizer.step#AdamW.step" count with the optimizer
    assert g["AdamW and zero_grad"] >= sum(e.self_cpu_time_total for e in events if e.key.startswith("Optimizer.")) / 1e3 / 2
    assert sum(g.values()) == pytest.approx(b["total_ms_per_step"])
    assert b["total_ms_per_step"] == pytest.approx(sum(e.self_cpu_time_total for e in events) / 1e3 / 2)
    assert b["top_ops_ms_per_step"][0][1] == max(e.self_cpu_time_total for e in events) / 1e3 / 2
