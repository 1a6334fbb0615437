"""
evaluate.py: the downstream protocols of the four papers (PedCLIP, CXR-CLIP, CXR-CML, D-MLM) on a checkpoint
of any of them (its paper file's load() rebuilds it), with 95% bootstrap CIs, figures, and several checkpoints
side by side with paired bootstrap p-values (render.py draws the tables and figures).

    python evaluate.py --ckpt=out/pedclip/ckpt.pt                      # zero-shot AUC on the demo's phantoms
    python evaluate.py --ckpt=out/cxrclip/ckpt.pt,out/pedclip/ckpt.pt,out/cxrcml/ckpt.pt,out/dmlm/ckpt.pt \\
        --task=zeroshot,retrieval,probe --out=results                     # the comparison table and figures
    python evaluate.py --preset=cxrclip_vindr --ckpt=out/cxrclip/ckpt.pt   # a paper's table (the map below)

    zeroshot             cos(positive prompts) - cos(negative prompts) per label, as at the end of training:
                         AUC; F1, ACC at the threshold of the best F1 on the valid split
    zeroshot_multiclass  the class of the highest mean cosine to its prompts, on images positive for one class
    retrieval            image -> text R@1/5/10: one frontal image per study against one report section per
                         study, identical texts merged (CXR-CLIP Sec. 4.1 and its evaluator)
    probe, finetune      a linear head on frozen features (--probe: logreg, C chosen on valid | head,
                         CXR-CLIP's, its epoch chosen on valid); image encoder + head, D-MLM's recipe
                         (Sec. 3.5); on --fractions of the training images x --seeds
    segmentation         a light decoder on the frozen image_tokens of the images with a finding: Dice
    regression, grading  ridge on frozen embeddings, alpha chosen on valid: MAE (PedCLIP: bone age); ordinal
                         grades (D-MLM: edema 0-3), frozen or fine-tuned: ACC, F1, kappa, one-vs-rest AUC
Labels: 1, 0, -1 (uncertain) or blank; --blank, --uncertain, --no_finding say what the last two become (each
output states it). 95% percentile CIs from --bootstrap resamples of the patients, drawn within strata of their
rarest positive label so that every resample's macro is over the same labels (one that still loses a label is
skipped and counted); p: two-sided paired bootstrap, each later checkpoint against the first.

Paper tables -> commands. R: the release's folder as downloaded. A preset reads data_prep.py's default --out,
data/<data set>.csv (--preset=NAME --help shows its values):
    paper, table, column             python data_prep.py ...                  python evaluate.py --preset=
    CXR-CLIP T2 VinDr ZS, 10%, 100%  vindr_cxr --root=R                       cxrclip_vindr
    CXR-CLIP T2 RSNA / SIIM          rsna_pneumonia --root=R / siim --root=R  cxrclip_rsna / cxrclip_siim
    CXR-CLIP T2-3 C5x200 ACC, R@K    chexpert5x200 --root=R                   cxrclip_5x200
    CXR-CLIP T3 MIMIC / Open-I R@K   mimic_cxr --root=R --reports=R2 / openi  cxrclip_mimic / cxrclip_openi
    CXR-CML T2 all / base / rare     cxr_lt --root=R --label_root=L           cxrcml_cxrlt (per fold)
    D-MLM T1, T2, T5 RSNA / SIIM     rsna_pneumonia / siim --fractions=0.6,0.2,0.2   dmlm_rsna / dmlm_siim
    D-MLM T1 CheXpert; T2 NIH        chexpert --root=R; nih --root=R          dmlm_chexpert; dmlm_nih
    D-MLM T3 COVID-19; T4 edema      covidx --root=R; mimic_edema --label_root=L   dmlm_covidx; dmlm_edema
    PedCLIP T1-2 PCXR / CHD / GRAZ   vindr_pcxr / chd_cxr / grazpedwri        pedclip_pcxr / _chd / _graz
    PedCLIP T2 bone age              boneage --root=R                         pedclip_boneage
Checkpoints: python cxrclip.py --preset=paper --data=data/mimic_cxr.csv; python text_prep.py extract_bodyparts
--csv=data/pexr.csv --model=<LLM>, then python pedclip.py --preset=paper --data=data/pexr.csv; for k in 0..4:
python cxrcml.py --preset=paper --data=data/cxr_lt.csv --fold=k --out_dir=out/cxrcml_fold$k (python cxrcml.py
summarize out/cxrcml_fold*: their mean); python text_prep.py knowledge --findings=data/mimic_cxr.csv
--model=<LLM>, then python dmlm.py --preset=paper --data=data/mimic_cxr.csv --knowledge=data/knowledge.json.
Not covered: PeXR and PedCLIP's Arthritis set (private; its concepts: --task=probe --labels=<concepts>
--fractions=1); D-MLM's Covid-19 segmentation (no converter). D-MLM fine-tunes its segmentation, with no
recipe given: here the decoder reads frozen tokens. RSNA's images are a subset of NIH ChestX-ray14.
Output: printed, and <out>/eval_<tasks>.json, .md and .png (--out: the checkpoint's folder, or ./results). A
user error (a missing file or column, a bad flag) is one line and exit status 2.
"""
from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import precision_recall_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import common
import phantoms
import render

# ----------------------------------------------------------------------------------------------------
# ---- config ----


@dataclass
class Config:
    ckpt: str = ""  # checkpoint(s) of pedclip.py / cxrclip.py / cxrcml.py / dmlm.py, comma-separated
    task: str = "zeroshot"  # task(s), comma-separated (the table in the manual above)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema (data_prep.py writes them)
    split: str = "test"  # evaluation split (heads are fitted on "train", hyper-parameters chosen on "valid")
    out: str = ""  # output folder (default: the checkpoint's folder; ./results for several)
    labels: str = ""  # label columns to evaluate, comma-separated (default: all)
    exclude: str = ""  # label columns to leave out, comma-separated
    min_pos: int = 0  # evaluate only labels with at least this many positive images in the evaluation split
    blank: str = "drop"  # a blank label: drop (left out) | zero (negative: GLoRIA, PRIOR)
    uncertain: str = "drop"  # a -1 label: drop | ones (U-Ones) | zeros (U-Zeros) | gloria (per label)
    no_finding: bool = False  # where No Finding = 1 every blank label is negative
    views: str = "auto"  # auto (the task's default) | frontal | all | a list such as PA,AP
    rare: str = "none"  # rare labels for base / rare AUC: none | auto (--rare_below) | a list
    rare_below: int = 1000  # auto: rare is fewer positive images than this in the whole CSV (CXR-CML: 1,000)
    retrieval_text: str = "impression"  # a study's text: impression (else findings) | findings | a column
    fractions: str = "0.01,0.1,1"  # shares of the training images for probe / finetune / segmentation
    seeds: str = "0,1,2"  # one run per seed and fraction; mean and std over the seeds
    probe: str = "logreg"  # logreg (scikit-learn, C from --probe_c on valid) | head (CXR-CLIP's linear head)
    probe_features: str = "backbone"  # backbone (what the projection reads) | embedding (the shared space)
    probe_c: str = "0.01,0.1,1,10,100"  # logreg / grading: C candidates, the best valid AUC per label wins
    probe_epochs: int = 300  # head: epochs, min valid loss kept (CXR-CLIP's configs: 300 at 10%, 30 at 100%)
    probe_lr: float = 5e-5  # head: AdamW lr, weight decay 1e-4, cosine, batch 256 (CXR-CLIP's configs)
    mode: str = "frozen"  # grading: frozen (logistic regression, C from --probe_c on valid) | finetune
    target_column: str = "target"  # regression / grading target
    classes: str = ""  # grading: the grades in order (default: the values in the training split)
    ft_epochs: int = 10  # fine-tuning epochs (D-MLM Sec. 3.5: 10)
    ft_lr: float = 1e-5  # fine-tuning: image encoder learning rate (D-MLM: 1e-5)
    head_lr: float = 3e-4  # fine-tuning: head learning rate, one warm-up epoch then cosine (D-MLM: 3e-4)
    ft_batch_size: int = 32  # fine-tuning batch size
    seg_epochs: int = 20  # segmentation decoder epochs
    bootstrap: int = 1000  # patient resamples for the confidence intervals and p-values (0: none)
    prompts: str = ""  # zero-shot: chexzero (CheXzero's "{}" / "no {}") | a JSON {class: {"pos", "neg"}}
    figures: bool = True  # write the figures (PNG) beside the markdown
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 256  # images per forward pass
    num_workers: int = 2  # DataLoader workers reading images
    threads: int = 0  # CPU: torch threads (0: the usable cores)
    preset: str = "demo"  # set by --preset


CHEXPERT_5 = "Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion"
CXRCLIP_T2 = dict(task="zeroshot,probe", probe="head", fractions="0.1,1", seeds="1234")  # ZS, 10%, 100%
DMLM_T125 = dict(task="finetune,zeroshot,segmentation", seeds="0,1,2,3,4")  # Tables 1, 2, 5; 5 runs (PRIOR)
PEDCLIP_T12 = dict(task="zeroshot,probe", fractions="1")  # Tables 1-2; no probe recipe given: logreg on valid
PRESETS = {  # the papers' protocols on data_prep.py's CSVs (the map in the manual above)
    "demo": {},  # the phantoms the four demos train on
    "cxrclip_vindr": dict(data="data/vindr_cxr.csv", min_pos=10, **CXRCLIP_T2,  # Sec. 4.1: 10+ test positives
                          exclude="Other disease,Other diseases,Other lesion,No finding"),
    "cxrclip_rsna": dict(data="data/rsna_pneumonia.csv", **CXRCLIP_T2),
    "cxrclip_siim": dict(data="data/siim.csv", **CXRCLIP_T2),
    "cxrclip_5x200": dict(data="data/chexpert5x200.csv", task="zeroshot_multiclass,retrieval", views="all"),
    "cxrclip_mimic": dict(data="data/mimic_cxr.csv", task="retrieval"),  # MIMIC's test split, frontal queries
    "cxrclip_openi": dict(data="data/openi.csv", task="retrieval"),  # Sec. 4.1: one frontal image per study
    "cxrcml_cxrlt": dict(data="data/cxr_lt.csv", rare="auto"),
    "dmlm_rsna": dict(data="data/rsna_pneumonia.csv", **DMLM_T125),
    "dmlm_siim": dict(data="data/siim.csv", **DMLM_T125),
    "dmlm_chexpert": dict(data="data/chexpert.csv", task="finetune", labels=CHEXPERT_5, blank="zero",
                          uncertain="gloria", views="frontal", seeds="0,1,2,3,4"),
    "dmlm_nih": dict(data="data/nih.csv"),  # Table 2: macro over the 14 diseases (MedKLIP)
    "dmlm_covidx": dict(data="data/covidx.csv"),  # Table 3
    "dmlm_edema": dict(data="data/mimic_edema.csv", task="grading", mode="finetune", classes="0,1,2,3",
                       views="frontal"),  # Table 4; the severity set [5] grades frontal images
    "pedclip_pcxr": dict(data="data/vindr_pcxr.csv", exclude="No finding", **PEDCLIP_T12),  # its 14 findings
    "pedclip_chd": dict(data="data/chd_cxr.csv", **PEDCLIP_T12),
    "pedclip_graz": dict(data="data/grazpedwri.csv",
                         **{**PEDCLIP_T12, "task": "zeroshot,probe,segmentation"}),
    "pedclip_boneage": dict(data="data/boneage.csv", task="regression")}
PHANTOMS = 3000  # images in the demos' phantom data set (the same as the paper files draw)
PAPERS = ("pedclip", "cxrclip", "cxrcml", "dmlm")
# the module whose input is the image feature before the projection to the shared space (a linear probe's)
PRE_PROJECTION = {"pedclip": "image_proj", "cxrclip": "image_proj", "cxrcml": "clip.visual_projection",
                  "dmlm": "image_gauss"}
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


def auc_columns(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """common.auc_per_label as an array [L], nan where a column holds one class."""
    per = common.auc_per_label(Y, S, list(range(Y.shape[1])))["per_label"].values()
    return np.array([np.nan if a is None else a for a in per], dtype=np.float64)


def macro(v, keep=None) -> float | None:
    """The mean of per-label values over `keep` (the labels defined on all evaluated rows; default: the finite
    ones); None when one of them is undefined here (a bootstrap resample that lost a label: skipped)."""
    v = np.asarray(v, dtype=np.float64)
    keep = np.isfinite(v) if keep is None else np.asarray(keep, bool)
    return float(v[keep].mean()) if keep.any() and np.isfinite(v[keep]).all() else None


def f1_acc_per_column(Y: np.ndarray, S: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 and accuracy of predicting 1 where S >= T (per column), over the 0 / 1 rows; nan with one class."""
    P, pos, neg = S >= T, Y == 1, Y == 0
    tp, fp, fn, tn = (P & pos).sum(0), (P & neg).sum(0), (~P & pos).sum(0), (~P & neg).sum(0)
    ok = (pos.sum(0) > 0) & (neg.sum(0) > 0)
    f1 = np.where(ok, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return f1, np.where(ok, (tp + tn) / np.maximum(tp + fp + fn + tn, 1), np.nan)


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> float | None:
    """The threshold t (predict 1 where s >= t) with the highest F1 on (y, s); None without a positive."""
    m = (y == 0) | (y == 1)
    if not (y[m] == 1).any():
        return None
    p, r, t = precision_recall_curve(y[m], s[m])
    return float(t[np.argmax(2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12))])


def class_metrics(gt: np.ndarray, pred: np.ndarray, k: int) -> dict:
    """Accuracy, macro F1 (over all k classes; 0 for a class never true nor predicted, as scikit-learn's
    zero_division=0), quadratically weighted Cohen's kappa and the confusion matrix [true, predicted]."""
    C = np.bincount(gt * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    n, tp, true, predicted = C.sum(), np.diag(C), C.sum(1), C.sum(0)
    f1 = np.where(true + predicted > 0, 2 * tp / np.maximum(true + predicted, 1), 0.0)
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2 / max(1, (k - 1) ** 2)
    expected = (w * np.outer(true, predicted)).sum() / max(n, 1)
    return {"acc": float(tp.sum() / max(n, 1)), "f1_macro": float(f1.mean()), "confusion": C.astype(
            int).tolist(), "kappa_quadratic": float(1 - (w * C).sum() / expected) if expected > 0 else None}


def recall_hits(sim: np.ndarray, target: np.ndarray, ks=(1, 5, 10)) -> np.ndarray:
    """sim [Q, M] query-candidate similarities, target [Q] each query's own candidate -> bool [Q, len(ks)]:
    is it among the top k? Its rank counts every candidate scoring at least as high (ties count against)."""
    rank = (sim >= sim[np.arange(len(sim)), target][:, None]).sum(1)
    return rank[:, None] <= np.asarray(ks)[None, :]


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


def label_strata(Y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[patients] the stratum of each patient: its rarest positive label (by positive patients), -1 for
    none. Resampled within these strata, every label keeps a positive patient in (almost) every resample."""
    P = np.zeros((int(groups.max()) + 1, Y.shape[1]), bool)
    np.logical_or.at(P, groups, Y == 1)
    return np.where(P.any(1), np.argmin(np.where(P, P.sum(0)[None, :], np.inf), 1), -1)


def bootstrap(stat, groups: np.ndarray, n: int, seed: int = 0, strata=None) -> dict[str, np.ndarray]:
    """stat(idx) -> {metric: value} on rows idx (repeats allowed). n resamples of whole patients with
    replacement, within `strata` (label_strata) if given -> {metric: [n] values, nan for a skipped resample}.
    Draws depend only on (seed, groups, strata): checkpoints on the same rows share them (paired_p)."""
    rng, n_groups = np.random.default_rng(seed), int(groups.max()) + 1 if len(groups) else 0
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)] if strata is not None else \
        [np.arange(n_groups)]
    out: dict[str, list] = {}
    for _ in range(n):
        counts = sum(np.bincount(m[rng.integers(0, len(m), len(m))], minlength=n_groups) for m in members)
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
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    return float(min(1.0, 2 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / (len(d) + 1))) if len(d) else None


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
        for j in set(range(len(names))) - set(nf):
            Y[normal & np.isnan(Y[:, j]), j] = 0.0
    if blank == "zero":
        Y[np.isnan(Y)] = 0.0
    for j, t in enumerate(text):
        Y[Y[:, j] == -1, j] = {"ones": 1.0, "zeros": 0.0, "gloria": GLORIA_UNCERTAIN.get(t, np.nan)}.get(
            uncertain, np.nan)
    return Y


def views_of(cfg: Config, task: str) -> str:
    return DEFAULT_VIEWS.get(task, "all") if cfg.views == "auto" else cfg.views


def view_set(views: str) -> set[str] | None:  # --views -> the accepted view names (upper case), None for all
    return None if views == "all" else set(FRONTAL_VIEWS if views == "frontal" else csv_list(views.upper()))


def retrieval_text(row: dict, how: str) -> str:
    """One report section of a study (CXR-CLIP samples one section, not the concatenation)."""
    other = {"impression": "findings", "findings": "impression"}.get(how)
    return " ".join(((row.get(how) or "").strip() or (row.get(other) or "").strip() if other else
                     (row.get(how) or "").strip()).split())


@dataclass
class Part:
    """A split's readable rows (after --views), embeddings [n, D], for probes the projection input [n, C]."""
    rows: list[dict]
    emb: np.ndarray
    feat: np.ndarray | None = None


def load_model(path: str, device: str, prompts: str = ""):
    """(model in eval mode on device, paper name): the checkpoint's "paper" names the file whose load() reads
    it. A missing, corrupt or foreign file is a UserError. `prompts`: a JSON file of zero-shot prompts that
    replace the paper file's for the classes it names (CXR-CLIP Sec. 4.3 takes each data set's own)."""
    ck = common.load_checkpoint(path)
    paper = ck.get("paper") if isinstance(ck, dict) else None
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


class Evaluator:
    """One checkpoint on one CSV: its model, the CSV's splits (read once), their image embeddings (computed
    once and shared by the tasks), and the label / view choices of the config."""

    def __init__(self, cfg: Config, model, paper: str, ckpt: str = "", device: str = "cpu"):
        self.cfg, self.model, self.paper, self.ckpt, self.device = cfg, model, paper, ckpt, device
        self.table: common.XrayCSV | None = None  # the whole CSV, read on first use
        self.parts: dict[tuple, Part] = {}  # (split, views) -> Part; tests fill it with hand-made features
        self.label_names_all, self.columns, self.proj = None, None, None  # proj: probes read its input
        if "probe" in csv_list(cfg.task) and cfg.probe_features == "backbone" and model is not None:
            try:
                self.proj = model.get_submodule(PRE_PROJECTION[paper])
            except (AttributeError, KeyError):
                print(f"note: no {PRE_PROJECTION.get(paper)} in this {paper} model; probes use the embedding")

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
        """The Part of (split, views), embedded on first use; None for a missing split if not required."""
        if (split, views) not in self.parts:
            rows, dim = self.rows(split, views, required), []
            if not rows:
                return None

            def embed(x):  # encode_image, and the input of its projection caught on the way (for probes)
                seen = []
                hook = self.proj and self.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
                e = self.model.encode_image(x)
                if hook:
                    hook.remove()
                dim[:] = [e.shape[1]]
                return torch.cat([e, *(f.reshape(len(x), -1).to(e.dtype) for f in seen[:1])], 1)
            out, ok = self.images(rows, embed)
            if not ok.all():
                print(f"warning: {int((~ok).sum())} unreadable image(s) in split {split!r} left out (first: "
                      f"{rows[int(np.argmin(ok))]['_path']})")
            self.parts[split, views] = Part([r for r, k in zip(rows, ok) if k], out[ok, :dim[0]],
                                            out[ok, dim[0]:] if self.proj else None)
        return self.parts[split, views]

    def images(self, rows: list[dict], fn) -> tuple[np.ndarray, np.ndarray]:
        return common.embed_images(self.model, rows, self.device, self.cfg.batch_size, fn=fn,
                                   num_workers=self.cfg.num_workers)

    def labels(self, rows: list[dict], names: list[str]) -> np.ndarray:
        """[n, L] 1 / 0 / nan after the label policy."""
        j, c = [self.label_names_all.index(n) for n in names], self.cfg
        Y = np.array([r["_labels"][j] for r in rows], dtype=np.float64).reshape(len(rows), len(j))
        return apply_label_policy(Y, names, c.blank, c.uncertain, c.no_finding)

    def label_names(self, rows: list[dict]) -> tuple[list[str], list[str]]:
        """The labels to evaluate (--labels, --exclude, --min_pos on `rows`) and those --min_pos dropped."""
        names = csv_list(self.cfg.labels) or list(self.label_names_all)
        unknown = [n for n in names if n not in self.label_names_all]
        if unknown:
            raise common.UserError(f"--labels: {unknown} are not label columns of {self.cfg.data} (it has "
                                   f"{self.label_names_all})")
        excluded = {common.label_text(n) for n in csv_list(self.cfg.exclude)}
        names = [n for n in names if common.label_text(n) not in excluded]
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
        if r != "auto":
            if set(csv_list(r)) - set(names) - {"none"}:
                raise common.UserError(f"--rare: {sorted(set(csv_list(r)) - set(names))} are not among the "
                                       f"evaluated labels {names}")
            return [n for n in csv_list(r) if n != "none"]
        counts = (self.table.labels()[:, [self.label_names_all.index(n) for n in names]] == 1).sum(0)
        return [n for n, c in zip(names, counts) if c < self.cfg.rare_below]


# ----------------------------------------------------------------------------------------------------
# ---- zero-shot and retrieval ----


def label_stat(Y: np.ndarray, S: np.ndarray, T: np.ndarray, is_rare: np.ndarray):
    """stat(idx) of the zero-shot task: macro AUC, F1 and ACC (at thresholds T) over the labels defined on all
    rows; base / rare AUC where some labels are rare."""
    keep = np.isfinite(auc_columns(Y, S))

    def stat(idx):
        auc, (f1, acc) = auc_columns(Y[idx], S[idx]), f1_acc_per_column(Y[idx], S[idx], T)
        out = {"auc_macro": macro(auc, keep), "f1_macro": macro(f1, keep), "acc_macro": macro(acc, keep)}
        if is_rare.any():
            out.update(auc_base=macro(auc, keep & ~is_rare), auc_rare=macro(auc, keep & is_rare))
        return out
    return stat


def task_zeroshot(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    test = ev.part(ev.cfg.split, views)
    names, few = ev.label_names(test.rows)
    # F1 / ACC thresholds: max-F1 on the valid split (MedKLIP, which D-MLM follows, uses the test set itself)
    valid = ev.part("valid", views, required=False) if ev.cfg.split != "valid" else None
    emb = test.emb if valid is None else np.concatenate([test.emb, valid.emb])
    Y, S = ev.labels(test.rows, names), common.zeroshot_scores(ev.model, emb, names)  # prompts encoded once
    T = list(map(best_f1_threshold, ev.labels(valid.rows, names).T, S[len(Y):].T)) if valid else []
    fallback = [n for n, t in zip(names, T) if t is None] if valid else names  # at 0: the pair softmax's 0.5
    T, S, rare = np.array([t or 0.0 for t in T] or np.zeros(len(names))), S[:len(Y)], ev.rare_labels(names)
    stat = label_stat(Y, S, T, np.array([n in rare for n in names]))
    per, (f1, acc) = common.auc_per_label(Y, S, names)["per_label"], f1_acc_per_column(Y, S, T)
    res = {"metrics": stat(np.arange(len(Y))), "n_images": len(Y), "rare_labels": rare, "per_label": {
        n: {"auc": per[n], "f1": macro(f1[j:j + 1]), "acc": macro(acc[j:j + 1]), "threshold": float(T[j]),
            "n_pos": int((Y[:, j] == 1).sum()), "n_neg": int((Y[:, j] == 0).sum())}
        for j, n in enumerate(names)}, "_roc": (names, Y, S), "_strata": Y,
        "note": "score cos(positive prompts) - cos(negative prompts); F1 / ACC at the threshold maximising "
                "F1 on the valid split" + (f" (0, the pair's 0.5, for {fallback}: no valid split or no valid "
                "positive)" if fallback else "") + "; a label with one class is left out of the macro" + (
                    f"; --min_pos={ev.cfg.min_pos} dropped {few}" if few else "")}
    return res, stat, test.rows


@torch.no_grad()
def encode_texts(model, texts: list[str], batch: int = 256) -> np.ndarray:
    return np.concatenate([model.encode_text(texts[i:i + batch]).double().cpu().numpy()
                           for i in range(0, len(texts), batch)])


def task_zeroshot_multiclass(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    test = ev.part(ev.cfg.split, views)
    classes, _ = ev.label_names(test.rows)
    raw = np.array([r["_labels"][[ev.label_names_all.index(c) for c in classes]] for r in test.rows])
    one = np.flatnonzero((raw == 1).sum(1) == 1)  # CheXpert 5x200: positive for exactly one class
    if not len(one):
        raise common.UserError(f"zeroshot_multiclass: no image of split {ev.cfg.split!r} is positive for "
                               f"exactly one of {classes}")
    gt, K = np.argmax(raw[one] == 1, 1), len(classes)
    # the mean of the cosines to a class's prompts (CXR-CLIP's evaluator): the dot product with the mean of
    # their unit embeddings, not renormalised (which would favour a class with more varied prompts)
    T = np.stack([encode_texts(ev.model, ev.model.zeroshot_prompts(c)[0]).mean(0) for c in classes])
    pred = np.argmax(test.emb[one].astype(np.float64) @ T.T, 1)

    def stat(idx):
        return {k: v for k, v in class_metrics(gt[idx], pred[idx], K).items() if k in ("acc", "f1_macro")}
    res = {"metrics": stat(np.arange(len(one))), "n_images": len(one), "classes": classes,
           "_strata": np.eye(K)[gt], "confusion": class_metrics(gt, pred, K)["confusion"],
           "note": "images positive for exactly one class; prediction: argmax over the classes of the mean "
                   "cosine to the class's positive prompts; the label policy does not apply"}
    return res, stat, [test.rows[i] for i in one]


def task_retrieval(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    how, test = ev.cfg.retrieval_text, ev.part(ev.cfg.split, views)
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
    own = [retrieval_text(test.rows[i], how) for i in q]
    index = {t: k for k, t in enumerate(dict.fromkeys(own))}  # identical texts merged (CXR-CLIP's code)
    texts, target = list(index), np.array([index[t] for t in own])
    hits = recall_hits(test.emb[q].astype(np.float64) @ encode_texts(ev.model, texts).T, target)  # [Q, 3]

    def stat(idx):
        r = hits[idx].mean(0)
        return {"R@1": float(r[0]), "R@5": float(r[1]), "R@10": float(r[2]), "rsum": float(r.sum())}
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


def over_fractions(ev: Evaluator, n_train: int, name: str, run, score) -> tuple[dict, callable]:
    """run(train_idx, seed) -> (predictions for the test rows, what was chosen on valid), once per
    (--fractions, --seeds); score(pred, idx) -> the metric on test rows idx. -> ({metrics: name@F, the mean
    over the seeds whose run is defined; seed_std; chosen, ...}, stat)."""
    fracs, seeds = [float(f) for f in csv_list(ev.cfg.fractions)], [int(s) for s in csv_list(ev.cfg.seeds)]
    runs = {(f, s): run(subsample(n_train, f, s), s) for f in fracs for s in seeds}
    n_test, pct = len(next(iter(runs.values()))[0]), lambda f: f"{name}@{f * 100:g}%"
    full = {k: score(p, np.arange(n_test)) for k, (p, _) in runs.items()}
    keep = {f: [full[f, s] is not None for s in seeds] for f in fracs}

    def stat(idx):
        return {pct(f): macro([score(runs[f, s][0], idx) for s in seeds], keep[f]) for f in fracs}
    return {"metrics": stat(np.arange(n_test)), "seeds": seeds,
            "seed_std": {pct(f): float(np.std([full[f, s] for s, k in zip(seeds, keep[f]) if k]))
                         if any(keep[f]) else None for f in fracs},
            "n_train": {f"{f * 100:g}%": len(subsample(n_train, f, 0)) for f in fracs}, "chosen": {
                f"{f * 100:g}%, seed {s}": c for (f, s), (_, c) in runs.items() if c is not None}}, stat


def fit(model, X: np.ndarray, y: np.ndarray):
    """model.fit(X, y) on standardised features, with one BLAS thread: these fits are small, and more threads
    only wait on each other (ten times slower on a busy 2-core machine)."""
    with threadpool_limits(1, user_api="blas"):
        return make_pipeline(StandardScaler(), model).fit(X, y)


def choose_on_valid(cands: list, fit_one, score, default):
    """fit_one(c) for each candidate; score(model) -> its score on the valid split (higher is better; None
    without one) -> (model, c) of the best, the first on ties; without a valid score: c = default."""
    best = None
    for c in cands:
        m = fit_one(c)
        if (s := score(m)) is None:
            break
        best = (s, m, c) if best is None or s > best[0] else best
    return (best[1], best[2]) if best else (fit_one(default), default)


def probe_scores(Xtr, Ytr, Xva, Yva, Xte, cands: list[float], seed: int = 0) -> tuple[np.ndarray, list]:
    """A logistic regression per label on its 0 / 1 training rows, C the candidate with the best AUC on the
    valid rows (C = 1 without valid positives and negatives) -> (P(1) on Xte [n, L], C per label); nan for a
    label whose training rows hold one class (no probe: undefined in that run)."""
    out, chosen = np.full((len(Xte), Ytr.shape[1]), np.nan), []
    for j in range(Ytr.shape[1]):
        m, mv = np.isin(Ytr[:, j], (0, 1)), np.isin(Yva[:, j], (0, 1)) if Xva is not None else np.zeros(0, bool)
        if ok := 0 < Ytr[m, j].sum() < m.sum():
            clf, c = choose_on_valid(cands, lambda c: fit(
                LogisticRegression(C=c, max_iter=2000, random_state=seed), Xtr[m], Ytr[m, j]),
                lambda clf: macro(auc_columns(Yva[mv, j:j + 1], clf.predict_proba(Xva[mv])[:, 1:]))
                if mv.any() else None, 1.0)
            out[:, j] = clf.predict_proba(Xte)[:, 1]
        chosen.append(c if ok else None)
    return out, chosen


def linear_head(Xtr, Ytr, Xva, Yva, Xte, cfg: Config, seed: int, device: str) -> tuple[np.ndarray, int]:
    """CXR-CLIP's linear probe (its finetune_10 / _100 configs): a linear layer on frozen features, BCE over
    the known labels, AdamW (--probe_lr, weight decay 1e-4), batches of 256, cosine over --probe_epochs, the
    epoch of the lowest valid loss kept (else the last) -> (P(1) on Xte [n, L], nan where training had one
    class; that epoch). A departure: features taken once, unaugmented; official code augments each epoch."""
    torch.manual_seed(seed)
    x, y, xv, yv, xt = (torch.as_tensor(np.asarray(a, dtype=np.float32), device=device) if a is not None
                        else None for a in (Xtr, Ytr, Xva, Yva, Xte))
    head, bs, g = nn.Linear(x.shape[1], y.shape[1]).to(device), min(256, len(x)), torch.Generator().manual_seed(seed)
    opt, steps = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=1e-4), len(x) // bs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.probe_epochs * steps))

    def loss(x, y):  # BCE over the known labels
        out, m = head(x), ~y.isnan()
        return F.binary_cross_entropy_with_logits(out[m], y[m]) if m.any() else out.sum() * 0
    best = (math.inf, cfg.probe_epochs, None)
    for epoch in range(cfg.probe_epochs):
        for b in torch.randperm(len(x), generator=g)[:steps * bs].view(steps, bs).to(device):  # drop_last
            opt.zero_grad(set_to_none=True)
            loss(x[b], y[b]).backward()
            opt.step()
            sched.step()
        if xv is not None and len(xv) and (~yv.isnan()).any():
            with torch.no_grad():
                v = loss(xv, yv).item()
            best = (v, epoch + 1, {k: t.clone() for k, t in head.state_dict().items()}) if v < best[0] else best
    if best[2]:
        head.load_state_dict(best[2])
    with torch.no_grad():
        P = torch.sigmoid(head(xt)).double().cpu().numpy()
    P[:, [not 0 < np.nansum(t) < np.isfinite(t).sum() for t in Ytr.T]] = np.nan
    return P, best[1]


def task_probe(ev: Evaluator, views: str, finetune: bool = False) -> tuple[dict, callable, list]:
    c = ev.cfg
    train, test = ev.part("train", views), ev.part(c.split, views)
    valid = ev.part("valid", views, required=False) if not finetune and c.split != "valid" else None
    names, few = ev.label_names(test.rows)
    Ytr, Yte = ev.labels(train.rows, names), ev.labels(test.rows, names)
    X = lambda p: p.emb if p.feat is None else p.feat  # noqa: E731
    Xva, Yva = (X(valid), ev.labels(valid.rows, names)) if valid else (None, None)

    def run(idx, seed):
        if finetune:
            return finetune_predict(ev, [train.rows[i] for i in idx], Ytr[idx], len(names), test.rows, seed,
                                    test.emb.shape[1]), None
        if c.probe == "head":
            return linear_head(X(train)[idx], Ytr[idx], Xva, Yva, X(test), c, seed, ev.device)
        return probe_scores(X(train)[idx], Ytr[idx], Xva, Yva, X(test), [float(v) for v in csv_list(c.probe_c)], seed)
    keeps = {}  # per run: the labels defined on all test rows

    def score(P, idx):
        return macro(auc_columns(Yte[idx], P[idx]), keeps.setdefault(id(P), np.isfinite(auc_columns(Yte, P))))
    res, stat = over_fractions(ev, len(train.rows), "auc", run, score)
    feats = "features before the projection" if train.feat is not None else "embeddings"
    how = (f"image encoder + linear head fine-tuned, masked BCE, {c.ft_epochs} epochs" if finetune else
           f"linear head on frozen {feats}, the best of {c.probe_epochs} epochs by the valid loss (chosen: "
           f"the epoch)" if c.probe == "head" else f"logistic regression per label on frozen, standardised "
           f"{feats}, C from {c.probe_c} by the valid AUC (chosen: C per label)")
    res.update(n_images=len(test.rows), _strata=Yte, note=f"{how}; macro AUC over the labels defined in "
               f"a run, mean over seeds" + ("" if finetune or valid else "; no valid split: C = 1 / the last "
               "epoch") + (f"; --min_pos={c.min_pos} dropped {few}" if few else ""))
    return res, stat, test.rows


def warmup_cosine(opt, warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (D-MLM Sec. 3.5)."""
    S = torch.optim.lr_scheduler
    return S.SequentialLR(opt, [S.LinearLR(opt, 1 / warmup, 1.0, max(1, warmup - 1)),
                                S.CosineAnnealingLR(opt, max(1, total - warmup))], milestones=[warmup])


def finetune_predict(ev: Evaluator, rows: list[dict], targets: np.ndarray, n_out: int, test_rows: list[dict],
                     seed: int, dim: int) -> np.ndarray:
    """A fresh copy of the checkpoint's model; its image encoder and a linear head on encode_image are trained
    on (rows, targets) with D-MLM's recipe (Sec. 3.5: AdamW, weight decay 0.05, encoder lr 1e-5, head lr 3e-4
    warmed up then cosine, 10 epochs; nothing chosen on valid) -> the head's probabilities on test_rows.
    targets: [n, L] 1 / 0 / nan (multi-label: BCE on the known ones) or [n] class ids (cross-entropy)."""
    c, multilabel, epoch = ev.cfg, np.ndim(targets) == 2, [0]
    torch.manual_seed(seed)
    model = importlib.import_module(ev.paper).load(ev.ckpt)[0].to(ev.device).train()
    tf, size, t = model.image_transform(True), model.cfg.image_size, torch.tensor(np.asarray(targets, float))

    def load(idx):  # a batch in a DataLoader worker, augmented by a generator per (seed, epoch, image)
        xs, ok = [], []
        for i in idx:
            try:
                xs.append(tf(common.load_image(rows[i]["_path"]), np.random.default_rng([seed, epoch[0], i])))
                ok.append(i)
            except common.BadImageError:  # left out of the batch
                pass
        return torch.stack(xs or [torch.zeros(3, size, size)]), torch.tensor(ok, dtype=torch.long)
    head, scale = nn.Linear(dim, n_out).to(ev.device), math.sqrt(dim)  # unit-norm embedding: unit-scale input
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": c.ft_lr},
                             {"params": head.parameters(), "lr": c.head_lr}], weight_decay=0.05)
    per_epoch = max(1, len(rows) // c.ft_batch_size)
    sched, ctx = warmup_cosine(opt, per_epoch, c.ft_epochs * per_epoch), torch.autocast(
        "cuda", torch.bfloat16, enabled=ev.device.startswith("cuda"))
    for e in range(c.ft_epochs):
        epoch[0] = e  # read by the workers, which each epoch's DataLoader forks anew
        for x, idx in torch.utils.data.DataLoader(range(len(rows)), c.ft_batch_size, shuffle=True,
                num_workers=c.num_workers, collate_fn=load, drop_last=len(rows) >= c.ft_batch_size,
                generator=torch.Generator().manual_seed(seed * 1000 + e)):
            if not len(idx):  # every image of the batch unreadable
                continue
            x, y = x.to(ev.device), t[idx].to(ev.device)
            with ctx:
                out = head(model.encode_image(x).float() * scale).float()
            m = ~torch.isnan(y)
            loss = (F.binary_cross_entropy_with_logits(out[m], y[m].float()) if m.any() else out.sum() * 0) \
                if multilabel else F.cross_entropy(out, y.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], 1.0)
            opt.step()
            sched.step()
    with ctx:
        out, _ = common.embed_images(model, test_rows, ev.device, c.batch_size, num_workers=c.num_workers,
                                     fn=lambda x: head(model.encode_image(x).float() * scale))
    out = torch.from_numpy(out).double()
    return (torch.sigmoid(out) if multilabel else out.softmax(-1)).numpy()


def numeric_targets(ev: Evaluator, views: str) -> list[tuple[Part | None, np.ndarray]]:
    """(part, --target_column as numbers) of the rows with one: train, valid (None, [] if absent), --split."""
    parts, col = [ev.part("train", views), ev.part("valid", views, False) if ev.cfg.split != "valid"
                  else None, ev.part(ev.cfg.split, views)], ev.cfg.target_column
    if col not in ev.columns:
        raise common.UserError(f"--target_column={col}: no such column in {ev.cfg.data}")
    out = []
    for p in parts:
        v = np.array([float(x) if x.strip() and x.strip().lstrip("-").replace(".", "", 1).isdigit() else
                      np.nan for x in (r.get(col) or "" for r in (p.rows if p else []))], dtype=np.float64)
        k = np.flatnonzero(np.isfinite(v))
        out.append((Part([p.rows[i] for i in k], p.emb[k]) if p else None, v[k]))
    return out


def task_regression(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    (tr, ytr), (va, yva), (te, yte) = numeric_targets(ev, views)
    if len(tr.rows) < 2 or not len(te.rows):
        raise common.UserError(f"regression: too few rows with a number in {ev.cfg.target_column!r}")
    m, alpha = choose_on_valid(list(np.logspace(-3, 3, 13)), lambda a: fit(Ridge(alpha=a), tr.emb, ytr),
                               lambda m: -np.abs(m.predict(va.emb) - yva).mean() if len(yva) else None, 1.0)
    err, base = np.abs(m.predict(te.emb) - yte), np.abs(ytr.mean() - yte)

    def stat(idx):
        return {"mae": float(err[idx].mean()), "mae_predict_mean": float(base[idx].mean())}
    res = {"metrics": stat(np.arange(len(yte))), "n_train": len(ytr), "n_images": len(yte), "chosen": alpha,
           "note": f"MAE in the units of {ev.cfg.target_column!r} (bone age: months); ridge regression on "
                   f"the frozen, standardised embeddings (PedCLIP's linear probing), alpha by the valid MAE"
                   + ("" if len(yva) else " (no valid split: 1)") + "; mae_predict_mean: the training mean's"}
    return res, stat, te.rows


def task_grading(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    c, parts = ev.cfg, numeric_targets(ev, views)
    classes = [float(v) for v in csv_list(c.classes)] if c.classes else sorted(set(parts[0][1].tolist()))

    def graded(p, y):  # the rows whose target is one of the grades -> (Part, grade ids)
        k = np.array([classes.index(v) if v in classes else -1 for v in y], dtype=int)
        i = np.flatnonzero(k >= 0)
        return (Part([p.rows[j] for j in i], p.emb[i]) if p else None), k[i]
    (tr, ktr), (va, kva), (te, kte) = [graded(p, y) for p, y in parts]
    if len(set(ktr.tolist())) < 2 or not len(kte):
        raise common.UserError(f"grading: need two or more of the grades {classes} in the training split "
                               f"and a graded row in {c.split!r}")
    K, C = len(classes), None
    if c.mode == "finetune":
        prob = finetune_predict(ev, tr.rows, ktr, K, te.rows, 0, te.emb.shape[1])
    else:
        clf, C = choose_on_valid([float(v) for v in csv_list(c.probe_c)], lambda C: fit(
            LogisticRegression(C=C, max_iter=2000), tr.emb, ktr),
            lambda m: float((m.predict(va.emb) == kva).mean()) if len(kva) else None, 1.0)
        prob = np.zeros((len(kte), K))
        prob[:, clf.classes_] = clf.predict_proba(te.emb)
    pred, onehot = prob.argmax(1), np.eye(K)[kte]
    keep = np.isfinite(auc_columns(onehot, prob))

    def stat(idx):
        m = class_metrics(kte[idx], pred[idx], K)
        return {"acc": m["acc"], "f1_macro": m["f1_macro"], "kappa_quadratic": m["kappa_quadratic"],
                "auc_ovr_macro": macro(auc_columns(onehot[idx], prob[idx]), keep)}
    res = {"metrics": stat(np.arange(len(kte))), "classes": classes, "mode": c.mode, "chosen": C,
           "_strata": onehot, "confusion": class_metrics(kte, pred, K)["confusion"], "n_train": len(ktr),
           "n_images": len(kte),
           "note": "grades in the order of --classes; auc_ovr_macro: each grade against the rest (D-MLM "
                   "Table 4), macro over the grades present" + (f"; frozen: C by the valid accuracy" + (
                       "" if len(kva) else " (no valid split: 1)") if c.mode == "frozen" else "")}
    return res, stat, te.rows


def load_mask(row: dict, csv_dir: Path, size: int) -> np.ndarray:
    """bool [size, size]: the `mask` image > 0 (data_prep writes one per image with a finding; an empty cell:
    no finding), resized with nearest neighbours."""
    p = (row.get("mask") or "").strip()
    if not p:
        return np.zeros((size, size), bool)
    m = common.load_image(p if Path(p).is_absolute() else csv_dir / p)
    return cv2.resize((m > 0).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def finding_masks(ev: Evaluator, rows: list[dict], size: int) -> tuple[list[int], np.ndarray]:
    """The rows whose mask holds a finding, and those masks bit-packed [n, size * size / 8], read one at a
    time: the masks without a finding (most of RSNA's 26,684) are never all in memory."""
    keep, packed, bad = [], [], 0
    for i, r in enumerate(rows):
        try:
            m = load_mask(r, Path(ev.cfg.data).parent, size)
        except common.BadImageError:
            bad += 1
            continue
        if m.any():
            keep.append(i)
            packed.append(np.packbits(m))
    if bad:
        print(f"warning: {bad} unreadable mask(s) left out")
    return keep, np.stack(packed) if packed else np.zeros((0, (size * size + 7) // 8), np.uint8)


def seg_decoder(c_in: int, grid: int, out_size: int, width: int = 32) -> nn.Sequential:
    """Tokens [B, N, C] -> grid [B, C, g, g] -> 1x1 conv, x2 upsampling, 3x3 conv, GN, GELU, 1x1 conv -> one
    logit map [B, 1, S, S], bilinear to the mask size. Light on purpose: the frozen tokens must carry it."""
    return nn.Sequential(nn.Unflatten(2, (grid, grid)), nn.Conv2d(c_in, width, 1), nn.GELU(),
                         nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(width, width // 2, 3, padding=1),
                         nn.GroupNorm(8, width // 2), nn.GELU(), nn.Conv2d(width // 2, 1, 1),
                         nn.Upsample(size=(out_size, out_size), mode="bilinear"), nn.Flatten(1, 2))


def task_segmentation(ev: Evaluator, views: str) -> tuple[dict, callable, list]:
    c, S, data = ev.cfg, ev.model.cfg.image_size, {}
    ev.rows("train", views)  # reads the CSV's columns
    if "mask" not in ev.columns:
        raise common.UserError(f"segmentation: {c.data} has no `mask` column (data_prep.py writes the masks)")
    for split in ("train", c.split):  # the images with a finding (D-MLM: SIIM's 2,669 pneumothorax images)
        rows = ev.rows(split, views)
        keep, masks = finding_masks(ev, rows, S)
        if not keep:
            raise common.UserError(f"segmentation: no image of split {split!r} has a non-empty mask")
        tokens, ok = ev.images([rows[i] for i in keep], ev.model.image_tokens)
        tokens = torch.from_numpy(tokens[ok]).half().transpose(1, 2)  # [n, C, N]
        data[split] = (tokens, masks[ok], [rows[i] for i, k in zip(keep, ok) if k])
    (Xtr, Mtr, _), (Xte, Mte, te_rows) = data["train"], data[c.split]
    unpack = lambda m: torch.from_numpy(np.unpackbits(m, axis=1, count=S * S).reshape(-1, S, S))  # noqa: E731
    if (grid := math.isqrt(Xtr.shape[2])) ** 2 != Xtr.shape[2]:
        raise common.UserError(f"segmentation: image_tokens gives {Xtr.shape[2]} tokens, not a square grid")

    def run(idx, seed):
        torch.manual_seed(seed)
        dec = seg_decoder(Xtr.shape[1], grid, S).to(ev.device)
        opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, c.seg_epochs))
        g = torch.Generator().manual_seed(seed)
        for _ in range(c.seg_epochs):
            for b in torch.from_numpy(idx)[torch.randperm(len(idx), generator=g)].split(32):
                x, m = Xtr[b].float().to(ev.device), unpack(Mtr[b.numpy()]).float().to(ev.device)
                logit = dec(x)
                p = torch.sigmoid(logit)  # BCE + soft Dice
                soft = 1 - (2 * (p * m).sum((1, 2)) + 1) / (p.sum((1, 2)) + m.sum((1, 2)) + 1)
                opt.zero_grad(set_to_none=True)
                (F.binary_cross_entropy_with_logits(logit, m) + soft.mean()).backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            return np.concatenate([dice_per_image(dec(Xte[i:i + 64].float().to(ev.device)).cpu().numpy() > 0,
                                                  unpack(Mte[i:i + 64]).numpy().astype(bool))
                                   for i in range(0, len(Xte), 64)]), None
    res, stat = over_fractions(ev, len(Xtr), "dice", run, lambda d, idx: macro(d[idx]))
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
    groups, Y = patient_groups(rows), res.pop("_strata", None)  # Y: the rows' labels, where there are labels
    boot = bootstrap(stat, groups, ev.cfg.bootstrap, strata=None if Y is None else label_strata(Y, groups)) \
        if ev.cfg.bootstrap > 0 else {}
    res["ci"] = {k: percentile_ci(v) for k, v in boot.items()}
    res["bootstrap_skipped"] = max([int(np.isnan(v).sum()) for k, v in boot.items()
                                    if res["metrics"].get(k) is not None] or [0])
    c = ev.cfg
    labels = f"blank={c.blank}, uncertain={c.uncertain}, no_finding={'on' if c.no_finding else 'off'}" \
        if task in ("zeroshot", "probe", "finetune") else "not used"
    return {"task": task, "paper": ev.paper, "ckpt": ev.ckpt, "data": ev.cfg.data, "split": ev.cfg.split,
            "labels": labels, "views": views, "bootstrap": ev.cfg.bootstrap, **res, "_boot": boot,
            "_rows": [(r["_row"], r.get("patient_id", "")) for r in rows]}


# ----------------------------------------------------------------------------------------------------
# ---- the paired comparison, the command line ----


def compare(results: dict):
    """p-values of each later checkpoint's metrics against the first one's, on the same patient resamples
    (only where both were evaluated on the same rows)."""
    first = results[next(iter(results))]
    for per_task in list(results.values())[1:]:
        for task, r in per_task.items():
            if r["_boot"] and r["_rows"] == first[task]["_rows"]:
                r["p_vs_first"] = {k: paired_p(v, first[task]["_boot"][k]) for k, v in r["_boot"].items()
                                   if k in first[task]["_boot"]}


def check_config(cfg: Config) -> tuple[list[str], list[str]]:
    """The flags a typo could break, checked before any work: -> (checkpoints, tasks)."""
    ckpts, tasks = csv_list(cfg.ckpt), csv_list(cfg.task)
    if not ckpts or len(set(ckpts)) < len(ckpts):
        raise common.UserError(f"--ckpt=PATH[,PATH...] is required, each checkpoint once (a ckpt.pt or "
                               f"ckpt_best.pt of pedclip.py, cxrclip.py, cxrcml.py or dmlm.py); got {cfg.ckpt!r}")
    if not tasks or any(t not in TASKS for t in tasks):
        raise common.UserError(f"--task={cfg.task}: choose from {', '.join(TASKS)} (comma-separated)")
    for k, ok in {"blank": ("drop", "zero"), "uncertain": ("drop", "ones", "zeros", "gloria"),
                  "mode": ("frozen", "finetune"), "probe": ("logreg", "head"),
                  "probe_features": ("backbone", "embedding")}.items():
        if getattr(cfg, k) not in ok:
            raise common.UserError(f"--{k}={getattr(cfg, k)}: choose from {' | '.join(ok)}")
    try:
        fracs, seeds, cs = [[t(v) for v in csv_list(s)] for t, s in ((float, cfg.fractions), (int, cfg.seeds),
                                                                      (float, cfg.probe_c))]
    except ValueError:
        fracs = seeds = cs = []
    if not (fracs and seeds and cs and all(0 < f <= 1 for f in fracs) and min(cs) > 0):
        raise common.UserError(
            f"--fractions={cfg.fractions} / --seeds={cfg.seeds} / --probe_c={cfg.probe_c}: "
            f"expected shares in (0, 1], integers, values > 0: e.g. 0.01,0.1,1 / 0,1,2 / 1,10")
    heads = [t for t in tasks if t not in ("zeroshot", "zeroshot_multiclass", "retrieval")]
    if cfg.split == "train" and heads:
        raise common.UserError(f"--split=train: {', '.join(heads)} fit their heads on the training split")
    for c in ckpts:
        if not Path(c).is_file():
            raise common.UserError(f"no checkpoint at {c} (train one first, e.g. `python pedclip.py`)")
    if cfg.data != Config.data and not Path(cfg.data).is_file():
        raise common.UserError(f"data CSV {cfg.data} does not exist (data_prep.py writes one per data set; "
                               f"the presets read its default --out, data/<data set>.csv)")
    return ckpts, tasks


def main(argv=None) -> dict:
    """-> {checkpoint: {task: result}}; also printed and written to <out>/eval_<tasks>.json, .md and .png."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    cfg = common.parse_config(Config, PRESETS, argv)
    ckpts, tasks = check_config(cfg)
    if cfg.data == Config.data:
        phantoms.ensure_phantoms(cfg.data, PHANTOMS)
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda":  # as the paper files' setup() does: the zero-shot numbers agree with training time
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out or (Path(ckpts[0]).parent if len(ckpts) == 1 else "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem, threads, results, pngs = out / ("eval_" + "+".join(tasks)), torch.get_num_threads(), {}, []
    torch.set_num_threads(common.cpu_threads(cfg.threads))
    try:
        for i, ck in enumerate(ckpts):
            model, paper = load_model(ck, device, cfg.prompts)
            print(f"{ck}: {paper}, {model.cfg.image_size} px, on {device}")
            ev, results[ck] = Evaluator(cfg, model, paper, ck, device), {}
            for t in tasks:
                results[ck][t] = run_task(ev, t)
                print(render.result_block(results[ck][t]))
            pngs += [render.paper_figure(ev, Path(f"{stem}_{paper}{i}.png"))] if cfg.figures else []
            del ev, model
    finally:
        torch.set_num_threads(threads)
    compare(results)
    pngs = (render.figures(results, stem) if cfg.figures else []) + pngs
    clean = {c: {t: {k: v for k, v in r.items() if k[0] != "_"} for t, r in rt.items()} for c, rt in results.items()}
    common.atomic_write(f"{stem}.json", lambda f: json.dump(clean, f, indent=2))
    md = render.markdown_table(results, cfg, pngs)
    common.atomic_write(f"{stem}.md", lambda f: f.write(md))
    print(f"\n{md}\nwrote {stem}.json and {stem}.md" + (" and the figures" if cfg.figures else ""))
    return results


if __name__ == "__main__":
    common.cli(main)
