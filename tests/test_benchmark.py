"""--benchmark in every paper file prints samples/s, step time, memory and FLOPs."""
import subprocess
import sys

import pytest

from conftest import ROOT

PAPERS = ["pedclip", "cxrclip", "cxrcml", "dmlm"]
FIELDS = ["samples/s", "step", "p90", "peak memory", "GFLOP/sample", "TFLOP/s"]


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_benchmark_prints_every_field(paper):
    p = subprocess.run([sys.executable, f"{paper}.py", "--benchmark", "--batch_size=8", "--image_size=32",
                        "--device=cpu", "--threads=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = "\n".join(line for line in p.stdout.splitlines() if line.startswith("benchmark"))
    assert all(f in lines for f in FIELDS), p.stdout[-2000:]
