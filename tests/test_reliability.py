"""Faults: SIGTERM, kill -9 + exact resume, NaN on one rank of two, bad images during training."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT

TINY = ["--image_size=32", "--tiny_width=32", "--embed_dim=32", "--vocab_size=400", "--num_workers=0",
        "--eval_batch_size=64", "--log_every=1", "--batch_size=16", "--lr=1e-3"]


def _weights(p):
    return common.load_checkpoint(p)["model"]


def _log(p):
    return [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in open(p)]


def _wait_for_steps(log, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
        if log.exists() and sum(1 for l in open(log) if '"loss"' in l) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


def test_sigterm_then_kill9_then_resume_equals_uninterrupted(tmp_path, phantom_csv):
    import cxrclip

    args = [f"--data={phantom_csv}", "--epochs=4", "--ckpt_every=1", *TINY]
    cxrclip.main([*args, f"--out_dir={tmp_path / 'ref'}"])

    run = tmp_path / "run"
    cmd = [sys.executable, "cxrclip.py", *args, f"--out_dir={run}"]
    # 1) SIGTERM (pre-emption): the step finishes, a checkpoint is written, the message names it
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run / "log.jsonl", 3, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "SIGTERM" in out + err and "ckpt.pt" in out + err and "--resume" in out + err
    step_at_term = common.load_checkpoint(run / "ckpt.pt")["step"]
    assert step_at_term >= 3

    # 2) kill -9 at an arbitrary later moment (maybe mid-checkpoint): the last whole checkpoint survives
    p = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run / "log.jsonl", step_at_term + 3, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert common.load_checkpoint(run / "ckpt.pt")["step"] > step_at_term

    # 3) resume to the end: same weights and same log as the run that was never interrupted
    cxrclip.main([*args, f"--out_dir={run}", "--resume"])
    wa, wb = _weights(tmp_path / "ref" / "ckpt.pt"), _weights(run / "ckpt.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    assert _log(tmp_path / "ref" / "log.jsonl") == _log(run / "log.jsonl")


def test_nan_on_one_rank_skips_the_step_on_both(tmp_path, phantom_csv):
    out = tmp_path / "nan"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        "cxrclip.py", f"--data={phantom_csv}", f"--out_dir={out}", "--epochs=2", "--fault_nan_step=2",
                        *TINY], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _log(out / "log.jsonl")
    assert [r["step"] for r in rows if r.get("skipped_nonfinite")] == [2]
    assert json.load(open(out / "metrics.json"))["skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in _weights(out / "ckpt.pt").values() if w.is_floating_point())


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path, phantom_csv):
    import cxrclip

    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        cxrclip.main([f"--data={phantom_csv}", f"--out_dir={out}", "--epochs=2", "--fault_nan_step=1",
                      "--max_bad_steps=1", *TINY])
    assert "non-finite" in str(e.value) and "ckpt.pt" in str(e.value)
    assert common.load_checkpoint(out / "ckpt.pt")["step"] == 1


def test_unreadable_images_are_counted_and_fail_past_the_limit(tmp_path, phantom_csv):
    import cxrclip

    d = tmp_path / "data"
    shutil.copytree(os.path.dirname(phantom_csv), d)
    tr = common.XrayCSV(d / "phantoms.csv", split="train")
    for i in tr.studies[0] + tr.studies[1]:
        with open(tr.rows[i]["_path"], "r+b") as f:
            f.truncate(40)  # truncated PNGs
    m = cxrclip.main([f"--data={d / 'phantoms.csv'}", f"--out_dir={tmp_path / 'a'}", "--epochs=1",
                      "--max_bad_frac=0.5", *TINY])
    assert m["bad_samples"].get("unreadable image", 0) >= 1
    with pytest.raises(RuntimeError, match="max_bad_frac"):
        cxrclip.main([f"--data={d / 'phantoms.csv'}", f"--out_dir={tmp_path / 'b'}", "--epochs=1",
                      "--max_bad_frac=0.0001", *TINY])


# ---- the same faults in the other three paper files (each copies cxrclip.py's loop on purpose) ----

OTHER = {
    "pedclip": ["--image_size=32", "--vit_width=32", "--vit_mlp_dim=64", "--tiny_width=32", "--tiny_layers=1",
                "--vocab_size=400", "--embed_dim=32", "--batch_size=16", "--log_every=1", "--teacher_epochs=1"],
    "cxrcml": ["--image_size=32", "--patch_size=8", "--batch_size=16", "--bank_size=64", "--refit_every=3",
               "--n_clusters=4", "--num_workers=0", "--folds=2", "--log_every=1", "--vocab_size=300"],
    "dmlm": ["--image_size=32", "--vit_width=32", "--vit_layers=1", "--vit_heads=2", "--bert_width=32",
             "--bert_layers=1", "--embed_dim=32", "--fusion_width=32", "--fusion_heads=2", "--vocab_size=400",
             "--max_tokens=64", "--batch_size=16", "--num_workers=0", "--log_every=1"],
}


@pytest.mark.parametrize("paper", list(OTHER))
def test_other_papers_nan_on_one_rank_and_sigterm(paper, tmp_path, phantom_csv):
    out = tmp_path / "nan"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                        f"{paper}.py", f"--data={phantom_csv}", f"--out_dir={out}", "--epochs=2", "--fault_nan_step=2",
                        *OTHER[paper]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _log(out / "log.jsonl") if r.get("skipped_nonfinite")] == [2]

    run = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, f"{paper}.py", f"--data={phantom_csv}", f"--out_dir={run}",
                             "--epochs=50", *OTHER[paper]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_steps(run / "log.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    o, e = proc.communicate(timeout=120)
    assert proc.returncode == 0, e[-2000:]
    assert "SIGTERM" in o + e and "ckpt.pt" in o + e
    assert common.load_checkpoint(run / "ckpt.pt")["step"] >= 2


def test_cxrcml_resume_is_exact(tmp_path, phantom_csv):
    """CXR-CML also checkpoints its embedding bank and mixture: stop mid-run, resume, same weights and log."""
    import cxrcml

    args = [f"--data={phantom_csv}", "--epochs=3", "--ckpt_every=2", *OTHER["cxrcml"]]
    cxrcml.main([*args, f"--out_dir={tmp_path / 'a'}"])
    cxrcml.main([*args, f"--out_dir={tmp_path / 'b'}", "--max_steps=7"])
    cxrcml.main([*args, f"--out_dir={tmp_path / 'b'}", "--resume"])
    wa, wb = _weights(tmp_path / "a" / "ckpt.pt"), _weights(tmp_path / "b" / "ckpt.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    drop = ("elapsed_s", "cluster_share", "step_ms", "cluster_ms")
    strip = lambda p: [{k: v for k, v in r.items() if k not in drop} for r in _log(p)]  # noqa: E731
    assert strip(tmp_path / "a" / "log.jsonl") == strip(tmp_path / "b" / "log.jsonl")
