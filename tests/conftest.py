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


TINY_FLAGS = {  # each paper file's demo at its smallest (its flags as it defines them)
    "pedclip": ["--patch_size=8", "--vit_width=32", "--vit_depth=1", "--vit_heads=2", "--vit_mlp_dim=64",
                "--embed_dim=32", "--vocab_size=300", "--teacher_epochs=0"],
    "cxrclip": ["--tiny_width=32", "--embed_dim=32", "--vocab_size=300"],
    "cxrcml": ["--width=32", "--layers=1", "--patch_size=8", "--n_clusters=4", "--bank_size=32",
               "--refit_every=1"],
    "dmlm": ["--patch_size=8", "--vit_width=32", "--vit_depth=1", "--vit_heads=2", "--embed_dim=32"],
}
