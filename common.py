"""
common.py: what the paper files pedclip.py, cxrclip.py, cxrcml.py and dmlm.py share; nothing paper-specific.

    config / CLI     the Config dataclass -> --key=value flags, presets, --help; a user's mistake as one line
    distributed      print0, all-gather WITH gradient, the all-reduces of the training loop
    images           load_image (PNG / JPEG / DICOM -> uint8), augmentations, the demos' conv stem
    data             the CSV schema (README, "Data"): XrayCSV, EpochSampler, bad-sample counting
    text encoders    a WordPiece tokenizer fitted on the reports; pretrained weights that fail fast offline
    training loop    atomic checkpoints; Loop: resume, progress, logging, SIGTERM, non-finite steps
    metrics          AUC and the one zero-shot scorer
A paper file holds its model, losses, sampling, CUDA/DDP setup and train(); phantoms.py draws the demo data.
"""
from __future__ import annotations

import argparse
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
import torch.nn.functional as F

LABEL_PREFIX = "label:"  # CSV columns "label:<Name>" hold 1 / 0 / -1 / blank (CheXpert's convention)


# ----------------------------------------------------------------------------------------------------
# ---- config / CLI ----

class UserError(Exception):
    """A mistake in what the user gave (a flag, a file, a column, the data): `cli` prints it as one line."""


def cli(main):
    """Run main() as a command: a UserError is one line on stderr and exit status 2, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_config(cls, presets: dict[str, dict], argv: list[str] | None = None):
    """argparse from the dataclass: `--preset=NAME` (the first by default) sets the defaults, `--key=value`
    overrides a field (a bare `--flag` sets a boolean), and `--help` lists every field with the value the
    chosen preset runs with and the field's comment. A bad flag exits with status 2 and names it."""
    fields = re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M)
    notes = {m[1]: m[2].replace("%", "%%") for m in fields}  # each field's trailing comment is its help
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--preset", choices=list(presets), default=next(iter(presets)))
    preset = first.parse_known_args(argv)[0].preset
    p = argparse.ArgumentParser(parents=[first], allow_abbrev=False, usage="%(prog)s [--key=value ...]",
                                description=f"Each flag shows the value that --preset={preset} runs with.",
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, 2, 40, 160))
    hints, defaults = typing.get_type_hints(cls), {**dataclasses.asdict(cls()), **presets[preset]}
    for f in dataclasses.fields(cls):
        t, d = hints[f.name], defaults[f.name]
        flag = dict(type=_bool, nargs="?", const=True) if t is bool else dict(type=t)
        if f.name != "preset":
            p.add_argument(f"--{f.name}", default=d, metavar=str(d) or '""', help=notes.get(f.name), **flag)
    return cls(**vars(p.parse_args(argv)))


def _bool(s: str) -> bool:
    if s.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1", "yes")


def cpu_threads(requested: int) -> int:
    """--threads, or for 0 the usable cores shared among the processes on this node (by default torch gives
    each process all of them, and two processes on two cores spin-wait on each other)."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# ----------------------------------------------------------------------------------------------------
# ---- distributed (the process group itself is set up in each paper file) ----

def ddp_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if ddp_active() else 0


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of each rank's rows over ranks (every rank's loss depends
    on every rank's rows); plain `dist.all_gather` cuts the graph. With DDP's averaging of the gradients, 2
    processes x b then equal 1 process x 2b (tests/test_common.py checks it)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each rank -> [world * b, ...] in rank order, differentiable; the identity without DDP."""
    return _GatherWithGrad.apply(x) if ddp_active() else x


def all_reduce_mean(x, op=dist.ReduceOp.SUM) -> float:
    """The mean over ranks of a number (op=MAX: the maximum)."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().clone()
    if not ddp_active():
        return float(t)
    t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return float(t) / (dist.get_world_size() if op == dist.ReduceOp.SUM else 1)


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank when it is True on any rank: ranks must take the same branch (skip, stop)."""
    return all_reduce_mean(float(flag), dist.ReduceOp.MAX) > 0


# ----------------------------------------------------------------------------------------------------
# ---- images ----

class BadImageError(ValueError):
    """An image that cannot be read; the message names the file."""


def _dicom_to_uint8(path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise BadImageError(f"{path}: DICOM without pixel data")
    arr = ds.pixel_array.astype(np.float64)
    if arr.ndim == 3:  # colour secondary capture -> luminance; multi-frame -> the first frame
        arr = arr[..., :3].mean(-1) if arr.shape[-1] in (3, 4) else arr[0]
    # the modality LUT (rescale slope / intercept), then the VOI LUT or window, as a viewer shows the image
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        arr = apply_voi_lut(arr, ds, index=0).astype(np.float64)
    lo, hi = arr.min(), arr.max()
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1 shows high values dark: invert, so bone is bright as everywhere else
    return np.round(arr * 255).astype(np.uint8)


def load_image(path) -> np.ndarray:
    """PNG / JPEG / DICOM -> uint8 [H, W] grayscale, or a BadImageError naming the file."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM" or path.lower().endswith((".dcm", ".dicom")):
                return _dicom_to_uint8(path)
        from PIL import Image

        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            if im.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit PNGs (some NIH / VinDr copies)
                a = np.asarray(im, dtype=np.float64)
                return np.round((a - a.min()) / max(a.max() - a.min(), 1e-9) * 255).astype(np.uint8)
            return np.array(im.convert("L"), dtype=np.uint8)
    except BadImageError:
        raise
    except Exception as e:  # missing, truncated, not an image, a DICOM pydicom cannot decode, ...
        raise BadImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Squash to size x size: area averaging when shrinking (no aliasing), bilinear when enlarging."""
    import cv2

    how = cv2.INTER_AREA if min(img.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=how)


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator, scale=(0.8, 1.1),
                        ratio=(0.75, 4 / 3)):
    """torchvision's RandomResizedCrop on rng: a box that does not fit is redrawn (10 tries); never padded."""
    h, w = img.shape
    for _ in range(10):  # a box of scale x the image's area, aspect w / h log-uniform in ratio
        area, r = h * w * rng.uniform(*scale), math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < cw <= w and 0 < ch <= h:
            y0, x0 = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
            return resize(img[y0:y0 + ch, x0:x0 + cw], size)
    r = min(max(w / h, ratio[0]), ratio[1])  # none fitted: the centre crop of the aspect nearest the image's
    cw, ch = (w, int(round(w / r))) if r >= w / h else (int(round(h * r)), h)
    return resize(img[(h - ch) // 2:(h + ch) // 2, (w - cw) // 2:(w + cw) // 2], size)


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness=(0.9, 1.1), contrast=(0.8, 1.2)):
    """Brightness and contrast jitter (hue and saturation do nothing to a grayscale radiograph)."""
    x = img.astype(np.float32) * rng.uniform(*brightness)
    x = (x - x.mean()) * rng.uniform(*contrast) + x.mean()
    return np.clip(x, 0, 255).astype(np.uint8)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_tensor(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [H, W] -> float [3, H, W], normalised with the statistics the image encoder was trained with."""
    x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0).unsqueeze(0).expand(3, -1, -1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class ConvStem(nn.Sequential):
    """Patch embedding of a hybrid ViT, for the demos' small ViTs trained from scratch: log2(patch) stride-2
    convs, then a 1x1 conv, [B, 3, H, W] -> [B, dim, H/patch, W/patch]. It trains far faster than a linear
    patchify (Xiao et al., arXiv:2106.14881). overlap=False: 2x2 kernels, so each token sees only its patch,
    as masked modelling needs (the hMLP stem, arXiv:2204.07118). The paper presets keep the patchify."""

    def __init__(self, dim: int, patch: int, overlap: bool = True):
        n = int(round(math.log2(max(patch, 1))))
        if patch < 2 or 2 ** n != patch:
            raise UserError(f"a conv stem needs a power-of-two patch size >= 2, got {patch}")
        chans = [3] + [max(8, dim >> (n - i)) for i in range(1, n + 1)]  # ..., dim/4, dim/2, dim
        k, pad = (3, 1) if overlap else (2, 0)
        layers = []
        for i in range(n):
            layers += [nn.Conv2d(chans[i], chans[i + 1], k, stride=2, padding=pad, bias=False),
                       nn.GroupNorm(math.gcd(8, chans[i + 1]), chans[i + 1]), nn.GELU()]
        super().__init__(*layers, nn.Conv2d(chans[-1], dim, 1))

    @property
    def weight(self) -> torch.Tensor:  # transformers reads the embedding's dtype from it
        return self[-1].weight


# ----------------------------------------------------------------------------------------------------
# ---- data: the CSV schema ----

class BadSampleCounter:
    """Counts skipped samples by kind, warns once per kind, and fails past `max_bad_frac` of those seen."""

    def __init__(self, max_bad_frac: float = 0.01):
        self.max_bad_frac, self.counts, self.examples, self.seen = max_bad_frac, Counter(), {}, 0

    def add(self, kind: str, detail: str = "", n: int = 1):
        if kind not in self.counts:
            print0(f"warning: skipping {kind} ({detail}); more are counted, not printed")
        self.counts[kind] += n
        self.examples.setdefault(kind, detail)

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        return f"bad samples: {kinds} (of {self.seen})" if kinds else "bad samples: none"

    def check(self):
        bad = sum(self.counts.values())
        if self.seen and bad / self.seen > self.max_bad_frac:
            raise UserError(f"{self.summary()}: {bad / self.seen:.1%}, more than --max_bad_frac="
                            f"{self.max_bad_frac}; the first of each kind: {self.examples}")


def parse_label(v) -> tuple[float, bool]:
    """A label cell -> (value, ok): 1 / 0 / -1, blank -> nan; anything else is not ok."""
    s = str(v or "").strip()
    ok = s in ("", "1", "0", "-1", "1.0", "0.0", "-1.0")
    return (float(s) if s and ok else float("nan")), ok


class XrayCSV:
    """The rows of one split of a CSV in the project's schema (one row per image), grouped into studies.

    A missing file or column is a UserError naming it. Rows are counted in `counter` and skipped when a label
    is not 1 / 0 / -1 / blank, when every column of `require_text` is empty ("labels" among them: and no label
    is given either), and, read with split="train", when the split cell is empty."""

    def __init__(self, path, split: str | None = None, require=("image",), require_text=(), counter=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"data CSV {self.path} does not exist (data_prep.py writes one per data set)")
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            self.columns, rows = list(reader.fieldnames or []), list(reader)
        missing = [c for c in [*require, *(["split"] if split else [])] if c not in self.columns]
        if missing:
            raise UserError(f"{self.path}: no column {missing[0]!r} (it has: {', '.join(self.columns)})")
        self.label_names = [c[len(LABEL_PREFIX):] for c in self.columns if c.startswith(LABEL_PREFIX)]
        self.counter = counter if counter is not None else BadSampleCounter()
        self.rows = []
        for i, r in enumerate(rows):
            where = f"{self.path} row {i + 2}"
            if split is not None and r["split"].strip() != split:
                if split == "train" and not r["split"].strip():  # counted once, with the training rows
                    self.counter.seen += 1
                    self.counter.add("row without a split", where)
                continue
            self.counter.seen += 1
            parsed = [parse_label(r.get(LABEL_PREFIX + n)) for n in self.label_names]
            labels = np.array([v for v, _ in parsed], dtype=np.float32)
            if not all(ok for _, ok in parsed):
                self.counter.add("label outside {1, 0, -1, blank}", where)
            elif require_text and not (any((r.get(c) or "").strip() for c in require_text)
                                       or ("labels" in require_text and not np.isnan(labels).all())):
                self.counter.add("empty report text", f"{where}: {', '.join(require_text)} all empty")
            else:
                self.rows.append({**r, "_path": str(self.path.parent / r["image"]), "_labels": labels,
                                  "_row": i + 2})
        studies = defaultdict(list)  # the rows of each study_id, in first-seen order
        for i, r in enumerate(self.rows):
            studies[r.get("study_id") or f"_row{i}"].append(i)
        self.studies = list(studies.values())
        self.counter.check()

    def __len__(self):
        return len(self.rows)

    def labels(self) -> np.ndarray:
        """[N, L] float32 with 1 / 0 / -1 / nan (blank)."""
        return np.array([r["_labels"] for r in self.rows], np.float32).reshape(
            len(self), len(self.label_names))

    def texts(self, i: int) -> list[str]:
        """Row i's report sections that are not empty: findings and impression, else the whole report."""
        r = self.rows[i]
        out = [t for t in ((r.get("findings") or "").strip(), (r.get("impression") or "").strip()) if t]
        return out or [t for t in [(r.get("report") or "").strip()] if t]


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles n items per epoch (seed, epoch), gives each rank its slice of every global batch, and can
    start mid-epoch (exact resume). Yields (index, sample seed), so that a sample's augmentation depends on
    (seed, epoch, index) alone, in any DataLoader worker. Incomplete batches are dropped: ranks keep pace."""

    def __init__(self, n: int, local_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.b, self.rank, self.ws, self.seed = n, local_batch, rank, world_size, seed
        self.shuffle, self.epoch, self.skip = shuffle, 0, 0
        if self.batches_per_epoch == 0:
            raise UserError(f"{n} items cannot fill one global batch of {local_batch * world_size}: lower "
                            f"--batch_size or add data")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.b * self.ws)

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self):
        return (self.batches_per_epoch - self.skip) * self.b

    def __iter__(self):
        key = self.seed * 1_000_003 + self.epoch
        g = torch.Generator().manual_seed(key)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        for k in range(self.skip, self.batches_per_epoch):
            start = (k * self.ws + self.rank) * self.b  # global batch k: order[kB:(k+1)B]; this rank's part
            for j in order[start:start + self.b]:
                yield j, key * 10_000_019 + j


def split_by_patient(patient_ids, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, str]:
    """patient -> train / valid / test, deterministic in seed; a patient is never in two splits."""
    uniq = sorted(set(patient_ids))
    random.Random(seed).shuffle(uniq)
    n_tr, n_va = int(round(fractions[0] * len(uniq))), int(round(fractions[1] * len(uniq)))
    return {p: "train" if i < n_tr else "valid" if i < n_tr + n_va else "test" for i, p in enumerate(uniq)}


def atomic_write(path, write, binary: bool = False):
    """write(f) into a temp file, fsync, then os.replace it onto `path`: a kill at any moment leaves either
    the old file or the new one, whole (checkpoints, CSVs, metrics)."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_csv_atomic(path, rows: list[dict], columns: list[str]):
    def write(f):
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in columns} for r in rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def label_text(name: str) -> str:
    """A label column's name as words for a prompt: "Pleural_Thickening" -> "pleural thickening"."""
    return " ".join(name.replace("_", " ").split()).lower()


# clinical sentences: "a 1.5 cm nodule", "Dr. ___", "e.g. effusion", numbered lists stay whole
ABBREVIATIONS = {"e.g", "i.e", "a.m", "p.m", "vs", "approx", "etc", "cf", "esp"}  # end only before a capital
TITLES = {"dr", "mr", "mrs", "ms", "prof"}  # never an end ("Dr. ___")
LIST_ITEM = re.compile(r"\(?(\d{1,2})[.)]")  # "1." "2)" "(3)"


def split_sentences(text: str) -> list[str]:
    """A report -> its sentences (CXR-CLIP's sentence shuffle; text_prep.py's back-translation). ".", "?" or
    "!" ends one, except after a title or an abbreviation ("1.5 cm", "e.g.", "Dr. ___" stay inside); a list
    number ("1.", "2)") opens one where a list starts or goes on."""
    sents, cur, item = [], [], 0
    parts = re.split(r"(\s+)", text.strip())  # words at even indices, the whitespace before them at odd
    for k in range(0, len(parts), 2):
        w, m = parts[k], LIST_ITEM.fullmatch(parts[k])
        if m and (not cur or "\n" in parts[k - 1] or cur[-1].endswith(":") or int(m[1]) == item + 1 > 1):
            if cur and not cur[-1].endswith(":"):
                sents, cur = sents + [" ".join(cur)], []
            cur, item = cur + [w], int(m[1])
            continue
        cur += [w] if w else []
        end = w.rstrip("\"')]").lower()
        if end[-1:] in (".", "?", "!"):
            stem, nxt = end.rstrip(".").lstrip("(\"'"), parts[k + 2] if k + 2 < len(parts) else ""
            if stem not in TITLES and not (stem in ABBREVIATIONS and nxt and not nxt[0].isupper()):
                sents, cur = sents + [" ".join(cur)], []
    return sents + [" ".join(cur)] if cur else sents


# ----------------------------------------------------------------------------------------------------
# ---- text encoders: the demos' tokenizer, pretrained weights ----

def train_wordpiece(texts: list[str], vocab_size: int = 2000):
    """A lower-case WordPiece tokenizer fitted on `texts`, so the demos download nothing. Deterministic, as
    the `tokenizers` trainer is not (hash-ordered merges): the special tokens, every character (alone and as a
    "##" continuation, so every word can be spelled), then whole words by frequency, up to vocab_size."""
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    if not words:
        raise UserError("no text to fit a tokenizer on: every training report is empty")
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    ranked = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in set(vocab)]
    return tokenizer_from_vocab(vocab + ranked[:max(0, vocab_size - len(vocab))])


def tokenizer_from_vocab(vocab: list[str], lowercase: bool = True):
    """BERT's WordPiece tokenizer ("[CLS] text [SEP]") from its vocabulary, which every checkpoint stores."""
    import tempfile

    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizerFast(str(Path(d) / "vocab.txt"), do_lower_case=lowercase)


def tokenizer_vocab(tokenizer) -> list[str]:
    return [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]


def load_pretrained(what: str, load):
    """load() of published weights, e.g. lambda: torchvision.models.resnet50(weights="IMAGENET1K_V1") or
    AutoModel.from_pretrained(name). Neither cached nor downloadable (offline), it is a UserError within
    seconds that says what to do."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return load()
    except Exception as e:
        raise UserError(f"cannot load {what} ({type(e).__name__}: {str(e).splitlines()[0][:150]}). Fetch it "
                        f"where there is network and copy the cache ({torch.hub.get_dir()} for torchvision, "
                        f"HF_HOME for Hugging Face), or give a local folder, or --pretrained=false") from None


# ----------------------------------------------------------------------------------------------------
# ---- checkpoints and the training loop's plumbing ----

def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint, or a UserError naming the file. weights_only: tensors, numbers, strings, lists and dicts
    only, so that a file from elsewhere (CheXzero's weights) cannot run code when it is read."""
    if not Path(path).exists():
        raise UserError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:120]!r})") from None


# flags that a resumed run may change: where and how fast it runs, not what it computes
RESUME_MAY_CHANGE = {"resume", "overwrite", "max_steps", "device", "amp", "compile", "num_workers", "threads",
                     "log_every", "ckpt_every", "max_bad_frac", "data", "out_dir"}


def start_run(cfg) -> dict | None:
    """With --resume the checkpoint to continue (same flags; an ended run says so and exits 0), else None;
    a new run does not replace another run's ckpt.pt unless --overwrite says so."""
    ck = Path(cfg.out_dir) / "ckpt.pt"
    if not cfg.resume:
        if ck.exists() and not cfg.overwrite:
            raise UserError(f"{ck} exists: --resume continues that run, --overwrite replaces it (or use "
                            f"another --out_dir)")
        return None
    if not ck.exists():
        raise UserError(f"--resume: no checkpoint in {cfg.out_dir} (drop --resume to start a new run)")
    state = load_checkpoint(ck)
    changed = [f"--{k}={getattr(cfg, k)} (the run has {v})" for k, v in state["config"].items()
               if k not in RESUME_MAY_CHANGE and hasattr(cfg, k) and getattr(cfg, k) != v]
    if changed:
        raise UserError(f"--resume continues the run in {ck} with the flags it was started with; these differ"
                        f": {', '.join(changed)}. Give the run's values, or start a new run (--overwrite)")
    if state["loop"]["ended"]:
        print0(f"{ck}: this run has ended ({state['loop']['ended']}); its results are in {cfg.out_dir}/"
               f"metrics.json. Nothing to resume (a new run: --overwrite, or another --out_dir)")
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(0)
    return state


def _rng_state() -> dict:  # torch's generators: dropout, masks (the data's randomness is in sample seeds)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


class Loop:
    """The plumbing of a training loop; the paper's train() keeps its objective and its whole optimiser step:

        for epoch in loop.epochs():                   # --epochs, unless --max_steps, a signal or --patience
            for batch in loop.batches(loader):        # counts the batch's unreadable samples
                ... forward, loss, backward, unscale, clip; if loop.bad_step(loss, grad_norm): skip it ...
                ... scaler.step, scaler.update, zero_grad, scheduler ...
                loop.step_done(loss=loss, ...)        # log, progress bar, checkpoint, SIGTERM, --max_steps
            loop.end_epoch(val_loss)                  # bad-sample check, best weights, checkpoint
        return loop.close(metrics)                    # metrics.json, or how to --resume a stopped run

    It reads cfg.out_dir, epochs, max_steps, log_every, ckpt_every and, if the paper has it, patience (epochs
    without a lower validation loss that end the run; 0: off). `ck` (start_run's) restores weights, optimiser,
    schedule, scaler, data position and every rank's RNG: a resumed run equals one never stopped. `extra()`
    adds the paper's state to each checkpoint. SIGTERM / SIGINT: all ranks checkpoint and stop at one step."""
    STATE = ("step", "epoch", "batch", "skipped", "best_val", "since_best", "log_bytes", "ended")  # resumed
    SCALE_FLOOR = 1.0  # an fp16 loss scale at or below this stops calibrating: its overflows are divergence

    def __init__(self, cfg, *, name, model, opt, sched, scaler, sampler, counter, ck=None, extra=dict):
        from tqdm import tqdm

        self.cfg, self.name, self.model, self.opt, self.sched = cfg, name, model, opt, sched
        self.scaler, self.sampler, self.counter, self.extra = scaler, sampler, counter, extra
        self.out, self.log_path = Path(cfg.out_dir), Path(cfg.out_dir) / "log.jsonl"
        self.step = self.epoch = self.batch = self.skipped = self.since_best = self.log_bytes = 0
        self.bad_run, self.ended, self.best_val, self.stop_reason = 0, None, math.inf, None
        self.signal, self.t0 = None, time.time()
        if ck is not None:
            for obj, key in ((model, "model"), (opt, "optimizer"), (sched, "scheduler"), (scaler, "scaler")):
                obj.load_state_dict(ck[key])
            for k in self.STATE:
                setattr(self, k, ck["loop"][k])
            r = ck["rng"][rank()]
            torch.set_rng_state(r["torch"])
            if r["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(r["cuda"])
            print0(f"resumed {self.out}/ckpt.pt at step {self.step} (epoch {self.epoch}, batch {self.batch})")
        if is_main_process():  # a resumed log is cut back to its length at the checkpoint; a new one is empty
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.truncate(self.log_bytes)
        total = cfg.epochs * sampler.batches_per_epoch
        self.pbar = tqdm(total=min(total, cfg.max_steps) if cfg.max_steps >= 0 else total, initial=self.step,
                         desc=name, unit="step", dynamic_ncols=True, disable=not is_main_process())
        self.handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum, frame):
        if self.signal and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def log(self, **row):
        if is_main_process():
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def epochs(self):
        while not self.ended and not self.stop_reason:
            yield self.epoch

    def batches(self, loader):
        self.sampler.set_epoch(self.epoch, self.batch)
        rng, batches = torch.get_rng_state(), iter(loader)  # iter() draws a seed from torch's RNG: undone, so
        torch.set_rng_state(rng)  # that dropout's numbers do not depend on where a resumed run started
        for batch in batches:
            for kind, detail in batch.get("bad", ()):
                self.counter.add(kind, detail)
            self.counter.seen += self.sampler.b
            self.batch += 1
            yield batch
            if self.stop_reason:
                self.save()
                return

    def bad_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step must be dropped: True on every rank when the loss or the gradient norm is not
        finite on some rank (ranks must never diverge). An fp16 overflow (finite loss, gradients not finite,
        the loss scale still above SCALE_FLOOR) is the GradScaler calibrating its scale: logged, not counted.
        Any other non-finite step is counted, and 5 in a row stop the run with a checkpoint."""
        bad_loss, bad_grad = not torch.isfinite(loss), not torch.isfinite(grad_norm)
        if not all_reduce_flag(bad_loss or bad_grad):
            self.bad_run = 0
            return False
        if not all_reduce_flag(bad_loss) and self.scaler.is_enabled() and \
                self.scaler.get_scale() > self.SCALE_FLOOR:
            self.log(step=self.step, fp16_overflow=True, loss_scale=self.scaler.get_scale())
            return True
        self.skipped, self.bad_run = self.skipped + 1, self.bad_run + 1
        print0(f"warning: non-finite loss or gradient at step {self.step}: skipped ({self.skipped} in all)")
        self.log(step=self.step, skipped_nonfinite=True)
        if self.bad_run >= 5:
            self.save()
            self.pbar.close()
            raise SystemExit(f"stopping: 5 non-finite steps in a row; the last good state is in "
                             f"{self.out}/ckpt.pt. Lower --lr, check the data, or try --amp=off.")
        return True

    def step_done(self, **logs):
        """After an optimiser step: log `logs` (averaged over ranks) every --log_every steps, checkpoint every
        --ckpt_every, and stop at --max_steps or on SIGTERM / SIGINT."""
        self.step, self.bad_run = self.step + 1, 0
        if self.step % self.cfg.log_every == 0 or self.step == 1:
            row = {k: all_reduce_mean(v) for k, v in logs.items()}
            self.log(step=self.step, epoch=self.epoch, **row, elapsed_s=round(time.time() - self.t0, 2))
            self.pbar.set_postfix({k: f"{v:.4g}" for k, v in list(row.items())[:3]}, refresh=False)
        self.pbar.update()
        if self.step % self.cfg.ckpt_every == 0:
            self.save()
        if 0 <= self.cfg.max_steps <= self.step:
            self.stop_reason = f"--max_steps={self.cfg.max_steps} reached"
        elif all_reduce_flag(self.signal is not None):
            self.stop_reason = f"{self.signal or 'a signal on another rank'} received"

    def end_epoch(self, val_loss: float | None = None):
        """The bad-sample check, the lowest validation loss's weights to ckpt_best.pt, whether the run ended
        (its last epoch, or --patience), a checkpoint. Nothing after a stop mid-epoch (batches() saved it)."""
        if self.stopped:
            return
        print0(self.counter.summary())
        self.counter.check()
        best = val_loss is not None and val_loss < self.best_val
        if val_loss is not None:
            self.best_val, self.since_best = (val_loss, 0) if best else (self.best_val, self.since_best + 1)
            self.log(step=self.step, epoch=self.epoch, val_loss=val_loss, best=best)
        self.epoch, self.batch = self.epoch + 1, 0
        patience = getattr(self.cfg, "patience", 0)
        if self.epoch >= self.cfg.epochs:
            self.ended = f"all {self.cfg.epochs} epochs"
        elif patience and self.since_best >= patience:
            self.ended = f"early stop: no lower validation loss in {patience} epochs"
            print0(self.ended)
        self.save(best)

    def save(self, best: bool = False):
        rngs = [_rng_state()]
        if ddp_active():  # every rank's RNG state (dropout and masks differ per rank), for an exact resume
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, _rng_state())
        if is_main_process():
            self.log_bytes = self.log_path.stat().st_size
            state = {"model": self.model.state_dict(), "config": dataclasses.asdict(self.cfg),
                     "paper": self.name, **self.extra()}
            if best:
                best_state = {**state, "epoch": self.epoch - 1, "val_loss": self.best_val}
                atomic_write(self.out / "ckpt_best.pt", lambda f: torch.save(best_state, f), binary=True)
            state.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), rng=rngs,
                         scaler=self.scaler.state_dict(), loop={k: getattr(self, k) for k in self.STATE})
            atomic_write(self.out / "ckpt.pt", lambda f: torch.save(state, f), binary=True)
        if ddp_active():
            dist.barrier()

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def close(self, metrics: dict | None = None) -> dict:
        """A stopped run says how to continue it; a finished one writes metrics.json (on rank 0)."""
        self.pbar.close()
        for s, h in self.handlers.items():  # SIGTERM acts normally again, also in processes forked later
            signal.signal(s, h)
        secs = time.time() - self.t0
        print0(f"training: {self.step} steps in {secs:.1f} s" + (f" ({self.stop_reason})" * self.stopped))
        if self.stopped:
            print0(f"checkpoint written to {self.out}/ckpt.pt; continue with --resume")
            return {"stopped": self.stop_reason, "step": self.step}
        if not is_main_process():
            return {}
        metrics = {**(metrics or {}), "step": self.step, "train_seconds": round(secs, 1),
                   "bad_samples": dict(self.counter.counts), "skipped_nonfinite_steps": self.skipped}
        if "zeroshot_auc_per_label" in metrics:
            print(f"zero-shot AUC on the test split ({metrics['n_images']} images; None: one class only)")
            for n, a in {"macro": metrics["zeroshot_auc_macro"], **metrics["zeroshot_auc_per_label"]}.items():
                print(f"  {n:<24} {a if a is None else round(a, 4)}")
        atomic_write(self.out / "metrics.json", lambda f: json.dump(metrics, f, indent=2))
        print(f"wrote {self.out}/metrics.json")
        return metrics


# ----------------------------------------------------------------------------------------------------
# ---- metrics ----

def auc_per_label(y: np.ndarray, scores: np.ndarray, names: list[str]) -> dict:
    """ROC AUC per label over its 0 / 1 rows (None, undefined, with one class only) and their macro mean:
    {"per_label": {name: auc or None}, "macro": mean of the defined ones or None}. By the Mann-Whitney rank
    sum (ties count half, as in roc_auc_score): quick enough for evaluate.py's 1,000 bootstrap resamples."""
    from scipy.stats import rankdata

    y, per = np.asarray(y, dtype=np.float64), {}
    for j, n in enumerate(names):
        m = (y[:, j] == 0) | (y[:, j] == 1)  # -1 (uncertain) and blank (nan) are left out
        pos = y[m, j] == 1
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        r = rankdata(scores[m, j]) if n_pos and n_neg else None
        per[n] = None if r is None else float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    vals = [v for v in per.values() if v is not None]
    return {"per_label": per, "macro": float(np.mean(vals)) if vals else None}


@torch.no_grad()
def embed_images(model, rows, device, batch_size: int = 256, counter=None, fn=None, num_workers: int = 0):
    """fn (default model.encode_image) of every row's image with the eval transform, in float32 -> (array
    [N, ...], readable-row mask [N]). rows: an XrayCSV or a list of its rows; an unreadable image is counted
    in `counter` and masked out. The one image loop of the end of training and of evaluate.py."""
    rows = rows.rows if isinstance(rows, XrayCSV) else rows
    tf, size, fn = model.image_transform(False), model.cfg.image_size, fn or model.encode_image

    def load(idx):  # in a DataLoader worker: one batch of images, and the error text of each unreadable one
        xs, errs = [], []
        for i in idx:
            try:
                xs.append(tf(load_image(rows[i]["_path"]))), errs.append("")
            except BadImageError as e:
                xs.append(torch.zeros(3, size, size)), errs.append(str(e))
        return torch.stack(xs), errs

    model.eval()
    batches = [range(s, min(s + batch_size, len(rows))) for s in range(0, len(rows), batch_size)]
    out, ok = [], np.ones(len(rows), bool)
    for idx, (x, errs) in zip(batches, torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=load,
                                                                    num_workers=num_workers)):
        for i, e in zip(idx, errs):
            if e:
                ok[i] = False
                if counter is not None:
                    counter.add("unreadable image", e)
        out.append(fn(x.to(device)).float().cpu())
    return torch.cat(out).numpy(), ok


@torch.no_grad()
def prompt_embedding(model, prompts: list[str]) -> np.ndarray:
    """float64 [D]: the normalised mean of the prompts' text embeddings (CheXzero averages its templates)."""
    return F.normalize(model.encode_text(list(prompts)).double().mean(0), dim=0).cpu().numpy()


def zeroshot_scores(model, emb: np.ndarray, names: list[str]) -> np.ndarray:
    """float64 [N, L]: each image's cosine similarity to a label's positive prompts minus that to its negative
    ones (model.zeroshot_prompts(name) -> (pos, neg); the positive one alone where neg is empty). CheXzero's
    predict softmaxes the raw cosines of its pair ("{}" / "no {}", no logit scale): exp(c+) / (exp(c+) +
    exp(c-)) = sigmoid(c+ - c-), a monotone function of this difference, so both rank the images alike."""
    emb, out = np.asarray(emb, dtype=np.float64), np.zeros((len(emb), len(names)))
    for j, n in enumerate(names):
        pos, neg = model.zeroshot_prompts(n)
        out[:, j] = emb @ prompt_embedding(model, pos) - (emb @ prompt_embedding(model, neg) if neg else 0.0)
    return out


def zeroshot_eval(model, table: XrayCSV, device, batch_size: int = 256) -> dict:
    """Zero-shot AUC per label (zeroshot_scores) and its macro, over the readable images of `table`."""
    emb, ok = embed_images(model, table, device, batch_size)
    names = table.label_names
    res = auc_per_label(table.labels()[ok], zeroshot_scores(model, emb[ok], names), names)
    return {"zeroshot_auc_macro": res["macro"], "zeroshot_auc_per_label": res["per_label"],
            "n_images": int(ok.sum())}
