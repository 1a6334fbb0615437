"""Shared pytest fixtures: a small phantom data set drawn once per session (32 px, ~240 images)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download; offline loads must fail fast


@pytest.fixture(scope="session")
def phantom_csv(tmp_path_factory):
    import phantoms

    return str(phantoms.make_phantoms(240, seed=0, out_dir=tmp_path_factory.mktemp("phantoms"), size=32,
                                      progress=False))
