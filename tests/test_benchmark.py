"""benchmark.py times every paper's training step: samples/s, step time, memory and FLOPs."""
import math
import re
import subprocess
import sys

import pytest
import torch

import benchmark
import common
from conftest import ROOT

PAPERS = ["pedclip", "cxrclip", "cxrcml", "dmlm"]
ARGS = ["--batch_size=8", "--image_size=32", "--device=cpu", "--threads=1"]
LINE = re.compile(r"benchmark (.+) on CPU: ([\d.]+) samples/s \| step ([\d.]+) ms \(p90 ([\d.]+)\) \| peak memory "
                  r"([\d.]+) GiB \| ([\d.e+-]+) GFLOP/sample, ([\d.e+-]+) TFLOP/s")


def _figures(paper):
    p = subprocess.run([sys.executable, "benchmark.py", paper, *ARGS], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [LINE.fullmatch(line) for line in p.stdout.splitlines() if line.startswith("benchmark")]
    assert rows and all(rows), p.stdout[-2000:]  # every "benchmark" line has every field
    return {r[1]: [float(v) for v in r.groups()[1:]] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_benchmark_prints_consistent_figures(paper):
    """Every figure finite and > 0 (no FLOPs in AdamW's step); samples/s x step time = the samples of one step; for CXR-CLIP, GFLOP per
    sample within 10% of a forward + backward counted here on the model the paper file builds."""
    figures = _figures(paper)
    for label, (sps, ms, p90, mem, gflop, tflops) in figures.items():
        assert all(math.isfinite(v) and v > 0 for v in (sps, ms, p90, mem)), label
        # FLOPs count matmuls and convolutions: AdamW's step alone (PedCLIP's rows) has none
        assert (gflop == tflops == 0) if "AdamW" in label else (gflop > 0 and tflops > 0), label
        samples = 16 if paper == "cxrclip" else 8  # 2 image-text pairs a study; the mixture fits the bank:
        if "mixture fit" in label:
            import cxrcml

            samples = common.parse_config(cxrcml.Config, cxrcml.PRESETS, ARGS).bank_size
        assert abs(sps * ms / 1e3 - samples) < 0.02 * samples, (label, sps, ms)
        assert abs(tflops * 1e12 - gflop * 1e9 * sps) <= 0.02 * tflops * 1e12, label
    if paper == "cxrclip":
        import cxrclip

        cfg = common.parse_config(cxrclip.Config, cxrclip.PRESETS, ARGS)
        tok = common.tokenizer_from_vocab(benchmark.SPECIALS + [f"w{i}" for i in range(cfg.vocab_size - 5)])
        model = cxrclip.build(cfg, tok)
        x = torch.randn(16, 3, 32, 32)
        t = {"input_ids": torch.randint(5, cfg.vocab_size, (8, cfg.max_tokens)),
             "attention_mask": torch.ones(8, cfg.max_tokens, dtype=torch.long)}
        def fwd_bwd():
            v1, v2, u1, u2 = model(x, t, t)
            cxrclip.cxrclip_loss(v1, v2, u1, u2, model.logit_scale.exp(), 1.0, 0.5)[0].backward()
        flops = benchmark.count_flops(fwd_bwd)
        (gflop,) = [f[4] for label, f in figures.items()]
        assert abs(gflop * 1e9 - flops / 16) < 0.1 * flops / 16, (gflop, flops / 16)


def test_benchmark_help_and_an_unknown_paper():
    p = subprocess.run([sys.executable, "benchmark.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "usage: benchmark.py" in p.stdout and "samples/s" in p.stdout
    p = subprocess.run([sys.executable, "benchmark.py", "mocov3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "pedclip | cxrclip | cxrcml | dmlm" in p.stderr


def test_flop_count_of_a_linear_layer_is_2_n_in_out():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    assert benchmark.count_flops(lambda: lin(x)) == 2 * 5 * 16 * 8
    assert benchmark.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 5 * 16 * 8  # backward 2x
