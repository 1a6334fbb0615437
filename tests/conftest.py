"""Shared pytest fixtures: a small phantom data set made once per session (32 px, ~240 images)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import common  # noqa: E402,F401  (first: it hides a torchvision wheel that cannot load, before transformers looks)


@pytest.fixture(scope="session")
def phantom_csv(tmp_path_factory):
    import common

    d = tmp_path_factory.mktemp("phantoms")
    return str(common.make_phantoms(240, seed=0, out_dir=d, size=32, progress=False))
