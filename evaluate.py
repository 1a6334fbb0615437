"""
evaluate.py: every downstream protocol of the four papers (PedCLIP, CXR-CLIP, CXR-CML, D-MLM), on a checkpoint
of any of them, so the four methods can be compared side by side on the same data.

A checkpoint names the paper file that wrote it (its "paper" key); this file imports that module and rebuilds
the model with its `load(path)`. Everything below uses only the shared model interface of DESIGN.md:
`encode_image`, `encode_text(list[str])`, `image_tokens`, `image_transform(train)`, `zeroshot_prompts(label)`.

    task                 protocol (paper)                                         headline metrics
    zeroshot             positive vs negative prompt per label, softmax over the   AUC, F1, ACC (macro, base/rare)
                         pair (CheXzero; all four papers); F1/ACC at the threshold
                         that maximises F1 on the valid split
    zeroshot_multiclass  argmax over class prompts (CheXpert 5x200; CXR-CLIP)     ACC, macro F1
    retrieval            image->text and text->image, one frontal image per study  R@1/5/10 both ways, RSUM
                         against the study's report (CXR-CLIP Table 3)
    probe                logistic regression on frozen image embeddings, 1/10/100%  AUC mean ± std over seeds
                         of the training labels (PedCLIP, CXR-CLIP, D-MLM)
    finetune             image encoder + linear head trained end to end, 1/10/100%  AUC mean ± std over seeds
    segmentation         light conv decoder on frozen `image_tokens` (SIIM,         Dice
                         GRAZPEDWRI-DX: PedCLIP, D-MLM)
    regression           bone age from a head on frozen or fine-tuned features      MAE (months)
    grading              ordinal grades (edema severity 0-3)                        ACC, macro F1, quadratic kappa
    concepts             a linear probe per concept column (PedCLIP)               AUC per concept
    kfold                any task above, 5-fold CV over the evaluation split,      mean ± std over folds
                         grouped by patient (CXR-CML)

Run it:

    python evaluate.py --ckpt=out/cxrclip/ckpt.pt --task=zeroshot                  # -> out/cxrclip/eval_zeroshot.json
    python evaluate.py --ckpt=out/cxrclip/ckpt.pt --task=zeroshot --labels=Edema,Nodule --plots
    python evaluate.py --ckpt=out/cxrclip/ckpt.pt --task=probe --seeds=0,1,2 --fractions=0.01,0.1,1
    python evaluate.py --ckpt=out/cxrclip/ckpt.pt --task=regression --body_part=hand,wrist --mode=finetune
    python evaluate.py --ckpt=out/cxrclip/ckpt.pt --task=grading --data=grades.csv --target_column=grade --classes=0,1,2,3
    python evaluate.py --ckpt=out/cxrcml/ckpt.pt --task=kfold --kfold_task=zeroshot --folds=5
    python evaluate.py --ckpt=out/cxrclip/ckpt.pt,out/pedclip/ckpt.pt,out/cxrcml/ckpt.pt,out/dmlm/ckpt.pt \\
        --tasks=zeroshot,retrieval,probe,kfold:zeroshot --out=results           # -> results/results.json + .md
    python evaluate.py --help

Image embeddings are computed once per (checkpoint, data file, split, image size) and cached in
`<out>/cache/<hash>.pt` (the hash covers the paths and modification times and the paper file's source), so
several tasks reuse them.
Batched, no-grad, bf16 autocast on GPUs; tqdm shows the progress.

Choices worth knowing:
  * A label with one class only among the rows that count (1 positive, 0 negative; -1 and blank left out) has
    no AUC: it is reported as undefined (null in JSON) and left out of the macro means, never as 0.5.
  * Zero-shot F1 / ACC use a per-label threshold chosen on the valid split (the one maximising F1); where the
    valid split has no positive for a label the threshold is 0.5 on the pair-softmax probability. Said in the output.
  * Probe fractions sample images (seeded); at 100% every seed sees the same data, so its std is 0.
  * Segmentation Dice is computed at the model's input resolution (masks resized with nearest neighbour).
"""
from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the paper files sit next to this one
import common  # noqa: E402

PAPERS = ("cxrclip", "pedclip", "cxrcml", "dmlm")
TASKS = ("zeroshot", "zeroshot_multiclass", "retrieval", "probe", "finetune", "segmentation", "regression",
         "grading", "concepts", "kfold")


@dataclass
class Config:
    ckpt: str = "out/cxrclip/ckpt.pt"  # checkpoint of any paper file; comma-separated for a comparison table
    task: str = "zeroshot"  # one task -> <out>/eval_<task>.json; the list is in the module docstring
    tasks: str = ""  # several tasks, comma-separated (kfold:<task> allowed) -> <out>/results.json + results.md
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema (the demo's phantoms are made if absent)
    split: str = "test"  # evaluation split
    train_split: str = "train"  # split the probe / fine-tune / decoder / regression heads are trained on
    valid_split: str = "valid"  # split the zero-shot F1 threshold is chosen on
    out: str = ""  # output folder (default: the checkpoint's folder; ./results for several checkpoints)
    labels: str = ""  # restrict to these label columns, comma-separated (default: every label:<Name> column)
    rare: str = "auto"  # base/rare grouping (CXR-LT): comma list | auto (phantoms' rare tail) | none
    classes: str = ""  # zeroshot_multiclass: label names (default: all); grading: the grade values (default: all seen)
    target_column: str = "target"  # regression / grading target column
    concepts: str = ""  # concepts task: columns, e.g. label:Fracture,label:Nodule (default: every label column)
    body_part: str = ""  # keep only rows of these body parts, comma-separated (e.g. hand,wrist for bone age)
    kfold_task: str = "zeroshot"  # the task --task=kfold cross-validates
    folds: int = 5  # folds for kfold (grouped by patient)
    seeds: str = "0,1,2"  # seeds for probe / finetune label fractions (mean ± std over them)
    fractions: str = "0.01,0.1,1.0"  # shares of the training labels for probe / finetune
    probe_c: float = 1.0  # inverse L2 strength of the logistic-regression probes (scikit-learn C)
    mode: str = "frozen"  # regression / grading: frozen (scikit-learn on cached embeddings) | finetune
    ft_epochs: int = 5  # fine-tuning epochs (finetune, and regression/grading with --mode=finetune)
    ft_lr: float = 1e-4  # fine-tuning learning rate of the image encoder (AdamW)
    head_lr: float = 1e-3  # learning rate of the linear head when fine-tuning
    ft_batch_size: int = 32  # fine-tuning batch size
    seg_epochs: int = 20  # segmentation decoder epochs
    seg_lr: float = 3e-3  # segmentation decoder learning rate (Adam)
    seg_width: int = 32  # segmentation decoder channels
    mask_rle_column: str = ""  # segmentation: masks from this Kaggle RLE column instead of `mask` PNGs
    retrieval_text: str = "longest"  # retrieval candidates: longest of findings/impression/report | a column name
    batch_size: int = 128  # images per forward pass when embedding
    num_workers: int = 2  # DataLoader workers for image loading
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16/fp16 autocast on GPU, off on CPU) | off
    plots: bool = False  # PNG plots in <out>/plots: ROC curves, retrieval examples, embedding map
    embed_plot: str = "pca"  # embedding map: pca | tsne
    cache: bool = True  # cache image embeddings in <out>/cache
    threads: int = 0  # torch CPU threads (0: the usable cores; 1 is fastest on a shared, busy CPU)
    sklearn_threads: int = 1  # BLAS threads for the scikit-learn fits (small problems: more threads only contend)
    preset: str = "default"  # filled in by the CLI


PRESETS = {"default": {}}


def _csv_list(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------------
# ---- metrics (scikit-learn; a one-class label is undefined, None) ----


def auc_or_none(y: np.ndarray, s: np.ndarray) -> float | None:
    """ROC AUC over rows with y in {0, 1}; None when only one class is there."""
    from sklearn.metrics import roc_auc_score

    y = common.binary_targets(y)
    m = ~np.isnan(y)
    y, s = y[m], np.asarray(s)[m]
    if len(y) == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, s))


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> float | None:
    """The score threshold (predict 1 when s >= t) that maximises F1 on (y, s); None without a positive."""
    from sklearn.metrics import precision_recall_curve

    y = common.binary_targets(y)
    m = ~np.isnan(y)
    y, s = y[m], np.asarray(s, dtype=np.float64)[m]
    if len(y) == 0 or y.sum() == 0:
        return None
    p, r, t = precision_recall_curve(y, s)
    f1 = 2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12)
    return float(t[int(np.argmax(f1))])


def f1_acc(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    from sklearn.metrics import accuracy_score, f1_score

    y = common.binary_targets(y)
    m = ~np.isnan(y)
    if not m.any():
        return None, None
    pred = (np.asarray(s)[m] >= threshold).astype(int)
    return float(f1_score(y[m], pred, zero_division=0)), float(accuracy_score(y[m], pred))


def dice_per_image(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pred, gt: bool [N, H, W] -> Dice per image, 2|P∩G| / (|P| + |G|); nan where both are empty."""
    pred, gt = pred.reshape(len(pred), -1).astype(bool), gt.reshape(len(gt), -1).astype(bool)
    inter = (pred & gt).sum(1).astype(np.float64)
    den = pred.sum(1) + gt.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * inter / np.maximum(den, 1), np.nan)


def dice_summary(pred: np.ndarray, gt: np.ndarray) -> dict:
    d = dice_per_image(pred, gt)
    has = gt.reshape(len(gt), -1).any(1)
    allv = np.where(np.isnan(d), 1.0, d)  # Kaggle SIIM convention: both empty counts as a perfect 1
    p, g = pred.astype(bool), gt.astype(bool)
    glob = 2 * (p & g).sum() / max(p.sum() + g.sum(), 1) if (p.sum() + g.sum()) else None
    return {"dice_pos": float(np.mean(d[has])) if has.any() else None,  # mean over images with a finding
            "dice_all": float(np.mean(allv)) if len(allv) else None,
            "dice_global": None if glob is None else float(glob),
            "n_images": int(len(gt)), "n_with_mask": int(has.sum())}


def mean_std(vals) -> tuple[float | None, float | None]:
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v))


# ----------------------------------------------------------------------------------------------------
# ---- models: any paper file's checkpoint through its own load() ----


def load_model(path: str, device: str):
    """-> (model on device in eval mode, its config, paper name). The checkpoint's "paper" key names the file."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first, e.g. `python cxrclip.py`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # only to read the key
    except Exception:
        ck = common.load_checkpoint(path)
    paper = ck.get("paper") if isinstance(ck, dict) else None
    del ck
    if paper not in PAPERS:
        raise ValueError(f"{path}: checkpoint has paper={paper!r}; expected one of {PAPERS} (written by the "
                         f"paper files' save())")
    mod = importlib.import_module(paper)
    model, cfg = mod.load(path)
    return model.to(device).eval(), cfg, paper


def model_image_size(model, cfg) -> int:
    return int(getattr(cfg, "image_size", None) or getattr(model, "image_size"))


class ImageRows(torch.utils.data.Dataset):
    """Rows of an XrayCSV -> (image tensor, index, error). A deterministic rng per (seed, epoch, index) when
    `seed` is given (training augmentation), none for evaluation."""

    def __init__(self, rows: list[dict], transform, size: int, seed: int | None = None):
        self.rows, self.tf, self.size, self.seed, self.epoch = rows, transform, size, seed, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        try:
            img = common.load_image(self.rows[i]["_path"])
            if self.seed is None:
                return self.tf(img), i, ""
            return self.tf(img, np.random.default_rng([self.seed, self.epoch, i])), i, ""
        except common.BadImageError as e:
            return torch.zeros(3, self.size, self.size), i, str(e)


# ----------------------------------------------------------------------------------------------------
# ---- evaluation context: model, data parts with cached embeddings ----


class Part:
    """A set of readable rows of one split with their image embeddings [n, D]."""

    def __init__(self, rows: list[dict], emb: np.ndarray, label_names: list[str], name: str):
        self.rows, self.emb, self.label_names, self.name = rows, emb, label_names, name

    def __len__(self):
        return len(self.rows)

    def subset(self, idx, name: str | None = None) -> "Part":
        idx = np.asarray(idx, dtype=int)
        return Part([self.rows[i] for i in idx], self.emb[idx], self.label_names, name or self.name)

    def labels(self, names: list[str]) -> np.ndarray:
        """[n, len(names)] with 1 / 0 / -1 / nan."""
        j = [self.label_names.index(n) for n in names]
        if not self.rows:
            return np.zeros((0, len(j)), np.float32)
        return np.stack([r["_labels"][j] for r in self.rows])

    def column(self, col: str) -> list[str]:
        return [(r.get(col) or "").strip() for r in self.rows]


class Context:
    def __init__(self, cfg: Config, ckpt: str, out: Path):
        self.cfg, self.ckpt, self.out = cfg, ckpt, out
        dev = cfg.device
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev
        self.model, self.mcfg, self.paper = load_model(ckpt, self.device)
        self.image_size = model_image_size(self.model, self.mcfg)
        self.parts: dict[str, Part | None] = {}
        self.token_cache: dict[str, np.ndarray] = {}
        self.text_cache: dict[str, np.ndarray] = {}
        self.columns: list[str] = []
        self.notes: list[str] = []

    def autocast(self):
        if self.device.startswith("cuda") and self.cfg.amp != "off":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dt)
        return nullcontext()

    def label_names(self, part: Part) -> list[str]:
        names = _csv_list(self.cfg.labels) or list(part.label_names)
        bad = [n for n in names if n not in part.label_names]
        if bad:
            raise ValueError(f"--labels: {bad} are not label columns of {self.cfg.data}; it has {part.label_names}")
        return names

    def rare_labels(self, names: list[str]) -> list[str]:
        r = self.cfg.rare.strip()
        if r.lower() in ("", "none"):
            return []
        if r.lower() == "auto":
            return [n for n in names if n in common.PHANTOM_RARE]
        return [n for n in _csv_list(r) if n in names]

    # -- embeddings, cached per (checkpoint, data, split, image size)
    def cache_path(self, split: str) -> Path:
        c, d = Path(self.ckpt).resolve(), Path(self.cfg.data).resolve()
        # the paper file's source too: an edited encoder must not be served embeddings of the old one
        code = hashlib.sha1(Path(importlib.import_module(self.paper).__file__).read_bytes()).hexdigest()
        key = f"{c}|{c.stat().st_mtime_ns}|{d}|{d.stat().st_mtime_ns}|{split}|{self.image_size}|{code}"
        return self.out / "cache" / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".pt")

    @torch.no_grad()
    def embed_rows(self, rows: list[dict], desc: str) -> tuple[np.ndarray, np.ndarray]:
        """[n, D] image embeddings (eval transform) and a mask of readable rows."""
        from tqdm import tqdm

        ds = ImageRows(rows, self.model.image_transform(False), self.image_size)
        dl = torch.utils.data.DataLoader(ds, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                                         pin_memory=self.device.startswith("cuda"))
        feats, ok = [], np.ones(len(rows), bool)
        for x, idx, err in tqdm(dl, desc=desc, unit="batch", leave=False, disable=len(dl) < 2):
            for i, e in zip(idx.tolist(), err):
                if e:
                    ok[i] = False
            with self.autocast():
                feats.append(self.model.encode_image(x.to(self.device, non_blocking=True)).float().cpu())
        emb = torch.cat(feats).numpy() if feats else np.zeros((0, 1), np.float32)
        return emb, ok

    def part(self, split: str) -> Part | None:
        """The readable rows of `split` (after --body_part) with their embeddings; None if the split is empty."""
        if split in self.parts:
            return self.parts[split]
        cfg = self.cfg
        if cfg.data == Config.data:
            common.ensure_phantoms(cfg.data, 3000, seed=0, size=64)  # the same demo data set as the paper files
        table = common.XrayCSV(cfg.data, split=split)
        self.columns = table.columns
        if not len(table):
            self.parts[split] = None
            return None
        cp = self.cache_path(split)
        cached = torch.load(cp, weights_only=False) if cfg.cache and cp.exists() else None
        if cached is not None and cached.get("n") == len(table):
            emb, ok = cached["emb"].numpy(), cached["ok"].numpy()
        else:
            emb, ok = self.embed_rows(table.rows, f"embed {split}")
            if cfg.cache:
                cp.parent.mkdir(parents=True, exist_ok=True)
                tmp = cp.with_name(cp.name + ".tmp")
                torch.save({"emb": torch.from_numpy(emb), "ok": torch.from_numpy(ok), "n": len(table),
                            "ckpt": str(self.ckpt), "data": cfg.data, "split": split,
                            "image_size": self.image_size}, tmp)
                os.replace(tmp, cp)
        if (~ok).any():
            print(f"warning: {int((~ok).sum())} unreadable image(s) in split {split!r} left out "
                  f"(first: {table.rows[int(np.argmin(ok))]['_path']})")
        keep = ok.copy()
        if cfg.body_part:
            parts = {p.lower() for p in _csv_list(cfg.body_part)}
            keep &= np.array([(r.get("body_part") or "").lower() in parts for r in table.rows])
        idx = np.flatnonzero(keep)
        p = Part([table.rows[i] for i in idx], emb[idx], table.label_names, split)
        self.parts[split] = p if len(p) else None
        return self.parts[split]

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch: int = 256) -> np.ndarray:
        out = []
        for s in range(0, len(texts), batch):
            with self.autocast():
                out.append(self.model.encode_text(list(texts[s:s + batch])).float().cpu())
        return torch.cat(out).numpy()

    def prompt_embedding(self, prompts: list[str]) -> np.ndarray:
        """The normalised mean of a prompt set's embeddings (prompt ensembling, as CLIP / CheXzero do)."""
        key = "\x00".join(prompts)
        if key not in self.text_cache:
            e = self.embed_texts(prompts).mean(0)
            self.text_cache[key] = e / max(np.linalg.norm(e), 1e-12)
        return self.text_cache[key]

    def logit_scale(self) -> float:
        s = getattr(self.model, "scale", None)
        try:
            return float(s().detach()) if callable(s) else 1.0
        except Exception:
            return 1.0

    def require(self, part: Part | None, split: str, task: str) -> Part:
        if part is None:
            raise ValueError(f"{task}: split {split!r} of {self.cfg.data} has no (readable) rows"
                             + (f" of body part {self.cfg.body_part}" if self.cfg.body_part else ""))
        return part


# ----------------------------------------------------------------------------------------------------
# ---- zero-shot ----


def zeroshot_probs(ctx: Context, emb: np.ndarray, names: list[str]) -> np.ndarray:
    """CheXzero: p(label) = softmax over (positive, negative) prompt similarity = sigmoid(scale (s+ - s-)).
    The model's learned temperature is used where it has one (it changes the probabilities, not the AUC)."""
    scale = ctx.logit_scale()
    out = np.zeros((len(emb), len(names)), np.float32)
    for j, n in enumerate(names):
        pos, neg = ctx.model.zeroshot_prompts(n)
        d = emb @ ctx.prompt_embedding(list(pos))
        if neg:  # a paper may give no negative prompt (CXR-CML's normal class): the positive similarity alone
            d = d - emb @ ctx.prompt_embedding(list(neg))
        out[:, j] = 1 / (1 + np.exp(-scale * d))
    return out


def task_zeroshot(ctx: Context, train: Part | None, valid: Part | None, test: Part) -> dict:
    names = ctx.label_names(test)
    rare = ctx.rare_labels(names)
    y, p = test.labels(names), zeroshot_probs(ctx, test.emb, names)
    pv, yv = (zeroshot_probs(ctx, valid.emb, names), valid.labels(names)) if valid is not None else (None, None)
    per, notes = {}, []
    for j, n in enumerate(names):
        auc = auc_or_none(y[:, j], p[:, j])
        t = best_f1_threshold(yv[:, j], pv[:, j]) if pv is not None else None
        src = f"max-F1 on {valid.name}" if t is not None else "0.5 (no positive in the valid split)"
        if t is None:
            t = 0.5
            notes.append(n)
        f1, acc = f1_acc(y[:, j], p[:, j], t) if auc is not None else (None, None)
        yb = common.binary_targets(y[:, j])
        per[n] = {"auc": auc, "f1": f1, "acc": acc, "threshold": t, "threshold_from": src,
                  "n_pos": int(np.nansum(yb == 1)), "n_neg": int(np.nansum(yb == 0))}
    m = {"auc_macro": mean_std(v["auc"] for v in per.values())[0],
         "f1_macro": mean_std(v["f1"] for v in per.values())[0],
         "acc_macro": mean_std(v["acc"] for v in per.values())[0]}
    if rare:
        m["auc_base"] = mean_std(v["auc"] for k, v in per.items() if k not in rare)[0]
        m["auc_rare"] = mean_std(v["auc"] for k, v in per.items() if k in rare)[0]
    note = (f"F1/ACC at the per-label threshold maximising F1 on the '{valid.name if valid else 'valid'}' split"
            + (f"; 0.5 for {notes} (no positive there)" if notes else "")
            + "; labels with one class in the test split are undefined (null) and not averaged")
    res = {"metrics": m, "per_label": per, "rare_labels": rare, "note": note, "n_images": len(test)}
    if ctx.cfg.plots:
        plot_roc(ctx, y, p, names, "zeroshot")
    return res


def task_zeroshot_multiclass(ctx: Context, train, valid, test: Part) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    classes = _csv_list(ctx.cfg.classes) or ctx.label_names(test)
    bad = [c for c in classes if c not in test.label_names]
    if bad:
        raise ValueError(f"--classes: {bad} are not label columns; choose from {test.label_names}")
    y = test.labels(classes)
    one = (y == 1).sum(1) == 1  # CheXpert 5x200: images positive for exactly one class of the set
    if not one.any():
        raise ValueError(f"zeroshot_multiclass: no {test.name} image is positive for exactly one of {classes}")
    gt = np.argmax(y[one] == 1, axis=1)
    T = np.stack([ctx.prompt_embedding(list(ctx.model.zeroshot_prompts(c)[0])) for c in classes])
    pred = np.argmax(test.emb[one] @ T.T, axis=1)
    per = {c: {"n": int((gt == k).sum()),
               "recall": float((pred[gt == k] == k).mean()) if (gt == k).any() else None} for k, c in enumerate(classes)}
    return {"metrics": {"acc": float(accuracy_score(gt, pred)),
                        "f1_macro": float(f1_score(gt, pred, labels=list(range(len(classes))), average="macro",
                                                   zero_division=0))},
            "per_class": per, "confusion": confusion_matrix(gt, pred, labels=list(range(len(classes)))).tolist(),
            "classes": classes, "n_images": int(one.sum()),
            "note": "images positive for exactly one class of the set; prediction = argmax over the classes' "
                    "positive-prompt embeddings"}


# ----------------------------------------------------------------------------------------------------
# ---- retrieval (CXR-CLIP Table 3) ----


def study_text(row: dict, how: str) -> str:
    """The retrieval candidate of a study: the LONGEST report section by length (not max() of the strings,
    which is the alphabetically last one), or a named column."""
    if how == "longest":
        secs = [(row.get(k) or "").strip() for k in ("findings", "impression", "report")]
        return max(secs, key=len)
    return (row.get(how) or "").strip()


def retrieval_pairs(part: Part, how: str) -> tuple[list[int], list[str]]:
    """One frontal image per study (the first frontal row, else the first row) and the study's text."""
    studies: dict[str, list[int]] = {}
    for i, r in enumerate(part.rows):
        studies.setdefault(r.get("study_id") or f"_row{i}", []).append(i)
    q, texts = [], []
    for rows in studies.values():
        front = [i for i in rows if (part.rows[i].get("view") or "").upper() in common.FRONTAL_VIEWS]
        i = (front or rows)[0]
        t = study_text(part.rows[i], how)
        if t:
            q.append(i)
            texts.append(t)
    return q, texts


def task_retrieval(ctx: Context, train, valid, test: Part) -> dict:
    q, texts = retrieval_pairs(test, ctx.cfg.retrieval_text)
    if len(q) < 2:
        raise ValueError(f"retrieval: fewer than 2 studies with text ({ctx.cfg.retrieval_text}) in {test.name}")
    img, txt = test.emb[q], ctx.embed_texts(texts)
    sim = img @ txt.T  # [studies, studies]
    # identical report texts cannot be told apart: every candidate with the same text counts as correct
    same: dict[str, set] = {}
    for k, t in enumerate(texts):
        same.setdefault(t, set()).add(k)
    gt = [same[t] for t in texts]
    i2t, t2i = common.recall_at_k(sim, gt), common.recall_at_k(sim.T, gt)
    m = {f"i2t_{k}": v for k, v in i2t.items()}
    m.update({f"t2i_{k}": v for k, v in t2i.items()})
    m["rsum"] = float(sum(i2t.values()) + sum(t2i.values()))
    if ctx.cfg.plots:
        plot_retrieval(ctx, test, q, texts, sim)
    return {"metrics": m, "n_studies": len(q),
            "note": f"queries: one frontal image per study; candidates: the {ctx.cfg.retrieval_text} report text "
                    f"of each study; identical texts count as correct"}


# ----------------------------------------------------------------------------------------------------
# ---- probes on frozen embeddings (scikit-learn) ----


def fit_logreg(X: np.ndarray, y: np.ndarray, C: float, seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000, random_state=seed)).fit(X, y)


def probe_scores(Xtr, Ytr, Xte, C: float, seed: int = 0) -> np.ndarray:
    """One logistic regression per column of Ytr (rows with 1/0 only) -> P(1) on Xte [n_te, L]; nan columns
    where the training rows hold one class only (no probe can be fitted: the label is undefined)."""
    Ytr = common.binary_targets(Ytr)
    out = np.full((len(Xte), Ytr.shape[1]), np.nan, np.float64)
    for j in range(Ytr.shape[1]):
        m = ~np.isnan(Ytr[:, j])
        yj = Ytr[m, j]
        if len(yj) == 0 or yj.min() == yj.max():
            continue
        out[:, j] = fit_logreg(Xtr[m], yj.astype(int), C, seed).predict_proba(Xte)[:, 1]
    return out


def subsample(n: int, frac: float, seed: int) -> np.ndarray:
    k = max(1, int(math.ceil(frac * n)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _frac_name(f: float) -> str:
    return f"{f * 100:g}%"


def _fraction_table(names, per_run: dict, fractions) -> dict:
    """per_run[(frac, seed)] = {label: auc} -> metrics auc@F (mean over seeds of the macro) and per label."""
    metrics, per = {}, {}
    for f in fractions:
        runs = [v for (ff, _), v in per_run.items() if ff == f]
        macros = [mean_std(r.values())[0] for r in runs]
        metrics[f"auc@{_frac_name(f)}"], metrics[f"auc@{_frac_name(f)}_std"] = mean_std(macros)
        for n in names:
            mu, sd = mean_std(r[n] for r in runs)
            per.setdefault(n, {})[_frac_name(f)] = {"auc": mu, "std": sd}
    return {"metrics": metrics, "per_label": per}


def task_probe(ctx: Context, train: Part, valid, test: Part) -> dict:
    names = ctx.label_names(test)
    seeds, fractions = [int(s) for s in _csv_list(ctx.cfg.seeds)], [float(f) for f in _csv_list(ctx.cfg.fractions)]
    Ytr, Yte = train.labels(names), test.labels(names)
    per_run, n_used = {}, {}
    for f in fractions:
        for s in seeds:
            idx = subsample(len(train), f, s)
            P = probe_scores(train.emb[idx], Ytr[idx], test.emb, ctx.cfg.probe_c, s)
            per_run[(f, s)] = {n: (auc_or_none(Yte[:, j], P[:, j]) if not np.isnan(P[:, j]).all() else None)
                               for j, n in enumerate(names)}
            n_used[_frac_name(f)] = len(idx)
    res = _fraction_table(names, per_run, fractions)
    res.update(n_train=n_used, seeds=seeds, note="logistic regression (scikit-learn, standardised features) per label "
               "on frozen image embeddings; AUC on the test split, macro over defined labels, mean ± std over seeds; "
               "a label whose training sample holds one class is undefined for that run")
    return res


def task_concepts(ctx: Context, train: Part, valid, test: Part) -> dict:
    """PedCLIP's concept alignment: can each concept be read linearly off the frozen image embedding?"""
    cols = _csv_list(ctx.cfg.concepts) or [common.LABEL_PREFIX + n for n in test.label_names]
    missing = [c for c in cols if c not in ctx.columns]
    if missing:
        raise ValueError(f"--concepts: columns {missing} are not in {ctx.cfg.data}")

    def values(part):
        return np.array([[common.parse_label(r.get(c))[0] for c in cols] for r in part.rows], np.float64)

    Ytr, Yte = values(train), values(test)
    P = probe_scores(train.emb, Ytr, test.emb, ctx.cfg.probe_c)
    per = {}
    for j, c in enumerate(cols):
        auc = auc_or_none(Yte[:, j], P[:, j]) if not np.isnan(P[:, j]).all() else None
        f1, acc = f1_acc(Yte[:, j], P[:, j], 0.5) if auc is not None else (None, None)
        per[c] = {"auc": auc, "f1": f1, "acc": acc}
    return {"metrics": {"auc_macro": mean_std(v["auc"] for v in per.values())[0],
                        "acc_macro": mean_std(v["acc"] for v in per.values())[0]},
            "per_label": per, "note": "a logistic-regression probe per concept column on frozen image embeddings "
                                      "(all training rows); F1/ACC at probability 0.5"}


# ----------------------------------------------------------------------------------------------------
# ---- fine-tuning: image encoder + linear head, trained end to end ----


def finetune_predict(ctx: Context, train_rows: list[dict], targets: np.ndarray, kind: str, n_out: int,
                     test_rows: list[dict], seed: int, dim: int) -> np.ndarray:
    """Fresh copy of the checkpoint's model; its image encoder and a linear head on encode_image are trained
    on (train_rows, targets); returns the head's output on test_rows.

    kind: multilabel (targets [n, L], 1/0, nan ignored: masked BCE) | regression (targets [n], L1 on the
    standardised target; output in target units) | multiclass (targets [n] ints: cross-entropy)."""
    from tqdm import tqdm

    cfg = ctx.cfg
    torch.manual_seed(seed)
    mod = importlib.import_module(ctx.paper)
    model, _ = mod.load(ctx.ckpt)
    model.to(ctx.device).train()
    head = nn.Linear(dim, n_out).to(ctx.device)
    # the embedding is unit-norm: sqrt(D) brings its coordinates to unit scale so the head learns at a usual lr
    feat_scale = math.sqrt(dim)
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.ft_lr},
                             {"params": head.parameters(), "lr": cfg.head_lr}], weight_decay=1e-4)
    t = torch.as_tensor(np.asarray(targets, dtype=np.float64))
    mu, sd = (float(t.mean()), float(t.std().clamp(min=1e-6))) if kind == "regression" else (0.0, 1.0)
    ds = ImageRows(train_rows, model.image_transform(True), ctx.image_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(cfg.ft_epochs):
        ds.epoch = epoch
        dl = torch.utils.data.DataLoader(ds, batch_size=cfg.ft_batch_size, shuffle=True, generator=g,
                                         num_workers=cfg.num_workers, drop_last=len(ds) > cfg.ft_batch_size)
        for x, idx, err in tqdm(dl, desc=f"finetune epoch {epoch + 1}/{cfg.ft_epochs}", leave=False,
                                disable=len(dl) < 2):
            good = torch.tensor([not e for e in err])
            if not good.any():
                continue
            x, idx = x[good].to(ctx.device), idx[good]
            with ctx.autocast():
                out = head(model.encode_image(x).float() * feat_scale).float()
            yt = t[idx].to(ctx.device)
            if kind == "multilabel":
                m = ~torch.isnan(yt)
                loss = F.binary_cross_entropy_with_logits(out[m], yt[m].float()) if m.any() else out.sum() * 0
            elif kind == "regression":
                loss = F.smooth_l1_loss(out[:, 0], ((yt - mu) / sd).float())
            else:
                loss = F.cross_entropy(out, yt.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
            opt.step()
    model.eval()
    preds = []
    dl = torch.utils.data.DataLoader(ImageRows(test_rows, model.image_transform(False), ctx.image_size),
                                     batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    with torch.no_grad():
        for x, _, _ in dl:
            with ctx.autocast():
                preds.append(head(model.encode_image(x.to(ctx.device)).float() * feat_scale).float().cpu())
    out = torch.cat(preds)
    if kind == "multilabel":
        return torch.sigmoid(out).numpy()
    if kind == "regression":
        return (out[:, 0] * sd + mu).numpy()
    return out.softmax(-1).numpy()


def task_finetune(ctx: Context, train: Part, valid, test: Part) -> dict:
    names = ctx.label_names(test)
    seeds, fractions = [int(s) for s in _csv_list(ctx.cfg.seeds)], [float(f) for f in _csv_list(ctx.cfg.fractions)]
    Ytr, Yte = common.binary_targets(train.labels(names)), test.labels(names)
    per_run, n_used = {}, {}
    for f in fractions:
        for s in seeds:
            idx = subsample(len(train), f, s)
            P = finetune_predict(ctx, [train.rows[i] for i in idx], Ytr[idx], "multilabel", len(names), test.rows, s,
                                 train.emb.shape[1])
            per_run[(f, s)] = {n: auc_or_none(Yte[:, j], P[:, j]) for j, n in enumerate(names)}
            n_used[_frac_name(f)] = len(idx)
    res = _fraction_table(names, per_run, fractions)
    res.update(n_train=n_used, seeds=seeds, note=f"image encoder + linear head, masked BCE, AdamW (encoder lr "
               f"{ctx.cfg.ft_lr}, head lr {ctx.cfg.head_lr}), {ctx.cfg.ft_epochs} epochs; AUC on the test split")
    return res


# ----------------------------------------------------------------------------------------------------
# ---- regression (bone age) and ordinal grading ----


def _targets(part: Part, col: str) -> tuple[np.ndarray, np.ndarray]:
    """Float targets of a column and the mask of rows where it parses."""
    vals, ok = [], []
    for r in part.rows:
        try:
            v = float((r.get(col) or "").strip())
            ok.append(math.isfinite(v))
            vals.append(v if math.isfinite(v) else 0.0)
        except ValueError:
            vals.append(0.0)
            ok.append(False)
    return np.array(vals), np.array(ok, bool)


def task_regression(ctx: Context, train: Part, valid, test: Part) -> dict:
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import mean_absolute_error, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    col = ctx.cfg.target_column
    if col not in ctx.columns:
        raise ValueError(f"regression: column {col!r} is not in {ctx.cfg.data} (--target_column)")
    ytr, mtr = _targets(train, col)
    yte, mte = _targets(test, col)
    tr, te = train.subset(np.flatnonzero(mtr)), test.subset(np.flatnonzero(mte))
    ytr, yte = ytr[mtr], yte[mte]
    if len(tr) < 2 or not len(te):
        raise ValueError(f"regression: too few rows with a numeric {col!r}")
    if ctx.cfg.mode == "finetune":
        pred = finetune_predict(ctx, tr.rows, ytr, "regression", 1, te.rows, 0, tr.emb.shape[1])
    else:
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        pred = reg.fit(tr.emb, ytr).predict(te.emb)
    return {"metrics": {"mae": float(mean_absolute_error(yte, pred)),
                        "mae_predict_mean": float(np.mean(np.abs(yte - ytr.mean()))),
                        "r2": float(r2_score(yte, pred)) if len(te) > 1 else None},
            "n_train": len(tr), "n_test": len(te), "mode": ctx.cfg.mode,
            "note": f"{col}: MAE in the column's units (months for bone age); mae_predict_mean is the baseline of "
                    f"always predicting the training mean; frozen = ridge regression (scikit-learn, alpha by CV)"}


def task_grading(ctx: Context, train: Part, valid, test: Part) -> dict:
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score

    col = ctx.cfg.target_column
    if col not in ctx.columns:
        raise ValueError(f"grading: column {col!r} is not in {ctx.cfg.data} (--target_column)")
    classes = _csv_list(ctx.cfg.classes) or sorted({v for v in train.column(col) if v},
                                                   key=lambda v: (float(v) if _isnum(v) else math.inf, v))
    cid = {c: k for k, c in enumerate(classes)}

    def grades(part):
        g = np.array([cid.get(_norm_grade(v, classes), -1) for v in part.column(col)])
        keep = np.flatnonzero(g >= 0)
        return part.subset(keep), g[keep]

    tr, ytr = grades(train)
    te, yte = grades(test)
    if len(set(ytr.tolist())) < 2 or not len(te):
        raise ValueError(f"grading: need two or more grades of {classes} in {train.name} and rows in {test.name}")
    if ctx.cfg.mode == "finetune":
        prob = finetune_predict(ctx, tr.rows, ytr, "multiclass", len(classes), te.rows, 0, tr.emb.shape[1])
    else:
        clf = fit_logreg(tr.emb, ytr, ctx.cfg.probe_c)
        prob = np.zeros((len(te), len(classes)))
        prob[:, clf.classes_] = clf.predict_proba(te.emb)
    pred = prob.argmax(1)
    lab = list(range(len(classes)))
    return {"metrics": {"acc": float(accuracy_score(yte, pred)),
                        "f1_macro": float(f1_score(yte, pred, labels=lab, average="macro", zero_division=0)),
                        "kappa_quadratic": float(cohen_kappa_score(yte, pred, labels=lab, weights="quadratic")),
                        "mae_grades": float(np.mean(np.abs(yte - pred)))},
            "classes": classes, "confusion": confusion_matrix(yte, pred, labels=lab).tolist(),
            "n_train": len(tr), "n_test": len(te), "mode": ctx.cfg.mode,
            "note": "grades in the order of --classes; frozen = multinomial logistic regression on the embeddings"}


def _isnum(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _norm_grade(v: str, classes: list[str]) -> str:
    """'2.0' matches class '2' (CSV writers differ on integer formatting)."""
    if v in classes or not _isnum(v):
        return v
    for c in classes:
        if _isnum(c) and float(c) == float(v):
            return c
    return v


# ----------------------------------------------------------------------------------------------------
# ---- segmentation: a light decoder on the frozen image tokens ----


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Kaggle run-length string (1-based absolute starts, pixels numbered column by column) -> bool [H, W];
    empty or "-1" is an empty mask."""
    flat = np.zeros(height * width, bool)
    v = [int(x) for x in rle.split()] if rle.strip() not in ("", "-1") else []
    for start, length in zip(v[0::2], v[1::2]):
        flat[start - 1:start - 1 + length] = True
    return flat.reshape((height, width), order="F")


def load_mask(row: dict, csv_dir: Path, size: int, rle_column: str = "") -> np.ndarray:
    """bool [size, size]: pixel value > 0 of the `mask` PNG (empty cell: no finding), or the RLE column."""
    import cv2

    if rle_column:
        h, w = common.load_image(row["_path"]).shape
        m = rle_decode(row.get(rle_column) or "", h, w).astype(np.uint8)
    elif (row.get("mask") or "").strip():
        p = Path(row["mask"])
        p = p if p.is_absolute() else csv_dir / p
        import PIL.Image

        with PIL.Image.open(p) as im:
            m = (np.asarray(im.convert("L")) > 0).astype(np.uint8)
    else:
        return np.zeros((size, size), bool)
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 0


class SegDecoder(nn.Module):
    """Tokens [B, N, C] -> grid [B, C, g, g] -> 1x1 conv -> upsample x2 -> 3x3 conv, GN, GELU -> 1x1 conv to one
    logit map -> bilinear to the mask size. Light on purpose: the encoder's features must carry the finding."""

    def __init__(self, c_in: int, grid: int, out_size: int, width: int = 32):
        super().__init__()
        self.grid, self.out_size = grid, out_size
        w2 = max(8, width // 2)
        self.net = nn.Sequential(
            nn.Conv2d(c_in, width, 1), nn.GELU(), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(width, w2, 3, padding=1), nn.GroupNorm(min(8, w2), w2), nn.GELU(), nn.Conv2d(w2, 1, 1))

    def forward(self, tokens):
        B, N, C = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, C, self.grid, self.grid)
        return F.interpolate(self.net(x), size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)[:, 0]


def seg_tokens(ctx: Context, part: Part) -> np.ndarray:
    """Frozen image_tokens [n, N, C] (float16 in memory), cached by image path for k-fold reuse."""
    need = [r["_path"] for r in part.rows if r["_path"] not in ctx.token_cache]
    if need:
        rows = [r for r in part.rows if r["_path"] not in ctx.token_cache]
        dl = torch.utils.data.DataLoader(ImageRows(rows, ctx.model.image_transform(False), ctx.image_size),
                                         batch_size=ctx.cfg.batch_size, num_workers=ctx.cfg.num_workers)
        with torch.no_grad():
            for x, idx, _ in dl:
                with ctx.autocast():
                    tk = ctx.model.image_tokens(x.to(ctx.device)).float().cpu().half().numpy()
                for i, t in zip(idx.tolist(), tk):
                    ctx.token_cache[rows[i]["_path"]] = t
    return np.stack([ctx.token_cache[r["_path"]] for r in part.rows])


def task_segmentation(ctx: Context, train: Part, valid, test: Part) -> dict:
    cfg = ctx.cfg
    if not cfg.mask_rle_column and "mask" not in ctx.columns:
        raise ValueError(f"segmentation: {cfg.data} has no `mask` column (or pass --mask_rle_column=...)")
    csv_dir, S = Path(cfg.data).parent, ctx.image_size
    Xtr, Xte = seg_tokens(ctx, train), seg_tokens(ctx, test)
    N, C = Xtr.shape[1:]
    g = int(round(math.sqrt(N)))
    if g * g != N:
        raise ValueError(f"segmentation: image_tokens gives {N} tokens, not a square grid")
    Mtr = np.stack([load_mask(r, csv_dir, S, cfg.mask_rle_column) for r in train.rows])
    Mte = np.stack([load_mask(r, csv_dir, S, cfg.mask_rle_column) for r in test.rows])
    torch.manual_seed(0)
    dec = SegDecoder(C, g, S, cfg.seg_width).to(ctx.device)
    opt = torch.optim.Adam(dec.parameters(), lr=cfg.seg_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.seg_epochs))
    Xt, Mt = torch.from_numpy(Xtr), torch.from_numpy(Mtr.astype(np.float32))
    gen = torch.Generator().manual_seed(0)
    for _ in range(cfg.seg_epochs):
        for b in torch.randperm(len(Xt), generator=gen).split(32):
            x, m = Xt[b].float().to(ctx.device), Mt[b].to(ctx.device)
            logit = dec(x)
            p = torch.sigmoid(logit)
            soft_dice = 1 - (2 * (p * m).sum((1, 2)) + 1) / (p.sum((1, 2)) + m.sum((1, 2)) + 1)
            loss = F.binary_cross_entropy_with_logits(logit, m) + soft_dice.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    dec.eval()
    with torch.no_grad():
        pred = np.concatenate([(dec(torch.from_numpy(Xte[s:s + 64]).float().to(ctx.device)) > 0).cpu().numpy()
                               for s in range(0, len(Xte), 64)])
    d = dice_summary(pred, Mte)
    return {"metrics": {"dice_pos": d["dice_pos"], "dice_all": d["dice_all"], "dice_global": d["dice_global"]},
            "n_test": d["n_images"], "n_test_with_mask": d["n_with_mask"], "n_train": len(train), "grid": g,
            "note": f"decoder on frozen image_tokens ({g}x{g}x{C}), BCE + soft Dice, {cfg.seg_epochs} epochs; masks "
                    f"binarised (> 0) at {S} px; dice_pos: mean over test images with a mask, dice_all: empty-empty "
                    f"counts 1 (SIIM Kaggle), dice_global: pooled over all pixels"}


# ----------------------------------------------------------------------------------------------------
# ---- k-fold cross-validation over the evaluation split (CXR-CML) ----


def group_folds(groups: list[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index per row; a group (patient) is never in two folds. Groups shuffled, then dealt round-robin
    in order of size so the folds have similar numbers of rows."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    uniq = [uniq[i] for i in rng.permutation(len(uniq))]
    size = {u: 0 for u in uniq}
    for g in groups:
        size[g] += 1
    load, fold_of = np.zeros(k), {}
    for u in sorted(uniq, key=lambda u: -size[u]):  # stable: ties keep the shuffled order
        f = int(np.argmin(load))
        fold_of[u] = f
        load[f] += size[u]
    return np.array([fold_of[g] for g in groups])


def task_kfold(ctx: Context, base: str, part: Part) -> dict:
    if base == "kfold" or base not in TASK_FNS:
        raise ValueError(f"kfold: --kfold_task={base} must be one of {[t for t in TASKS if t != 'kfold']}")
    k = ctx.cfg.folds
    groups = [r.get("patient_id") or r.get("study_id") or str(i) for i, r in enumerate(part.rows)]
    if len(set(groups)) < k:
        raise ValueError(f"kfold: {len(set(groups))} patients in {part.name}, fewer than --folds={k}")
    fold = group_folds(groups, k, 0)
    runs = []
    plots, ctx.cfg.plots = ctx.cfg.plots, False
    try:
        for f in range(k):
            te = part.subset(np.flatnonzero(fold == f), f"{part.name} fold {f}")
            tr = part.subset(np.flatnonzero(fold != f), f"{part.name} other folds")
            print(f"kfold {base}: fold {f + 1}/{k} ({len(te)} test / {len(tr)} train rows)")
            runs.append(TASK_FNS[base](ctx, tr, tr, te))
    finally:
        ctx.cfg.plots = plots
    metrics = {}
    for key in runs[0]["metrics"]:
        if key.endswith("_std"):
            continue
        metrics[key], metrics[key + "_std"] = mean_std(r["metrics"].get(key) for r in runs)
    return {"metrics": metrics, "base_task": base, "folds": k, "per_fold": [r["metrics"] for r in runs],
            "note": f"{k}-fold cross-validation over the {part.name} split grouped by patient: each fold is the test "
                    f"set once, the other folds are the training / threshold-selection set; mean ± std over folds"}


TASK_FNS = {"zeroshot": task_zeroshot, "zeroshot_multiclass": task_zeroshot_multiclass, "retrieval": task_retrieval,
            "probe": task_probe, "finetune": task_finetune, "segmentation": task_segmentation,
            "regression": task_regression, "grading": task_grading, "concepts": task_concepts}
NEEDS_TRAIN = {"probe", "finetune", "segmentation", "regression", "grading", "concepts"}


def run_task(ctx: Context, task: str) -> dict:
    cfg = ctx.cfg
    base = None
    if task.startswith("kfold"):
        base = task.partition(":")[2] or cfg.kfold_task
        task = "kfold"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)} (or kfold:<task>)")
    from threadpoolctl import threadpool_limits

    t0 = time.time()
    with threadpool_limits(cfg.sklearn_threads if cfg.sklearn_threads > 0 else None, user_api="blas"):
        res = _run_task(ctx, task, base)
    res.update(task=task if base is None else f"kfold:{base}", ckpt=ctx.ckpt, paper=ctx.paper, data=cfg.data,
               split=cfg.split, seconds=round(time.time() - t0, 1))
    if cfg.plots:
        plot_embeddings(ctx, ctx.part(cfg.split))
    return res


def _run_task(ctx: Context, task: str, base: str | None) -> dict:
    cfg = ctx.cfg
    test = ctx.require(ctx.part(cfg.split), cfg.split, task)
    if task == "kfold":
        res = task_kfold(ctx, base, test)
    else:
        train = ctx.require(ctx.part(cfg.train_split), cfg.train_split, task) if task in NEEDS_TRAIN else None
        valid = ctx.part(cfg.valid_split) if task == "zeroshot" else None
        res = TASK_FNS[task](ctx, train, valid, test)
    return res


# ----------------------------------------------------------------------------------------------------
# ---- plots (matplotlib, PNG) ----


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(ctx: Context, y: np.ndarray, p: np.ndarray, names: list[str], tag: str) -> Path | None:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    yb = common.binary_targets(y)
    for j, n in enumerate(names):
        m = ~np.isnan(yb[:, j])
        a = auc_or_none(y[:, j], p[:, j])
        if a is None:
            continue
        fpr, tpr, _ = roc_curve(yb[m, j], p[m, j])
        ax.plot(fpr, tpr, lw=1.2, label=f"{n} ({a:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{ctx.paper}: {tag} ROC (test)")
    ax.legend(fontsize=7, loc="lower right")
    out = ctx.out / "plots" / f"roc_{tag}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_retrieval(ctx: Context, part: Part, q: list[int], texts: list[str], sim: np.ndarray, n: int = 4) -> Path:
    import textwrap

    plt = _plt()
    n = min(n, len(q))
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.8 * n), gridspec_kw={"width_ratios": [1, 3]}, squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(common.load_image(part.rows[q[r]]["_path"]), cmap="gray")
        axes[r, 0].set_axis_off()
        axes[r, 0].set_title(part.rows[q[r]].get("study_id", ""), fontsize=8)
        top = np.argsort(-sim[r])[:5]
        lines = [("* " if texts[c] == texts[r] else "  ") + f"{k + 1}. ({sim[r, c]:.2f}) "
                 + textwrap.shorten(texts[c], 110) for k, c in enumerate(top)]
        axes[r, 1].text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7)
        axes[r, 1].set_axis_off()
    fig.suptitle(f"{ctx.paper}: image -> top-5 report texts (* = the study's own report)", fontsize=9)
    out = ctx.out / "plots" / "retrieval_examples.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_embeddings(ctx: Context, part: Part) -> Path | None:
    """2-D map (PCA or t-SNE) of the image embeddings, coloured by body part and by the most common label."""
    plt = _plt()
    if len(part) < 3:
        return None
    X = part.emb
    if ctx.cfg.embed_plot == "tsne" and len(X) > 10:
        from sklearn.manifold import TSNE

        Z = TSNE(2, perplexity=min(30, len(X) // 4), init="pca", random_state=0).fit_transform(X)
    else:
        from sklearn.decomposition import PCA

        Z = PCA(2, random_state=0).fit_transform(X)
    colourings = []
    bp = part.column("body_part")
    if len(set(bp)) > 1:
        colourings.append(("body part", bp))
    Y = part.labels(part.label_names) if part.label_names else None
    if Y is not None and len(part.label_names):
        j = int(np.argmax((Y == 1).sum(0)))
        colourings.append((part.label_names[j], [{1: "positive", 0: "negative", -1: "uncertain"}.get(v, "blank")
                                                 if not np.isnan(v) else "blank" for v in Y[:, j]]))
    if not colourings:
        colourings.append(("all", ["image"] * len(X)))
    fig, axes = plt.subplots(1, len(colourings), figsize=(6 * len(colourings), 5), squeeze=False)
    for ax, (title, c) in zip(axes[0], colourings):
        for v in sorted(set(c)):
            m = np.array([x == v for x in c])
            ax.scatter(Z[m, 0], Z[m, 1], s=8, label=v, alpha=0.8)
        ax.set_title(f"{ctx.paper}: {ctx.cfg.embed_plot.upper()} of image embeddings by {title}", fontsize=9)
        ax.legend(fontsize=7, markerscale=1.5)
    out = ctx.out / "plots" / f"embeddings_{ctx.cfg.embed_plot}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------
# ---- output: printed tables, JSON, Markdown ----


def _fmt(v, std=None) -> str:
    if v is None:
        return "undefined"
    s = f"{v:.4f}" if isinstance(v, float) else str(v)
    return s + (f" ± {std:.4f}" if isinstance(std, float) else "")


def headline(metrics: dict) -> dict[str, str]:
    return {k: _fmt(v, metrics.get(k + "_std")) for k, v in metrics.items() if not k.endswith("_std")}


def format_result(res: dict) -> str:
    lines = [f"== {res['task']}  ({res['paper']}: {res['ckpt']}, {res['data']} split={res['split']}, "
             f"{res['seconds']} s)"]
    for k, v in headline(res["metrics"]).items():
        lines.append(f"  {k:<22} {v}")
    per = res.get("per_label") or res.get("per_class")
    if per:
        first = next(iter(per.values()))
        if isinstance(first, dict) and first and all(not isinstance(v, dict) for v in first.values()):
            cols = [c for c in first if c not in ("threshold_from",)]
            lines.append("  " + f"{'':<26}" + "".join(f"{c:>12}" for c in cols))
            for n, d in per.items():
                lines.append("  " + f"{n[:26]:<26}" + "".join(
                    f"{(_fmt(d[c]) if not isinstance(d[c], int) else str(d[c])):>12}" for c in cols))
        else:  # fraction tables: label x fraction
            fr = list(first)
            lines.append("  " + f"{'':<26}" + "".join(f"{f:>20}" for f in fr))
            for n, d in per.items():
                lines.append("  " + f"{n[:26]:<26}" + "".join(f"{_fmt(d[f]['auc'], d[f]['std']):>20}" for f in fr))
    if res.get("note"):
        lines.append(f"  note: {res['note']}")
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """results[ckpt][task] -> one row per checkpoint, one column per task metric."""
    cols = []
    for per_task in results.values():
        for task, r in per_task.items():
            for k in headline(r.get("metrics", {})):
                if (task, k) not in cols:
                    cols.append((task, k))
    head = "| checkpoint | paper | " + " | ".join(f"{t} {k}" for t, k in cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 2)]
    for ck, per_task in results.items():
        paper = next((r.get("paper") for r in per_task.values() if r.get("paper")), "")
        cells = []
        for t, k in cols:
            r = per_task.get(t, {})
            cells.append(headline(r["metrics"]).get(k, "") if "metrics" in r else r.get("error", "")[:40])
        lines.append(f"| {ck} | {paper} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = common.parse_config(Config, PRESETS, argv, default_preset="default")
    threads = torch.get_num_threads()
    torch.set_num_threads(common.cpu_threads(cfg.threads))
    try:
        return _main(cfg)
    finally:
        torch.set_num_threads(threads)


def _main(cfg: Config) -> dict:
    ckpts = _csv_list(cfg.ckpt)
    tasks = _csv_list(cfg.tasks)
    if not ckpts:
        raise common.ConfigError("--ckpt=<path>[,<path>...] is required")
    if cfg.mode not in ("frozen", "finetune"):
        raise common.ConfigError(f"--mode={cfg.mode}: expected frozen | finetune")
    if cfg.embed_plot not in ("pca", "tsne"):
        raise common.ConfigError(f"--embed_plot={cfg.embed_plot}: expected pca | tsne")
    for t in tasks or [cfg.task]:
        if t.partition(":")[0] not in TASKS:
            raise common.ConfigError(f"unknown task {t!r}; choose from {', '.join(TASKS)} (or kfold:<task>)")
    table_form = bool(tasks) or len(ckpts) > 1
    out = Path(cfg.out or ("results" if table_form and len(ckpts) > 1 else str(Path(ckpts[0]).parent)))
    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks or [cfg.task]
    results: dict[str, dict] = {}
    for ck in ckpts:
        try:
            ctx = Context(cfg, ck, out)
        except Exception as e:
            if not table_form:
                raise
            print(f"error: cannot load {ck}: {type(e).__name__}: {str(e)[:300]}")  # the other rows still run
            results[ck] = {t: {"task": t, "error": f"load failed: {type(e).__name__}"} for t in tasks}
            continue
        print(f"{ck}: {ctx.paper} model, {ctx.image_size} px, device {ctx.device}")
        results[ck] = {}
        for t in tasks:
            try:
                res = run_task(ctx, t)
            except Exception as e:
                if not table_form:
                    raise
                print(f"error: {ck} {t}: {type(e).__name__}: {e}")  # one failing cell must not lose the table
                res = {"task": t, "error": f"{type(e).__name__}: {e}", "paper": ctx.paper}
                results[ck][t] = res
                continue
            print(format_result(res))
            results[ck][t] = res
            if not table_form:
                p = out / f"eval_{t.replace(':', '_')}.json"
                common.write_json_atomic(p, res)
                print(f"wrote {p}")
        del ctx
    if table_form:
        common.write_json_atomic(out / "results.json", results)
        (out / "results.md").write_text(markdown_table(results))
        print(markdown_table(results))
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
