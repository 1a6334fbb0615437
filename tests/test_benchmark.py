"""--benchmark in every paper file (tiny sizes, a few steps, every field printed); --compile gives the eager loss."""
import importlib
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

PAPERS = ["cxrclip", "pedclip", "cxrcml", "dmlm"]
FIELDS = ["samples/s", "step", "p50", "p90", "peak memory", "GFLOP/sample", "TFLOP/s", "MFU"]


@pytest.mark.parametrize("paper", PAPERS)
def test_benchmark_mode_prints_every_field(paper):
    if not (ROOT / f"{paper}.py").exists():
        pytest.skip(f"{paper}.py not in this checkout")
    p = subprocess.run([sys.executable, f"{paper}.py", "--benchmark", "--benchmark_steps=2", "--batch_size=8",
                        "--image_size=32", "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("benchmark")]
    assert line, p.stdout[-2000:]
    for f in FIELDS:
        assert f in "\n".join(line), (f, line)


def test_benchmark_flops_match_an_independent_count():
    """FlopCounterMode's count of one tiny-CNN forward equals the conv/linear MACs counted by hand, x2."""
    import common
    import cxrclip

    m = cxrclip.TinyCNN(32)
    x = torch.randn(2, 3, 32, 32)
    macs, h = 0, 32
    for mod in m.body:
        if isinstance(mod, torch.nn.Conv2d):
            h = (h + 2 * mod.padding[0] - mod.kernel_size[0]) // mod.stride[0] + 1
            macs += h * h * mod.out_channels * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    assert common.count_flops(lambda: m.tokens(x)) == 2 * 2 * macs


@pytest.mark.slow
def test_compile_gives_the_eager_loss(phantom_csv):
    """torch.compile (inductor on CPU) vs eager on one fixed batch: same loss to 1e-4 (float32 re-association)."""
    import common
    import cxrclip

    torch.manual_seed(0)
    cfg = cxrclip.Config(image_size=32, tiny_width=32, embed_dim=32, vocab_size=300)
    tr = common.XrayCSV(phantom_csv, split="train")
    model = cxrclip.build(cfg, None, tr).eval()
    ds = cxrclip.StudyDataset(tr, cfg, train=False)
    batch = cxrclip.Collate(model.tokenize)([ds[(i, i)] for i in range(8)])

    def loss_of(m):
        v, u1, u2 = m(torch.cat([batch["x1"], batch["x2"]]), batch["t1"], batch["t2"])
        return cxrclip.cxrclip_loss(u1, u2, v[:8], v[8:], model.scale(), 1.0, 0.5)[0].item()

    eager = loss_of(model)
    compiled = loss_of(torch.compile(model))
    assert abs(eager - compiled) < 1e-4, (eager, compiled)
