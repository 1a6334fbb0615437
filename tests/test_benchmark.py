"""benchmark.py times every paper's training step: samples/s, step time, memory and FLOPs."""
import subprocess
import sys

import pytest
import torch

import benchmark
from conftest import ROOT

PAPERS = ["pedclip", "cxrclip", "cxrcml", "dmlm"]
FIELDS = ["samples/s", "step", "p90", "peak memory", "GFLOP/sample", "TFLOP/s"]


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_benchmark_prints_every_field(paper):
    p = subprocess.run([sys.executable, "benchmark.py", paper, "--batch_size=8", "--image_size=32",
                        "--device=cpu", "--threads=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = "\n".join(line for line in p.stdout.splitlines() if line.startswith("benchmark"))
    assert all(f in lines for f in FIELDS), p.stdout[-2000:]


def test_benchmark_names_the_papers():
    p = subprocess.run([sys.executable, "benchmark.py", "mocov3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "pedclip | cxrclip | cxrcml | dmlm" in p.stderr


def test_flop_count_of_a_linear_layer_is_2_n_in_out():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    assert benchmark.count_flops(lambda: lin(x)) == 2 * 5 * 16 * 8
    assert benchmark.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 5 * 16 * 8  # backward 2x
