"""Faults, in every paper file: SIGTERM and kill -9 then an exact resume, a NaN on one rank of two (torchrun),
unreadable images, and user errors that print one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
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


# the function whose value is (or carries) each paper file's training loss: a NaN there is a NaN loss
LOSS_FN = {"pedclip": "total_loss", "cxrclip": "cxrclip_loss", "cxrcml": "cml_loss", "dmlm": "total_loss"}


def nan_at_call(fn, calls, rank_ok=lambda: True):
    """fn, whose value (or first value) is NaN at the given 1-based calls (on the ranks rank_ok accepts)."""
    count = [0]

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        count[0] += 1
        if count[0] in calls and rank_ok():
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out

    return wrapped


def _weights(run):
    return common.load_checkpoint(run / "ckpt.pt")["model"]


NAN_RUN = """
import hashlib, os, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import common, pedclip
from test_reliability import nan_at_call

pedclip.total_loss = nan_at_call(pedclip.total_loss, {{3}}, lambda: os.environ["RANK"] == "0")
close = common.Loop.close

def close_with_checksum(self, metrics=None):  # every rank's own weights, hashed
    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in self.model.parameters()))
    open(os.path.join(self.cfg.out_dir, "weights" + os.environ["RANK"]), "w").write(h.hexdigest())
    return close(self, metrics)

common.Loop.close = close_with_checksum
pedclip.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_nan_on_one_rank_of_two_skips_the_step_on_both(tmp_path, phantom_csv):
    """Rank 0's loss is NaN at its third step (step 2): both ranks drop that step, train on, and end with
    the same finite weights."""
    out = tmp_path / "nan"
    (tmp_path / "nan_run.py").write_text(NAN_RUN.format(root=str(ROOT), tests=str(ROOT / "tests")))
    args = [f"--data={phantom_csv}", f"--out_dir={out}", "--epochs=2", *TINY["pedclip"]]
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
         str(tmp_path / "nan_run.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.load(open(out / "metrics.json"))
    assert [r["step"] for r in _log(out / "log.jsonl") if r.get("skipped_nonfinite")] == [2]
    ck = common.load_checkpoint(out / "ckpt.pt")
    per_epoch = len(common.XrayCSV(phantom_csv, "train")) // 16
    assert metrics["skipped_nonfinite_steps"] == 1 and ck["loop"]["step"] == 2 * per_epoch - 1
    assert all(torch.isfinite(w).all() for w in ck["model"].values() if w.is_floating_point())
    assert (out / "weights0").read_text() == (out / "weights1").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("paper", list(TINY))
def test_every_paper_file_skips_a_nan_loss_and_finishes(paper, tmp_path, phantom_csv, monkeypatch, capsys):
    """A real NaN in the paper's loss at step 2: the file's own finiteness check drops that step (a file that
    stepped the optimiser anyway would end with NaN weights); a --resume of the ended run does nothing."""
    import importlib

    m = importlib.import_module(paper)
    monkeypatch.setattr(m, LOSS_FN[paper], nan_at_call(getattr(m, LOSS_FN[paper]), {3}))
    args = [f"--data={phantom_csv}", f"--out_dir={tmp_path}", "--epochs=1", *TINY[paper]]
    metrics = m.main(args)
    ck = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["zeroshot_auc_macro"] is not None
    assert [r["step"] for r in _log(tmp_path / "log.jsonl") if r.get("skipped_nonfinite")] == [2]
    tr = common.XrayCSV(phantom_csv, "train")
    batch = int(next(a for a in TINY[paper] if a.startswith("--batch_size=")).split("=")[1])
    per_epoch = (len(tr.studies) if paper == "cxrclip" else len(tr)) // batch
    assert metrics["step"] == ck["loop"]["step"] == per_epoch - 1  # every batch used, one without a step
    assert all(torch.isfinite(w).all() for w in ck["model"].values() if w.is_floating_point())
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        m.main([*args, "--resume"])
    assert e.value.code == 0 and "this run has ended" in capsys.readouterr().out
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("paper", list(TINY))
def test_fp16_calibration_does_not_stop_a_run_and_the_temperature_comes_back(paper, tmp_path, phantom_csv,
                                                                              monkeypatch):
    """--amp=fp16 on the CPU with a GradScaler that starts at 2^24: its first steps overflow (more than the 5
    in a row that stop a run), are logged as calibration, and the run goes past 20 steps with its loss
    falling. The temperature starts above CLIP's cap (1/tau = 100): its gradient still flows, and the clamp
    after each step brings it to the cap."""
    import functools
    import importlib
    import math

    m = importlib.import_module(paper)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    build = m.build

    def build_hot(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100) + 0.5)
        return model

    monkeypatch.setattr(m, "build", build_hot)
    res = m.main([f"--data={phantom_csv}", f"--out_dir={tmp_path}", "--amp=fp16", "--max_steps=24",
                  *TINY[paper]])
    log = _log(tmp_path / "log.jsonl")
    assert res == {"stopped": "--max_steps=24 reached", "step": 24}
    assert sum(1 for r in log if r.get("fp16_overflow")) >= 6 and not any(r.get("skipped_nonfinite") for r in log)
    key = "l_c" if paper == "cxrcml" else "loss"  # CXR-CML's L_m joins once its embedding bank is full
    losses = [r[key] for r in log if key in r]
    assert np.mean(losses[-4:]) < 0.97 * losses[0], losses
    ck = common.load_checkpoint(tmp_path / "ckpt.pt")
    scale = next(v for k, v in ck["model"].items() if k.endswith("logit_scale"))
    assert float(scale) <= math.log(100) + 1e-6


def _no_module(self, protocol):
    raise RuntimeError("a model was pickled into a DataLoader worker")


@pytest.mark.slow
def test_dataloader_workers_get_no_model(tmp_path, phantom_csv, monkeypatch):
    """Under the spawn start method (macOS, Windows) each worker gets a pickled copy of the loader's dataset,
    sampler and collate_fn: in every paper file these pickle with modules made unpicklable, and pedclip.py
    runs two steps with one spawned worker."""
    import importlib
    import pickle

    loaders = []
    init = torch.utils.data.DataLoader.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        loaders.append(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", recording_init)
    for paper in TINY:
        loaders.clear()
        importlib.import_module(paper).main([f"--data={phantom_csv}", f"--out_dir={tmp_path / paper}",
                                             "--max_steps=1", *TINY[paper]])
        with monkeypatch.context() as mp:
            mp.setattr(torch.nn.Module, "__reduce_ex__", _no_module)
            for loader in loaders:
                assert len(pickle.dumps((loader.dataset, loader.sampler, loader.collate_fn))) < 2**20
    code = f"""
import multiprocessing, sys, torch
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_reliability import TINY, _no_module

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    torch.nn.Module.__reduce_ex__ = _no_module
    import pedclip
    res = pedclip.main(["--data={phantom_csv}", "--out_dir={tmp_path}/spawn", "--max_steps=2", "--num_workers=1",
                        *TINY["pedclip"]])
    print(res["step"])
"""
    (tmp_path / "spawn_run.py").write_text(code)
    p = subprocess.run([sys.executable, str(tmp_path / "spawn_run.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("2"), p.stderr[-3000:]


def test_resume_with_a_flag_that_changes_the_model_is_one_line(tmp_path, phantom_csv):
    import dmlm

    args = [f"--data={phantom_csv}", f"--out_dir={tmp_path}", "--max_steps=1", *TINY["dmlm"]]
    dmlm.main(args)
    with pytest.raises(common.UserError, match=r"--target=ema \(the run has stopgrad\)"):
        dmlm.main([*args, "--resume", "--target=ema"])


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
        (["--resume"], "--resume: no checkpoint"),
        (["--moe_layers=12"], "--moe_layers=12"),
    ],
)
def test_user_errors_name_the_problem(argv, says, tmp_path):
    import pedclip

    with pytest.raises(common.UserError, match=says):
        pedclip.main([*argv, f"--out_dir={tmp_path / 'none'}"])


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    for argv, says in (
        (["--data=nowhere.csv"], "nowhere.csv does not exist"),
        (["--batch_size=many"], "invalid int value: 'many'"),
    ):
        p = subprocess.run(
            [sys.executable, "pedclip.py", *argv, f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
            text=True, timeout=120,
        )
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert len([line for line in p.stderr.splitlines() if "error" in line]) == 1
