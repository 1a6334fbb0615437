"""common.py: CLI, CSV schema, image loading (PNG / JPEG / DICOM), phantoms, checkpoints, metrics, DDP gather."""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import ROOT


# ---- CLI ----

from dataclasses import dataclass


@dataclass
class _Cfg:
    lr: float = 0.1  # learning rate
    epochs: int = 3  # epochs
    name: str = "x"  # a name
    flag: bool = False  # a switch
    preset: str = "demo"  # preset


_PRESETS = {"demo": {}, "paper": {"lr": 0.5, "epochs": 10}}


def test_cli_types_presets_and_overrides():
    c = common.parse_config(_Cfg, _PRESETS, ["--preset=paper", "--epochs=7", "--flag", "--name=y"])
    assert (c.lr, c.epochs, c.flag, c.name, c.preset) == (0.5, 7, True, "y", "paper")
    c = common.parse_config(_Cfg, _PRESETS, ["--flag=false", "--lr=1e-3"])
    assert (c.lr, c.flag, c.epochs) == (1e-3, False, 3)
    # flags override the preset whatever their order on the command line
    assert common.parse_config(_Cfg, _PRESETS, ["--epochs=2", "--preset=paper"]).epochs == 2


@pytest.mark.parametrize("argv, must_contain", [
    (["--lrr=1"], ["--lrr", "--lr", "--epochs"]),             # unknown flag: named, valid ones listed
    (["--epochs=two"], ["--epochs", "two", "int"]),           # bad value: named with the expected type
    (["--flag=maybe"], ["--flag", "maybe"]),
    (["--preset=huge"], ["huge", "demo", "paper"]),
    (["epochs=3"], ["epochs=3"]),
])
def test_cli_errors_name_the_flag(argv, must_contain):
    with pytest.raises(common.ConfigError) as e:
        common.parse_config(_Cfg, _PRESETS, argv)
    for s in must_contain:
        assert s in str(e.value)


def test_cli_help_lists_fields_with_comments(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(_Cfg, _PRESETS, ["--help"])
    out = capsys.readouterr().out
    assert "--lr=0.1" in out and "learning rate" in out and "--flag" in out


# ---- CSV schema ----

def _write_csv(path, rows, cols):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def test_csv_missing_column_names_file_and_column(tmp_path):
    p = tmp_path / "d.csv"
    _write_csv(p, [{"study_id": "1", "split": "train"}], ["study_id", "split"])
    with pytest.raises(ValueError) as e:
        common.XrayCSV(p, require=("image", "study_id"))
    assert str(p) in str(e.value) and "'image'" in str(e.value)
    with pytest.raises(FileNotFoundError):
        common.XrayCSV(tmp_path / "nope.csv")


def test_csv_paths_studies_splits_labels(tmp_path):
    cols = ["image", "study_id", "split", "findings", "label:A", "label:B"]
    rows = [{"image": "a.png", "study_id": "s1", "split": "train", "findings": "x", "label:A": "1", "label:B": ""},
            {"image": "sub/b.png", "study_id": "s1", "split": "train", "findings": "x", "label:A": "-1", "label:B": "0"},
            {"image": "c.png", "study_id": "s2", "split": "test", "findings": "y", "label:A": "0", "label:B": "1.0"},
            {"image": "d.png", "study_id": "s3", "split": "train", "findings": "z", "label:A": "2", "label:B": "1"}]
    _write_csv(tmp_path / "d.csv", rows, cols)
    counter = common.BadSampleCounter(max_bad_frac=0.5)
    t = common.XrayCSV(tmp_path / "d.csv", split="train", counter=counter)
    assert t.label_names == ["A", "B"]
    assert [r["_path"] for r in t.rows] == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png")]
    assert t.studies == [[0, 1]]  # s1 grouped; s3 dropped for its label "2" ...
    assert counter.counts["label outside {1, 0, -1, blank}"] == 1  # ... and counted, not silently
    lab = t.labels()
    assert lab[0, 0] == 1 and np.isnan(lab[0, 1]) and lab[1, 0] == -1 and lab[1, 1] == 0
    # more bad rows than --max_bad_frac allows: a clear error
    with pytest.raises(RuntimeError, match="max_bad_frac"):
        common.XrayCSV(tmp_path / "d.csv", split="train", counter=common.BadSampleCounter(0.1))


# ---- images ----

def test_load_png_and_jpeg(tmp_path):
    from PIL import Image

    a = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert np.array_equal(common.load_image(tmp_path / "a.png"), a)
    rgb = np.stack([a, a, a], -1)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    got = common.load_image(tmp_path / "a.jpg")
    assert got.shape == (48, 64) and got.dtype == np.uint8 and np.abs(got.astype(int) - a).mean() < 4
    Image.fromarray((a.astype(np.uint16) * 200)).save(tmp_path / "b16.png")  # 16-bit PNG: rescaled
    g16 = common.load_image(tmp_path / "b16.png")
    assert g16.max() == 255 and g16.min() == 0


def test_bad_images_raise_named_errors(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for name in ("trunc.png", "junk.jpg", "missing.png"):
        with pytest.raises(common.BadImageError) as e:
            common.load_image(tmp_path / name)
        assert name in str(e.value)


def _write_dicom(path, pixels: np.ndarray, photometric: str, window=None, with_pixels=True):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PhotometricInterpretation = "DX", photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_load_dicom_monochrome_and_window(tmp_path):
    px = np.linspace(0, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)
    ref = np.round((px - px.min()) / (px.max() - px.min()) * 255)
    _write_dicom(tmp_path / "m2.dcm", px, "MONOCHROME2")
    _write_dicom(tmp_path / "m1.dcm", px, "MONOCHROME1")
    m2, m1 = common.load_image(tmp_path / "m2.dcm"), common.load_image(tmp_path / "m1.dcm")
    assert np.abs(m2 - ref).max() <= 1
    assert np.abs(m1 - (255 - ref)).max() <= 1  # MONOCHROME1: inverted so bone is bright
    # windowed: DICOM PS3.3 C.11.2.1.2 linear VOI function, computed here independently, then scaled to 8 bit
    c, w = 1000.0, 800.0
    _write_dicom(tmp_path / "win.dcm", px, "MONOCHROME2", window=(c, w))
    x = px.astype(np.float64)
    y = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5), 0, 1)
    expect = np.round((y - y.min()) / (y.max() - y.min()) * 255)
    got = common.load_image(tmp_path / "win.dcm")
    assert np.abs(got.astype(float) - expect).max() <= 2
    assert (got == 0).mean() > 0.1 and (got == 255).mean() > 0.3  # the window really clipped both ends
    # a DICOM with no pixel data (file name as .png too: detected by its DICM magic)
    _write_dicom(tmp_path / "empty.dcm", px, "MONOCHROME2", with_pixels=False)
    with pytest.raises(common.BadImageError, match="empty.dcm"):
        common.load_image(tmp_path / "empty.dcm")


def test_augmentations_shapes_and_determinism():
    img = (np.random.default_rng(0).random((80, 70)) * 255).astype(np.uint8)
    a = common.random_resized_crop(img, 32, np.random.default_rng(1))
    b = common.random_resized_crop(img, 32, np.random.default_rng(1))
    assert a.shape == (32, 32) and np.array_equal(a, b)
    assert common.clahe(img).shape == img.shape
    t = common.to_tensor(a)
    assert t.shape == (3, 32, 32)
    assert torch.allclose(t[0] * common.IMAGENET_STD[0] + common.IMAGENET_MEAN[0], torch.tensor(a / 255.0).float(), atol=1e-6)


# ---- phantoms ----

def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_phantoms_deterministic_and_schema(tmp_path, phantom_csv):
    a = common.make_phantoms(60, seed=3, out_dir=tmp_path / "a", size=32, progress=False)
    b = common.make_phantoms(60, seed=3, out_dir=tmp_path / "b", size=32, progress=False)
    c = common.make_phantoms(60, seed=4, out_dir=tmp_path / "c", size=32, progress=False)
    assert _digest(a.parent) == _digest(b.parent) != _digest(c.parent)
    t = common.XrayCSV(phantom_csv)
    rows = t.rows
    assert set(r["body_part"] for r in rows) == set(common.PHANTOM_BODY_PARTS)
    assert all(len(s) >= 2 for s in t.studies)  # >= 2 views per study
    split_of = {}
    for r in rows:  # split by patient: a patient never appears in two splits
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert {r["split"] for r in rows} == {"train", "valid", "test"}
    assert any(r["findings"].lower().startswith(("no ", "there is no")) or " no " in r["findings"].lower() for r in rows)
    assert all(r["target"].isdigit() for r in rows)
    assert len(common.PHANTOM_FINDINGS) >= 8 and set(common.PHANTOM_RARE) <= set(common.PHANTOM_FINDINGS)


def test_phantom_findings_are_in_the_pixels(phantom_csv):
    """Drawn findings: each mask marks pixels that differ from the finding-free rendering."""
    t = common.XrayCSV(phantom_csv)
    from PIL import Image

    n_checked = 0
    for r in t.rows:
        m = np.array(Image.open(Path(phantom_csv).parent / r["mask"]))
        pos = [n for n, v in zip(t.label_names, r["_labels"]) if v in (1, -1) and n != "No Finding"]
        ids = set(np.unique(m)) - {0}
        if pos:
            assert ids, f"{r['image']} has findings {pos} but an empty mask"
            n_checked += 1
        else:
            assert not ids
    assert n_checked > 20


def test_phantoms_2000_images_under_30s(tmp_path):
    t0 = time.time()
    p = common.make_phantoms(2000, seed=1, out_dir=tmp_path, size=64, progress=False)
    dt = time.time() - t0
    with open(p) as f:
        n = sum(1 for _ in f) - 1
    assert n >= 2000 and dt < 30, (n, dt)


# ---- checkpoints ----

def test_checkpoint_atomic_and_prev_kept(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.pt"
    common.save_checkpoint({"w": torch.ones(3), "step": 1}, p)
    common.save_checkpoint({"w": torch.ones(3) * 2, "step": 2}, p)
    assert common.load_checkpoint(p)["step"] == 2
    assert common.load_checkpoint(tmp_path / "ckpt_prev.pt")["step"] == 1

    # a crash in the middle of writing the next one: ckpt.pt is untouched and loadable
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint({"w": torch.ones(3) * 3, "step": 3}, p)
    monkeypatch.setattr(torch, "save", real_save)
    assert common.load_checkpoint(p)["step"] == 2

    # a corrupt ckpt.pt: the error names it and points at ckpt_prev.pt
    p.write_bytes(b"\x00garbage")
    with pytest.raises(RuntimeError) as e:
        common.load_checkpoint(p)
    assert "ckpt.pt" in str(e.value) and "ckpt_prev.pt" in str(e.value)


_KILL_WRITER = r"""
import sys, torch, common
p = sys.argv[1]
i = 0
while True:
    i += 1
    common.save_checkpoint({"step": i, "w": torch.full((3_000_000,), float(i))}, p)
    print(i, flush=True)
"""


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_one(tmp_path):
    p = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(p)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.readline()  # one whole checkpoint exists
    proc.stdout.readline()
    time.sleep(0.137)  # then kill at an arbitrary moment, most likely mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = common.load_checkpoint(p)
    assert ck["step"] >= 1 and torch.all(ck["w"] == ck["step"])


def test_out_dir_refuses_to_overwrite(tmp_path):
    common.save_checkpoint({"step": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="--resume"):
        common.prepare_out_dir(tmp_path, resume=False, overwrite=False)
    assert common.prepare_out_dir(tmp_path, resume=True, overwrite=False) == tmp_path


# ---- metrics ----

def test_auc_per_label_against_sklearn_and_undefined():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3)).astype(float)
    y[:5, 0] = -1  # uncertain: excluded
    y[5:10, 0] = np.nan  # blank: excluded
    y[:, 2] = 1  # one class only: undefined
    s = rng.random((50, 3)) + y * 0.3
    r = common.auc_per_label(y, s, ["a", "b", "c"])
    m = slice(10, 50)
    assert abs(r["per_label"]["a"] - roc_auc_score(y[m, 0], s[m, 0])) < 1e-12
    assert abs(r["per_label"]["b"] - roc_auc_score(y[:, 1], s[:, 1])) < 1e-12
    assert r["per_label"]["c"] is None
    assert abs(r["macro"] - (r["per_label"]["a"] + r["per_label"]["b"]) / 2) < 1e-12


def test_recall_at_k_by_hand():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.1, 0.2, 0.0]])
    # query 0 -> correct 2 (rank 2); query 1 -> correct 1 (rank 1); query 2 -> correct 2 (rank 3)
    r = common.recall_at_k(sim, [2, 1, 2], ks=(1, 2, 3))
    assert r == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0}


# ---- sampler ----

def test_epoch_sampler_ranks_partition_and_resume():
    full = list(common.EpochSampler(40, 8, 0, 1, seed=5))
    r0 = list(common.EpochSampler(40, 4, 0, 2, seed=5))
    r1 = list(common.EpochSampler(40, 4, 1, 2, seed=5))
    # global batch k of the 1-process run = rank 0's batch k followed by rank 1's batch k
    for k in range(5):
        assert full[8 * k:8 * k + 8] == r0[4 * k:4 * k + 4] + r1[4 * k:4 * k + 4]
    s = common.EpochSampler(40, 8, 0, 1, seed=5)
    s.set_epoch(0, skip_batches=2)
    assert list(s) == full[16:]
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full]


# ---- distributed: all-gather with gradient, 2 gloo processes vs 1 ----

def _gather_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64)
    w = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    b = 8 // world
    f = (x[rank * b:(rank + 1) * b] @ w)
    g = common.all_gather_with_grad(f)  # [8, 5]
    loss = (f @ g.T).logsumexp(1).mean()  # local rows against all columns, like a contrastive loss
    loss.backward()
    dist.all_reduce(w.grad)
    w.grad /= world  # what DDP does
    torch.save({"grad": w.grad, "loss": loss.detach(), "g": g.detach()}, f"{out_dir}/r{rank}.pt")
    dist.destroy_process_group()


def test_all_gather_with_grad_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64)
    w = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    f = x @ w
    loss = (f @ f.T).logsumexp(1).mean()
    loss.backward()
    assert torch.allclose(r0["g"], f.detach()) and torch.allclose(r1["g"], f.detach())
    assert torch.allclose((r0["loss"] + r1["loss"]) / 2, loss.detach(), atol=1e-12)
    assert torch.allclose(r0["grad"], w.grad, atol=1e-10) and torch.allclose(r1["grad"], w.grad, atol=1e-10)


def test_jsonl_logger_and_truncate(tmp_path):
    lg = common.JSONLLogger(tmp_path / "log.jsonl")
    for s in range(1, 6):
        lg.log(step=s, loss=1.0 / s)
    common.truncate_log(tmp_path / "log.jsonl", 3)
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_studies_with_no_frontal_view_are_counted(tmp_path):
    cols = ["image", "study_id", "split", "view"]
    rows = [{"image": "a.png", "study_id": "s1", "split": "train", "view": "PA"},
            {"image": "b.png", "study_id": "s1", "split": "train", "view": "LATERAL"},
            {"image": "c.png", "study_id": "s2", "split": "train", "view": "LATERAL"},
            {"image": "d.png", "study_id": "s3", "split": "train", "view": "AP"}]
    _write_csv(tmp_path / "d.csv", rows, cols)
    c = common.BadSampleCounter(max_bad_frac=0.5)
    t = common.XrayCSV(tmp_path / "d.csv", counter=c, require_frontal=True)
    assert [r["image"] for r in t.rows] == ["a.png", "b.png", "d.png"] and t.studies == [[0, 1], [2]]
    assert c.counts["study with no frontal view"] == 1
    with pytest.raises(RuntimeError, match="max_bad_frac"):
        common.XrayCSV(tmp_path / "d.csv", counter=common.BadSampleCounter(0.1), require_frontal=True)


def test_conv_stem_shapes_and_receptive_fields():
    """common.ConvStem gives the patchify conv's output shape; with overlap=False (hMLP) each token is a function
    of its own patch's pixels only (checked with the per-image GroupNorms removed, which are the one place where
    other patches enter: through a mean and a variance), with overlap=True neighbouring pixels reach it too."""
    import torch.nn as nn

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, :8, :8] += 1.0  # perturb the pixels of patch (0, 0) only
    for overlap, expect_only_own in ((False, True), (True, False)):
        stem = common.ConvStem(48, 8, overlap=overlap)
        assert stem(x).shape == nn.Conv2d(3, 48, 8, 8)(x).shape == (2, 48, 4, 4)
        assert stem.weight is stem[-1].weight  # what transformers' CLIPVisionEmbeddings reads the dtype from
        plain = nn.Sequential(*[nn.Identity() if isinstance(m, nn.GroupNorm) else m for m in stem])
        changed = ((plain(x2) - plain(x)).abs().amax(dim=(0, 1)) > 1e-6).nonzero().tolist()
        if expect_only_own:
            assert changed == [[0, 0]], changed
        else:
            assert [0, 0] in changed and len(changed) > 1, changed
    with pytest.raises(ValueError, match="power-of-two"):
        common.ConvStem(48, 12)


def test_cpu_threads_divides_the_cores_among_the_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert common.cpu_threads(0) == 4  # python pedclip.py: all usable cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert common.cpu_threads(0) == 2  # torchrun --nproc_per_node=2: half each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.cpu_threads(0) == 1  # never 0
    assert common.cpu_threads(3) == 3  # an explicit --threads wins
    n = torch.get_num_threads()
    try:
        common.set_cpu_threads(0, "cpu")  # LOCAL_WORLD_SIZE=8 on "4 cores": one thread
        assert torch.get_num_threads() == 1
        common.set_cpu_threads(0, "cuda")  # a GPU run keeps torch's own setting
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def test_stop_signal_sets_a_flag_then_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    s = common.StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # caught: sets the flag, the process lives on
        time.sleep(0.01)
        assert s.flag and s.name == "SIGTERM" and s.should_stop()
    finally:
        s.restore()
    # a pool forked after training must still be stoppable by SIGTERM (Pool.terminate relies on it)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
