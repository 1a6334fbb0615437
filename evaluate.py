"""
evaluate.py: the downstream protocols of the four papers (PedCLIP, CXR-CLIP, CXR-CML, D-MLM) on a checkpoint
of any of them, with 95% bootstrap confidence intervals, and a side-by-side table of several checkpoints with
paired bootstrap p-values.

    python evaluate.py --ckpt=out/pedclip/ckpt.pt                      # zero-shot AUC on the demo's phantoms
    python evaluate.py --ckpt=out/pedclip/ckpt.pt --task=retrieval,probe
    python evaluate.py --ckpt=out/cxrclip/ckpt.pt,out/pedclip/ckpt.pt,out/cxrcml/ckpt.pt,out/dmlm/ckpt.pt \\
        --task=zeroshot,retrieval,probe --out=results                     # the comparison table
    python evaluate.py --preset=vindr --ckpt=out/cxrclip/ckpt.pt           # a paper's protocol (below)

A checkpoint names the paper file that wrote it; that file's load(path) rebuilds the model, and only the
interface all four share is used: encode_image, encode_text, image_tokens, image_transform, zeroshot_prompts.

    task                 protocol                                                  metrics         views
    zeroshot             per label, cos(positive prompts) - cos(negative prompts)  AUC, F1, ACC    all
                         (common.zeroshot_scores, as at the end of training); F1,  (macro)
                         ACC at the threshold maximising F1 on the valid split
    zeroshot_multiclass  argmax over the classes' prompts, on the images positive  ACC, macro F1   all
                         for exactly one class (CheXpert 5x200: CXR-CLIP Table 2)
    retrieval            image -> text: one frontal image per study against one    R@1, R@5, R@10  frontal
                         report section per study, identical texts merged into one
                         candidate (CXR-CLIP Table 3 and its evaluator)
    probe                logistic regression on frozen embeddings, --fractions of  AUC@1/10/100%   all
                         the training images x --seeds (PedCLIP Table 2; concept
                         alignment: --labels=<concept columns> --fractions=1)
    finetune             image encoder + linear head, D-MLM's recipe (Sec. 3.5)    AUC@1/10/100%   all
    segmentation         light decoder on frozen image_tokens, images with a mask  Dice@1/10/100%  all
                         (D-MLM Table 5, PedCLIP Table 2)
    regression           ridge (--mode=frozen) or fine-tuning on --target_column   MAE             all
                         (bone age in months: PedCLIP Table 2)
    grading              ordinal grades (edema 0-3: D-MLM Table 4), logistic       ACC, F1, kappa, all
                         regression or fine-tuning                                 one-vs-rest AUC

Labels. A label cell is 1, 0, -1 (uncertain) or blank (not mentioned). --blank and --uncertain say what
becomes of the last two (drop: left out of that label's metrics and fits), --no_finding makes a blank label
negative where No Finding = 1. Every output states the policy it used. --labels / --exclude / --min_pos choose
the labels; --rare splits them into base and rare groups (CXR-CML Sec. 3: < 1,000 positive images).
Views. --views=auto takes the task's default above; frontal is PA, AP and their decubitus / axial variants
(an empty or unknown view is not frontal); all; or a list such as PA,AP.
Uncertainty. Every headline metric has a 95% percentile CI from --bootstrap resamples of the patients of the
evaluation split (CheXzero: 1,000); with several checkpoints each metric of the 2nd, 3rd, ... is compared
with the first on the same resamples: p is the two-sided paired bootstrap p-value of their difference.
Probes and fine-tuning also give the std over --seeds. Nothing is fitted or chosen on the evaluation split.

Presets: the papers' protocols on the CSVs data_prep.py writes (--help shows each preset's values):
    --preset=vindr          CXR-CLIP Table 2: VinDr-CXR zero-shot AUC over the classes with >= 10 positive
                            test images, without "Other disease(s)", "Other lesion" and "No finding"
    --preset=chexpert5x200  CXR-CLIP Tables 2-3: 5-way zero-shot accuracy and retrieval on CheXpert 5x200
    --preset=openi          CXR-CLIP Table 3: Open-I retrieval (data_prep writes no views for Open-I: all)
    --preset=chexpert       D-MLM Table 1 (PRIOR / GLoRIA): fine-tuning on 1/10/100% of CheXpert, the five
                            competition labels, frontal images, blank -> 0, -1 -> U-Ones / U-Zeros per label
    --preset=cxrlt          CXR-CML Table 2: zero-shot AUC on CXR-LT, all / base / rare
    --preset=edema          D-MLM Table 4: edema severity 0-3, fine-tuned
Output: printed, and <out>/eval_<tasks>.json and .md (--out: the checkpoint's folder, or ./results for
several checkpoints). A user error (a missing file or column, a bad flag) is one line and exit status 2.
"""
from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import phantoms

# ----------------------------------------------------------------------------------------------------
# ---- config ----


@dataclass
class Config:
    ckpt: str = ""  # checkpoint(s) of pedclip.py / cxrclip.py / cxrcml.py / dmlm.py, comma-separated
    task: str = "zeroshot"  # task(s), comma-separated (the table in the manual above)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema (data_prep.py writes them)
    split: str = "test"  # evaluation split (heads are fitted on "train", thresholds chosen on "valid")
    out: str = ""  # output folder (default: the checkpoint's folder; ./results for several)
    # labels and images
    labels: str = ""  # label columns to evaluate, comma-separated (default: all)
    exclude: str = ""  # label columns to leave out, comma-separated
    min_pos: int = 0  # evaluate only labels with at least this many positive images in the evaluation split
    blank: str = "drop"  # a blank label: drop (left out) | zero (negative: GLoRIA, PRIOR)
    uncertain: str = "drop"  # a -1 label: drop | ones (U-Ones) | zeros (U-Zeros) | gloria (per label)
    no_finding: bool = False  # where No Finding = 1 every blank label is negative
    views: str = "auto"  # auto (the task's default) | frontal | all | a list such as PA,AP
    rare: str = "none"  # rare labels for base / rare AUC: none | auto (--rare_below) | a list
    rare_below: int = 1000  # auto: rare is fewer positive images than this in the whole CSV (CXR-CML: 1,000)
    # tasks
    retrieval_text: str = "impression"  # a study's text: impression (else findings) | findings | a column
    fractions: str = "0.01,0.1,1"  # shares of the training images for probe / finetune / segmentation
    seeds: str = "0,1,2"  # one run per seed and fraction; mean and std over the seeds
    probe_c: float = 1.0  # inverse L2 strength of the logistic-regression heads (scikit-learn C)
    mode: str = "frozen"  # regression / grading: frozen (scikit-learn on embeddings) | finetune
    target_column: str = "target"  # regression / grading target
    classes: str = ""  # grading: the grades in order (default: the values in the training split)
    ft_epochs: int = 10  # fine-tuning epochs (D-MLM Sec. 3.5: 10)
    ft_lr: float = 1e-5  # fine-tuning: image encoder learning rate (D-MLM: 1e-5)
    head_lr: float = 3e-4  # fine-tuning: head learning rate, one warm-up epoch then cosine (D-MLM: 3e-4)
    ft_batch_size: int = 32  # fine-tuning batch size
    seg_epochs: int = 20  # segmentation decoder epochs
    mask_rle: str = ""  # segmentation: masks from this column of SIIM stage-1 (relative) RLE, not `mask`
    bootstrap: int = 1000  # patient resamples for the confidence intervals and p-values (0: none)
    prompts: str = ""  # zero-shot prompts: chexzero (CheXzero's "{}" / "no {}") | a JSON {class: {"pos", "neg"}}
    # run
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 256  # images per forward pass
    num_workers: int = 2  # DataLoader workers reading images
    threads: int = 0  # CPU: torch threads (0: the usable cores)
    preset: str = "demo"  # set by --preset


CHEXPERT_5 = "Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion"
PRESETS = {  # the papers' protocols, on the CSVs data_prep.py writes (the manual above says which)
    "demo": {},  # the phantoms the four demos train on
    "vindr": dict(data="data/vindr.csv", min_pos=10,
                  exclude="Other disease,Other diseases,Other lesion,No finding"),
    "chexpert5x200": dict(data="data/chexpert5x200.csv", task="zeroshot_multiclass,retrieval", views="all"),
    "openi": dict(data="data/openi.csv", task="retrieval", views="all"),
    "chexpert": dict(data="data/chexpert.csv", task="finetune", labels=CHEXPERT_5, blank="zero",
                     uncertain="gloria", views="frontal", seeds="0,1,2,3,4"),
    "cxrlt": dict(data="data/cxrlt.csv", rare="auto"),
    "edema": dict(data="data/edema.csv", task="grading", mode="finetune", classes="0,1,2,3"),
}
PHANTOMS = 3000  # images in the demos' phantom data set (the same as the paper files draw)
PAPERS = ("pedclip", "cxrclip", "cxrcml", "dmlm")
TASKS = ("zeroshot", "zeroshot_multiclass", "retrieval", "probe", "finetune", "segmentation", "regression",
         "grading")
DEFAULT_VIEWS = {"retrieval": "frontal"}  # CXR-CLIP Sec. 4.1: one frontal image per study; others: all
FRONTAL_VIEWS = {"PA", "AP", "FRONTAL", "AP AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD"}
# --uncertain=gloria: the mapping of CheXpert's uncertain labels that GLoRIA (ICCV 2021) and the works D-MLM's
# Table 1 copies (PRIOR, MGCA) fine-tune with, for the five competition labels; other labels' -1 are left out.
GLORIA_UNCERTAIN = {"atelectasis": 1.0, "cardiomegaly": 0.0, "consolidation": 0.0, "edema": 1.0,
                    "pleural effusion": 1.0}
NORMAL_LABELS = ("no finding", "normal")


def csv_list(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------------
# ---- metrics (vectorised: 1,000 bootstrap resamples stay quick; tests check them on scikit-learn) ----


def auc_per_column(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """ROC AUC of each column over its 0 / 1 rows (nan rows left out), by the Mann-Whitney rank sum; nan for
    a column with one class. Rows may repeat (a bootstrap resample): average ranks handle the ties."""
    from scipy.stats import rankdata

    out = np.full(Y.shape[1], np.nan)
    for j in range(Y.shape[1]):
        m = (Y[:, j] == 0) | (Y[:, j] == 1)
        pos = Y[m, j] == 1
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            r = rankdata(S[m, j])
            out[j] = (r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def f1_acc_per_column(Y: np.ndarray, S: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 and accuracy of predicting 1 where S >= T (per column), over the 0 / 1 rows; nan with one class."""
    P, pos, neg = S >= T, Y == 1, Y == 0
    tp, fp, fn, tn = (P & pos).sum(0), (P & neg).sum(0), (~P & pos).sum(0), (~P & neg).sum(0)
    ok = (pos.sum(0) > 0) & (neg.sum(0) > 0)
    f1 = np.where(ok, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return f1, np.where(ok, (tp + tn) / np.maximum(tp + fp + fn + tn, 1), np.nan)


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> float | None:
    """The threshold t (predict 1 where s >= t) with the highest F1 on (y, s); None without a positive."""
    from sklearn.metrics import precision_recall_curve

    m = (y == 0) | (y == 1)
    if not (y[m] == 1).any():
        return None
    p, r, t = precision_recall_curve(y[m], s[m])
    return float(t[np.argmax(2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12))])


def mean_or_none(v) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def confusion(gt: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts of (true class, predicted class)."""
    return np.bincount(gt * k + pred, minlength=k * k).reshape(k, k)


def class_metrics(gt: np.ndarray, pred: np.ndarray, k: int) -> dict:
    """Accuracy, macro F1 (over all k classes; 0 for a class never true nor predicted, as scikit-learn's
    zero_division=0) and quadratically weighted Cohen's kappa of class ids, from the confusion matrix."""
    C = confusion(gt, pred, k).astype(np.float64)
    n, tp, true, predicted = C.sum(), np.diag(C), C.sum(1), C.sum(0)
    f1 = np.where(true + predicted > 0, 2 * tp / np.maximum(true + predicted, 1), 0.0)
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2 / max(1, (k - 1) ** 2)
    expected = np.outer(true, predicted) / max(n, 1)
    kappa = 1 - (w * C).sum() / (w * expected).sum() if (w * expected).sum() > 0 else None
    return {"acc": float(tp.sum() / max(n, 1)), "f1_macro": float(f1.mean()),
            "kappa_quadratic": None if kappa is None else float(kappa)}


def recall_hits(sim: np.ndarray, target: np.ndarray, ks=(1, 5, 10)) -> np.ndarray:
    """sim [Q, M] query-candidate similarities, target [Q] each query's own candidate -> bool [Q, len(ks)]:
    is it among the top k? Its rank counts every candidate scoring at least as high (ties count against)."""
    own = sim[np.arange(len(sim)), target]
    rank = (sim >= own[:, None]).sum(1)
    return rank[:, None] <= np.asarray(ks)[None, :]


def dedupe_texts(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Identical report texts become one candidate (CXR-CLIP's evaluator) -> (unique texts, index of each)."""
    index: dict[str, int] = {}
    target = np.array([index.setdefault(t, len(index)) for t in texts], dtype=np.int64)
    return list(index), target


def dice_per_image(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """bool [N, H, W] -> 2|P & G| / (|P| + |G|) per image; nan where both are empty."""
    p, g = pred.reshape(len(pred), -1), gt.reshape(len(gt), -1)
    den = (p.sum(1) + g.sum(1)).astype(np.float64)
    return np.where(den > 0, 2 * (p & g).sum(1) / np.maximum(den, 1), np.nan)


# ----------------------------------------------------------------------------------------------------
# ---- bootstrap: 95% CIs over patients, paired p-values ----


def patient_groups(rows: list[dict]) -> np.ndarray:
    """The resampling unit of each row: its patient (else its study, else itself): images of one patient are
    correlated, and resampling images would make the intervals too narrow."""
    keys = [r.get("patient_id") or r.get("study_id") or f"row{r.get('_row', i)}" for i, r in enumerate(rows)]
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


def bootstrap(stat, groups: np.ndarray, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """stat(idx) -> {metric: value} on the rows idx (repeats allowed). n resamples of whole patients with
    replacement -> {metric: [n] values, nan where undefined}. The draws depend only on (seed, groups), so two
    checkpoints evaluated on the same rows see the same resamples (paired_p)."""
    rng, n_groups = np.random.default_rng(seed), int(groups.max()) + 1 if len(groups) else 0
    out: dict[str, list] = {}
    for _ in range(n):
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        idx = np.repeat(np.arange(len(groups)), counts[groups])  # a drawn patient's rows, as often as drawn
        for k, v in stat(idx).items():
            out.setdefault(k, []).append(np.nan if v is None else v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def percentile_ci(reps: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of the resampled values (None when most resamples are undefined)."""
    v = reps[np.isfinite(reps)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) > len(reps) / 2 else None


def paired_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided paired bootstrap p-value of "metric a != metric b", from their values on the same resamples:
    twice the share of resampled differences on the far side of 0 (+1 smoothing, so never exactly 0)."""
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if not len(d):
        return None
    return float(min(1.0, 2 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / (len(d) + 1)))


# ----------------------------------------------------------------------------------------------------
# ---- labels and rows ----


def apply_label_policy(Y: np.ndarray, names: list[str], blank: str, uncertain: str,
                       no_finding: bool) -> np.ndarray:
    """Labels 1 / 0 / -1 / nan (blank) [N, L] -> 1 / 0 / nan (left out), per --blank, --uncertain and
    --no_finding. The No Finding rule only fills blanks: a stated 1 or -1 stays."""
    Y = np.array(Y, dtype=np.float64)
    text = [common.label_text(n) for n in names]
    if no_finding:
        nf = [j for j, t in enumerate(text) if t in NORMAL_LABELS]
        if not nf:
            raise common.UserError(f"--no_finding: no No Finding column among the labels {names}")
        normal = (Y[:, nf] == 1).any(1)
        for j in range(len(names)):
            if j not in nf:
                Y[normal & np.isnan(Y[:, j]), j] = 0.0
    if blank == "zero":
        Y[np.isnan(Y)] = 0.0
    for j, t in enumerate(text):
        v = {"ones": 1.0, "zeros": 0.0, "gloria": GLORIA_UNCERTAIN.get(t, np.nan)}.get(uncertain, np.nan)
        Y[Y[:, j] == -1, j] = v
    return Y


def views_of(cfg: Config, task: str) -> str:
    return DEFAULT_VIEWS.get(task, "all") if cfg.views == "auto" else cfg.views


def view_set(views: str) -> set[str] | None:
    """--views -> the accepted view names (upper case), None for all."""
    if views == "all":
        return None
    return set(FRONTAL_VIEWS) if views == "frontal" else {v.upper() for v in csv_list(views)}


def retrieval_text(row: dict, how: str) -> str:
    """One report section of a study (CXR-CLIP samples one section, not the concatenation)."""
    if how in ("impression", "findings"):
        other = "findings" if how == "impression" else "impression"
        text = (row.get(how) or "").strip() or (row.get(other) or "").strip()
    else:
        text = (row.get(how) or "").strip()
    return " ".join(text.split())


@dataclass
class Part:
    """The readable rows of one split (after --views) and their image embeddings [n, D]."""
    rows: list[dict]
    emb: np.ndarray


class ImageRows(torch.utils.data.Dataset):
    """Rows -> (image [3, S, S], index, error text); `seed` set: the training transform with a generator per
    (seed, epoch, index), so augmentations are reproducible in any worker."""

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


def load_model(path: str, device: str, prompts: str = ""):
    """(model in eval mode on device, paper name): the checkpoint's "paper" names the file whose load() reads
    it. A missing, corrupt or foreign file is a UserError. `prompts`: a JSON file of zero-shot prompts that
    replace the paper file's for the classes it names (CXR-CLIP Sec. 4.3 takes each data set's own)."""
    ck = common.load_checkpoint(path)
    paper = ck.get("paper") if isinstance(ck, dict) else None
    del ck
    if paper not in PAPERS:
        raise common.UserError(f"{path} is not a checkpoint of {', '.join(f'{p}.py' for p in PAPERS)} "
                               f"(its 'paper' entry is {paper!r})")
    try:
        model, _ = importlib.import_module(paper).load(path)
    except (KeyError, RuntimeError, TypeError) as e:  # written by another version of the paper file
        raise common.UserError(f"{paper}.load cannot rebuild {path} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]})") from None
    if prompts == "chexzero":  # CheXzero's pair, as CXR-CML's Table 2 scores its CheXzero baseline
        model.zeroshot_prompts = importlib.import_module("cxrcml").chexzero_prompts
    elif prompts:
        try:
            with open(prompts, encoding="utf-8") as f:
                bank = {common.label_text(c): (d["pos"], d.get("neg", [])) for c, d in json.load(f).items()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise common.UserError(f"--prompts={prompts}: {e}; expected {{class: {{'pos': [...], 'neg': "
                                   f"[...]}}}}") from None
        own = model.zeroshot_prompts
        model.zeroshot_prompts = lambda name: bank.get(common.label_text(name)) or own(name)
    return model.to(device).eval(), paper


@torch.no_grad()
def forward_images(model, rows: list[dict], fn, device: str, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """fn (encode_image, image_tokens, ...) of every row's image with the eval transform, in float32 ->
    (array [n, ...], readable mask [n]): the same forward as common.zeroshot_eval at the end of training."""
    from tqdm import tqdm

    ds = ImageRows(rows, model.image_transform(False), model.cfg.image_size)
    dl = torch.utils.data.DataLoader(ds, cfg.batch_size, num_workers=cfg.num_workers)
    out, ok = [], np.ones(len(rows), bool)
    for x, idx, err in tqdm(dl, desc="images", unit="batch", leave=False, disable=len(dl) < 4):
        ok[[i for i, e in zip(idx.tolist(), err) if e]] = False
        out.append(fn(x.to(device)).float().cpu().numpy())
    return np.concatenate(out), ok


class Evaluator:
    """One checkpoint on one CSV: its model, the CSV's splits (read once), their image embeddings (computed
    once and shared by the tasks), and the label / view choices of the config."""

    def __init__(self, cfg: Config, model, paper: str, ckpt: str = "", device: str = "cpu"):
        self.cfg, self.model, self.paper, self.ckpt, self.device = cfg, model, paper, ckpt, device
        self.table: common.XrayCSV | None = None  # the whole CSV, read on first use
        self.parts: dict[tuple, Part] = {}  # (split, views) -> Part; tests fill it with hand-made features
        self.label_names_all: list[str] | None = None
        self.columns: list[str] | None = None

    # -- rows
    def rows(self, split: str, views: str, required: bool = True) -> list[dict]:
        """The rows of `split` whose view is in --views (all rows for --views=all)."""
        if self.table is None:
            self.table = common.XrayCSV(self.cfg.data, require=("image", "split"))
            self.label_names_all, self.columns = self.table.label_names, self.table.columns
        rows, accept = [r for r in self.table.rows if r["split"].strip() == split], view_set(views)
        if accept is not None:
            if "view" not in self.columns:
                raise common.UserError(f"--views={views}: {self.cfg.data} has no `view` column; --views=all "
                                       f"takes every image")
            seen = sorted({(r.get("view") or "").strip() for r in rows})
            rows = [r for r in rows if (r.get("view") or "").strip().upper() in accept]
            if required and not rows and seen:
                raise common.UserError(f"split {split!r} of {self.cfg.data} has no rows with --views={views} "
                                       f"(its views: {seen}); --views=all takes every image")
        if required and not rows:
            raise common.UserError(f"split {split!r} of {self.cfg.data} has no rows")
        return rows

    def part(self, split: str, views: str, required: bool = True) -> Part | None:
        key = (split, views)
        if key not in self.parts:
            rows = self.rows(split, views, required)
            if not rows:
                return None
            emb, ok = self.images(rows, self.model.encode_image)
            if not ok.all():
                print(f"warning: {int((~ok).sum())} unreadable image(s) in split {split!r} left out (first: "
                      f"{rows[int(np.argmin(ok))]['_path']})")
            self.parts[key] = Part([r for r, k in zip(rows, ok) if k], emb[ok])
        return self.parts[key]

    def images(self, rows: list[dict], fn) -> tuple[np.ndarray, np.ndarray]:
        return forward_images(self.model, rows, fn, self.device, self.cfg)

    # -- labels
    def labels(self, rows: list[dict], names: list[str]) -> np.ndarray:
        """[n, L] 1 / 0 / nan after the label policy."""
        j = [self.label_names_all.index(n) for n in names]
        Y = np.array([r["_labels"][j] for r in rows], dtype=np.float64).reshape(len(rows), len(j))
        c = self.cfg
        return apply_label_policy(Y, names, c.blank, c.uncertain, c.no_finding)

    def label_names(self, rows: list[dict]) -> tuple[list[str], list[str]]:
        """The labels to evaluate (--labels, --exclude, --min_pos on the evaluation rows) and those that
        --min_pos dropped."""
        names = csv_list(self.cfg.labels) or list(self.label_names_all)
        unknown = [n for n in names if n not in self.label_names_all]
        if unknown:
            raise common.UserError(f"--labels: {unknown} are not label columns of {self.cfg.data} (it has "
                                   f"{self.label_names_all})")
        excluded = {common.label_text(n) for n in csv_list(self.cfg.exclude)}
        names = [n for n in names if common.label_text(n) not in excluded]
        few = []
        if self.cfg.min_pos > 0:
            pos = (self.labels(rows, names) == 1).sum(0)
            few = [n for n, p in zip(names, pos) if p < self.cfg.min_pos]
            names = [n for n in names if n not in few]
        if not names:
            raise common.UserError(f"no label left to evaluate in {self.cfg.data} after --labels, --exclude "
                                   f"and --min_pos={self.cfg.min_pos}")
        return names, few

    def rare_labels(self, names: list[str]) -> list[str]:
        """--rare: none; a list; or auto: the labels with fewer than --rare_below positive images in the data
        set, all splits (CXR-CML Sec. 3, counted as cxrcml.py counts them)."""
        r = self.cfg.rare.strip()
        if r in ("", "none"):
            return []
        if r != "auto":
            unknown = [n for n in csv_list(r) if n not in names]
            if unknown:
                raise common.UserError(f"--rare: {unknown} are not among the evaluated labels {names}")
            return csv_list(r)
        self.rows("train", "all", required=False)  # reads the CSV
        counts = (self.table.labels()[:, [self.label_names_all.index(n) for n in names]] == 1).sum(0)
        return [n for n, c in zip(names, counts) if c < self.cfg.rare_below]

    def policy(self) -> str:
        c = self.cfg
        return f"blank={c.blank}, uncertain={c.uncertain}, no_finding={'on' if c.no_finding else 'off'}"


# ----------------------------------------------------------------------------------------------------
# ---- zero-shot ----


def task_zeroshot(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    test = ev.part(ev.cfg.split, views)
    names, few = ev.label_names(test.rows)
    # F1 / ACC thresholds: max-F1 on the valid split (MedKLIP, which D-MLM follows, takes it on the test set
    # itself); without a valid positive, 0 on the score, the pair softmax's 0.5
    valid = ev.part("valid", views, required=False) if ev.cfg.split != "valid" else None
    emb = test.emb if valid is None else np.concatenate([test.emb, valid.emb])
    Y, S = ev.labels(test.rows, names), common.zeroshot_scores(ev.model, emb, names)
    S, Sv = S[:len(Y)], S[len(Y):]  # one call: the prompts are encoded once
    T, fallback = np.zeros(len(names)), []
    if valid is not None:
        Yv = ev.labels(valid.rows, names)
        for j, n in enumerate(names):
            t = best_f1_threshold(Yv[:, j], Sv[:, j])
            T[j] = 0.0 if t is None else t
            fallback += [n] if t is None else []
    rare = ev.rare_labels(names)
    is_rare = np.array([n in rare for n in names])

    def stat(idx):
        auc = auc_per_column(Y[idx], S[idx])
        f1, acc = f1_acc_per_column(Y[idx], S[idx], T)
        out = {"auc_macro": mean_or_none(auc), "f1_macro": mean_or_none(f1), "acc_macro": mean_or_none(acc)}
        if rare:
            out.update(auc_base=mean_or_none(auc[~is_rare]), auc_rare=mean_or_none(auc[is_rare]))
        return out

    per = common.auc_per_label(Y, S, names)  # the per-label AUC and macro of the training-time evaluation
    metrics = {**stat(np.arange(len(Y))), "auc_macro": per["macro"]}
    f1, acc = f1_acc_per_column(Y, S, T)
    res = {"metrics": metrics, "n_images": len(Y), "rare_labels": rare, "per_label": {
        n: {"auc": per["per_label"][n], "f1": mean_or_none(f1[j]), "acc": mean_or_none(acc[j]),
            "threshold": float(T[j]), "n_pos": int((Y[:, j] == 1).sum()), "n_neg": int((Y[:, j] == 0).sum())}
        for j, n in enumerate(names)},
        "note": "score cos(positive prompts) - cos(negative prompts); F1 / ACC at the threshold maximising "
                "F1 on the valid split" + (f" (0 for {fallback}: no valid positive)" if fallback else "")
                + "; a label with one class is undefined and left out of the macro"
                + (f"; --min_pos={ev.cfg.min_pos} dropped {few}" if few else "")}
    return res, stat, test.rows


def task_zeroshot_multiclass(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    test = ev.part(ev.cfg.split, views)
    classes, _ = ev.label_names(test.rows)
    raw = np.array([r["_labels"][[ev.label_names_all.index(c) for c in classes]] for r in test.rows])
    one = np.flatnonzero((raw == 1).sum(1) == 1)  # CheXpert 5x200: positive for exactly one class
    if not len(one):
        raise common.UserError(f"zeroshot_multiclass: no image of split {ev.cfg.split!r} is positive for "
                               f"exactly one of {classes}")
    gt = np.argmax(raw[one] == 1, 1)
    T = np.stack([common.prompt_embedding(ev.model, ev.model.zeroshot_prompts(c)[0]) for c in classes])
    pred = np.argmax(test.emb[one].astype(np.float64) @ T.T, 1)
    K = len(classes)

    def stat(idx):
        m = class_metrics(gt[idx], pred[idx], K)
        return {"acc": m["acc"], "f1_macro": m["f1_macro"]}

    res = {"metrics": stat(np.arange(len(one))), "n_images": len(one), "classes": classes,
           "confusion": confusion(gt, pred, K).tolist(),
           "note": "images positive for exactly one class; prediction: argmax over the classes of the cosine "
                   "to the mean embedding of the class's positive prompts; the label policy does not apply"}
    return res, stat, [test.rows[i] for i in one]


# ----------------------------------------------------------------------------------------------------
# ---- retrieval (CXR-CLIP Table 3) ----


@torch.no_grad()
def encode_texts(model, texts: list[str], batch: int = 256) -> np.ndarray:
    return np.concatenate([model.encode_text(texts[i:i + batch]).double().cpu().numpy()
                           for i in range(0, len(texts), batch)])


def task_retrieval(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    how = ev.cfg.retrieval_text
    test = ev.part(ev.cfg.split, views)
    if how not in ("impression", "findings") and how not in ev.columns:
        raise common.UserError(f"--retrieval_text={how}: no such column in {ev.cfg.data}")
    first: dict[str, int] = {}  # study -> its first image among the accepted views
    for i, r in enumerate(test.rows):
        if retrieval_text(r, how):
            first.setdefault(r.get("study_id") or f"row{r['_row']}", i)
    q = list(first.values())
    if len(q) < 2:
        raise common.UserError(f"retrieval: fewer than 2 studies with a {how} text and a {views} image in "
                               f"split {ev.cfg.split!r}")
    texts, target = dedupe_texts([retrieval_text(test.rows[i], how) for i in q])
    sim = test.emb[q].astype(np.float64) @ encode_texts(ev.model, texts).T  # [queries, unique texts]
    ks = (1, 5, 10)
    hits = recall_hits(sim, target, ks)

    def stat(idx):
        r = hits[idx].mean(0)
        return {**{f"R@{k}": float(v) for k, v in zip(ks, r)}, "rsum": float(r.sum())}

    res = {"metrics": stat(np.arange(len(q))), "n_images": len(q), "n_texts": len(texts),
           "note": f"image -> text; queries: the first image of each study (views: {views}); candidates: one "
                   f"section per study ({how}), identical texts merged ({len(q) - len(texts)} duplicates); "
                   f"ties in similarity count against the query"}
    return res, stat, [test.rows[i] for i in q]


# ----------------------------------------------------------------------------------------------------
# ---- heads trained on the training split: probe, fine-tuning, segmentation, regression, grading ----


def subsample(n: int, frac: float, seed: int) -> np.ndarray:
    """A seeded random share `frac` of n training images (at least one), in order."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:max(1, int(math.ceil(frac * n)))])


def pct(f: float) -> str:
    return f"{f * 100:g}%"


def over_fractions(ev: Evaluator, n_train: int, name: str, run, score) -> tuple[dict, callable]:
    """run(train_idx, seed) -> predictions for the test rows, once per (--fractions, --seeds); score(pred,
    idx) -> the metric on test rows idx. -> ({metrics: name@F, the mean over seeds; seed_std, ...}, stat)."""
    fracs, seeds = [float(f) for f in csv_list(ev.cfg.fractions)], [int(s) for s in csv_list(ev.cfg.seeds)]
    preds = {(f, s): run(subsample(n_train, f, s), s) for f in fracs for s in seeds}

    def stat(idx):
        return {f"{name}@{pct(f)}": mean_or_none([score(preds[f, s], idx) for s in seeds]) for f in fracs}

    n_test = len(next(iter(preds.values())))
    std = {f"{name}@{pct(f)}": float(np.nanstd([score(preds[f, s], np.arange(n_test)) for s in seeds]))
           for f in fracs}
    return {"metrics": stat(np.arange(n_test)), "seed_std": std, "seeds": seeds,
            "n_train": {pct(f): len(subsample(n_train, f, 0)) for f in fracs}}, stat


def fit(model, X: np.ndarray, y: np.ndarray):
    """model.fit(X, y) on standardised features, with one BLAS thread: these fits are small, and more threads
    only wait on each other (ten times slower on a busy 2-core machine)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return make_pipeline(StandardScaler(), model).fit(X, y)


def fit_logreg(X: np.ndarray, y: np.ndarray, C: float, seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    return fit(LogisticRegression(C=C, max_iter=2000, random_state=seed), X, y)


def probe_scores(Xtr, Ytr, Xte, C: float, seed: int = 0) -> np.ndarray:
    """A logistic regression per label on its 0 / 1 training rows -> P(1) on Xte [n, L]; nan for a label whose
    training rows hold one class (no probe: undefined in that run)."""
    out = np.full((len(Xte), Ytr.shape[1]), np.nan)
    for j in range(Ytr.shape[1]):
        m = (Ytr[:, j] == 0) | (Ytr[:, j] == 1)
        if 0 < Ytr[m, j].sum() < m.sum():
            out[:, j] = fit_logreg(Xtr[m], Ytr[m, j].astype(int), C, seed).predict_proba(Xte)[:, 1]
    return out


def task_probe(ev: Evaluator, views: str, finetune: bool = False) -> tuple[dict, callable, list]:
    train, test = ev.part("train", views), ev.part(ev.cfg.split, views)
    names, few = ev.label_names(test.rows)
    Ytr, Yte = ev.labels(train.rows, names), ev.labels(test.rows, names)

    def run(idx, seed):
        if finetune:
            return finetune_predict(ev, [train.rows[i] for i in idx], Ytr[idx], "multilabel", len(names),
                                    test.rows, seed, test.emb.shape[1])
        return probe_scores(train.emb[idx], Ytr[idx], test.emb, ev.cfg.probe_c, seed)

    res, stat = over_fractions(ev, len(train.rows), "auc", run, lambda P, idx: mean_or_none(
        auc_per_column(Yte[idx], P[idx])))
    how = (f"image encoder + linear head fine-tuned, masked BCE, {ev.cfg.ft_epochs} epochs" if finetune else
           "logistic regression per label on frozen, standardised image embeddings")
    res.update(n_images=len(test.rows), note=f"{how}; macro AUC over the labels defined in a run, mean over "
               f"seeds" + (f"; --min_pos={ev.cfg.min_pos} dropped {few}" if few else ""))
    return res, stat, test.rows


def warmup_cosine(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (D-MLM Sec. 3.5)."""
    return lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def finetune_predict(ev: Evaluator, rows: list[dict], targets: np.ndarray, kind: str, n_out: int,
                     test_rows: list[dict], seed: int, dim: int) -> np.ndarray:
    """A fresh copy of the checkpoint's model; its image encoder and a linear head on encode_image are trained
    on (rows, targets) with D-MLM's recipe (Sec. 3.5: AdamW, weight decay 0.05, encoder lr 1e-5, head lr 3e-4
    warmed up then cosine, 10 epochs) -> the head's output on test_rows.
    kind: multilabel (targets [n, L] 1 / 0 / nan: BCE on the known ones, -> probabilities) | multiclass
    (targets [n] class ids: cross-entropy, -> probabilities) | regression (targets [n]: smooth L1 on the
    standardised target, -> target units)."""
    c, cuda = ev.cfg, ev.device.startswith("cuda")
    torch.manual_seed(seed)
    model = importlib.import_module(ev.paper).load(ev.ckpt)[0].to(ev.device).train()
    ds = ImageRows(rows, model.image_transform(True), model.cfg.image_size, seed)
    head = nn.Linear(dim, n_out).to(ev.device)
    feat_scale = math.sqrt(dim)  # the embedding is unit-norm: coordinates of unit scale suit the head's lr
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": c.ft_lr},
                             {"params": head.parameters(), "lr": c.head_lr}], weight_decay=0.05)
    per_epoch = max(1, len(rows) // c.ft_batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(c.ft_epochs * per_epoch, per_epoch))
    t = torch.as_tensor(np.asarray(targets, dtype=np.float64))
    mu, sd = (t.mean(), t.std().clamp(min=1e-6)) if kind == "regression" else (0.0, 1.0)
    ctx = torch.autocast("cuda", torch.bfloat16, enabled=cuda)
    for epoch in range(c.ft_epochs):
        ds.epoch = epoch
        dl = torch.utils.data.DataLoader(ds, c.ft_batch_size, shuffle=True, num_workers=c.num_workers,
                                         drop_last=len(ds) >= c.ft_batch_size,
                                         generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for x, idx, err in dl:
            good = torch.tensor([not e for e in err])
            if not good.any():
                continue
            x, y = x[good].to(ev.device), t[idx[good]].to(ev.device)
            with ctx:
                out = head(model.encode_image(x).float() * feat_scale).float()
            if kind == "multilabel":
                m = ~torch.isnan(y)
                loss = F.binary_cross_entropy_with_logits(out[m], y[m].float()) if m.any() else out.sum() * 0
            elif kind == "multiclass":
                loss = F.cross_entropy(out, y.long())
            else:
                loss = F.smooth_l1_loss(out[:, 0], ((y - mu) / sd).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], 1.0)
            opt.step()
            sched.step()
    model.eval()
    with ctx:
        out, _ = forward_images(model, test_rows, lambda x: head(model.encode_image(x).float() * feat_scale),
                                ev.device, c)
    out = torch.from_numpy(out).double()
    if kind == "regression":
        return (out[:, 0] * sd + mu).numpy()
    return (torch.sigmoid(out) if kind == "multilabel" else out.softmax(-1)).numpy()


def numeric_targets(ev: Evaluator, part: Part) -> tuple[Part, np.ndarray]:
    """The rows whose --target_column is a number, and the numbers."""
    col = ev.cfg.target_column
    if col not in ev.columns:
        raise common.UserError(f"--target_column={col}: no such column in {ev.cfg.data}")
    vals = []
    for r in part.rows:
        try:
            vals.append(float((r.get(col) or "").strip()))
        except ValueError:
            vals.append(math.nan)
    keep = np.flatnonzero(np.isfinite(vals))
    return Part([part.rows[i] for i in keep], part.emb[keep]), np.asarray(vals)[keep]


def task_regression(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    from sklearn.linear_model import RidgeCV

    (tr, ytr), (te, yte) = (numeric_targets(ev, ev.part(s, views)) for s in ("train", ev.cfg.split))
    if len(tr.rows) < 2 or not len(te.rows):
        raise common.UserError(f"regression: too few rows with a number in {ev.cfg.target_column!r}")
    if ev.cfg.mode == "finetune":
        pred = finetune_predict(ev, tr.rows, ytr, "regression", 1, te.rows, 0, te.emb.shape[1])
    else:
        pred = fit(RidgeCV(alphas=np.logspace(-3, 3, 13)), tr.emb, ytr).predict(te.emb)
    err, base = np.abs(pred - yte), np.abs(ytr.mean() - yte)

    def stat(idx):
        return {"mae": float(err[idx].mean()), "mae_predict_mean": float(base[idx].mean())}

    res = {"metrics": stat(np.arange(len(yte))), "n_train": len(ytr), "n_images": len(yte),
           "mode": ev.cfg.mode, "note": f"MAE in the units of {ev.cfg.target_column!r} (bone age: months); "
           f"mae_predict_mean: always the training mean; frozen: ridge regression, alpha by cross-validation"}
    return res, stat, te.rows


def task_grading(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    (tr, ytr), (te, yte) = (numeric_targets(ev, ev.part(s, views)) for s in ("train", ev.cfg.split))
    classes = [float(c) for c in csv_list(ev.cfg.classes)] if ev.cfg.classes else sorted(set(ytr.tolist()))
    cid = {c: k for k, c in enumerate(classes)}
    ktr, kte = (np.array([cid.get(v, -1) for v in y]) for y in (ytr, yte))
    tr_keep, te_keep = np.flatnonzero(ktr >= 0), np.flatnonzero(kte >= 0)
    ktr, kte = ktr[tr_keep], kte[te_keep]
    if len(set(ktr.tolist())) < 2 or not len(kte):
        raise common.UserError(f"grading: need two or more of the grades {classes} in the training split "
                               f"and a graded row in {ev.cfg.split!r}")
    if ev.cfg.mode == "finetune":
        prob = finetune_predict(ev, [tr.rows[i] for i in tr_keep], ktr, "multiclass", len(classes),
                                [te.rows[i] for i in te_keep], 0, te.emb.shape[1])
    else:
        clf = fit_logreg(tr.emb[tr_keep], ktr, ev.cfg.probe_c)
        prob = np.zeros((len(te_keep), len(classes)))
        prob[:, clf.classes_] = clf.predict_proba(te.emb[te_keep])
    K, pred = len(classes), prob.argmax(1)
    onehot = (kte[:, None] == np.arange(K)[None, :]).astype(np.float64)

    def stat(idx):
        return {**class_metrics(kte[idx], pred[idx], K),
                "auc_ovr_macro": mean_or_none(auc_per_column(onehot[idx], prob[idx]))}

    res = {"metrics": stat(np.arange(len(kte))), "classes": classes, "mode": ev.cfg.mode,
           "confusion": confusion(kte, pred, K).tolist(), "n_train": len(ktr),
           "n_images": len(kte), "note": "grades in the order of --classes; auc_ovr_macro: each grade "
                                         "against the rest (D-MLM Table 4), macro over the grades present"}
    return res, stat, [te.rows[i] for i in te_keep]


# -- segmentation: a light decoder on the frozen image tokens


def load_mask(row: dict, csv_dir: Path, size: int, rle_column: str = "") -> np.ndarray:
    """bool [size, size]: the `mask` image > 0 (an empty cell: no finding), or a SIIM stage-1 run-length
    string (data_prep's decoder; "-1" or empty: no finding) at the image's own size, resized (nearest)."""
    import cv2

    if rle_column:
        from data_prep import rle_decode

        h, w = common.load_image(row["_path"]).shape
        m = rle_decode((row.get(rle_column) or "").strip(), h, w, relative=True)
    elif (row.get("mask") or "").strip():
        p = Path(row["mask"].strip())
        m = common.load_image(p if p.is_absolute() else csv_dir / p)
    else:
        return np.zeros((size, size), bool)
    return cv2.resize((m > 0).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


class SegDecoder(nn.Module):
    """Tokens [B, N, C] -> grid [B, C, g, g] -> 1x1 conv, x2 upsampling, 3x3 conv, GN, GELU, 1x1 conv -> one
    logit map, bilinear to the mask size. Light on purpose: the frozen tokens must carry the finding."""

    def __init__(self, c_in: int, grid: int, out_size: int, width: int = 32):
        super().__init__()
        self.grid, self.out_size = grid, out_size
        self.net = nn.Sequential(
            nn.Conv2d(c_in, width, 1), nn.GELU(), nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.GroupNorm(8, width // 2), nn.GELU(),
            nn.Conv2d(width // 2, 1, 1))

    def forward(self, tokens):
        x = tokens.transpose(1, 2).reshape(len(tokens), -1, self.grid, self.grid)
        return F.interpolate(self.net(x), size=(self.out_size,) * 2, mode="bilinear")[:, 0]


def task_segmentation(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    c, S = ev.cfg, ev.model.cfg.image_size
    ev.rows("train", views)  # reads the CSV's columns
    if not c.mask_rle and "mask" not in ev.columns:
        raise common.UserError(f"segmentation: {c.data} has no `mask` column (or give --mask_rle=<column>)")
    if c.mask_rle and c.mask_rle not in ev.columns:
        raise common.UserError(f"--mask_rle={c.mask_rle}: no such column in {c.data}")
    data = {}
    for split in ("train", c.split):  # the images with a finding (D-MLM: SIIM's 2,669 pneumothorax images)
        rows = ev.rows(split, views)
        masks = np.stack([load_mask(r, Path(c.data).parent, S, c.mask_rle) for r in rows])
        keep = np.flatnonzero(masks.reshape(len(rows), -1).any(1))
        if not len(keep):
            raise common.UserError(f"segmentation: no image of split {split!r} has a non-empty mask")
        rows = [rows[i] for i in keep]
        tokens, ok = ev.images(rows, ev.model.image_tokens)
        data[split] = (torch.from_numpy(tokens[ok]).half(), torch.from_numpy(masks[keep][ok]),
                       [r for r, k in zip(rows, ok) if k])
    (Xtr, Mtr, _), (Xte, Mte, te_rows) = data["train"], data[c.split]
    grid = math.isqrt(Xtr.shape[1])
    if grid * grid != Xtr.shape[1]:
        raise common.UserError(f"segmentation: image_tokens gives {Xtr.shape[1]} tokens, not a square grid")

    def run(idx, seed):
        torch.manual_seed(seed)
        dec = SegDecoder(Xtr.shape[2], grid, S).to(ev.device)
        opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, c.seg_epochs))
        g = torch.Generator().manual_seed(seed)
        for _ in range(c.seg_epochs):
            for b in torch.from_numpy(idx)[torch.randperm(len(idx), generator=g)].split(32):
                x, m = Xtr[b].float().to(ev.device), Mtr[b].float().to(ev.device)
                logit = dec(x)
                p = torch.sigmoid(logit)  # BCE + soft Dice
                soft = 1 - (2 * (p * m).sum((1, 2)) + 1) / (p.sum((1, 2)) + m.sum((1, 2)) + 1)
                loss = F.binary_cross_entropy_with_logits(logit, m) + soft.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            pred = torch.cat([dec(x.float().to(ev.device)).cpu() > 0 for x in Xte.split(64)]).numpy()
        return dice_per_image(pred, Mte.numpy())

    res, stat = over_fractions(ev, len(Xtr), "dice", run, lambda d, idx: mean_or_none(d[idx]))
    res.update(n_images=len(te_rows), note=f"decoder on frozen image_tokens ({grid}x{grid}), BCE + soft "
               f"Dice, {c.seg_epochs} epochs, trained and tested on images with a finding; Dice at {S} px")
    return res, stat, te_rows


TASK_FNS = {"zeroshot": task_zeroshot, "zeroshot_multiclass": task_zeroshot_multiclass,
            "retrieval": task_retrieval, "probe": task_probe,
            "finetune": lambda ev, views: task_probe(ev, views, finetune=True),
            "segmentation": task_segmentation, "regression": task_regression, "grading": task_grading}


def run_task(ev: Evaluator, task: str) -> dict:
    """One task -> its result: metrics, their 95% CIs, what was evaluated and how. The bootstrap values are
    kept under "_boot" (for paired_p; not written)."""
    views = views_of(ev.cfg, task)
    res, stat, rows = TASK_FNS[task](ev, views)
    boot = bootstrap(stat, patient_groups(rows), ev.cfg.bootstrap) if ev.cfg.bootstrap > 0 else {}
    res["ci"] = {k: percentile_ci(v) for k, v in boot.items()}
    labels = ev.policy() if task in ("zeroshot", "probe", "finetune") else "not used"
    return {"task": task, "paper": ev.paper, "ckpt": ev.ckpt, "data": ev.cfg.data, "split": ev.cfg.split,
            "labels": labels, "views": views, "bootstrap": ev.cfg.bootstrap, **res, "_boot": boot,
            "_rows": [(r["_row"], r.get("patient_id", "")) for r in rows]}


# ----------------------------------------------------------------------------------------------------
# ---- output: printed blocks, JSON, the Markdown comparison table ----


def fmt(v, ci=None, p=None, digits: int = 4) -> str:
    """0.8123 (0.7901-0.8345), p=0.002; MAE-sized numbers with 2 decimals."""
    if v is None:
        return "undefined"
    d = digits if abs(v) < 10 else 2
    s = f"{v:.{d}f}" + (f" ({ci[0]:.{d}f}-{ci[1]:.{d}f})" if ci else "")
    return s + (f", p={p:.3f}" if p is not None else "")


def format_result(r: dict) -> str:
    lines = [f"== {r['task']} | {r['paper']} {r['ckpt']} | {r['data']} split {r['split']}: {r['n_images']} "
             f"images, views {r['views']} | labels: {r['labels']}"]
    for k, v in r["metrics"].items():
        std = r.get("seed_std", {}).get(k)
        lines.append(f"  {k:<16} {fmt(v, r['ci'].get(k))}"
                     + (f"   std over seeds {std:.4f}" if std is not None else ""))
    for n, d in r.get("per_label", {}).items():
        lines.append(f"    {n[:28]:<28} AUC {fmt(d['auc'])}  F1 {fmt(d['f1'])}  ACC {fmt(d['acc'])}  "
                     f"(threshold {d['threshold']:.3f}; {d['n_pos']} pos / {d['n_neg']} neg)")
    if r["ci"]:
        lines.append(f"  95% CIs: {r['bootstrap']} resamples of the patients")
    return "\n".join(lines + [f"  note: {r['note']}"])


def compare(results: dict):
    """p-values of each later checkpoint's metrics against the first one's, on the same patient resamples
    (only where both were evaluated on the same rows)."""
    first = results[next(iter(results))]
    for per_task in list(results.values())[1:]:
        for task, r in per_task.items():
            r0 = first[task]
            if r["_boot"] and r["_rows"] == r0["_rows"]:
                r["p_vs_first"] = {k: paired_p(v, r0["_boot"][k]) for k, v in r["_boot"].items()
                                   if k in r0["_boot"]}


def markdown_table(results: dict, cfg: Config) -> str:
    """One row per (task, metric), one column per checkpoint: value (95% CI), p against the first column."""
    ckpts = list(results)
    papers = [next(iter(results[c].values()))["paper"] for c in ckpts]
    heads = papers if len(set(papers)) == len(papers) else ckpts
    policy = next((r["labels"] for r in results[ckpts[0]].values() if r["labels"] != "not used"), None)
    lines = [f"{cfg.data}, split {cfg.split}" + (f"; labels: {policy}" if policy else "")
             + f"; 95% CIs: {cfg.bootstrap} bootstrap resamples of the patients"
             + (f"; p: paired bootstrap against {heads[0]}" if len(ckpts) > 1 else "") + ".", "",
             "| task (views) | metric | " + " | ".join(heads) + " |", "| --- | --- |" + " --- |" * len(ckpts)]
    for task, r in results[ckpts[0]].items():
        for k in r["metrics"]:
            cells = []
            for c in ckpts:
                rc = results[c][task]
                cells.append(fmt(rc["metrics"].get(k), rc["ci"].get(k), rc.get("p_vs_first", {}).get(k), 3))
            lines.append(f"| {task} ({r['views']}) | {k} | " + " | ".join(cells) + " |")
    if heads != ckpts:
        lines += ["", "Checkpoints: " + ", ".join(f"{h} = {c}" for h, c in zip(heads, ckpts)) + "."]
    return "\n".join(lines) + "\n"


def check_config(cfg: Config) -> tuple[list[str], list[str]]:
    """The flags a typo could break, checked before any work: -> (checkpoints, tasks)."""
    ckpts, tasks = csv_list(cfg.ckpt), csv_list(cfg.task)
    if not ckpts:
        raise common.UserError("--ckpt=PATH[,PATH...] is required: a ckpt.pt or ckpt_best.pt written by "
                               "pedclip.py, cxrclip.py, cxrcml.py or dmlm.py")
    if len(set(ckpts)) < len(ckpts):
        raise common.UserError(f"--ckpt names a checkpoint twice: {cfg.ckpt}")
    if not tasks or any(t not in TASKS for t in tasks):
        raise common.UserError(f"--task={cfg.task}: choose from {', '.join(TASKS)} (comma-separated)")
    choices = {"blank": ("drop", "zero"), "uncertain": ("drop", "ones", "zeros", "gloria"),
               "mode": ("frozen", "finetune")}
    for k, ok in choices.items():
        if getattr(cfg, k) not in ok:
            raise common.UserError(f"--{k}={getattr(cfg, k)}: choose from {' | '.join(ok)}")
    try:
        fracs, _ = [float(f) for f in csv_list(cfg.fractions)], [int(s) for s in csv_list(cfg.seeds)]
    except ValueError:
        raise common.UserError(f"--fractions={cfg.fractions} / --seeds={cfg.seeds}: expected numbers, "
                               f"e.g. 0.01,0.1,1 and 0,1,2") from None
    if not fracs or not csv_list(cfg.seeds) or not all(0 < f <= 1 for f in fracs):
        raise common.UserError(f"--fractions={cfg.fractions}: shares in (0, 1]; --seeds: at least one")
    heads = [t for t in tasks if t not in ("zeroshot", "zeroshot_multiclass", "retrieval")]
    if cfg.split == "train" and heads:
        raise common.UserError(f"--split=train: {', '.join(heads)} fit their heads on the training split")
    for c in ckpts:
        if not Path(c).is_file():
            raise common.UserError(f"no checkpoint at {c} (train one first, e.g. `python pedclip.py`)")
    if cfg.data != Config.data and not Path(cfg.data).is_file():
        raise common.UserError(f"data CSV {cfg.data} does not exist (data_prep.py writes one per data set)")
    return ckpts, tasks


def main(argv=None) -> dict:
    """-> {checkpoint: {task: result}}; also printed and written to <out>/eval_<tasks>.json and .md."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    cfg = common.parse_config(Config, PRESETS, argv)
    ckpts, tasks = check_config(cfg)
    if cfg.data == Config.data:
        phantoms.ensure_phantoms(cfg.data, PHANTOMS)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    if cuda:  # as the paper files' setup() does, so that the zero-shot numbers agree with training time
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    threads = torch.get_num_threads()
    torch.set_num_threads(common.cpu_threads(cfg.threads))
    try:
        results = {}
        for ck in ckpts:
            model, paper = load_model(ck, device, cfg.prompts)
            print(f"{ck}: {paper}, {model.cfg.image_size} px, on {device}")
            ev, results[ck] = Evaluator(cfg, model, paper, ck, device), {}
            for t in tasks:
                results[ck][t] = run_task(ev, t)
                print(format_result(results[ck][t]))
            del ev, model
    finally:
        torch.set_num_threads(threads)
    compare(results)
    out = Path(cfg.out or (Path(ckpts[0]).parent if len(ckpts) == 1 else "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("eval_" + "+".join(tasks))
    clean = {c: {t: {k: v for k, v in r.items() if not k.startswith("_")} for t, r in rt.items()}
             for c, rt in results.items()}
    common.atomic_write(f"{stem}.json", lambda f: json.dump(clean, f, indent=2))
    md = markdown_table(results, cfg)
    common.atomic_write(f"{stem}.md", lambda f: f.write(md))
    print(f"\n{md}\nwrote {stem}.json and {stem}.md")
    return results


if __name__ == "__main__":
    common.cli(main)
