"""Faults, in every paper file: SIGTERM and kill -9 then an exact resume, a NaN on one rank of two (torchrun),
unreadable images, and user errors that print one line."""

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

TINY = {  # small settings of each paper file for the fault tests (a few seconds a run)
    "pedclip": [
        "--image_size=32",
        "--vit_width=32",
        "--vit_mlp_dim=64",
        "--vocab_size=400",
        "--embed_dim=32",
        "--batch_size=16",
        "--log_every=1",
        "--teacher_epochs=1",
        "--threads=1",
    ],
    "cxrclip": [
        "--image_size=32",
        "--tiny_width=32",
        "--embed_dim=32",
        "--vocab_size=400",
        "--num_workers=0",
        "--log_every=1",
        "--batch_size=8",
        "--threads=1",
    ],
    "cxrcml": [
        "--image_size=32",
        "--batch_size=16",
        "--bank_size=64",
        "--refit_every=3",
        "--n_clusters=4",
        "--num_workers=0",
        "--log_every=1",
        "--threads=1",
    ],
    "dmlm": [
        "--image_size=32",
        "--patch_size=8",
        "--vit_width=32",
        "--vit_depth=1",
        "--embed_dim=32",
        "--batch_size=16",
        "--log_every=1",
        "--threads=1",
    ],
}


def _log(p):
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in open(p)]


def _wait_for_steps(log, n, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
        if log.exists() and sum(1 for line in open(log) if '"loss"' in line) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.slow
def test_sigterm_then_kill9_then_resume_equals_uninterrupted(tmp_path, phantom_csv):
    import pedclip

    args = [f"--data={phantom_csv}", "--epochs=3", "--ckpt_every=1", *TINY["pedclip"]]
    pedclip.main([*args, f"--out_dir={tmp_path / 'ref'}"])
    run = tmp_path / "run"
    cmd = [sys.executable, "pedclip.py", *args, f"--out_dir={run}"]
    # 1) SIGTERM (pre-emption): the step finishes, a checkpoint is written, the message says how to continue
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run / "log.jsonl", 3, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "SIGTERM" in out + err and "ckpt.pt" in out and "--resume" in out, err[
        -2000:
    ]
    step_at_term = common.load_checkpoint(run / "ckpt.pt")["loop"]["step"]
    # 2) kill -9 at an arbitrary later moment (maybe mid-checkpoint): the last whole checkpoint survives
    p = subprocess.Popen(
        cmd + ["--resume"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_steps(run / "log.jsonl", step_at_term + 3, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert common.load_checkpoint(run / "ckpt.pt")["loop"]["step"] > step_at_term
    # 3) resume to the end: the weights and the log of the run that was never interrupted
    pedclip.main([*args, f"--out_dir={run}", "--resume"])
    a, b = (common.load_checkpoint(d / "ckpt.pt")["model"] for d in (tmp_path / "ref", run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(tmp_path / "ref" / "log.jsonl") == _log(run / "log.jsonl")


@pytest.mark.slow
def test_nan_on_one_rank_of_two_skips_the_step_on_both(tmp_path, phantom_csv):
    out = tmp_path / "nan"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29561",
            "pedclip.py",
            f"--data={phantom_csv}",
            f"--out_dir={out}",
            "--epochs=2",
            *TINY["pedclip"],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FAULT_NAN_STEP": "2"},
    )
    assert p.returncode == 0, p.stderr[-3000:]  # the NaN is on rank 0 only: rank 1 skips its step too
    assert [r["step"] for r in _log(out / "log.jsonl") if r.get("skipped_nonfinite")] == [2]
    assert json.load(open(out / "metrics.json"))["skipped_nonfinite_steps"] == 1
    assert all(
        torch.isfinite(w).all()
        for w in common.load_checkpoint(out / "ckpt.pt")["model"].values()
        if w.is_floating_point()
    )


@pytest.mark.slow
@pytest.mark.parametrize("paper", list(TINY))
def test_every_paper_file_skips_a_non_finite_step_and_finishes(paper, tmp_path, phantom_csv, monkeypatch):
    import importlib

    monkeypatch.setenv("FAULT_NAN_STEP", "2")
    m = importlib.import_module(paper).main(
        [f"--data={phantom_csv}", f"--out_dir={tmp_path}", "--epochs=1", *TINY[paper]]
    )
    assert m["skipped_nonfinite_steps"] == 1 and m["zeroshot_auc_macro"] is not None
    assert [r["step"] for r in _log(tmp_path / "log.jsonl") if r.get("skipped_nonfinite")] == [2]


@pytest.mark.slow
def test_unreadable_images_are_counted_and_fail_past_the_limit(tmp_path, phantom_csv):
    import pedclip

    d = tmp_path / "data"
    shutil.copytree(os.path.dirname(phantom_csv), d)
    tr = common.XrayCSV(d / "phantoms.csv", split="train")
    for r in tr.rows[:3]:
        with open(r["_path"], "r+b") as f:
            f.truncate(40)  # truncated PNGs
    args = [f"--data={d / 'phantoms.csv'}", "--epochs=1", *TINY["pedclip"]]
    m = pedclip.main([*args, f"--out_dir={tmp_path / 'a'}", "--max_bad_frac=0.5"])
    assert m["bad_samples"].get("unreadable image", 0) >= 1
    with pytest.raises(common.UserError, match="max_bad_frac"):
        pedclip.main([*args, f"--out_dir={tmp_path / 'b'}", "--max_bad_frac=0.0001"])


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--data=nowhere.csv"], "nowhere.csv does not exist"),
        (["--resume", "--out_dir={tmp}/none"], "--resume: no checkpoint"),
        (["--moe_layers=12"], "--moe_layers=12"),
    ],
)
def test_user_errors_name_the_problem(argv, says, tmp_path):
    import pedclip

    with pytest.raises(common.UserError, match=says):
        pedclip.main([a.replace("{tmp}", str(tmp_path)) for a in argv])


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    for argv, says in (
        (["--data=nowhere.csv"], "nowhere.csv does not exist"),
        (["--batch_size=many"], "invalid int value: 'many'"),
    ):
        p = subprocess.run(
            [sys.executable, "pedclip.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert len([line for line in p.stderr.splitlines() if "error" in line]) == 1
