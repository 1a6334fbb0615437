"""
common.py: the small shared module of the four paper files (pedclip.py, cxrclip.py, cxrcml.py, dmlm.py).

Nothing paper-specific lives here. In execution order of a training script:

    config / CLI        Config dataclass -> --key=value flags, presets, --help from the field comments
    distributed         torchrun detection, NCCL/gloo, print0, all-gather WITH gradient
    images              load_image (PNG/JPEG/DICOM -> uint8), generic augmentations, bad-sample counting
    data                the CSV schema of DESIGN.md: XrayCSV (validation, studies, splits), EpochSampler
    tokenizer           a WordPiece tokenizer trained on the training reports (demo: no download)
    phantoms            make_phantoms: the synthetic radiograph data set the demos and tests run on
    pretrained          fail-fast loading of torchvision / Hugging Face weights when offline
    checkpoints         atomic save (temp + os.replace, ckpt_prev.pt kept), load with clear errors, RNG state
    metrics / logging   AUC/F1/ACC/recall@K over scikit-learn, a JSONL logger
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
import typing
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

LABEL_PREFIX = "label:"  # CSV columns "label:<Name>" hold 1 / 0 / -1 / blank (CheXpert convention)


def _check_torchvision() -> str | None:
    """Import torchvision once; if it is installed but cannot load, hide it and remember why.

    PyPI's torchvision wheels are CUDA builds: next to a CPU-only torch their C++ ops fail to load and
    `import torchvision` raises. transformers imports torchvision whenever it is installed, so one broken
    wheel would break every BERT / CLIP import too. Only the paper presets' ImageNet encoders need
    torchvision; everything else runs without it, so a broken one is marked absent (None in sys.modules,
    which `importlib.util.find_spec` reports as not installed) and `require_torchvision` explains.
    """
    if "torchvision" in sys.modules:
        return None if sys.modules["torchvision"] is not None else _TORCHVISION_ERROR
    try:
        import torchvision  # noqa: F401
        return None
    except Exception as e:  # RuntimeError "operator torchvision::nms does not exist", ImportError, ...
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        sys.modules["torchvision"] = None
        return f"{type(e).__name__}: {e}"


_TORCHVISION_ERROR = None
_TORCHVISION_ERROR = _check_torchvision()


# ----------------------------------------------------------------------------------------------------
# ---- config / CLI ----
# A paper file declares `@dataclass class Config` with one trailing comment per field; that comment is the
# flag's --help text (read from the source, so the dataclass stays as plain as nanoGPT's variables).

def _field_comments(cls) -> dict[str, str]:
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", src, flags=re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


class ConfigError(SystemExit):
    """A bad flag: uncaught, Python prints the message to stderr and exits with status 1."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.msg = msg


def parse_config(cls, presets: dict[str, dict], argv: list[str] | None = None, default_preset: str = "demo"):
    """Build `cls` from `--key=value` flags. `--preset=NAME` is applied first, other flags override it.

    Unknown flags and bad values raise ConfigError naming the flag and listing the valid ones;
    `--help` prints every field with its type, default and comment.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    comments = _field_comments(cls)

    def usage() -> str:
        lines = [f"usage: python {Path(sys.argv[0]).name} [--preset={'|'.join(presets)}] [--key=value ...]", ""]
        for name, f in fields.items():
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            t = getattr(hints[name], "__name__", str(hints[name]))
            lines.append(f"  --{name}={d!s:<14} ({t}) {comments.get(name, '')}")
        return "\n".join(lines)

    if "-h" in argv or "--help" in argv:
        print(usage())
        raise SystemExit(0)
    pairs = []
    for a in argv:
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: flags are --key=value.\n{usage()}")
        key, eq, val = a[2:].partition("=")
        if not eq:  # a bare --flag means true for booleans
            if key in fields and hints[key] is bool:
                val = "true"
            elif key == "benchmark" and key in fields:  # bare --benchmark: time the model (--benchmark=data: the loader)
                val = "model"
            elif key == "preset":
                raise ConfigError("--preset needs a value, e.g. --preset=paper")
            else:
                raise ConfigError(f"flag --{key} needs a value: --{key}=VALUE")
        pairs.append((key.replace("-", "_"), val))
    preset = default_preset
    for k, v in pairs:
        if k == "preset":
            if v not in presets:
                raise ConfigError(f"--preset={v} is not a preset; choose one of: {', '.join(presets)}")
            preset = v
    cfg = cls(**presets[preset])
    for k, v in pairs:
        if k == "preset":
            continue
        if k not in fields:
            import difflib

            close = difflib.get_close_matches(k, list(fields), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join('--' + c for c in close[:3])}?)" if close else ""
            raise ConfigError(f"unknown flag --{k}{hint}. Valid flags: --preset, "
                              + ", ".join("--" + n for n in fields))
        t = hints[k]
        try:
            val = _parse_bool(v) if t is bool else t(v)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad value for --{k}={v!r}: expected {t.__name__} ({e})")
        setattr(cfg, k, val)
    cfg.preset = preset if hasattr(cfg, "preset") else preset
    return cfg


# ----------------------------------------------------------------------------------------------------
# ---- distributed ----
# torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python x.py` has none and runs as rank 0 of 1.

@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed from torchrun's environment: NCCL on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, local, world, device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def cpu_threads(requested: int) -> int:
    """--threads, or for 0 the cores this process may run on divided among the processes on this node, so that
    `python x.py` uses every core of the machine and `torchrun --nproc_per_node=2 x.py` half each (torch's own
    default gives every process all cores unless OMP_NUM_THREADS is set). On a busy machine, threads beyond the
    free cores spin-wait in OpenMP: pass --threads=1 there."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def set_cpu_threads(requested: int, device: str):
    """CPU runs: torch's intra-op threads = cpu_threads(requested). CUDA runs keep torch's default."""
    if not device.startswith("cuda"):
        torch.set_num_threads(cpu_threads(requested))


def seed_everything(seed: int):
    """Same seed on every rank: weights are initialised identically; data order comes from the sampler."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the gradient summed over ranks.

    Plain `dist.all_gather` cuts the graph: the other ranks' features would be constants and the
    contrastive gradient through them would be lost (a classic silent bug). Summing in backward is right
    because every rank's loss depends on every rank's features; DDP then averages the parameter gradients
    over ranks, so the result equals one process with the whole batch (tests/test_common.py checks it).
    """

    @staticmethod
    def forward(ctx, x):
        ws = dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [world*b, ...] in rank order, differentiable. Identity without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first row in the gathered batch (labels arange(b) + b*rank, as in open_clip)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() * local_batch
    return 0


def all_reduce_mean(x: float | torch.Tensor) -> float:
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank if it is True on any rank: ranks must take the same branch (skip / stop)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class StopSignal:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C) set a flag; the loop finishes its step, checkpoints, exits.

    A second Ctrl-C exits at once. `should_stop()` all-reduces the flag so every rank stops at the same step.
    """

    def __init__(self):
        self.flag = False
        self.name = None
        self.previous = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def restore(self):
        """Put the previous handlers back once the loop is done. Otherwise a process that goes on after
        training (a notebook, a test session) would ignore SIGTERM for good, and so would every child it forks:
        `multiprocessing.Pool.terminate()` then waits forever on workers that only set a flag."""
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def _handler(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag, self.name = True, signal.Signals(signum).name

    def should_stop(self) -> bool:
        return all_reduce_flag(self.flag)


# ----------------------------------------------------------------------------------------------------
# ---- images ----

class BadImageError(ValueError):
    """An image that cannot be read; the message names the file."""


def _dicom_to_uint8(path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_voi_lut as _apply_voi_lut  # pydicom >= 3

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise BadImageError(f"{path}: DICOM has no pixel data")
    arr = ds.pixel_array.astype(np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour secondary capture: luminance
        arr = arr[..., :3].mean(-1)
    elif arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    # Modality LUT (RescaleSlope/Intercept) then VOI LUT or window centre/width, as a viewer would show it.
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        arr = _apply_voi_lut(arr, ds, index=0).astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1: high values are dark; make bone bright like every other image
    return np.round(arr * 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """PNG / JPEG / DICOM -> uint8 [H, W] grayscale. Raises BadImageError naming the file."""
    path = str(path)
    try:
        if path.lower().endswith((".dcm", ".dicom")) or _looks_like_dicom(path):
            return _dicom_to_uint8(path)
        from PIL import Image

        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            if im.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit PNGs (some NIH / VinDr copies)
                a = np.asarray(im, dtype=np.float64)
                lo, hi = a.min(), a.max()
                return np.round((a - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
            return np.array(im.convert("L"), dtype=np.uint8)  # a writable copy
    except BadImageError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), pydicom errors, ...
        raise BadImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _looks_like_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class BadSampleCounter:
    """Counts skipped samples by kind; one warning line per kind (not per row); fails past max_bad_frac."""

    def __init__(self, max_bad_frac: float = 0.01, label: str = ""):
        self.max_bad_frac, self.label = max_bad_frac, label
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.seen = 0

    def add(self, kind: str, detail: str = "", n: int = 1):
        if kind not in self.counts and is_main_process():
            print(f"warning: skipping {kind} ({detail}); further ones are counted, not printed", flush=True)
        self.counts[kind] += n
        self.examples.setdefault(kind, detail)

    def merge(self, kinds: dict):
        for k, (n, detail) in kinds.items():
            self.add(k, detail, n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return f"{self.label}no bad samples"
        return self.label + ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items())) + \
            f" (of {self.seen} samples)"

    def check(self):
        """Raise if the bad share is over the limit; the message says how to loosen it."""
        if self.seen and self.total / self.seen > self.max_bad_frac:
            raise RuntimeError(f"{self.summary()}: {self.total / self.seen:.1%} bad, over --max_bad_frac="
                               f"{self.max_bad_frac}. First example of each kind: {self.examples}. Fix the data "
                               f"or raise --max_bad_frac.")


# Generic augmentations on uint8 [H, W] numpy images, random state passed in (deterministic per sample).

def resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.shape == (size, size):
        return img
    interp = cv2.INTER_AREA if min(img.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator, scale=(0.8, 1.1),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Crop an area fraction `scale` of the image (>1 zooms out, padding with black) and resize to size."""
    import cv2

    h, w = img.shape
    area = h * w * rng.uniform(*scale)
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    ch, cw = max(1, int(round(math.sqrt(area / r)))), max(1, int(round(math.sqrt(area * r))))
    y0, x0 = rng.uniform(min(0, h - ch), max(0, h - ch)), rng.uniform(min(0, w - cw), max(0, w - cw))
    # affine map from the crop box to the output square; borderValue 0 pads when the box leaves the image
    m = np.array([[size / cw, 0, -x0 * size / cw], [0, size / ch, -y0 * size / ch]], dtype=np.float32)
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


def clahe(img: np.ndarray, clip: float = 2.0, grid: int = 8) -> np.ndarray:
    import cv2

    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(img)


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness=(0.9, 1.1), contrast=(0.8, 1.2)) -> np.ndarray:
    """Brightness and contrast jitter. Hue and saturation are no-ops on grayscale radiographs."""
    x = img.astype(np.float32) * rng.uniform(*brightness)
    m = x.mean()
    x = (x - m) * rng.uniform(*contrast) + m
    return np.clip(x, 0, 255).astype(np.uint8)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_tensor(img: np.ndarray, channels: int = 3) -> torch.Tensor:
    """uint8 [H, W] -> float [C, H, W], ImageNet-normalised (the pretrained encoders' statistics)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)
    x = x.unsqueeze(0).expand(channels, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN[:channels]).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD[:channels]).view(-1, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------
# ---- demo image encoders: a convolutional stem for tiny ViTs trained from scratch ----

class ConvStem(nn.Sequential):
    """Patch embedding of a hybrid ViT: log2(patch) stride-2 conv blocks, then a 1x1 conv to the token width.

    [B, 3, H, W] -> [B, dim, H/patch, W/patch], the shape of ViT's one patch_size x patch_size conv. A ViT
    trained from scratch for minutes on a few thousand images learns little through a single linear
    patchify; strided 3x3 convolutions in its place make it train far faster and more stably (Xiao et al.,
    "Early convolutions help transformers see better", NeurIPS 2021). The demos use it; the paper presets
    keep the pretrained linear patchify. `overlap=False` uses 2x2 kernels instead (the hMLP stem of Touvron
    et al., ECCV 2022): each token then sees only its own patch, so masking a token hides all of its pixels
    (what masked modelling needs); only GroupNorm's per-image mean and variance still see every patch.
    GroupNorm normalises each image over all positions, which removes the phantoms' per-image brightness and
    gamma: the CXR-CML demo reached a zero-shot AUC of 0.92 with it and 0.73 with a per-pixel LayerNorm in its
    place. It never mixes the samples of a batch. `weight` is the last conv's, for code that reads the
    embedding's dtype from it (transformers' CLIPVisionEmbeddings).
    """

    def __init__(self, dim: int, patch: int, in_ch: int = 3, overlap: bool = True):
        n = int(round(math.log2(patch))) if patch > 0 else 0
        if patch < 2 or 2 ** n != patch:
            raise ValueError(f"a conv stem needs a power-of-two patch size >= 2, got {patch}")
        chans = [in_ch] + [max(8, dim >> (n - i)) for i in range(1, n + 1)]  # ..., dim/4, dim/2, dim
        k, pad = (3, 1) if overlap else (2, 0)
        layers = []
        for i in range(n):
            layers += [nn.Conv2d(chans[i], chans[i + 1], k, stride=2, padding=pad, bias=False),
                       nn.GroupNorm(math.gcd(8, chans[i + 1]), chans[i + 1]), nn.GELU()]
        layers.append(nn.Conv2d(chans[-1], dim, 1))
        super().__init__(*layers)

    @property
    def weight(self) -> torch.Tensor:
        return self[-1].weight


# ---- data: the CSV schema ----

def parse_label(v) -> tuple[float, bool]:
    """CSV label string -> (value, ok). 1 / 0 / -1 as floats, blank -> nan; anything else is bad."""
    s = "" if v is None else str(v).strip()
    if s == "":
        return float("nan"), True
    try:
        f = float(s)
    except ValueError:
        return float("nan"), False
    return (f, True) if f in (1.0, 0.0, -1.0) else (float("nan"), False)


FRONTAL_VIEWS = {"AP", "PA", "FRONTAL", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD", ""}


class XrayCSV:
    """One CSV in the project's schema (DESIGN.md): one row per image, grouped into studies.

    Validates columns (a missing required column is an error naming the file and the column), resolves
    image paths relative to the CSV, keeps the rows of one split, parses `label:<Name>` columns, and
    counts (never silently drops) rows with bad labels or with no usable text when text is required.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None, require=("image",),
                 require_text: bool = False, counter: BadSampleCounter | None = None, require_frontal: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"data CSV {self.path} does not exist (the demo makes one with "
                                    f"common.make_phantoms; real data sets come from data_prep.py)")
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in require if c not in cols]
            if missing:
                raise ValueError(f"{self.path}: missing required column(s) {missing}; it has {cols}. "
                                 f"See the data schema in README.md.")
            rows = list(reader)
        self.columns = cols
        self.label_names = [c[len(LABEL_PREFIX):] for c in cols if c.startswith(LABEL_PREFIX)]
        self.counter = counter or BadSampleCounter(label=f"{self.path.name}: ")
        root = self.path.parent
        if split is not None:
            if "split" not in cols:
                raise ValueError(f"{self.path}: asked for split={split!r} but the CSV has no 'split' column")
            rows = [r for r in rows if r["split"] == split]
        self.rows = []
        for i, r in enumerate(rows):
            labels = []
            ok = True
            for name in self.label_names:
                v, good = parse_label(r.get(LABEL_PREFIX + name))
                ok &= good
                labels.append(v)
            if not ok:
                self.counter.add("label outside {1, 0, -1, blank}", f"{self.path} row {i + 2}")
                continue
            if require_text and not (r.get("findings", "").strip() or r.get("impression", "").strip()
                                     or r.get("report", "").strip() or self.label_names):
                self.counter.add("empty report text", f"{self.path} row {i + 2}")
                continue
            r = dict(r)
            r["_path"] = str(root / r["image"])
            r["_labels"] = np.array(labels, dtype=np.float32)
            r["_row"] = i + 2  # line number in the file, for messages
            self.rows.append(r)
        self.counter.seen += len(rows)
        self.counter.check()
        # studies: rows sharing study_id (a row without one is its own study), in first-seen order
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.rows):
            groups[r.get("study_id") or f"_row{i}"].append(i)
        if require_frontal and "view" in cols:  # frontal-only protocols (CheXzero, CXR-LT): lateral-only studies out
            keep = {}
            for sid, idx in groups.items():
                if any(self.rows[i].get("view", "").strip().upper() in FRONTAL_VIEWS for i in idx):
                    keep[sid] = idx
                else:
                    self.counter.add("study with no frontal view", f"{self.path} study {sid}", len(idx))
            order = [i for idx in keep.values() for i in idx]
            self.rows = [self.rows[i] for i in order]
            groups = defaultdict(list)
            for i, r in enumerate(self.rows):
                groups[r.get("study_id") or f"_row{i}"].append(i)
            self.counter.check()
        self.studies = list(groups.values())

    def __len__(self):
        return len(self.rows)

    def labels(self) -> np.ndarray:
        """[N, L] float with 1 / 0 / -1 / nan."""
        if not self.rows:
            return np.zeros((0, len(self.label_names)), np.float32)
        return np.stack([r["_labels"] for r in self.rows])

    def texts(self, i: int) -> list[str]:
        """The report sections of row i that are not empty (findings, impression; else report)."""
        r = self.rows[i]
        out = [r.get(k, "").strip() for k in ("findings", "impression")]
        out = [t for t in out if t]
        if not out and r.get("report", "").strip():
            out = [r["report"].strip()]
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles `n` items per epoch (seed + epoch), gives each rank its slice, and can start mid-epoch.

    Yields (index, sample_seed) so augmentations are a function of (seed, epoch, index) alone: the same in
    any DataLoader worker and after a resume. `drop_last` keeps every rank at the same number of full
    batches, which the all-gathered contrastive loss needs.
    """

    def __init__(self, n: int, local_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.b, self.rank, self.ws, self.seed, self.shuffle = n, local_batch, rank, world_size, seed, shuffle
        self.epoch, self.skip_batches = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} training items cannot fill one global batch of {local_batch * world_size}; "
                             f"lower --batch_size or add data")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.b * self.ws)

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self):
        return (self.batches_per_epoch - self.skip_batches) * self.b

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        nb = self.batches_per_epoch
        for k in range(self.skip_batches, nb):
            # global batch k is order[k*B:(k+1)*B]; this rank takes its contiguous slice of it
            start = k * self.b * self.ws + self.rank * self.b
            for j in range(start, start + self.b):
                yield order[j], (self.seed * 1_000_003 + self.epoch) * 10_000_019 + order[j]


def split_by_patient(patient_ids, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, str]:
    """Deterministic patient -> train/valid/test map; no patient is ever in two splits."""
    uniq = sorted(set(patient_ids))
    rng = random.Random(seed)
    rng.shuffle(uniq)
    n = len(uniq)
    n_tr = int(round(fractions[0] * n))
    n_va = int(round(fractions[1] * n))
    out = {}
    for i, p in enumerate(uniq):
        out[p] = "train" if i < n_tr else "valid" if i < n_tr + n_va else "test"
    return out


def write_csv_atomic(path: str | os.PathLike, rows: list[dict], columns: list[str]):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# ---- tokenizer (demo: trained on the training reports, so nothing is downloaded) ----

def train_wordpiece(texts: list[str], vocab_size: int = 2000):
    """A lowercase WordPiece vocabulary fitted on `texts`, wrapped as a transformers tokenizer (BERT-style).

    Deterministic by construction (the `tokenizers` trainer is not: its merges depend on hash order, so two
    ranks or two runs could get different vocabularies): the special tokens, every character seen (alone and
    as a "##" continuation, so any word of known characters can be spelled), then whole words by frequency,
    ties broken alphabetically, up to `vocab_size`.
    """
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    return tokenizer_from_vocab(vocab)


def tokenizer_from_vocab(vocab: list[str]):
    """Rebuild the demo tokenizer from its vocabulary list (stored in every checkpoint): BERT's lowercase
    normaliser and pre-tokeniser, WordPiece, "[CLS] text [SEP]", as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tokenizer_vocab(tokenizer) -> list[str]:
    v = tokenizer.get_vocab()
    return [w for w, _ in sorted(v.items(), key=lambda kv: kv[1])]


# ----------------------------------------------------------------------------------------------------
# ---- pretrained weights: real loaders, failing fast and clearly when offline ----

def require_torchvision():
    """torchvision, or a clear error (a CUDA-only torchvision wheel next to a CPU torch cannot import)."""
    if _TORCHVISION_ERROR is None:
        try:
            import torchvision

            return torchvision
        except ImportError as e:
            err = f"{type(e).__name__}: {e}"
    else:
        err = _TORCHVISION_ERROR
    raise RuntimeError(
        f"torchvision cannot be imported here ({err}). The paper presets' image encoders (ResNet-50, Swin-T, "
        f"ViT-B/16 weights from torchvision) need a torchvision build matching torch {torch.__version__}: with a "
        f"CPU-only torch, the CPU wheel from the PyTorch package index. The demo presets do not use torchvision.")


def load_torchvision_model(builder: str, weights: str | None):
    """torchvision.models.<builder>(weights=<weights>) with a fail-fast offline check.

    `weights` is a torchvision enum name like "ResNet50_Weights.IMAGENET1K_V2", or None for random init.
    """
    tv = require_torchvision()
    fn = getattr(tv.models, builder)
    if weights is None:
        return fn(weights=None)
    enum_name, member = weights.split(".")
    w = getattr(getattr(tv.models, enum_name), member)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if not cache.exists():
        import socket

        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(10)
        try:
            return fn(weights=w)
        except Exception as e:
            raise RuntimeError(
                f"cannot load torchvision weights {weights} ({type(e).__name__}: {e}). They are looked for at "
                f"{cache} and downloaded from {w.url} when missing. Copy the file there on a machine with "
                f"network, or pass --pretrained=false to train this encoder from scratch.") from None
        finally:
            socket.setdefaulttimeout(old)
    return fn(weights=w)


def hf_from_pretrained(cls, name: str, **kwargs):
    """cls.from_pretrained(name) trying the local cache first, then the hub with short time-outs."""
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        err = "HF_HUB_OFFLINE=1 is set and the files are not in the local cache"
    else:
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        try:
            return cls.from_pretrained(name, **kwargs)
        except Exception as e:
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    raise RuntimeError(
        f"cannot load Hugging Face weights '{name}' for {cls.__name__} ({err}). They are looked for in the "
        f"cache under {cache} (or pass a local folder path instead of the name). Download them on a machine "
        f"with network (huggingface-cli download {name}) and copy the cache, or pass --pretrained=false to "
        f"train from scratch with a tokenizer fitted on the training reports.")


# ----------------------------------------------------------------------------------------------------
def hf_grad_ckpt(model):
    """Gradient (activation) checkpointing on a transformers model, under the name its version uses
    (activation_checkpointing_enable from transformers 5.x, gradient_checkpointing_enable before)."""
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a KV cache and recomputation do not mix (and encoders do not need one)
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


# ---- checkpoints ----

def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(state: dict, path: str | os.PathLike):
    """Write atomically: temp file, fsync, keep the old file as ckpt_prev.pt, os.replace into place.

    A kill at any moment leaves either the old or the new checkpoint loadable, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    prev = path.with_name(path.stem + "_prev" + path.suffix)
    if path.exists():
        os.replace(path, prev)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint; a missing or corrupt file is an error naming it and the previous one."""
    path = Path(path)
    prev = path.with_name(path.stem + "_prev" + path.suffix)
    if not path.exists():
        if prev.exists():  # killed between the two renames of save_checkpoint: the previous one is whole
            print0(f"warning: {path} is missing, resuming from {prev}")
            path = prev
        else:
            raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        hint = f"; the previous checkpoint {prev} may be intact: copy it to {path} and resume" if prev.exists() \
            and prev != path else ""
        raise RuntimeError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}){hint}") from e


def prepare_out_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> Path:
    """Refuse to clobber an existing run's checkpoint unless --resume or --overwrite says so."""
    out = Path(out_dir)
    ck = out / "ckpt.pt"
    if (ck.exists() or (out / "ckpt_prev.pt").exists()) and not (resume or overwrite):
        raise SystemExit(f"{ck} already exists: pass --resume to continue that run or --overwrite to start a new "
                         f"one in its place (or choose another --out_dir)")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------------
# ---- metrics / logging ----

def binary_targets(y: np.ndarray) -> np.ndarray:
    """Labels -> evaluation mask: 1 positive, 0 negative; -1 (uncertain) and blank are left out (nan)."""
    y = np.asarray(y, dtype=np.float64).copy()
    y[(y != 0) & (y != 1)] = np.nan
    return y


def auc_per_label(y: np.ndarray, scores: np.ndarray, names: list[str]) -> dict:
    """ROC AUC per label over rows with a 0/1 label; a label with one class only is None (undefined).

    Returns {"per_label": {name: auc or None}, "macro": mean over defined labels or None}.
    """
    from sklearn.metrics import roc_auc_score

    y = binary_targets(y)
    per = {}
    for j, n in enumerate(names):
        m = ~np.isnan(y[:, j])
        yj = y[m, j]
        per[n] = float(roc_auc_score(yj, scores[m, j])) if m.any() and 0 < yj.sum() < len(yj) else None
    vals = [v for v in per.values() if v is not None]
    return {"per_label": per, "macro": float(np.mean(vals)) if vals else None}


def f1_acc_at(y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    y = binary_targets(y)
    out = {}
    for j, n in enumerate(names):
        m = ~np.isnan(y[:, j])
        if not m.any():
            out[n] = {"f1": None, "acc": None}
            continue
        pred = (scores[m, j] >= thresholds[j]).astype(int)
        out[n] = {"f1": float(f1_score(y[m, j], pred, zero_division=0)), "acc": float(accuracy_score(y[m, j], pred))}
    return out


def recall_at_k(sim: np.ndarray, gt: list[set] | np.ndarray, ks=(1, 5, 10)) -> dict:
    """sim [Q, C]; gt[q] the set of correct candidate indices (or an int array of one per query)."""
    order = np.argsort(-sim, axis=1)
    out = {}
    for k in ks:
        hit = [len(set(order[q, :k].tolist()) & (g if isinstance(g, set) else {int(g)})) > 0 for q, g in enumerate(gt)]
        out[f"R@{k}"] = float(np.mean(hit)) if hit else None
    return out


class JSONLLogger:
    """One JSON object per line; appends on resume. Only rank 0 writes."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        self.enabled = is_main_process()
        if self.enabled and not resume and self.path.exists():
            self.path.unlink()

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def truncate_log(path: str | os.PathLike, step: int):
    """On resume, drop log lines written after the checkpoint's step (they will be written again)."""
    p = Path(path)
    if not p.exists() or not is_main_process():
        return
    keep = []
    for line in p.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by a kill -9
            pass
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, p)


def write_json_atomic(path: str | os.PathLike, obj):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# ---- phantoms: the synthetic radiograph data set (the demos' and tests' data) ----
# Procedurally drawn "radiographs" of six body parts, paediatric and adult, two or three views per study,
# findings drawn into the pixels with masks, and reports written from templates with synonyms, negations
# and uncertainty. Built so that a model that learns image-text alignment scores a high zero-shot AUC and
# one that does not scores 0.5. Everything is a function of `seed`.

PHANTOM_BODY_PARTS = {"chest": 0.44, "wrist": 0.15, "hand": 0.12, "knee": 0.12, "elbow": 0.09, "hip": 0.08}
_BONES = ("hand", "wrist", "knee", "elbow", "hip")
# name: (body parts where it can occur, prevalence among those studies). The last three are the rare tail.
PHANTOM_FINDINGS = {
    "Cardiomegaly": (("chest",), 0.22),
    "Pleural Effusion": (("chest",), 0.20),
    "Consolidation": (("chest",), 0.16),
    "Edema": (("chest",), 0.12),
    "Pneumothorax": (("chest",), 0.10),
    "Nodule": (("chest",), 0.10),
    "Fracture": (_BONES, 0.25),
    "Joint Effusion": (("knee", "elbow", "hip"), 0.18),
    "Pneumoperitoneum": (("chest",), 0.05),
    "Soft Tissue Swelling": (("hand", "wrist", "knee", "elbow"), 0.06),
    "Foreign Body": (tuple(PHANTOM_BODY_PARTS), 0.04),
}
PHANTOM_RARE = ("Pneumoperitoneum", "Soft Tissue Swelling", "Foreign Body")
PHANTOM_LABELS = list(PHANTOM_FINDINGS) + ["No Finding"]

# Report phrases. {side}: right/left; {bone}: the fractured bone; {joint}: the joint.
_POS = {
    "Cardiomegaly": ["cardiomegaly", "the cardiac silhouette is enlarged", "the heart is enlarged",
                     "enlarged cardiac silhouette"],
    "Pleural Effusion": ["{side} pleural effusion", "{side} pleural fluid blunting the costophrenic angle",
                         "a small {side} effusion", "{side} pleural effusion at the costophrenic angle"],
    "Consolidation": ["{side} lower lobe consolidation", "airspace opacity in the {side} lower lobe",
                      "focal consolidation at the {side} base"],
    "Edema": ["pulmonary edema", "interstitial edema", "perihilar haziness in keeping with edema",
              "vascular congestion with edema"],
    "Pneumothorax": ["{side} apical pneumothorax", "a {side} pneumothorax", "air in the {side} pleural space at the apex"],
    "Nodule": ["a {side} lung nodule", "a small {side} pulmonary nodule", "a rounded nodular opacity in the {side} lung"],
    "Fracture": ["a fracture of the {bone}", "{bone} fracture", "a cortical break through the {bone}"],
    "Joint Effusion": ["a {joint} joint effusion", "joint effusion", "fluid distending the {joint} joint"],
    "Pneumoperitoneum": ["free air under the diaphragm", "pneumoperitoneum", "subdiaphragmatic free gas"],
    "Soft Tissue Swelling": ["soft tissue swelling", "swelling of the soft tissues", "soft tissue thickening"],
    "Foreign Body": ["a radiopaque foreign body", "a metallic foreign body", "a retained foreign body"],
}
_NEG = ["no {x}", "there is no {x}", "no evidence of {x}", "{x} is not seen", "without {x}"]
_UNC = ["possible {x}", "{x} cannot be excluded", "questionable {x}", "findings may represent {x}"]
_BONE_NAMES = {"hand": ["metacarpal", "proximal phalanx"], "wrist": ["distal radius", "distal ulna"],
               "knee": ["distal femur", "proximal tibia"], "elbow": ["distal humerus", "proximal radius"],
               "hip": ["femoral neck", "proximal femur"]}


def _soft(d, edge):
    """d: normalised distance (<1 inside). A soft-edged 0..1 mask, like a blurred projection."""
    return np.clip((1.0 - d) / edge, 0.0, 1.0)


def _ellipse(yy, xx, cy, cx, ry, rx, edge=0.15, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return _soft(np.sqrt((u / rx) ** 2 + (v / ry) ** 2), edge)


def _capsule(yy, xx, p0, p1, r, edge=0.2):
    """Soft mask of the points within r of the segment p0-p1 (a long bone)."""
    (y0, x0), (y1, x1) = p0, p1
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / max(vy * vy + vx * vx, 1e-9), 0, 1)
    d = np.sqrt((yy - y0 - t * vy) ** 2 + (xx - x0 - t * vx) ** 2) / r
    return _soft(d, edge)


def _bone_layout(part, view, s, rng):
    """Long bones as capsules ((y0,x0),(y1,x1), radius, name) and the joint centre, in [0,1] coordinates."""
    j = lambda: rng.normal(0, 0.015)  # noqa: E731  small positional jitter
    lat = view == "LATERAL"
    if part == "knee":
        b = [((-0.05, 0.5 + j()), (0.45, 0.5), 0.09 * s, "distal femur"),
             ((0.55, 0.5 + j()), (1.05, 0.5), 0.08 * s, "proximal tibia"),
             ((0.6, 0.5 + (0.03 if lat else 0.13) * s), (1.05, 0.5 + (0.04 if lat else 0.14) * s), 0.03 * s, "fibula")]
        if lat:
            b.append(((0.42, 0.5 - 0.15 * s), (0.47, 0.5 - 0.15 * s), 0.045 * s, "patella"))
        return b, (0.5, 0.5)
    if part == "elbow":
        ang = 0.9 if lat else 0.25
        ex, ey = 0.5 + j(), 0.5
        b = [((-0.05, ex), (ey, ex), 0.075 * s, "distal humerus"),
             ((ey + 0.03, ex - 0.03), (ey + 0.55 * math.cos(ang), ex - 0.03 + 0.55 * math.sin(ang)), 0.045 * s, "proximal radius"),
             ((ey + 0.03, ex + 0.04), (ey + 0.55 * math.cos(ang), ex + 0.04 + 0.55 * math.sin(ang) * 0.9), 0.05 * s, "proximal ulna")]
        return b, (ey, ex)
    if part == "hip":
        sep = 0.0 if lat else 0.22
        b = [((0.42, 0.5 - sep), (1.05, 0.42 - sep - 0.08), 0.07 * s, "proximal femur"),
             ((0.42, 0.5 + sep), (1.05, 0.58 + sep + 0.08), 0.07 * s, "femoral neck")]
        return b, (0.42, 0.5 - sep)
    if part == "wrist":
        off = 0.03 if lat else 0.09
        b = [((1.05, 0.5 - off), (0.5, 0.5 - off), 0.06 * s, "distal radius"),
             ((1.05, 0.5 + off), (0.52, 0.5 + off), 0.04 * s, "distal ulna"),
             ((0.38, 0.45), (0.05, 0.42), 0.03 * s, "metacarpal")]
        return b, (0.45, 0.5)
    # hand: five rays of metacarpal + phalanges fanning out from the wrist
    b = [((1.05, 0.45), (0.8, 0.47), 0.06 * s, "distal radius")]
    n = 3 if lat else 5
    for k in range(n):
        a = (k - (n - 1) / 2) * (0.12 if lat else 0.22)
        base = (0.72, 0.5 + a * 0.3)
        mid = (base[0] - 0.28 * math.cos(a), base[1] + 0.28 * math.sin(a))
        tip = (mid[0] - 0.3 * math.cos(a), mid[1] + 0.3 * math.sin(a))
        b.append((base, mid, 0.028 * s, "metacarpal"))
        b.append(((mid[0] - 0.02, mid[1]), tip, 0.022 * s, "proximal phalanx"))
    return b, (0.75, 0.5)


def _draw_phantom(part, view, age_years, findings, uncertain, size, rng):
    """Render one view. findings: {name: detail dict}; returns (uint8 image, uint8 mask of finding ids)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = (yy + 0.5) / size, (xx + 0.5) / size
    img = np.full((size, size), 0.06, np.float32)
    mask = np.zeros((size, size), np.uint8)
    s = 0.62 + 0.38 * min(age_years, 18) / 18  # body size grows until 18 (paediatric anatomy is smaller)
    fid = {n: i + 1 for i, n in enumerate(PHANTOM_FINDINGS)}

    def put(name, m, value, mode="set"):
        """Blend a finding in (half strength when reported as uncertain) and record it in the mask."""
        k = 0.5 if name in uncertain else 1.0
        nonlocal img
        if mode == "set":
            img = img * (1 - k * m) + value * k * m
        else:
            img = img + value * k * m
        mask[m > 0.5] = fid[name]

    if part == "chest":
        lat = view == "LATERAL"
        cy = 0.52 + rng.normal(0, 0.015)
        img = np.maximum(img, 0.33 * _ellipse(yy, xx, cy + 0.03, 0.5, 0.47 * s, (0.3 if lat else 0.43) * s, 0.1))
        lungs = [(cy - 0.02, 0.48, 0.3 * s, 0.2 * s, "right")] if lat else \
            [(cy - 0.02, 0.5 - 0.17 * s, 0.29 * s, 0.12 * s, "right"), (cy - 0.02, 0.5 + 0.17 * s, 0.29 * s, 0.12 * s, "left")]
        texture = 0.04 * np.sin(xx * 60 + rng.uniform(0, 6)) * np.sin(yy * 47 + rng.uniform(0, 6))
        lungmask = np.zeros_like(img)
        for (ly, lx, ry, rx, _) in lungs:
            lm = _ellipse(yy, xx, ly, lx, ry, rx, 0.12)
            lungmask = np.maximum(lungmask, lm)
        img = img * (1 - lungmask) + (0.13 + texture) * lungmask
        for k in range(6):  # ribs: faint bright curved bands over the lungs
            ry0 = cy - 0.24 * s + k * 0.085 * s
            band = _soft(np.abs(yy - ry0 - 0.25 * (xx - 0.5) ** 2) / 0.012, 0.5)
            img = img + 0.07 * band * lungmask
        spine_x = 0.72 if lat else 0.5
        img = np.maximum(img, 0.5 * _capsule(yy, xx, (0.05, spine_x), (0.98, spine_x), 0.035 * s))
        hy, hx = (cy + 0.1, 0.38) if lat else (cy + 0.1, 0.53)
        big = 1.55 if "Cardiomegaly" in findings else 1.0
        if big > 1 and "Cardiomegaly" in uncertain:
            big = 1.3
        heart = _ellipse(yy, xx, hy, hx, 0.12 * s * (1 + (big - 1) * 0.5), 0.12 * s * big, 0.15)
        img = np.maximum(img, 0.52 * heart)
        if "Cardiomegaly" in findings:
            mask[heart > 0.5] = fid["Cardiomegaly"]
        side_lung = lambda side: lungs[0] if lat or side == "right" else lungs[1]  # noqa: E731
        for name, d in findings.items():
            if name == "Pleural Effusion":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                lvl = ly + ry * rng.uniform(0.25, 0.45)
                m = _ellipse(yy, xx, ly, lx, ry, rx, 0.1) * (yy > lvl - 0.06 * np.abs(xx - lx) / rx)
                put(name, m.astype(np.float32), 0.5)
            elif name == "Pneumothorax":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                off = 0 if lat else (-1 if d["side"] == "right" else 1) * rx * 0.35
                e = _ellipse(yy, xx, ly - ry * 0.5, lx + off, ry * 0.5, rx * 0.85, 0.05)
                put(name, e * (lungmask > 0.3), 0.0)
                # the visceral pleural line: the bright edge of the collapsed lung, the sign radiologists look for
                edge = np.clip(_ellipse(yy, xx, ly - ry * 0.5, lx + off, ry * 0.62, rx * 1.0, 0.05) - e, 0, 1)
                put(name, edge * (lungmask > 0.3), 0.45)
            elif name == "Consolidation":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                m = np.maximum(_ellipse(yy, xx, ly + ry * 0.35, lx, 0.1 * s, 0.075 * s, 0.4),
                               _ellipse(yy, xx, ly + ry * 0.2, lx + 0.03, 0.06 * s, 0.06 * s, 0.4))
                patchy = 0.5 + 0.5 * (np.sin(xx * 90 + 1.3) * np.sin(yy * 70) > -0.3)  # mottled airspace opacity
                put(name, m * patchy, 0.62)
            elif name == "Nodule":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                m = _ellipse(yy, xx, ly + rng.uniform(-0.5, 0.3) * ry, lx + rng.uniform(-0.4, 0.4) * rx,
                             0.05, 0.05, 0.3)
                put(name, m, 0.8)
            elif name == "Edema":
                for (ly, lx, ry, rx, _) in lungs:
                    hilum = _ellipse(yy, xx, ly + 0.02, 0.5 if not lat else lx, ry * 0.9, rx * 1.6, 0.9)
                    put(name, hilum * lungmask, 0.25, mode="add")
            elif name == "Pneumoperitoneum":
                ly, lx, ry, rx, _ = lungs[0]
                outer = _ellipse(yy, xx, ly + ry * 0.95, lx, 0.08, rx * 0.95, 0.2)
                inner = _ellipse(yy, xx, ly + ry * 1.05, lx, 0.04, rx * 0.75, 0.2)
                put(name, np.clip(outer - inner, 0, 1) * (yy > ly + ry * 0.9), 0.0)
    else:
        bones, joint = _bone_layout(part, view, s, rng)
        tissue = np.zeros_like(img)
        for (p0, p1, r, _) in bones:
            tissue = np.maximum(tissue, _capsule(yy, xx, p0, p1, r * 2.2, 0.3))
        if part == "hip":
            tissue = np.maximum(tissue, _ellipse(yy, xx, 0.45, 0.5, 0.5, 0.55, 0.1))
            img = np.maximum(img, 0.45 * _ellipse(yy, xx, 0.2, 0.5, 0.2, 0.42, 0.2)
                             * (1 - _ellipse(yy, xx, 0.25, 0.5, 0.1, 0.25, 0.2)))  # pelvic ring
        if "Soft Tissue Swelling" in findings:
            p0, p1, r, _ = bones[0]
            sw = _capsule(yy, xx, p0, p1, r * 4.5, 0.3) * (1 - tissue)
            put("Soft Tissue Swelling", sw, 0.36)
        img = np.maximum(img, 0.26 * tissue)
        if "Joint Effusion" in findings:
            m = _ellipse(yy, xx, joint[0], joint[1], 0.15 * s, 0.2 * s, 0.3)
            put("Joint Effusion", m, 0.3, mode="add")
        for (p0, p1, r, name) in bones:
            bm = _capsule(yy, xx, p0, p1, r, 0.25)
            img = img * (1 - bm) + 0.62 * bm
            cortex = bm * (1 - _capsule(yy, xx, p0, p1, r * 0.6, 0.5))
            img = img + 0.12 * cortex
            if age_years < 16 and name != "patella":  # growth plate: a dark band across the bone near its end
                near, far = (p1, p0) if name.startswith("distal") or name in ("metacarpal", "proximal phalanx") else (p0, p1)
                py, px = near[0] + (far[0] - near[0]) * 0.1, near[1] + (far[1] - near[1]) * 0.1
                w = 0.012 + 0.02 * (1 - age_years / 16)  # narrows with age: another bone-age cue
                L = max(math.hypot(far[0] - near[0], far[1] - near[1]), 1e-6)
                along = ((yy - py) * (far[0] - near[0]) + (xx - px) * (far[1] - near[1])) / L
                img = img - 0.3 * _soft(np.abs(along) / w, 0.6) * bm
        if part in ("hand", "wrist"):  # carpal ossification centres appear with age (a bone-age cue)
            n_carpal = 0 if age_years < 1 else min(8, int(age_years * 0.7) + 1)
            for k in range(n_carpal):
                cy0, cx0 = joint[0] - 0.05 + 0.05 * (k // 4), joint[1] - 0.09 + 0.06 * (k % 4)
                img = np.maximum(img, 0.6 * _ellipse(yy, xx, cy0, cx0, 0.022, 0.022, 0.4))
        if "Fracture" in findings:
            p0, p1, r, _ = bones[findings["Fracture"]["bone_index"] % len(bones)]
            t = findings["Fracture"]["t"]
            cy0, cx0 = p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t
            L = max(math.hypot(p1[0] - p0[0], p1[1] - p0[1]), 1e-6)
            along = ((yy - cy0) * (p1[0] - p0[0]) + (xx - cx0) * (p1[1] - p0[1])) / L
            line = _soft(np.abs(along + 0.5 * (xx - cx0) * 0.6) / 0.035, 0.6) * _capsule(yy, xx, p0, p1, r * 1.2, 0.2)
            put("Fracture", line, 0.08)
    if "Foreign Body" in findings:
        fy, fx = findings["Foreign Body"]["pos"]
        m = (_soft(np.abs(yy - fy) / 0.05, 0.2) * _soft(np.abs(xx - fx) / 0.028, 0.2))
        put("Foreign Body", m, 1.0)
        put("Foreign Body", m * _soft(np.abs(yy - fy) / 0.025, 0.2) * _soft(np.abs(xx - fx) / 0.012, 0.2), 0.05)
    img = img.astype(np.float32)
    import cv2

    img = cv2.GaussianBlur(img, (0, 0), sigmaX=0.5 * size / 64)
    sigma = 0.055 if age_years < 18 else 0.03  # paediatric protocols use lower doses: noisier images
    img = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    img = (img * rng.uniform(0.85, 1.15)) ** rng.uniform(0.85, 1.15) if img.min() >= 0 else img
    img = np.clip(img, 0, 1)
    return np.round(img * 255).astype(np.uint8), mask


def _phrase(options, rng, **kw):
    return options[rng.integers(len(options))].format(**kw)


def _phantom_report(part, findings, uncertain, rng):
    """Findings and impression sections for one study, with synonyms, negations and uncertainty."""
    kw = lambda name: dict(side=findings[name].get("side", "right"), bone=findings[name].get("bone", "bone"),  # noqa: E731
                           joint=part)
    sents, imp = [], []
    for name in rng.permutation(list(findings)):
        p = _phrase(_POS[name], rng, **kw(name))
        if name in uncertain:
            p = _phrase(_UNC, rng, x=p)
            imp.append(_phrase(_UNC, rng, x=name.lower()))
        else:
            imp.append(name.lower() if rng.random() < 0.6 else p)
        s = p if rng.random() < 0.5 or name in uncertain else "there is " + p
        sents.append(s[0].upper() + s[1:] + ".")
    for name, (parts, prev) in PHANTOM_FINDINGS.items():
        # Negations ("no pneumothorax") are kept rarer than positive mentions of the same finding: with a 10%
        # finding negated in a third of all reports, the word itself would point at its absence, and a small
        # text encoder trained from scratch for minutes has not learnt negation yet (real models see millions).
        if part in parts and name not in findings and rng.random() < min(0.35, 0.5 * prev / (1 - prev)):
            s = _phrase(_NEG, rng, x=name.lower())
            sents.append(s[0].upper() + s[1:] + ".")
    order = rng.permutation(len(sents))
    sents = [sents[i] for i in order]
    if part == "chest":
        sents.append(["The lungs are otherwise clear.", "Otherwise no acute cardiopulmonary process."][rng.integers(2)])
    else:
        sents.append(["Alignment is otherwise normal.", "The bones are otherwise intact."][rng.integers(2)])
    findings_txt = " ".join(sents)
    if imp:
        imp_txt = (", ".join(imp[:-1]) + " and " + imp[-1]) if len(imp) > 1 else imp[0]
        imp_txt = imp_txt[0].upper() + imp_txt[1:] + "."
    else:
        imp_txt = ["No acute abnormality.", "Normal study.", "No acute findings."][rng.integers(3)]
    u = rng.random()  # some studies lack one section (CXR-CLIP then augments the other one)
    if u < 0.08:
        findings_txt = ""
    elif u < 0.16:
        imp_txt = ""
    return findings_txt, imp_txt


def make_phantoms(n: int, seed: int, out_dir: str | os.PathLike, size: int = 64, csv_name: str = "phantoms.csv",
                  progress: bool = True) -> Path:
    """Write about `n` phantom images (+ masks) and `<out_dir>/<csv_name>` in the project's schema.

    Deterministic in `seed`. Studies have 2 views (10% have a third); patients have 1-2 studies and the
    train/valid/test split (70/15/15) is by patient. Labels are the drawn ground truth: 1 present, -1
    reported as uncertain (drawn at half strength), 0 absent, blank where the finding cannot occur in that
    body part. `target` is the age in months (a bone-age-like regression target).
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts, pw = list(PHANTOM_BODY_PARTS), np.array(list(PHANTOM_BODY_PARTS.values()))
    rows, n_img, study, patient = [], 0, 0, 0
    plan = []
    while n_img < n:
        patient += 1
        peds = rng.random() < 0.5
        age = float(rng.uniform(0.5, 17.9) if peds else rng.uniform(18, 85))
        for _ in range(1 if rng.random() < 0.7 else 2):
            study += 1
            k = 3 if rng.random() < 0.1 else 2
            plan.append((patient, study, age, parts[rng.choice(len(parts), p=pw / pw.sum())], k))
            n_img += k
    split = split_by_patient([f"P{p:05d}" for p, *_ in plan], seed=seed)
    it = plan
    if progress:
        from tqdm import tqdm

        it = tqdm(plan, desc=f"phantoms -> {out}", unit="study", leave=False)
    for patient, st, age, part, k in it:
        srng = np.random.default_rng([seed, st])
        findings, uncertain = {}, set()
        for name, (where, prev) in PHANTOM_FINDINGS.items():
            if part in where and srng.random() < prev:
                d = {"side": ["right", "left"][srng.integers(2)]}
                if name == "Fracture":
                    d["bone_index"] = int(srng.integers(len(_bone_layout(part, "AP", 1.0, srng)[0]) - (1 if part == "knee" else 0)))
                    d["t"] = float(srng.uniform(0.35, 0.7))
                    d["bone"] = _bone_layout(part, "AP", 1.0, np.random.default_rng(0))[0][d["bone_index"]][3]
                if name == "Foreign Body":
                    d["pos"] = (float(srng.uniform(0.25, 0.75)), float(srng.uniform(0.3, 0.7)))
                findings[name] = d
                if srng.random() < 0.1:
                    uncertain.add(name)
        fx, imp = _phantom_report(part, findings, uncertain, srng)
        labels = {}
        for name, (where, _) in PHANTOM_FINDINGS.items():
            labels[name] = ("-1" if name in uncertain else "1") if name in findings else ("0" if part in where else "")
        labels["No Finding"] = "1" if not findings else "0"
        frontal = "PA" if part == "chest" and age >= 12 else "AP"
        views = [frontal, "LATERAL", frontal][:k]
        for v_i, view in enumerate(views):
            img, mask = _draw_phantom(part, view, age, findings, uncertain, size, srng)
            name = f"S{st:05d}_{v_i}"
            Image.fromarray(img).save(out / "images" / f"{name}.png", compress_level=1)
            Image.fromarray(mask).save(out / "masks" / f"{name}.png", compress_level=1)
            row = {"image": f"images/{name}.png", "mask": f"masks/{name}.png", "study_id": f"S{st:05d}",
                   "patient_id": f"P{patient:05d}", "split": split[f"P{patient:05d}"], "view": view,
                   "body_part": part, "findings": fx, "impression": imp,
                   "report": " ".join(t for t in (fx, imp) if t), "target": str(int(round(age * 12)))}
            row.update({LABEL_PREFIX + k2: v for k2, v in labels.items()})
            rows.append(row)
    cols = ["image", "mask", "study_id", "patient_id", "split", "view", "body_part", "findings", "impression",
            "report", "target"] + [LABEL_PREFIX + k for k in PHANTOM_LABELS]
    path = out / csv_name
    write_csv_atomic(path, rows, cols)
    return path


def ensure_phantoms(csv_path: str | os.PathLike, n: int, seed: int, size: int) -> Path:
    """Make the demo data set at `csv_path` unless it is already there (rank 0 makes it, others wait)."""
    p = Path(csv_path)
    if is_main_process() and not p.exists():
        t0 = time.time()
        make_phantoms(n, seed, p.parent, size=size, csv_name=p.name)
        print0(f"made {n} phantom images in {p.parent} ({time.time() - t0:.1f} s)")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return p


# ----------------------------------------------------------------------------------------------------
# ---- benchmark: samples/s, step-time percentiles, peak memory, FLOPs (FlopCounterMode), MFU ----

# Dense bf16 tensor-core peaks in FLOP/s (no 2:4 sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12,
                   "A10": 125e12, "RTX 4090": 165e12, "RTX 6000 Ada": 364e12, "A6000": 155e12, "RTX 3090": 71e12,
                   "V100": 125e12, "T4": 65e12, "B200": 2250e12}


def device_peak_flops(device: str) -> tuple[str, float | None]:
    """(device name, its peak dense bf16 FLOP/s or None when unknown / CPU)."""
    if not device.startswith("cuda"):
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", None
    name = torch.cuda.get_device_name(torch.device(device))
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # longest match first ("H100 NVL" before "H100")
        if key.lower() in name.lower():
            return name, PEAK_BF16_FLOPS[key]
    return name, None


def count_flops(fn) -> int:
    """FLOPs of one call of fn() (forward + backward if fn does both), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def run_benchmark(step, samples_per_step: int, device: str, warmup: int = 3, steps: int = 10,
                  flops_per_step: int | None = None, label: str = "") -> dict:
    """Time `step()` (one full training step) after `warmup` calls; print and return the figures."""
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = np.array(times)
    name, peak = device_peak_flops(device)
    if device.startswith("cuda"):
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process peak RSS)
    res = {"label": label, "device": name, "samples_per_step": samples_per_step,
           "samples_per_s": samples_per_step / t.mean(), "step_ms_mean": 1e3 * t.mean(),
           "step_ms_p50": 1e3 * float(np.percentile(t, 50)), "step_ms_p90": 1e3 * float(np.percentile(t, 90)),
           "peak_mem_gib": mem}
    if flops_per_step:
        res["flops_per_sample"] = flops_per_step / samples_per_step
        res["achieved_tflops"] = flops_per_step / t.mean() / 1e12
        res["mfu"] = (flops_per_step / t.mean() / peak) if peak else None
    print0(f"benchmark {label} on {name}: {res['samples_per_s']:.1f} samples/s | step {res['step_ms_mean']:.1f} ms "
           f"(p50 {res['step_ms_p50']:.1f}, p90 {res['step_ms_p90']:.1f}) | peak memory {mem:.2f} GiB"
           + (f" | {res['flops_per_sample'] / 1e9:.2f} GFLOP/sample, {res['achieved_tflops']:.2f} TFLOP/s"
              + (f", MFU {100 * res['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16" if res.get("mfu") else
                 " (MFU: no bf16 peak for this device)") if flops_per_step else ""))
    return res


def benchmark_data_csv(data: str, demo_data: str, n_phantoms: int) -> str:
    """The CSV that --benchmark=data reads: --data when given; the demo's 64 px phantoms when --data is the demo
    default; with no --data (the paper presets) 512 px phantoms, the size of `data_prep.py --resize=512` copies,
    so that the paper transform is timed on images of the size it will decode."""
    if data == demo_data:
        return str(ensure_phantoms(data, n_phantoms, seed=0, size=64))
    if data:
        return data
    p = Path(demo_data).parent.with_name("phantoms_512") / "phantoms.csv"
    print0(f"--benchmark=data without --data: 512 px phantoms ({p}) stand in for data_prep.py --resize=512 copies")
    return str(ensure_phantoms(p, 1000, seed=0, size=512))


def parse_workers(s: str) -> tuple[int, ...]:
    """--benchmark_workers=0,2,8 -> (0, 2, 8), or a ConfigError naming the flag."""
    try:
        w = tuple(int(v) for v in str(s).split(","))
    except ValueError:
        w = ()
    if not w or min(w) < 0:
        raise ConfigError(f"--benchmark_workers={s}: expected comma-separated worker counts >= 0, like 0,2,8")
    return w


def benchmark_data(dataset, collate, batch_size: int, workers=(0, 1, 2, 4), n_batches: int = 20) -> list[dict]:
    """Input-pipeline throughput (decode + augment + collate) per DataLoader worker count."""
    out = []
    for w in workers:
        dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=w,
                                         collate_fn=collate, prefetch_factor=4 if w else None)
        it = iter(dl)
        next(it)  # worker start-up is not throughput
        t0, n = time.perf_counter(), 0
        for _ in range(n_batches):
            try:
                next(it)
            except StopIteration:
                break
            n += batch_size
        dt = time.perf_counter() - t0
        out.append({"workers": w, "images_per_s": n / dt if dt > 0 else float("nan")})
        print0(f"data pipeline: {w} workers -> {out[-1]['images_per_s']:.0f} samples/s")
    return out
