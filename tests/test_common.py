"""common.py and phantoms.py: CLI, CSV schema, image loading (PNG / JPEG / DICOM), the training loop's
plumbing (resume, faults, signals, best checkpoint), checkpoints, metrics and the zero-shot scorer, DDP
gather, phantoms."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import phantoms
from conftest import ROOT


# ---- CLI ----


@dataclass
class _Cfg:
    lr: float = 0.1  # learning rate
    epochs: int = 3  # epochs
    name: str = "x"  # a name
    flag: bool = False  # a switch
    preset: str = "demo"  # set by --preset


_PRESETS = {"demo": {}, "paper": {"lr": 0.5, "epochs": 10}}


def test_cli_types_presets_and_overrides():
    c = common.parse_config(_Cfg, _PRESETS, ["--preset=paper", "--epochs=7", "--flag", "--name=y"])
    assert (c.lr, c.epochs, c.flag, c.name, c.preset) == (0.5, 7, True, "y", "paper")
    c = common.parse_config(_Cfg, _PRESETS, ["--flag=false", "--lr=1e-3"])
    assert (c.lr, c.flag, c.epochs, c.preset) == (1e-3, False, 3, "demo")
    assert common.parse_config(_Cfg, _PRESETS, ["--epochs=2", "--preset=paper"]).epochs == 2  # any order


@pytest.mark.parametrize(
    "argv, must_contain",
    [
        (["--lrr=1"], ["--lrr"]),
        (["--epochs=two"], ["--epochs", "two", "int"]),
        (["--flag=maybe"], ["--flag", "maybe"]),
        (["--preset=huge"], ["huge", "demo", "paper"]),
        (["epochs=3"], ["epochs=3"]),
    ],
)
def test_cli_errors_name_the_flag_and_exit_2(argv, must_contain, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(_Cfg, _PRESETS, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(s in err for s in must_contain), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_cli_help_shows_the_presets_values_and_the_comments(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(_Cfg, _PRESETS, ["--preset=paper", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--lr 0.5" in out and "learning rate" in out and "--epochs 10" in out


def test_user_errors_are_one_line_and_exit_2():
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import common\ndef main(): raise common.UserError('no file x.csv')\ncommon.cli(main)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        p.returncode == 2
        and p.stderr.strip().endswith("error: no file x.csv")
        and "Traceback" not in p.stderr
    )


# ---- CSV schema ----


def _write_csv(path, rows, cols):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def test_csv_missing_file_or_column_names_them(tmp_path):
    p = tmp_path / "d.csv"
    _write_csv(p, [{"study_id": "1", "split": "train"}], ["study_id", "split"])
    with pytest.raises(common.UserError, match=r"d.csv: no column 'image'"):
        common.XrayCSV(p, require=("image", "study_id"))
    with pytest.raises(common.UserError, match="nope.csv does not exist"):
        common.XrayCSV(tmp_path / "nope.csv")


def test_csv_paths_studies_splits_labels(tmp_path):
    cols = ["image", "study_id", "split", "findings", "label:A", "label:B"]
    rows = [
        {
            "image": "a.png",
            "study_id": "s1",
            "split": "train",
            "findings": "x",
            "label:A": "1",
            "label:B": "",
        },
        {
            "image": "sub/b.png",
            "study_id": "s1",
            "split": "train",
            "findings": "x",
            "label:A": "-1",
            "label:B": "0",
        },
        {
            "image": "c.png",
            "study_id": "s2",
            "split": "test",
            "findings": "y",
            "label:A": "0",
            "label:B": "1.0",
        },
        {
            "image": "d.png",
            "study_id": "s3",
            "split": "train",
            "findings": "z",
            "label:A": "2",
            "label:B": "1",
        },
    ]
    _write_csv(tmp_path / "d.csv", rows, cols)
    counter = common.BadSampleCounter(max_bad_frac=0.5)
    t = common.XrayCSV(tmp_path / "d.csv", split="train", counter=counter)
    assert t.label_names == ["A", "B"]
    assert [r["_path"] for r in t.rows] == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.png")]
    assert t.studies == [[0, 1]]  # s1 grouped; s3 dropped for its label "2" ...
    assert counter.counts["label outside {1, 0, -1, blank}"] == 1 and counter.seen == 3  # ... and counted
    lab = t.labels()
    assert lab[0, 0] == 1 and np.isnan(lab[0, 1]) and lab[1, 0] == -1 and lab[1, 1] == 0
    with pytest.raises(common.UserError, match="max_bad_frac"):  # more bad rows than allowed: a clear error
        common.XrayCSV(tmp_path / "d.csv", split="train", counter=common.BadSampleCounter(0.1))


def test_rows_without_a_split_or_without_text_are_counted_never_dropped_silently(tmp_path):
    cols = ["image", "split", "findings", "impression", "label:A"]
    rows = [
        {"image": "a.png", "split": "train", "findings": "x", "impression": "", "label:A": "1"},
        {"image": "b.png", "split": "", "findings": "x", "impression": "", "label:A": "1"},
        {"image": "c.png", "split": "train", "findings": " ", "impression": "", "label:A": ""},
        {"image": "d.png", "split": "train", "findings": "", "impression": "", "label:A": "0"},
        {"image": "e.png", "split": "test", "findings": "", "impression": "y", "label:A": "0"},
    ]
    _write_csv(tmp_path / "d.csv", rows, cols)
    c = common.BadSampleCounter(max_bad_frac=1.0)
    t = common.XrayCSV(tmp_path / "d.csv", "train", require_text=("findings", "impression"), counter=c)
    assert [r["image"] for r in t.rows] == ["a.png"]
    assert c.counts == {"row without a split": 1, "empty report text": 2} and c.seen == 4
    c2 = common.BadSampleCounter(max_bad_frac=1.0)  # label-only rows are text when "labels" is asked for
    t2 = common.XrayCSV(tmp_path / "d.csv", "train", require_text=("findings", "labels"), counter=c2)
    assert [r["image"] for r in t2.rows] == ["a.png", "d.png"] and c2.counts["empty report text"] == 1
    with pytest.raises(common.UserError, match="empty report text"):  # half the rows vanishing stops the run
        common.XrayCSV(
            tmp_path / "d.csv", "train", require_text=("findings",), counter=common.BadSampleCounter()
        )


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
    # 16-bit PNG (some NIH / VinDr copies): its own range [1000, 52000] stretched to [0, 255], i.e. back to a
    # (PIL's 8-bit conversion alone would clip 99% of these pixels to 255)
    Image.fromarray(a.astype(np.uint16) * 200 + 1000).save(tmp_path / "b16.png")
    assert Image.open(tmp_path / "b16.png").mode.startswith("I")
    assert np.array_equal(common.load_image(tmp_path / "b16.png"), a)


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


def _crop_box(img_h, img_w, size, seed, scale=(0.8, 1.1), ratio=(3 / 4, 4 / 3)):
    """The box random_resized_crop took, read back from two float images whose pixels are their x / y (+ 1000:
    a padded pixel would read 0). Area averaging of a linear ramp is linear: out[j] = x0 + (j + 0.5) cw / size
    - 0.5, fitted on the columns (rows). -> x0, y0, cw, ch, the lowest output value."""
    yy, xx = np.mgrid[0:img_h, 0:img_w].astype(np.float32) + 1000
    box, low = [], np.inf
    for ramp, axis in ((xx, 0), (yy, 1)):
        out = common.random_resized_crop(ramp, size, np.random.default_rng(seed), scale, ratio)
        slope, icpt = np.polyfit(np.arange(size), out.mean(axis), 1)
        box.append((icpt - 1000 - slope / 2 + 0.5, slope * size))
        low = min(low, out.min())
    (x0, cw), (y0, ch) = box
    return x0, y0, cw, ch, low


def test_random_resized_crop_box_inside_the_image_as_torchvision():
    """torchvision's RandomResizedCrop(scale=(0.8, 1.1)) never pads: on a non-square image every box lies inside
    it, with area and aspect inside the ranges; the boxes' distribution matches torchvision.get_params'."""
    from torchvision.transforms import RandomResizedCrop

    h, w, scale, ratio = 300, 420, (0.8, 1.1), (3 / 4, 4 / 3)
    boxes = np.array([_crop_box(h, w, 40, seed, scale, ratio) for seed in range(100)])
    x0, y0, cw, ch, low = boxes.T
    assert (low > 999).all()  # no pixel from outside the image
    assert (x0 > -1).all() and (y0 > -1).all() and (x0 + cw < w + 1).all() and (y0 + ch < h + 1).all()
    area = cw * ch / (h * w)
    assert (area > scale[0] - 0.01).all() and (area < 1 + 0.01).all()  # > 1 never fits: drawn again
    assert (cw / ch > ratio[0] - 0.01).all() and (cw / ch < ratio[1] + 0.01).all()
    assert x0.max() > 20 and y0.max() > 10 and area.min() < 0.83  # the boxes really vary
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny torch ops: a thread pool only adds waiting
    ref = np.array([RandomResizedCrop.get_params(torch.zeros(1, h, w), scale, ratio) for _ in range(1000)])
    torch.set_num_threads(threads)
    ref_area, ref_aspect = ref[:, 2] * ref[:, 3] / (h * w), ref[:, 3] / ref[:, 2]
    assert abs(area.mean() - ref_area.mean()) < 4 * ref_area.std() / np.sqrt(len(area))
    assert abs(np.log(cw / ch).mean() - np.log(ref_aspect).mean()) < 4 * np.log(ref_aspect).std() / np.sqrt(100)
    # no box fits a 10 x 400 strip (or 400 x 10): torchvision's fallback, the centre crop of the nearest aspect
    for shape in ((10, 400), (400, 10)):
        img = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
        i, j, bh, bw = RandomResizedCrop.get_params(torch.zeros(1, *shape), scale, ratio)
        got = common.random_resized_crop(img, 8, np.random.default_rng(0), scale, ratio)
        assert np.array_equal(got, common.resize(img[i:i + bh, j:j + bw], 8))
    a = common.random_resized_crop(img, 32, np.random.default_rng(1))
    assert a.shape == (32, 32) and np.array_equal(a, common.random_resized_crop(img, 32, np.random.default_rng(1)))


def test_to_tensor_is_torchvisions_to_tensor_and_normalize():
    from PIL import Image
    from torchvision.transforms import v2

    img = (np.random.default_rng(0).random((37, 53)) * 255).astype(np.uint8)
    ref = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])(Image.fromarray(img).convert("RGB"))
    got = common.to_tensor(img)
    assert got.shape == ref.shape == (3, 37, 53) and torch.allclose(got, ref, atol=1e-6)  # all three channels
    assert not torch.allclose(got[0], got[2], atol=0.1)


# ---- phantoms ----


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_phantoms_deterministic_and_schema(tmp_path, phantom_csv):
    a = phantoms.make_phantoms(60, seed=3, out_dir=tmp_path / "a", size=32, progress=False)
    b = phantoms.make_phantoms(60, seed=3, out_dir=tmp_path / "b", size=32, progress=False)
    c = phantoms.make_phantoms(60, seed=4, out_dir=tmp_path / "c", size=32, progress=False)
    assert _digest(a.parent) == _digest(b.parent) != _digest(c.parent)
    t = common.XrayCSV(phantom_csv)
    rows = t.rows
    assert set(r["body_part"] for r in rows) == set(phantoms.PHANTOM_BODY_PARTS)
    assert all(len(s) >= 2 for s in t.studies)  # >= 2 views per study
    split_of = {}
    for r in rows:  # split by patient: a patient never appears in two splits
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]
    assert {r["split"] for r in rows} == {"train", "valid", "test"}
    assert any(
        r["findings"].lower().startswith(("no ", "there is no")) or " no " in r["findings"].lower()
        for r in rows
    )
    assert all(r["target"].isdigit() for r in rows)
    assert len(phantoms.PHANTOM_FINDINGS) >= 8 and set(phantoms.PHANTOM_RARE) <= set(
        phantoms.PHANTOM_FINDINGS
    )


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



def test_rare_findings_are_drawn_at_a_size_the_demo_tokens_resolve():
    """At 64 px the demos' tokens are 8 px. The foreign body (a coin) spans at least 3/4 of a token both ways
    in every body part and view; free air is a cap under each dome of the diaphragm, each >= 3 px deep. (A 6x4-px
    bar and a 1-px arc stay at chance for the demo ViT trained on the labels; these fail on them.)"""
    from scipy import ndimage

    fid = {n: i + 1 for i, n in enumerate(phantoms.PHANTOM_FINDINGS)}
    rng = np.random.default_rng(0)
    for part in phantoms.PHANTOM_BODY_PARTS:
        for view in ("AP", "LATERAL"):
            pos = (rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.7))
            finding = {"Foreign Body": {"pos": pos}}
            _, mask = phantoms._draw_phantom(part, view, rng.uniform(1, 80), finding, set(), 64, rng)
            ys, xs = np.nonzero(mask == fid["Foreign Body"])
            assert np.ptp(ys) + 1 >= 6 and np.ptp(xs) + 1 >= 6, (part, view, np.ptp(ys), np.ptp(xs))
    for age in (1.0, 8.0, 40.0):
        for view, n_domes in (("PA", 2), ("LATERAL", 1)):
            finding = {"Pneumoperitoneum": {"side": "right"}}
            _, mask = phantoms._draw_phantom("chest", view, age, finding, set(), 64, rng)
            parts, n = ndimage.label(mask == fid["Pneumoperitoneum"])
            assert n == n_domes, (age, view, n)
            for box in ndimage.find_objects(parts):
                assert box[0].stop - box[0].start >= 3, (age, view, box)


# ---- checkpoints and the training loop ----


def test_atomic_write_survives_a_crash_mid_write_and_corrupt_checkpoints_are_named(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.pt"
    common.atomic_write(p, lambda f: torch.save({"step": 1}, f), binary=True)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(p, lambda f: torch.save({"step": 2}, f), binary=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert common.load_checkpoint(p)["step"] == 1  # the old file is untouched
    p.write_bytes(b"\x00garbage")
    with pytest.raises(common.UserError, match="ckpt.pt is unreadable"):
        common.load_checkpoint(p)
    with pytest.raises(common.UserError, match="no checkpoint at"):
        common.load_checkpoint(tmp_path / "missing.pt")


_KILL_WRITER = r"""
import sys, torch, common
p = sys.argv[1]
i = 0
while True:
    i += 1
    state = {"step": i, "w": torch.full((3_000_000,), float(i))}
    common.atomic_write(p, lambda f: torch.save(state, f), True)
    print(i, flush=True)
"""


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_one(tmp_path):
    p = tmp_path / "ckpt.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WRITER, str(p)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    proc.stdout.readline()  # one whole checkpoint exists
    proc.stdout.readline()
    time.sleep(0.137)  # then kill at an arbitrary moment, most likely mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = common.load_checkpoint(p)
    assert ck["step"] >= 1 and torch.all(ck["w"] == ck["step"])


@dataclass
class _LoopCfg:
    out_dir: str = ""
    epochs: int = 3
    max_steps: int = -1
    log_every: int = 1
    ckpt_every: int = 4
    resume: bool = False
    overwrite: bool = False


class _Always(set):
    def __sub__(self, other):
        return self


def _toy_data():  # x [40, 4] and y = x . w [40, 1], as one [40, 5] tensor
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    return torch.cat([x, x @ torch.tensor([[1.0], [-2.0], [0.5], [1.0]])], 1)


def _train(cfg, ck=None, fault=None, val=lambda e: None, fp16_scale=None):
    """A tiny regression through common.Loop, written as the paper files write their step; dropout makes the
    RNG matter. fault: steps whose loss is made NaN (once each: a skipped step is not counted); fp16_scale:
    train under CPU fp16 autocast with a GradScaler that starts at this scale."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.1 * s))
    scaler = torch.amp.GradScaler("cpu", init_scale=fp16_scale or 2.0**16, enabled=fp16_scale is not None)
    ctx = torch.autocast("cpu", dtype=torch.float16, enabled=fp16_scale is not None)
    data = _toy_data()
    sampler = common.EpochSampler(40, 8, seed=3)
    keyed = type("Keyed", (), {"__getitem__": lambda self, key: data[key[0]], "__len__": lambda self: 40})()
    loader = torch.utils.data.DataLoader(
        keyed, 8, sampler=sampler, collate_fn=lambda xs: {"x": torch.stack(xs)}
    )
    loop = common.Loop(
        cfg, name="toy", model=model, opt=opt, sched=sched, scaler=scaler, sampler=sampler,
        counter=common.BadSampleCounter(), ck=ck, extra=lambda: {},
    )
    for epoch in loop.epochs():
        for batch in loop.batches(loader):
            with ctx:
                loss = ((model(batch["x"][:, :4]).float() - batch["x"][:, 4:]) ** 2).mean()
            if fault and loop.step in fault:
                loss, fault = loss * float("nan"), fault - {loop.step}
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if loop.bad_step(loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)):
                opt.zero_grad(set_to_none=True)
                scaler.update()
                continue
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            loop.step_done(loss=loss)
        loop.end_epoch(val(epoch))
    return loop.close({}), model


def test_loop_resume_after_a_stop_equals_the_uninterrupted_run(tmp_path):
    _, ref = _train(_LoopCfg(out_dir=str(tmp_path / "a")))
    stopped, _ = _train(_LoopCfg(out_dir=str(tmp_path / "b"), max_steps=7))  # mid-epoch, between checkpoints
    assert stopped == {"stopped": "--max_steps=7 reached", "step": 7}
    cfg = _LoopCfg(out_dir=str(tmp_path / "b"), resume=True)
    _, got = _train(cfg, common.start_run(cfg))
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
    def strip(d):
        lines = (tmp_path / d / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]

    assert strip("a") == strip("b") and len(strip("a")) == 15
    with pytest.raises(common.UserError, match="--resume continues that run"):
        common.start_run(_LoopCfg(out_dir=str(tmp_path / "a")))
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.start_run(_LoopCfg(out_dir=str(tmp_path / "c"), resume=True))


def test_resume_of_an_ended_run_exits_0_and_a_changed_flag_is_named(tmp_path, capsys):
    _train(_LoopCfg(out_dir=str(tmp_path / "a")))
    before = (tmp_path / "a" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        common.start_run(_LoopCfg(out_dir=str(tmp_path / "a"), resume=True))
    assert e.value.code == 0 and "this run has ended (all 3 epochs)" in capsys.readouterr().out
    assert (tmp_path / "a" / "ckpt.pt").read_bytes() == before  # nothing trained, nothing rewritten
    _train(_LoopCfg(out_dir=str(tmp_path / "b"), max_steps=7))
    with pytest.raises(common.UserError, match=r"--epochs=4 \(the run has 3\)"):
        common.start_run(_LoopCfg(out_dir=str(tmp_path / "b"), resume=True, epochs=4))
    assert common.start_run(_LoopCfg(out_dir=str(tmp_path / "b"), resume=True, max_steps=9)) is not None


def test_loop_skips_non_finite_steps_and_stops_after_five_in_a_row(tmp_path):
    metrics, _ = _train(_LoopCfg(out_dir=str(tmp_path / "a")), fault={2})
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("skipped_nonfinite")] == [2]
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["step"] == 14  # 15 batches, one skipped
    with pytest.raises(SystemExit, match="5 non-finite steps in a row"):
        _train(_LoopCfg(out_dir=str(tmp_path / "c")), fault=_Always({4}))
    assert common.load_checkpoint(tmp_path / "c" / "ckpt.pt")["loop"]["step"] == 4


def test_fp16_overflows_calibrate_the_scale_and_do_not_stop_the_run(tmp_path):
    """A GradScaler that starts at 2^24 overflows fp16 for its first steps: logged, not counted; the run
    trains on and its loss falls. A NaN loss under the same scaler still stops the run after 5."""
    cfg = _LoopCfg(out_dir=str(tmp_path / "a"), epochs=6)
    metrics, model = _train(cfg, fp16_scale=2.0**24)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    overflows = [r for r in log if r.get("fp16_overflow")]
    assert len(overflows) >= 8 and metrics["skipped_nonfinite_steps"] == 0
    assert [r["loss_scale"] for r in overflows[:3]] == [2.0**24, 2.0**23, 2.0**22]  # halved per overflow
    assert metrics["step"] == 30 - len(overflows)
    _, untrained = _train(_LoopCfg(out_dir=str(tmp_path / "u"), max_steps=0))  # the same initial weights
    data = _toy_data()
    with torch.no_grad():
        mse = [float(((m.eval()(data[:, :4]) - data[:, 4:]) ** 2).mean()) for m in (untrained, model)]
    assert mse[1] < 0.8 * mse[0], mse  # the loss on the training data fell
    with pytest.raises(SystemExit, match="5 non-finite steps in a row"):
        _train(_LoopCfg(out_dir=str(tmp_path / "b")), fault=_Always({0}), fp16_scale=2.0**10)


def test_loop_keeps_the_best_validation_weights_and_stops_on_sigterm(tmp_path):
    losses = [0.5, 0.2, 0.3]
    _train(_LoopCfg(out_dir=str(tmp_path / "a")), val=lambda e: losses[e])
    best = common.load_checkpoint(tmp_path / "a" / "ckpt_best.pt")
    assert (best["epoch"], best["val_loss"]) == (1, 0.2) and "optimizer" not in best
    assert common.load_checkpoint(tmp_path / "a" / "ckpt.pt")["loop"]["since_best"] == 1
    before = signal.getsignal(signal.SIGTERM)
    cfg = _LoopCfg(out_dir=str(tmp_path / "b"))
    out, _ = _train(cfg, fault=None, val=lambda e: os.kill(os.getpid(), signal.SIGTERM))
    # the signal came at the end of epoch 0: the next step stops with a checkpoint; the handler is restored
    assert out == {"stopped": "SIGTERM received", "step": 6} and signal.getsignal(signal.SIGTERM) == before
    assert common.load_checkpoint(tmp_path / "b" / "ckpt.pt")["loop"]["step"] == 6


# ---- metrics ----


def test_auc_per_label_against_sklearn_with_ties_repeats_and_undefined():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3)).astype(float)
    y[:5, 0] = -1  # uncertain: excluded
    y[5:10, 0] = np.nan  # blank: excluded
    y[:, 2] = 1  # one class only: undefined
    s = np.round(rng.random((50, 3)) + y * 0.3, 1)  # rounded: ties
    r = common.auc_per_label(y, s, ["a", "b", "c"])
    m = slice(10, 50)
    assert abs(r["per_label"]["a"] - roc_auc_score(y[m, 0], s[m, 0])) < 1e-12
    assert abs(r["per_label"]["b"] - roc_auc_score(y[:, 1], s[:, 1])) < 1e-12
    assert r["per_label"]["c"] is None
    assert abs(r["macro"] - (r["per_label"]["a"] + r["per_label"]["b"]) / 2) < 1e-12
    idx = rng.integers(0, 50, 80)  # a bootstrap resample: rows repeat
    assert common.auc_per_label(y[idx], s[idx], "abc")["per_label"]["b"] == \
        pytest.approx(roc_auc_score(y[idx, 1], s[idx, 1]), abs=1e-12)


class _ImageModel(torch.nn.Module):
    """encode_image = the mean pixel of each image (the transform scales to [0, 1])."""
    cfg = type("C", (), {"image_size": 4})

    @staticmethod
    def image_transform(train):
        return lambda img: torch.from_numpy(common.resize(img, 4)).float().div(255).expand(3, 4, 4)

    def encode_image(self, x):
        return x.mean((1, 2, 3))[:, None]


def test_embed_images_rows_workers_bad_images_and_fn(tmp_path):
    from PIL import Image

    rows = []
    for i in range(7):
        Image.fromarray(np.full((6, 6), 30 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"_path": str(tmp_path / f"{i}.png")})
    rows[4]["_path"] = str(tmp_path / "missing.png")
    counter = common.BadSampleCounter()
    emb, ok = common.embed_images(_ImageModel(), rows, "cpu", batch_size=3, counter=counter)
    assert ok.tolist() == [True] * 4 + [False] + [True] * 2 and counter.counts == {"unreadable image": 1}
    np.testing.assert_allclose(emb[ok, 0], [30 * i / 255 for i in (0, 1, 2, 3, 5, 6)], atol=1e-6)
    again, ok2 = common.embed_images(_ImageModel(), rows, "cpu", batch_size=2, num_workers=2,
                                     fn=lambda x: x[:, 0, :2, :2])  # any function of the batch, in workers
    assert again.shape == (7, 2, 2) and (ok2 == ok).all()
    np.testing.assert_allclose(again[ok].mean((1, 2)), emb[ok, 0], atol=1e-6)


class _FakeModel:
    """encode_text: one fixed unit vector per prompt, so the scores can be computed by hand."""

    def __init__(self, table):
        self.table = table

    def encode_text(self, prompts):
        return torch.tensor(np.array([self.table[p] for p in prompts]))

    @staticmethod
    def zeroshot_prompts(name):
        return ([f"{name}+", f"{name}++"], [f"{name}-"]) if name != "N" else (["N+"], [])


def test_zeroshot_scores_are_the_cosine_difference():
    rng = np.random.default_rng(0)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    table = {k: unit(rng.normal(size=4)) for k in ("A+", "A++", "A-", "N+")}
    emb = np.array([unit(rng.normal(size=4)) for _ in range(6)], np.float32)
    got = common.zeroshot_scores(_FakeModel(table), emb, ["A", "N"])
    pos = unit(table["A+"] + table["A++"])  # the normalised mean of the normalised prompt embeddings
    np.testing.assert_allclose(got[:, 0], emb @ pos - emb @ table["A-"], atol=1e-6)
    np.testing.assert_allclose(got[:, 1], emb @ table["N+"], atol=1e-6)  # no negative prompts: s+ alone
    assert got.dtype == np.float64


def test_tokenizer_spells_every_training_word_and_refuses_an_empty_corpus():
    texts = [
        "Small left pleural effusion.",
        "No pneumothorax; heart size 1.5 cm.",
        "Café-au-lait ___ Dr. ___",
    ]
    tok = common.train_wordpiece(texts, vocab_size=40)  # fewer slots than words: spelt with "##" pieces
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in i for i in ids) and all(i[0] == tok.cls_token_id for i in ids)
    assert common.tokenizer_vocab(
        common.tokenizer_from_vocab(common.tokenizer_vocab(tok))
    ) == common.tokenizer_vocab(tok)
    with pytest.raises(common.UserError, match="empty"):
        common.train_wordpiece(["", "  "])


def test_pretrained_weights_offline_fail_fast_with_what_to_do():
    from transformers import AutoTokenizer

    t0 = time.time()
    with pytest.raises(common.UserError, match="--pretrained=false"):
        common.load_pretrained(
            "BioClinicalBERT", lambda: AutoTokenizer.from_pretrained("no-such-org/no-such-model")
        )
    assert time.time() - t0 < 60


def test_label_text_is_the_class_in_words():
    assert common.label_text("Pleural_Thickening") == "pleural thickening"


# ---- sampler ----


def test_epoch_sampler_permutes_drops_the_last_partial_batch_and_partitions_ranks():
    s = common.EpochSampler(43, 8, 0, 1, seed=5)  # 5 whole batches of 8; the last 3 items wait for an epoch
    assert s.batches_per_epoch == 5 and len(s) == 40
    epochs = []
    for epoch in range(4):
        s.set_epoch(epoch)
        epochs.append([i for i, _ in s])
        assert len(set(epochs[-1])) == 40 and set(epochs[-1]) <= set(range(43))  # no item twice
    assert len({tuple(e) for e in epochs}) == 4  # a new order each epoch ...
    assert set().union(*epochs) == set(range(43))  # ... so the items left over differ: none is never seen
    full = list(common.EpochSampler(40, 8, 0, 1, seed=5))
    r0 = list(common.EpochSampler(40, 4, 0, 2, seed=5))
    r1 = list(common.EpochSampler(40, 4, 1, 2, seed=5))
    # global batch k of the 1-process run = rank 0's batch k followed by rank 1's batch k
    for k in range(5):
        assert full[8 * k : 8 * k + 8] == r0[4 * k : 4 * k + 4] + r1[4 * k : 4 * k + 4]
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
    f = x[rank * b : (rank + 1) * b] @ w
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


def test_conv_stem_shapes_and_receptive_fields():
    """common.ConvStem gives the patchify conv's output shape; with overlap=False (hMLP) each token is a
    function of its own patch's pixels only (checked with the per-image GroupNorms removed, the one place
    where other patches enter: a mean and a variance), with overlap=True neighbouring pixels reach it too."""
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
    with pytest.raises(common.UserError, match="power-of-two"):
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


# ---- the project's own rules ----

SOURCES = sorted(p for p in ROOT.glob("*.py"))


def test_no_assert_checks_anything_and_common_imports_no_data_set_or_paper():
    """`python -O` removes asserts, so none guards a user's input; common.py, shared by all, imports no
    paper file and no data set (phantoms.py imports common.py, not the other way round)."""
    import ast

    for path in SOURCES:
        tree = ast.parse(path.read_text())
        asserts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]
        assert not asserts, f"{path.name}: assert at lines {asserts}"
    tree = ast.parse((ROOT / "common.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"phantoms", "pedclip", "cxrclip", "cxrcml", "dmlm", "evaluate", "data_prep"}


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_load_without_running_code(tmp_path):
    """Weights from elsewhere (CheXzero's file) are read with weights_only: a pickle that would run code is
    refused with one line naming the file, and a plain state dict loads."""
    torch.save({"w": torch.ones(2), "x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(common.UserError, match="evil.pt is unreadable"):
        common.load_checkpoint(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "config": {"lr": 0.1}, "vocab": ["a"], "files": {"v": b"x"}}, tmp_path / "ok.pt")
    assert torch.equal(common.load_checkpoint(tmp_path / "ok.pt")["w"], torch.ones(2))
