"""
D-MLM: Distribution-Based Masked Medical Vision-Language Model Using Structured Reports.
S. N. Gowda, R. Zhang, X. Gu, Y. Weng, L. Yang. (paper: ../shared/papers/dmlm.md; no public code)

What this file implements, top to bottom (one file, sharing only common.py):

    structured report                  Sec. 2.1: Definition / Appearance (per finding, from a knowledge JSON that
                                       data_prep.py writes with an LLM and the paper's two prompts; the project
                                       ships knowledge/phantom_chexpert.json) / Observations / Verdicts
    E^i: ViT-B/16 | tiny ViT           Sec. 2.2: our own pre-LN ViT whose parameter names are torchvision's, so
                                       ImageNet weights load into it; SDPA attention
    E^t: ClinicalBERT | tiny BERT      Sec. 2.2
    h_i = N(μ_i, σ_i²)                 Eq. (1): every token and patch -> a diagonal Gaussian (σ² by softplus or
                                       exp of a log-variance, plus a floor)
    masking                            Sec. 2.2 / 3.5: 30% of text tokens; image patches drawn with probabilities
                                       raised on the regions the Appearance section names (REGION_MAP)
    fusion transformer                 Eq. (2): predicts N(μ̂, σ̂²) of each masked token / patch from the visible
                                       tokens of both modalities
    L_D-MLM                            Eq. (3): closed-form KL(N(μ̂, σ̂²) || N(μ, σ²)) over masked positions; the
                                       targets are the unmasked input's Gaussians (stop-gradient or EMA encoder)
    L_align                            Eq. (4): 2-Wasserstein distance of the image / report Gaussians
    L = λ L_D-MLM + (1-λ) L_align      Eq. (5), λ = 0.2 (Sec. 3.6)
    AdamW wd 0.05, warm-up to 3e-4 then cosine, encoders at 1e-5, batch 128, 100 epochs (Sec. 3.5)

Run it:

    python dmlm.py                                         # demo: phantoms, tiny encoders, 416 steps (~0.55 s each on a free core)
    python dmlm.py --preset=paper --data=data/mimic.csv --knowledge=data/knowledge.json   # ViT-B/16 + ClinicalBERT
    python dmlm.py --align=pairs --image_mask=random --target=ema                      # the other readings
    torchrun --nproc_per_node=2 dmlm.py                    # 2 processes (GPUs, or gloo on CPU); --batch_size is global
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 dmlm.py --preset=paper ...
    python dmlm.py --resume                                # continue out/dmlm/ckpt.pt exactly where it stopped
    python dmlm.py --help                                  # every flag, with the paper section it comes from
    python data_prep.py knowledge --findings=data/mimic.csv --model=<llm> --out=data/knowledge.json  # Sec. 2.1

The paper leaves these choices open; what we do, and why (each flag picks the other reading where two are sensible):
  * Alignment (Eq. 4). The paper minimises W2 over aligned pairs only. Minimised alone that has a trivial optimum:
    every image and report mapped to one point (W2 = 0), which would make zero-shot impossible; the paper does not
    say what prevents it. --align=pairs is Eq. (4) literally. --align=contrastive (default in both presets) uses
    -W2²/2 as the similarity in a symmetric InfoNCE over the GLOBAL batch (all-gathered with gradient), so matched
    pairs are pulled together AND the other reports of the batch are pushed away; with λ = 0.2 the alignment term
    is 80% of the loss, so it must carry the anti-collapse force itself.
  * W2 is used squared (the closed form ||μ1-μ2||² + ||σ1-σ2||²): smooth at 0. The contrastive similarity is
    -W2²/2, so with --align_norm_means (default on: means L2-normalised before W2) it equals
    cos(μ1, μ2) - 1 - ||σ1-σ2||²/2: CLIP's logit plus a variance term, and the zero-shot score with the means
    (encode_image / encode_text return normalised means) ranks by the mean part of what was trained.
  * Global Gaussians for alignment: the same heads that map every token (Eq. 1) applied to the mean of the patch
    features / of the real token features (--pool=mean, default), or to the class token / [CLS] (--pool=cls). The
    paper does not say which. In the demo, mean pooling + lr 2e-3 reached zero-shot AUC 0.67 after 192 steps where
    the class token + lr 1e-3 had 0.60 after 320 (the two changes were not measured apart).
  * D-MLM targets (Eq. 3 "ground truth"): --target=stopgrad (default) uses the online encoder's Gaussians of the
    UNMASKED input under stop-gradient (one extra pass, no extra weights); --target=ema uses an EMA copy of the
    encoders + heads (BYOL-style, --ema_decay). The paper does not say where the ground truth comes from.
  * Eq. (3) sums over masked positions (and, as a KL of a diagonal Gaussian, over dimensions). --kl_reduce=sum
    is that (divided by the batch size: the expectation over pairs); --kl_reduce=mean (both presets) divides by
    (#masked positions x D). The literal sum is ~10^4 x the InfoNCE term at D = 768, so λ = 0.2 would not
    balance anything; the mean keeps λ meaningful.
  * Masking: masked text tokens become [MASK] and masked patches a learned mask token (SimMIM-style, the whole
    grid goes through the ViT), so the same encoders serve both passes. "Adaptive ratio for images based on the
    paired text" (Sec. 3.5): --image_mask=adaptive keeps the count at --image_mask_ratio (0.3, the paper's fixed
    ratio, Sec. 3.6) and draws WHICH patches with weight 1 + --region_boost on the regions named in the
    Appearance section (REGION_MAP below, written for frontal chest films and the phantom layout); a report whose
    Appearance names no region falls back to uniform. --image_mask=random is uniform.
  * Fusion transformer: the paper names none; we use a small pre-LN transformer over [image tokens; text tokens]
    of the masked pass (--fusion_layers), with separate Gaussian prediction heads per modality.
  * Structured reports (Sec. 2.1) are built from the study's findings text and labels: Definition and Appearance
    of every positive / uncertain finding from the knowledge file (of "No Finding" when none), Observations = the
    findings section (or the report), Verdicts = the labels in words ("no X" for negatives; "No Finding" gets
    "normal study" / "abnormal study", never "no no finding"). The paper's LLM rewrote each report; its link
    lists only the per-disease definitions and appearances, which is what the knowledge file holds.
    --verdict_negatives=false lists only the findings in the Verdicts (demo: AUC 0.65 vs 0.69 with negatives).
  * Encoder lr 1e-5 vs head/fusion lr 3e-4 (Sec. 3.5) are two AdamW parameter groups under one schedule. The
    demo trains its tiny encoders from scratch, so it gives them the same, larger lr.
  * Warm-up length is not given; we warm up for --warmup_epochs=1.
  * Zero-shot scores use the Gaussian means (cosine, positive minus negative prompt, as in cxrclip.py);
    --zeroshot_score=w2 uses -W2² with the variances instead. model.image_uncertainty / text_uncertainty give
    the mean σ² of the global Gaussian as an uncertainty score.
  * Demo encoders: a 2-layer ViT whose tokens come from a conv stem (--stem=conv, common.ConvStem: three strided
    3x3 conv blocks in place of the 8x8 patchify conv) and a 2-layer BERT, from scratch, 416 steps. With the
    patchify conv the demo reached zero-shot macro AUC 0.77 and missed the small findings; with the conv stem,
    0.85. The overlapping 3x3 kernels let a visible token see a few pixels of its masked neighbours' borders
    (a token's receptive field is 15 px for an 8 px patch), so masked-patch prediction is a little easier than
    with a patchify conv. --stem=hmlp (2x2 kernels) avoids that and reached 0.79 on the same demo in 384 steps.
    The paper preset keeps ViT-B/16's patchify conv.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import common

# ----------------------------------------------------------------------------------------------------
# ---- config ----


@dataclass
class Config:
    # data (Sec. 2.1, 3.1)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema; the demo makes phantoms here if absent
    n_phantoms: int = 3000  # images in the phantom data set made when --data is the default and missing
    knowledge: str = "knowledge/phantom_chexpert.json"  # Sec. 2.1: {"Finding": {"definition", "appearance"}} JSON
    verdict_negatives: bool = True  # Sec. 2.1 Verdicts also list the negative labels ("no x"), not only findings
    image_size: int = 224  # input resolution (224 in the paper, Sec. 3.5)
    # model (Sec. 2.2, 3.5)
    vit_patch: int = 16  # ViT patch size (ViT-B/16)
    stem: str = "patch"  # patch embedding: patch (ViT's one conv) | hmlp (non-overlapping 2x2 conv stack: a masked patch stays hidden; demo) | conv (3x3, overlapping)
    vit_width: int = 768  # ViT hidden size
    vit_layers: int = 12  # ViT blocks
    vit_heads: int = 12  # ViT attention heads
    text_encoder: str = "emilyalsentzer/Bio_ClinicalBERT"  # tiny | a Hugging Face BERT name or path (ClinicalBERT)
    bert_width: int = 768  # tiny BERT hidden size (ignored for a named model)
    bert_layers: int = 12  # tiny BERT layers (ignored for a named model)
    pretrained: bool = True  # ImageNet ViT-B/16 (torchvision) and ClinicalBERT weights (need them cached)
    embed_dim: int = 768  # Eq. (1): dimension of μ and σ² ("latent dimension of 768", Sec. 3.5)
    var_param: str = "softplus"  # Eq. (1): σ² = softplus(a) | exp (a is a log-variance), plus --var_floor
    var_floor: float = 1e-4  # Eq. (1): lower bound on σ² (keeps the KL finite)
    fusion_width: int = 768  # Eq. (2): cross-modal fusion transformer width
    fusion_layers: int = 4  # Eq. (2): fusion transformer blocks
    fusion_heads: int = 12  # Eq. (2): fusion attention heads
    max_tokens: int = 256  # text length after tokenisation (structured reports are long)
    vocab_size: int = 4000  # WordPiece vocabulary fitted on the training reports when no pretrained tokenizer
    # masking (Sec. 2.2, 3.5)
    text_mask_ratio: float = 0.3  # Sec. 2.2: share of text tokens masked ("higher than the standard 15%")
    image_mask: str = "adaptive"  # Sec. 2.2: adaptive (regions named in Appearance) | random
    image_mask_ratio: float = 0.3  # Sec. 3.6: share of patches masked ("a fixed masking ratio of 0.3")
    region_boost: float = 4.0  # adaptive masking: a patch inside a named region is (1 + boost) x as likely
    # loss (Sec. 2.3)
    target: str = "stopgrad"  # Eq. (3) ground truth: stopgrad (online encoder, unmasked) | ema (EMA copy)
    ema_decay: float = 0.996  # --target=ema: decay of the EMA encoder
    kl_reduce: str = "mean"  # Eq. (3): sum (over masked positions and dims, / batch) | mean (per position and dim)
    align: str = "contrastive"  # Eq. (4): contrastive (-W2² as InfoNCE similarity) | pairs (W2² of pairs, literal)
    align_norm_means: bool = True  # L2-normalise the means before W2 (-W2²/2 then contains the cosine)
    pool: str = "mean"  # global Gaussian from: mean (of patches / real tokens) | cls (class token / [CLS])
    lam: float = 0.2  # Eq. (5): λ, L = λ L_D-MLM + (1-λ) L_align (Sec. 3.6)
    init_temperature: float = 0.07  # --align=contrastive: τ at the start, learnable; 1/τ clamped at 100
    zeroshot_score: str = "mean"  # zero-shot similarity: mean (cosine of the means) | w2 (-W2² with variances)
    # optimisation (Sec. 3.5)
    epochs: int = 100  # pre-training epochs
    batch_size: int = 128  # image-report pairs per GLOBAL batch; each rank gets batch_size // world
    lr: float = 3e-4  # peak lr of heads, fusion transformer, mask token, temperature
    encoder_lr: float = 1e-5  # peak lr of the ViT and BERT encoders
    weight_decay: float = 0.05  # AdamW weight decay (matrices only; not biases, norms, tokens, temperature)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine annealing to 0 (length not given in the paper)
    grad_clip: float = 1.0  # max gradient norm (0: off)
    # run
    seed: int = 0  # seed for weights (same on every rank), data order, augmentations and masks
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 + GradScaler; off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model (same loss; faster on GPU after warm-up)
    grad_ckpt: bool = False  # gradient checkpointing: recompute each encoder layer in the backward (less memory, ~1/3 more compute)
    num_workers: int = 2  # DataLoader workers per rank
    threads: int = 0  # CPU only: torch intra-op threads per process (0: the usable cores / the processes on this node); 1 keeps a shared CPU from thrashing
    out_dir: str = "out/dmlm"  # ckpt.pt, ckpt_prev.pt, log.jsonl, metrics.json
    resume: bool = False  # continue from out_dir/ckpt.pt (weights, optimiser, schedule, data position, RNG)
    overwrite: bool = False  # allow a new run to replace an existing run's checkpoint in out_dir
    max_steps: int = -1  # stop (with a checkpoint) after this many optimiser steps; the schedule still spans --epochs
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and at every epoch end)
    max_bad_frac: float = 0.01  # fail when more than this share of samples are unreadable / empty
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    fault_nan_step: int = -1  # TESTS ONLY: make rank 0's loss NaN at this step
    eval_batch_size: int = 256  # images per forward pass in the final zero-shot evaluation
    benchmark: str = "off"  # off | model (or bare --benchmark): time training steps on synthetic tensors | data
    benchmark_steps: int = 10  # timed steps per phase of --benchmark (after 3 warm-up steps)
    benchmark_workers: str = "0,1,2,4"  # DataLoader worker counts that --benchmark=data times
    preset: str = "demo"  # filled in by the CLI: demo | paper


PRESETS = {
    # Demo: phantoms at 64 px, a 2-layer ViT (conv stem -> 8x8 grid) and a 2-layer BERT from scratch, width 64.
    # 3000 images -> 2106 training images; 64 per batch -> 32 steps/epoch; 13 epochs -> 416 steps, ~0.55 s each
    # on one free CPU core. Encoders from scratch need the large lr, so encoder_lr = lr here. One torch thread and no
    # loader worker: these ops are too small to gain from threads, and OpenMP threads on an oversubscribed CPU
    # spin-wait (measured: 2 threads 7x SLOWER than 1 while other jobs shared the 2 cores).
    "demo": dict(image_size=64, vit_patch=8, stem="conv", vit_width=64, vit_layers=2, vit_heads=2, text_encoder="tiny",
                 bert_width=64, bert_layers=2, pretrained=False, embed_dim=64, fusion_width=64, fusion_layers=1,
                 fusion_heads=2, max_tokens=96, vocab_size=1500, batch_size=64, epochs=13, lr=2e-3,
                 encoder_lr=2e-3, weight_decay=0.05, warmup_epochs=1.0, num_workers=0, threads=1),
    # Paper (Sec. 3.5): ViT-B/16 (ImageNet) + ClinicalBERT, 224 px, dim 768, global batch 128 (e.g. 4 GPUs x 32),
    # AdamW wd 0.05, warm-up to 3e-4 then cosine, encoders at 1e-5, 100 epochs; 30% text masking, λ = 0.2.
    "paper": dict(data="", num_workers=8),
}

# ----------------------------------------------------------------------------------------------------
# ---- structured reports (Sec. 2.1) ----
# Definition and Appearance come from the knowledge file; Observations and Verdicts from the study itself.
# "No Finding" is a negative statement: its verdicts are "normal study" / "abnormal study", never "no no finding".

NORMAL_LABELS = {"no finding", "normal"}


def load_knowledge(path: str) -> dict:
    """{"<Finding>": {"definition": str, "appearance": str}}; a missing file is an error saying how to make one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"knowledge file {path} not found: the project ships knowledge/phantom_chexpert.json; "
                                f"make one for other findings with `python data_prep.py knowledge ...` (Sec. 2.1)")
    with open(path, encoding="utf-8") as f:
        know = json.load(f)
    for k, v in know.items():
        if not isinstance(v, dict) or not {"definition", "appearance"} <= set(v):
            raise ValueError(f"{path}: entry {k!r} needs 'definition' and 'appearance' strings")
    return know


def _lookup(know: dict, name: str) -> dict | None:
    if name in know:
        return know[name]
    low = {k.lower(): v for k, v in know.items()}
    return low.get(name.lower())


def verdict_words(names: list[str], labels: np.ndarray, negatives: bool = True) -> str:
    """Verdicts: the labels in words. 1 -> "x", -1 -> "possible x", 0 -> "no x" (when `negatives`); No Finding ->
    "normal study" / "abnormal study"."""
    pos, neg, normal = [], [], None
    for n, y in zip(names, labels):
        x = n.lower()
        if x in NORMAL_LABELS:
            normal = {1.0: True, 0.0: False}.get(float(y), normal)
            continue
        if y == 1:
            pos.append(x)
        elif y == -1:
            pos.append("possible " + x)
        elif y == 0 and negatives:
            neg.append("no " + x)
    if normal is None:
        normal = not pos
    head = "normal study" if normal else "abnormal study"
    return ", ".join([head] + pos + neg) + "."


def structured_report(names: list[str], labels: np.ndarray, observations: str, know: dict,
                      negatives: bool = True) -> str:
    """Definition / Appearance / Observations / Verdicts (Sec. 2.1) for one study."""
    named = [n for n, y in zip(names, labels) if y in (1, -1) and n.lower() not in NORMAL_LABELS]
    if not named:
        named = [n for n in names if n.lower() in NORMAL_LABELS][:1] or ["No Finding"]
    entries = [e for e in (_lookup(know, n) for n in named) if e]
    definition = " ".join(e["definition"].strip() for e in entries)
    appearance = " ".join(e["appearance"].strip() for e in entries)
    return (f"Definition: {definition} Appearance: {appearance} Observations: {observations.strip()} "
            f"Verdicts: {verdict_words(names, labels, negatives)}")


def observations(table: common.XrayCSV, i: int) -> str:
    """Observations: the findings section (M&M's source of observations); the impression or whole report when a
    study has no findings section. The impression is not repeated: the Verdicts carry the conclusions."""
    r = table.rows[i]
    for k in ("findings", "impression", "report"):
        if (r.get(k) or "").strip():
            return r[k].strip()
    return ""


def appearance_of(report: str) -> str:
    """The Appearance section of a structured report (the text adaptive masking reads)."""
    m = re.search(r"Appearance:(.*?)(Observations:|$)", report, flags=re.S)
    return m.group(1) if m else ""


def zeroshot_prompts(label: str, know: dict) -> tuple[list[str], list[str]]:
    """Positive and negative structured mini-reports for one class; embeddings are averaged per side."""
    x = label.lower()
    if x in NORMAL_LABELS:
        e = _lookup(know, label)
        pos = ["Verdicts: normal study.", "Observations: no acute abnormality. Verdicts: normal study."]
        if e:
            pos.append(f"Definition: {e['definition']} Appearance: {e['appearance']} Verdicts: normal study.")
        return pos, ["Verdicts: abnormal study.", "Observations: abnormal findings are present. Verdicts: abnormal study."]
    e = _lookup(know, label)
    pos = [f"Observations: there is {x}. Verdicts: abnormal study, {x}.", f"Verdicts: abnormal study, {x}."]
    if e:
        pos.append(f"Definition: {e['definition']} Appearance: {e['appearance']} Observations: {x}. "
                   f"Verdicts: abnormal study, {x}.")
    neg = [f"Observations: no {x}. Verdicts: no {x}.", f"Verdicts: no {x}.", f"Observations: there is no {x}."]
    return pos, neg


# ----------------------------------------------------------------------------------------------------
# ---- adaptive image masking: region words -> patch-grid areas (Sec. 2.2) ----
# Boxes are (top, bottom, left, right) as fractions of a FRONTAL image, radiological convention (the patient's
# right on the image's left). They follow real chest-film anatomy and common._draw_phantom's layout (lungs centred
# at y ~ 0.5, x ~ 0.5 -/+ 0.17; heart low-centre at y ~ 0.62; effusion at the lung base; pneumothorax at the apex;
# consolidation in the lower lobe; free air under the right hemidiaphragm; limb films with the joint central).
REGION_MAP = [
    (r"costophrenic|lung base|lower hemithorax|basal|bases", [(0.58, 0.86, 0.12, 0.88)]),
    (r"apex|apices|apical|upper lobe|upper chest", [(0.12, 0.50, 0.12, 0.88)]),
    (r"lower lobe", [(0.48, 0.80, 0.12, 0.88)]),
    (r"cardiac silhouette|heart border|\bheart\b", [(0.46, 0.84, 0.30, 0.78)]),
    (r"mediastin", [(0.12, 0.78, 0.38, 0.64)]),
    (r"hilum|hilar|perihilar", [(0.34, 0.66, 0.26, 0.74)]),
    (r"diaphragm|subdiaphragmatic", [(0.68, 0.96, 0.08, 0.92)]),
    (r"lung fields|both lungs|lung parenchyma", [(0.16, 0.84, 0.12, 0.88)]),
    (r"chest wall|pleura\b", [(0.16, 0.84, 0.06, 0.26), (0.16, 0.84, 0.74, 0.94)]),
    (r"\bjoint\b|articular|joint capsule", [(0.28, 0.72, 0.24, 0.76)]),
    (r"shaft|cortex|cortical", [(0.08, 0.92, 0.28, 0.72)]),
    (r"soft tissue", [(0.04, 0.96, 0.12, 0.88)]),
]


def region_prior(appearance: str, grid: int) -> np.ndarray:
    """[grid*grid] in [0, 1]: for each patch the largest share of it covered by a region the text names."""
    prior = np.zeros((grid, grid), np.float32)
    text = appearance.lower()
    edges = np.arange(grid + 1) / grid
    for pattern, boxes in REGION_MAP:
        if not re.search(pattern, text):
            continue
        for (t, b, l, r) in boxes:
            oy = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], t), 0, None) * grid  # [grid] row overlap
            ox = np.clip(np.minimum(edges[1:], r) - np.maximum(edges[:-1], l), 0, None) * grid  # [grid] col overlap
            prior = np.maximum(prior, np.outer(oy, ox))
    return prior.reshape(-1)


def image_patch_mask(appearance: str, grid: int, ratio: float, mode: str, boost: float,
                     rng: np.random.Generator) -> np.ndarray:
    """[grid*grid] bool, exactly round(ratio * N) True. adaptive: weights 1 + boost * region prior, drawn without
    replacement (Gumbel top-k); random: uniform."""
    n = grid * grid
    k = int(round(ratio * n))
    w = np.ones(n) if mode == "random" else 1.0 + boost * region_prior(appearance, grid)
    keys = np.log(w) + rng.gumbel(size=n)  # top-k of log w + Gumbel = sampling without replacement ∝ w
    mask = np.zeros(n, bool)
    mask[np.argsort(-keys)[:k]] = True
    return mask


def text_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int], ratio: float,
                    rngs: list[np.random.Generator]) -> torch.Tensor:
    """[B, L] bool: round(ratio * n_real) of each row's real (non-special, non-pad) tokens, at least one."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    special = torch.isin(input_ids, torch.tensor(special_ids)) | (attention_mask == 0)
    for b, rng in enumerate(rngs):
        cand = (~special[b]).nonzero().flatten().numpy()
        if len(cand) == 0:
            continue
        k = max(1, int(round(ratio * len(cand))))
        mask[b, torch.from_numpy(rng.choice(cand, size=k, replace=False))] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# ---- model (Sec. 2.2) ----


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_weight / in_proj_bias /
    out_proj), so torchvision's ViT weights load; the computation is F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, key_mask=None):  # x [B, S, C]; key_mask [B, S] True = attend
        B, S, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, S, 3, self.heads, C // self.heads) \
            .permute(2, 0, 3, 1, 4)  # 3 x [B, nh, S, hs]
        am = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, C))


class Block(nn.Module):
    """Pre-LN transformer block; names as torchvision's EncoderBlock (ln_1, self_attention, ln_2, mlp.0, mlp.3)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(0.0))
        for m in (self.mlp[0], self.mlp[3]):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x, key_mask=None):
        x = x + self.self_attention(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))


class ViTEncoder(nn.Module):
    def __init__(self, seq_len: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, dim).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", Block(dim, heads, 4 * dim)) for i in range(layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.grad_ckpt = False  # --grad_ckpt: keep each block's input only, recompute the block in the backward

    def forward(self, x):
        x = x + self.pos_embedding
        recompute = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for blk in self.layers:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        return self.ln(x)


class ViT(nn.Module):
    """E^i: ViT with torchvision VisionTransformer's state-dict names (class_token, conv_proj, encoder.*), so
    ViT_B_16_Weights.IMAGENET1K_V1 loads with load_state_dict; the demo builds the same class tiny."""

    def __init__(self, image_size: int, patch: int, dim: int, layers: int, heads: int, stem: str = "patch"):
        super().__init__()
        self.grid = image_size // patch
        if stem == "patch":
            self.conv_proj = nn.Conv2d(3, dim, patch, patch)
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (3 * patch * patch)))
            nn.init.zeros_(self.conv_proj.bias)
        elif stem in ("hmlp", "conv"):  # demo: a convolutional stem (common.ConvStem says why and what hmlp is)
            self.conv_proj = common.ConvStem(dim, patch, overlap=stem == "conv")
        else:
            raise common.ConfigError(f"--stem={stem}: expected patch | hmlp | conv")
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = ViTEncoder(self.grid ** 2 + 1, dim, layers, heads)

    def forward(self, x, patch_mask=None, mask_token=None):
        """x [B, 3, H, W] -> [B, 1 + N, C]; patches where patch_mask [B, N] is True are replaced by mask_token."""
        p = self.conv_proj(x).flatten(2).transpose(1, 2)  # [B, N, C]
        if patch_mask is not None:
            p = torch.where(patch_mask[..., None], mask_token.to(p.dtype).expand_as(p), p)
        x = torch.cat([self.class_token.expand(p.shape[0], -1, -1).to(p.dtype), p], 1)
        return self.encoder(x)


def build_image_encoder(cfg: Config) -> ViT:
    vit = ViT(cfg.image_size, cfg.vit_patch, cfg.vit_width, cfg.vit_layers, cfg.vit_heads, cfg.stem)
    if cfg.pretrained:
        if (cfg.image_size, cfg.vit_patch, cfg.stem, cfg.vit_width, cfg.vit_layers) != (224, 16, "patch", 768, 12):
            raise common.ConfigError("--pretrained ViT-B/16 weights need --image_size=224 --vit_patch=16 --stem=patch "
                                     "--vit_width=768 --vit_layers=12 --vit_heads=12")
        tv = common.load_torchvision_model("vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1")
        sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("heads.")}  # drop the ImageNet classifier
        vit.load_state_dict(sd, strict=True)
    return vit


def build_text_encoder(cfg: Config, vocab_size: int):
    from transformers import AutoModel, BertConfig, BertModel

    if cfg.text_encoder == "tiny":
        bc = BertConfig(vocab_size=vocab_size, hidden_size=cfg.bert_width, num_hidden_layers=cfg.bert_layers,
                        num_attention_heads=max(1, cfg.bert_width // 32), intermediate_size=cfg.bert_width * 4,
                        max_position_embeddings=cfg.max_tokens, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
        bc._attn_implementation = "sdpa"
        return BertModel(bc, add_pooling_layer=False)
    if cfg.pretrained:
        return common.hf_from_pretrained(AutoModel, cfg.text_encoder, add_pooling_layer=False,
                                         attn_implementation="sdpa")
    # a named model without its weights (also what load() rebuilds): BERT-base shape, weights from the checkpoint
    bc = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, cfg.max_tokens))
    bc._attn_implementation = "sdpa"
    return BertModel(bc, add_pooling_layer=False)


class GaussianHead(nn.Module):
    """Eq. (1): features [..., C] -> (μ [..., D], σ² [..., D]); σ² = softplus(a) or exp(a), plus a floor."""

    def __init__(self, c_in: int, dim: int, var_param: str, var_floor: float):
        super().__init__()
        if var_param not in ("softplus", "exp"):
            raise common.ConfigError(f"--var_param={var_param}: expected softplus | exp")
        self.mu, self.var = nn.Linear(c_in, dim), nn.Linear(c_in, dim)
        self.var_param, self.var_floor = var_param, var_floor
        nn.init.normal_(self.var.weight, std=0.01)  # start with nearly equal variances
        nn.init.zeros_(self.var.bias)

    def forward(self, h):
        a = self.var(h).float()
        var = F.softplus(a) if self.var_param == "softplus" else torch.exp(a.clamp(max=30.0))
        return self.mu(h).float(), var + self.var_floor


class DMLM(nn.Module):
    def __init__(self, cfg: Config, tokenizer, knowledge: dict):
        super().__init__()
        self.cfg, self.tokenizer, self.knowledge = cfg, tokenizer, knowledge
        # an over-long report loses the START of its Definition, never its Observations / Verdicts
        self.tokenizer.truncation_side = "left"
        self.visual = build_image_encoder(cfg)
        self.text = build_text_encoder(cfg, len(tokenizer))
        cv, ct, fw = cfg.vit_width, self.text.config.hidden_size, cfg.fusion_width
        self.image_gauss = GaussianHead(cv, cfg.embed_dim, cfg.var_param, cfg.var_floor)  # Eq. (1), every patch
        self.text_gauss = GaussianHead(ct, cfg.embed_dim, cfg.var_param, cfg.var_floor)  # Eq. (1), every token
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cv))  # stands in for a masked patch (SimMIM-style)
        nn.init.normal_(self.mask_token, std=0.02)
        # Eq. (2): the fusion transformer sees the masked pass of both modalities
        self.fuse_image, self.fuse_text = nn.Linear(cv, fw), nn.Linear(ct, fw)
        self.modality = nn.Parameter(torch.zeros(2, fw))  # image / text type embedding
        self.fusion = nn.ModuleList(Block(fw, cfg.fusion_heads, 4 * fw) for _ in range(cfg.fusion_layers))
        self.fusion_ln = nn.LayerNorm(fw, eps=1e-6)
        self.pred_image = GaussianHead(fw, cfg.embed_dim, cfg.var_param, cfg.var_floor)  # N(μ̂_p, σ̂_p²)
        self.pred_text = GaussianHead(fw, cfg.embed_dim, cfg.var_param, cfg.var_floor)  # N(μ̂_t, σ̂_t²)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        if cfg.grad_ckpt:  # for batches that do not fit: both encoders recompute their layers in the backward
            self.visual.encoder.grad_ckpt = True
            common.hf_grad_ckpt(self.text)

    def encoder_parameters(self):
        """The parameters trained at --encoder_lr (Sec. 3.5)."""
        return list(self.visual.parameters()) + list(self.text.parameters())

    # -- Gaussians of every patch / token (Eq. 1), and the global ones (the same heads on pooled features)
    def image_gaussians(self, images, patch_mask=None):  # -> μ, σ² [B, 1 + N, D] (index 0: class token)
        return self.image_gauss(self.visual(images, patch_mask, self.mask_token))

    def text_gaussians(self, input_ids, attention_mask):  # -> μ, σ² [B, L, D] (index 0: [CLS])
        return self.text_gauss(self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)

    def pool_image(self, h):  # [B, 1+N, C] -> [B, C]: class token, or mean of the patches (--pool)
        return h[:, 0] if self.cfg.pool == "cls" else h[:, 1:].mean(1)

    def pool_text(self, h, attention_mask):  # [B, L, C] -> [B, C]: [CLS], or mean of the real tokens
        if self.cfg.pool == "cls":
            return h[:, 0]
        m = attention_mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, images, input_ids, attention_mask, masked_ids=None, patch_mask=None):
        """One training pass: unmasked Gaussians (alignment; stop-gradient targets) and the fusion transformer's
        predictions for every position of the masked pass (Eq. 2; the loss picks the masked ones).
        Without masked_ids: the global Gaussians alone (a CLIP-like alignment pass; --benchmark compares)."""
        hv0 = self.visual(images)  # [B, 1+N, Cv] unmasked
        ht0 = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, Ct]
        if masked_ids is None:
            ig_mu, ig_var = self.image_gauss(self.pool_image(hv0))
            tg_mu, tg_var = self.text_gauss(self.pool_text(ht0, attention_mask))
            return {"img_g_mu": ig_mu, "img_g_var": ig_var, "txt_g_mu": tg_mu, "txt_g_var": tg_var}
        img_mu, img_var = self.image_gauss(hv0)  # [B, 1+N, D] every patch (Eq. 1)
        txt_mu, txt_var = self.text_gauss(ht0)  # [B, L, D] every token (Eq. 1)
        ig_mu, ig_var = self.image_gauss(self.pool_image(hv0))  # [B, D] global image Gaussian
        tg_mu, tg_var = self.text_gauss(self.pool_text(ht0, attention_mask))  # [B, D] global report Gaussian
        hv = self.visual(images, patch_mask, self.mask_token)  # [B, 1+N, Cv], masked patches -> mask token
        ht = self.text(input_ids=masked_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, Ct]
        z = torch.cat([self.fuse_image(hv) + self.modality[0], self.fuse_text(ht) + self.modality[1]], 1)
        keep = torch.cat([torch.ones(hv.shape[:2], dtype=torch.bool, device=z.device), attention_mask.bool()], 1)
        for blk in self.fusion:
            z = blk(z, keep)
        z = self.fusion_ln(z)
        n1 = hv.shape[1]
        pi_mu, pi_var = self.pred_image(z[:, 1:n1])  # [B, N, D] patch predictions
        pt_mu, pt_var = self.pred_text(z[:, n1:])  # [B, L, D] token predictions
        return {"img_mu": img_mu, "img_var": img_var, "txt_mu": txt_mu, "txt_var": txt_var,
                "img_g_mu": ig_mu, "img_g_var": ig_var, "txt_g_mu": tg_mu, "txt_g_var": tg_var,
                "pred_img_mu": pi_mu, "pred_img_var": pi_var, "pred_txt_mu": pt_mu, "pred_txt_var": pt_var}

    # -- interface used by evaluate.py
    def _device(self):
        return self.logit_scale.device

    def tokenize(self, texts: list[str]) -> dict:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_tokens,
                                   return_tensors="pt", return_token_type_ids=False))

    def _tok(self, texts):
        if isinstance(texts, (list, tuple)):
            texts = self.tokenize(texts)
        return {k: v.to(self._device()) for k, v in texts.items()}

    def image_gaussian(self, images):
        """Global image Gaussian: μ, σ² [B, D]."""
        return self.image_gauss(self.pool_image(self.visual(images)))

    def text_gaussian(self, texts):
        """Global report Gaussian: μ, σ² [B, D]. texts: list of strings or a token batch."""
        t = self._tok(texts)
        h = self.text(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
        return self.text_gauss(self.pool_text(h, t["attention_mask"]))

    def encode_image(self, images):  # [B, 3, H, W] -> [B, D], L2-normalised mean
        return F.normalize(self.image_gaussian(images)[0], dim=-1)

    def encode_text(self, texts):  # list[str] -> [B, D], L2-normalised mean
        return F.normalize(self.text_gaussian(texts)[0], dim=-1)

    def image_uncertainty(self, images):  # [B]: mean σ² of the global image Gaussian
        return self.image_gaussian(images)[1].mean(-1)

    def text_uncertainty(self, texts):  # [B]: mean σ² of the global report Gaussian
        return self.text_gaussian(texts)[1].mean(-1)

    def image_tokens(self, images):  # [B, N, C] patch features (no class token), for segmentation heads
        return self.visual(images)[:, 1:]

    def image_transform(self, train: bool):
        return ImageTransform(self.cfg.image_size, train)

    def zeroshot_prompts(self, label: str):
        return zeroshot_prompts(label, self.knowledge)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


class EMATarget(nn.Module):
    """--target=ema: a slowly moving copy of the encoders and Gaussian heads that produces the Eq. (3) targets."""

    def __init__(self, model: DMLM):
        super().__init__()
        self.visual, self.text = copy.deepcopy(model.visual), copy.deepcopy(model.text)
        self.image_gauss, self.text_gauss = copy.deepcopy(model.image_gauss), copy.deepcopy(model.text_gauss)
        self.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: DMLM, decay: float):
        for name in ("visual", "text", "image_gauss", "text_gauss"):
            for pe, p in zip(getattr(self, name).parameters(), getattr(model, name).parameters()):
                pe.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def forward(self, images, input_ids, attention_mask):
        img = self.image_gauss(self.visual(images))
        txt = self.text_gauss(self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
        return img, txt


# ----------------------------------------------------------------------------------------------------
# ---- losses (Sec. 2.3) ----


# Eq. (3)'s summand: KL(N(μp, σp²) || N(μq, σq²)) of diagonal Gaussians, summed over the D dimensions.
# μ*, σ²*: [..., D] -> [...]
def gaussian_kl(mu_p, var_p, mu_q, var_q):
    return 0.5 * (torch.log(var_q) - torch.log(var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0).sum(-1)


# Eq. (3), Sec. 2.3: Σ over masked text tokens + Σ over masked image patches of KL(prediction || target).
# pred_* / tgt_*: [B, L, D] (text), [B, N, D] (image); *_mask: [B, L] / [B, N] bool. reduce: see Config.kl_reduce.
def dmlm_loss(pt_mu, pt_var, tt_mu, tt_var, text_mask, pi_mu, pi_var, ti_mu, ti_var, patch_mask, reduce="mean"):
    kl_t = gaussian_kl(pt_mu[text_mask], pt_var[text_mask], tt_mu[text_mask], tt_var[text_mask])  # [n_t]
    kl_i = gaussian_kl(pi_mu[patch_mask], pi_var[patch_mask], ti_mu[patch_mask], ti_var[patch_mask])  # [n_i]
    total = kl_t.sum() + kl_i.sum()
    if reduce == "sum":
        return total / text_mask.shape[0]  # E over pairs of the per-pair sum
    return total / max(1, (kl_t.numel() + kl_i.numel()) * pt_mu.shape[-1])


# Eq. (4)'s W: squared 2-Wasserstein distance of diagonal Gaussians, ||μ1-μ2||² + ||σ1-σ2||². [..., D] -> [...]
def w2_squared(mu1, var1, mu2, var2):
    return ((mu1 - mu2) ** 2).sum(-1) + ((var1.sqrt() - var2.sqrt()) ** 2).sum(-1)


# The same for every pair of rows: [n, D] x [m, D] -> [n, m] (expanded squares: no [n, m, D] tensor).
def w2_squared_pairwise(mu1, var1, mu2, var2):
    s1, s2 = var1.sqrt(), var2.sqrt()
    sq = lambda a, b: (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2 * a @ b.T  # noqa: E731
    return (sq(mu1, mu2) + sq(s1, s2)).clamp(min=0)


# Eq. (4), Sec. 2.3, literally: Σ over aligned (report, image) pairs of W², averaged over the batch.
def align_pairs_loss(img_mu, img_var, txt_mu, txt_var):
    return w2_squared(txt_mu, txt_var, img_mu, img_var).mean()


# Eq. (4) with negatives (--align=contrastive): similarity = -W2²/2, symmetric InfoNCE over the GLOBAL batch.
# With unit-norm means -W2²/2 = cos(μ1, μ2) - 1 - ||σ1-σ2||²/2: CLIP's logit plus a variance term, so the usual
# temperature applies. Each rank scores its b rows against all n = world*b gathered rows (labels arange(b) +
# b*rank, as open_clip).
def align_contrastive_loss(img_mu, img_var, txt_mu, txt_var, scale):
    gi_mu, gi_var = common.all_gather_with_grad(img_mu), common.all_gather_with_grad(img_var)  # [n, D]
    gt_mu, gt_var = common.all_gather_with_grad(txt_mu), common.all_gather_with_grad(txt_var)
    target = torch.arange(img_mu.shape[0], device=img_mu.device) + common.rank_offset(img_mu.shape[0])
    logits_i = -0.5 * scale * w2_squared_pairwise(img_mu, img_var, gt_mu, gt_var)  # [b, n] image -> reports
    logits_t = -0.5 * scale * w2_squared_pairwise(txt_mu, txt_var, gi_mu, gi_var)  # [b, n] report -> images
    return 0.5 * (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_t, target))


# Eq. (5), Sec. 2.3: L = λ L_D-MLM + (1-λ) L_align.
def total_loss(l_dmlm, l_align, lam: float):
    return lam * l_dmlm + (1 - lam) * l_align


def dmlm_objective(out: dict, targets, text_mask, patch_mask, cfg: Config, scale) -> tuple[torch.Tensor, dict]:
    """Eq. (3) + (4) + (5) from a forward pass. targets: ((μ, σ²) image [B,1+N,D], (μ, σ²) text [B,L,D])."""
    (ti_mu, ti_var), (tt_mu, tt_var) = targets
    l_dmlm = dmlm_loss(out["pred_txt_mu"], out["pred_txt_var"], tt_mu, tt_var, text_mask,
                       out["pred_img_mu"], out["pred_img_var"], ti_mu[:, 1:], ti_var[:, 1:], patch_mask,
                       cfg.kl_reduce)
    i_mu, i_var, t_mu, t_var = out["img_g_mu"], out["img_g_var"], out["txt_g_mu"], out["txt_g_var"]  # [B, D]
    if cfg.align_norm_means:
        i_mu, t_mu = F.normalize(i_mu, dim=-1), F.normalize(t_mu, dim=-1)
    if cfg.align == "contrastive":
        l_align = align_contrastive_loss(i_mu, i_var, t_mu, t_var, scale)
    else:
        l_align = align_pairs_loss(i_mu, i_var, t_mu, t_var)
    loss = total_loss(l_dmlm, l_align, cfg.lam)
    return loss, {"dmlm": l_dmlm.detach(), "align": l_align.detach(),
                  "var_img": i_var.detach().mean(), "var_txt": t_var.detach().mean()}


# ----------------------------------------------------------------------------------------------------
# ---- data (Sec. 2.1, 2.2) ----


class ImageTransform:
    """Train: random resized crop with scale [0.9, 1.05] (small, so the region prior still points at the right
    patches) and brightness / contrast jitter; eval: resize only. uint8 [H, W] -> normalised float [3, S, S].
    The paper gives no augmentation."""

    def __init__(self, size: int, train: bool):
        self.size, self.train = size, train

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        if not self.train:
            return common.to_tensor(common.resize(img, self.size))
        rng = rng or np.random.default_rng()
        if max(img.shape) > 2 * self.size:  # crop from a smaller copy: same result, far less work
            img = common.resize(img, 2 * self.size)
        img = common.random_resized_crop(img, self.size, rng, scale=(0.9, 1.05), ratio=(0.95, 1.05))
        img = common.color_jitter(img, rng, brightness=(0.9, 1.1), contrast=(0.9, 1.1))
        return common.to_tensor(img)


class PairDataset(torch.utils.data.Dataset):
    """Item = one image with its study's structured report and its patch mask (Sec. 2.1, 2.2).

    Indexed by (row index, sample seed) from common.EpochSampler: the augmentation and both masks are functions
    of (seed, epoch, row) alone. An unreadable image is replaced by the next row; every replacement is reported
    in the sample's "bad" field and counted by the training loop.
    """

    def __init__(self, table: common.XrayCSV, cfg: Config, knowledge: dict, train: bool = True):
        self.t, self.cfg, self.train = table, cfg, train
        self.transform = ImageTransform(cfg.image_size, train)
        self.grid = cfg.image_size // cfg.vit_patch
        self.reports = [structured_report(table.label_names, table.rows[i]["_labels"], observations(table, i), knowledge,
                                          cfg.verdict_negatives) for i in range(len(table))]

    def __len__(self):
        return len(self.t)

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        bad = []
        for attempt in range(8):
            i = (idx + attempt * 7919) % len(self.t)
            try:
                img = common.load_image(self.t.rows[i]["_path"])
                break
            except common.BadImageError as e:
                bad.append(("unreadable image", str(e)))
        else:
            raise RuntimeError(f"8 images in a row around row {idx} are unreadable: is the image folder next to "
                               f"{self.t.path}? First error: {bad[0][1]}")
        report = self.reports[i]
        pmask = image_patch_mask(appearance_of(report), self.grid, self.cfg.image_mask_ratio, self.cfg.image_mask,
                                 self.cfg.region_boost, rng)
        return {"x": self.transform(img, rng), "text": report, "patch_mask": torch.from_numpy(pmask),
                "seed": int(rng.integers(2**62)), "bad": bad}


class Collate:
    """Stacks images and patch masks, tokenises the reports and draws the 30% text mask (in the worker)."""

    def __init__(self, tokenize, tokenizer, ratio: float):
        self.tokenize, self.ratio = tokenize, ratio
        self.special = [i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
                        if i is not None]
        self.mask_id = tokenizer.mask_token_id

    def __call__(self, items):
        t = self.tokenize([it["text"] for it in items])
        tmask = text_token_mask(t["input_ids"], t["attention_mask"], self.special, self.ratio,
                                [np.random.default_rng(it["seed"]) for it in items])
        return {"x": torch.stack([it["x"] for it in items]), "input_ids": t["input_ids"],
                "attention_mask": t["attention_mask"], "masked_ids": t["input_ids"].masked_fill(tmask, self.mask_id),
                "text_mask": tmask, "patch_mask": torch.stack([it["patch_mask"] for it in items]),
                "bad": [b for it in items for b in it["bad"]]}


def make_loader(ds, cfg: Config, di: common.DistInfo, local_batch: int, shuffle: bool, model):
    sampler = common.EpochSampler(len(ds), local_batch, di.rank, di.world_size, cfg.seed, shuffle=shuffle)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=local_batch, sampler=sampler,
        collate_fn=Collate(model.tokenize, model.tokenizer, cfg.text_mask_ratio), num_workers=cfg.num_workers,
        pin_memory=di.device.startswith("cuda"), persistent_workers=cfg.num_workers > 0, drop_last=True,
        prefetch_factor=4 if cfg.num_workers > 0 else None)
    return loader, sampler


# ----------------------------------------------------------------------------------------------------
# ---- build / load ----


def all_prompt_texts(labels: list[str], know: dict) -> list[str]:
    out = []
    for n in labels:
        p, q = zeroshot_prompts(n, know)
        out += p + q
    return out


def build_tokenizer(cfg: Config, table: common.XrayCSV | None, know: dict):
    if cfg.text_encoder != "tiny" and cfg.pretrained:
        from transformers import AutoTokenizer

        return common.hf_from_pretrained(AutoTokenizer, cfg.text_encoder)
    if table is None:
        raise ValueError("a tokenizer fitted on the training reports needs the training CSV")
    texts = [structured_report(table.label_names, table.rows[i]["_labels"], observations(table, i), know,
                               cfg.verdict_negatives) for i in range(len(table))] + all_prompt_texts(table.label_names, know)
    texts += [e[k] for e in know.values() for k in ("definition", "appearance")]
    return common.train_wordpiece(texts, cfg.vocab_size)


def _check(cfg: Config):
    for k, ok in (("image_mask", ("adaptive", "random")), ("target", ("stopgrad", "ema")),
                  ("align", ("contrastive", "pairs")), ("kl_reduce", ("mean", "sum")),
                  ("zeroshot_score", ("mean", "w2")), ("var_param", ("softplus", "exp")), ("pool", ("mean", "cls"))):
        if getattr(cfg, k) not in ok:
            raise common.ConfigError(f"--{k}={getattr(cfg, k)}: expected {' | '.join(ok)}")
    if cfg.image_size % cfg.vit_patch:
        raise common.ConfigError(f"--image_size={cfg.image_size} must be a multiple of --vit_patch={cfg.vit_patch}")


def build(cfg: Config, tokenizer=None, table: common.XrayCSV | None = None, knowledge: dict | None = None) -> DMLM:
    _check(cfg)
    knowledge = knowledge if knowledge is not None else load_knowledge(cfg.knowledge)
    tokenizer = tokenizer or build_tokenizer(cfg, table, knowledge)
    return DMLM(cfg, tokenizer, knowledge)


def load(path: str, map_location="cpu") -> tuple[DMLM, Config]:
    """Rebuild the model from a checkpoint alone: config, tokenizer vocabulary and knowledge are stored in it."""
    ck = common.load_checkpoint(path, map_location)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    tok = common.tokenizer_from_vocab(ck["tokenizer_vocab"]) if ck.get("tokenizer_vocab") else None
    if tok is None:  # a pretrained tokenizer (paper preset): loaded by name, like the weights were
        from transformers import AutoTokenizer

        tok = common.hf_from_pretrained(AutoTokenizer, cfg.text_encoder)
    cfg.pretrained = False  # the weights come from the checkpoint, not from ImageNet / the hub
    model = DMLM(cfg, tok, ck["knowledge"])
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg


# ----------------------------------------------------------------------------------------------------
# ---- evaluation: zero-shot classification (Sec. 3.2) ----


@torch.no_grad()
def embed_images(model, table: common.XrayCSV, device, batch_size: int = 256, counter=None):
    """Global image Gaussians (μ normalised, σ²) [N, D] of every row (eval transform), and a readable-row mask."""
    tf = model.image_transform(False)
    mus, vars_, ok = [], [], np.ones(len(table), bool)
    for s in range(0, len(table), batch_size):
        xs = []
        for i in range(s, min(s + batch_size, len(table))):
            try:
                xs.append(tf(common.load_image(table.rows[i]["_path"])))
            except common.BadImageError as e:
                ok[i] = False
                if counter is not None:
                    counter.add("unreadable image", str(e))
                xs.append(torch.zeros(3, model.cfg.image_size, model.cfg.image_size))
        mu, var = model.image_gaussian(torch.stack(xs).to(device))
        mus.append(F.normalize(mu, dim=-1).cpu())
        vars_.append(var.cpu())
    return torch.cat(mus), torch.cat(vars_), ok


@torch.no_grad()
def zeroshot_eval(model, table: common.XrayCSV, device, batch_size: int = 256, score: str = "mean") -> dict:
    """Per class: similarity to the positive prompts minus similarity to the negative prompts (the logit of
    CheXzero's softmax over the pair). mean: cosine of the normalised means, prompt embeddings averaged;
    w2: -W2² between the image Gaussian and each prompt Gaussian, averaged over prompts."""
    model.eval()
    i_mu, i_var, ok = embed_images(model, table, device, batch_size)
    scores = np.zeros((len(table), len(table.label_names)), np.float32)
    for j, name in enumerate(table.label_names):
        side = []
        for prompts in model.zeroshot_prompts(name):
            mu, var = model.text_gaussian(prompts)
            mu, var = F.normalize(mu, dim=-1).cpu(), var.cpu()
            if score == "w2":
                side.append(-w2_squared_pairwise(i_mu, i_var, mu, var).mean(1))
            else:
                side.append(i_mu @ F.normalize(mu.mean(0), dim=-1))
        scores[:, j] = (side[0] - side[1]).numpy()
    res = common.auc_per_label(table.labels()[ok], scores[ok], table.label_names)
    return {"zeroshot_auc_macro": res["macro"], "zeroshot_auc_per_label": res["per_label"],
            "zeroshot_score": score, "n_images": int(ok.sum()),
            "image_variance_mean": float(i_var[torch.from_numpy(ok)].mean())}


# ----------------------------------------------------------------------------------------------------
# ---- training ----


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine annealing to 0 at `total` (Sec. 3.5)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def amp_context(cfg: Config, device: str):
    """bf16 autocast on GPUs that support it (no scaler needed), else fp16 + GradScaler; fp32 on CPU."""
    mode = cfg.amp
    if mode == "auto":
        mode = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.startswith("cuda") else "off"
    if mode == "off":
        return nullcontext, None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    scaler = torch.amp.GradScaler(dev_type) if mode == "fp16" else None
    return (lambda: torch.autocast(dev_type, dtype=dtype)), scaler


def param_groups(model: DMLM, cfg: Config):
    """Sec. 3.5: encoders at --encoder_lr, everything else at --lr; weight decay on matrices only."""
    enc = {id(p) for p in model.encoder_parameters()}
    groups = []
    for is_enc, lr in ((True, cfg.encoder_lr), (False, cfg.lr)):
        ps = [p for p in model.parameters() if p.requires_grad and (id(p) in enc) == is_enc]
        groups.append({"params": [p for p in ps if p.ndim >= 2 and p is not model.mask_token],
                       "weight_decay": cfg.weight_decay, "lr": lr})
        groups.append({"params": [p for p in ps if p.ndim < 2 or p is model.mask_token],
                       "weight_decay": 0.0, "lr": lr})
    return groups


def train(cfg: Config) -> dict:
    _check(cfg)
    di = common.setup_distributed(cfg.device)
    if cfg.batch_size % di.world_size:
        raise common.ConfigError(f"--batch_size={cfg.batch_size} (global) must divide by the {di.world_size} processes")
    local_batch = cfg.batch_size // di.world_size
    out = common.prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite) if di.is_main else None  # noqa: F841
    common.seed_everything(cfg.seed)
    common.set_cpu_threads(cfg.threads, di.device)
    if di.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere+ for fp32 parts
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    # -- data: the demo makes its phantom data set on first use
    if cfg.data == Config.data:
        common.ensure_phantoms(cfg.data, cfg.n_phantoms, seed=0, size=64)
    if not cfg.data:
        raise common.ConfigError("--data=<csv> is required with --preset=paper (see data_prep.py)")
    counter = common.BadSampleCounter(cfg.max_bad_frac, "bad samples: ")
    tr = common.XrayCSV(cfg.data, split="train", require=("image",), require_text=True, counter=counter)
    te = common.XrayCSV(cfg.data, split="test", require=("image",), counter=counter)

    # -- model: the tokenizer is fitted on the training reports; every rank fits the same one
    ck = common.load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")) if cfg.resume else None
    know = ck["knowledge"] if ck else load_knowledge(cfg.knowledge)
    missing = [n for n in tr.label_names if _lookup(know, n) is None]
    if missing:
        common.print0(f"warning: {cfg.knowledge} has no definition / appearance for {missing}; their structured "
                      f"reports keep only observations and verdicts (make one with data_prep.py knowledge)")
    tok = common.tokenizer_from_vocab(ck["tokenizer_vocab"]) if ck and ck.get("tokenizer_vocab") else None
    model = build(cfg, tok, tr, know).to(di.device)
    vocab = None if (cfg.text_encoder != "tiny" and cfg.pretrained) else common.tokenizer_vocab(model.tokenizer)
    ema = EMATarget(model).to(di.device) if cfg.target == "ema" else None

    train_ds = PairDataset(tr, cfg, know, train=True)
    loader, sampler = make_loader(train_ds, cfg, di, local_batch, True, model)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch

    fused = di.device.startswith("cuda")
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
    autocast, scaler = amp_context(cfg, di.device)

    step, start_epoch, start_batch = 0, 0, 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ema is not None and ck.get("ema"):
            ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, start_epoch, start_batch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        common.set_rng_state(ck["rng"])
        changed = {k: (v, getattr(cfg, k)) for k, v in ck["config"].items()
                   if k not in ("resume", "max_steps", "overwrite") and getattr(cfg, k, v) != v}
        if changed:
            common.print0(f"warning: flags differ from the checkpoint's run (saved, now): {changed}")
        common.print0(f"resumed from {cfg.out_dir}/ckpt.pt at step {step} (epoch {start_epoch}, batch {start_batch})")
        if di.is_main:
            common.truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), step)
        del ck
    logger = common.JSONLLogger(os.path.join(cfg.out_dir, "log.jsonl"), resume=cfg.resume)

    raw_model = model  # checkpoints hold the plain module: no "module." or "_orig_mod." prefixes
    if cfg.compile:
        model = torch.compile(model)
    if di.ddp:
        # --align=pairs leaves the temperature unused, which DDP must be told about
        model = nn.parallel.DistributedDataParallel(model, device_ids=[di.local_rank] if fused else None,
                                                    find_unused_parameters=cfg.align == "pairs")

    def save(epoch, batch_in_epoch):
        if di.is_main:
            common.save_checkpoint({
                "model": raw_model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "rng": common.rng_state(), "config": dataclasses.asdict(cfg),
                "tokenizer_vocab": vocab, "knowledge": know, "paper": "dmlm",
            }, os.path.join(cfg.out_dir, "ckpt.pt"))
        if di.ddp:
            torch.distributed.barrier()

    def forward_loss(batch):
        dev = di.device
        b = {k: v.to(dev, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        with autocast():
            out = model(b["x"], b["input_ids"], b["attention_mask"], b["masked_ids"], b["patch_mask"])
            if ema is not None:  # Eq. (3) targets from the EMA encoder
                targets = ema(b["x"], b["input_ids"], b["attention_mask"])
            else:  # ... or from the online encoder's unmasked pass under stop-gradient
                targets = ((out["img_mu"].detach(), out["img_var"].detach()),
                           (out["txt_mu"].detach(), out["txt_var"].detach()))
        out = {k: v.float() for k, v in out.items()}
        targets = tuple((m.float(), v.float()) for m, v in targets)
        return dmlm_objective(out, targets, b["text_mask"], b["patch_mask"], cfg, raw_model.scale())

    stopper = common.StopSignal()
    common.print0(f"dmlm: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, "
                  f"{len(tr)} training images, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
                  f"global batch {cfg.batch_size} on {di.world_size} process(es), device {di.device}, "
                  f"align={cfg.align} target={cfg.target} image_mask={cfg.image_mask}")
    t_start, bad_run, n_skipped, stop_reason, fault_done = time.time(), 0, 0, None, False
    pbar = None
    if di.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps if cfg.max_steps < 0 else min(total_steps, cfg.max_steps), initial=step,
                    desc="dmlm", unit="step", dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        model.train()
        bi = start_batch if epoch == start_epoch else 0
        for batch in loader:
            for kind, detail in batch["bad"]:
                counter.add(kind, detail)
            counter.seen += local_batch
            loss, parts = forward_loss(batch)
            if cfg.fault_nan_step == step and di.rank == 0 and not fault_done:  # test hook: one NaN, rank 0 only
                loss, fault_done = loss * float("nan"), True
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            gnorm = nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
            # a non-finite loss or gradient on ANY rank skips the step on ALL ranks (ranks must never diverge)
            if common.all_reduce_flag(not (torch.isfinite(loss) and torch.isfinite(gnorm))):
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                bad_run, n_skipped, bi = bad_run + 1, n_skipped + 1, bi + 1  # the batch is consumed all the same
                common.print0(f"warning: non-finite loss/gradient at step {step}: step skipped "
                              f"({bad_run} in a row, {n_skipped} in all)")
                logger.log(step=step, skipped_nonfinite=True)
                if bad_run >= cfg.max_bad_steps:
                    save(epoch, bi)
                    raise SystemExit(f"stopping: {bad_run} non-finite steps in a row (--max_bad_steps="
                                     f"{cfg.max_bad_steps}); last good state saved in {cfg.out_dir}/ckpt.pt. Lower "
                                     f"--lr, check the data, or try --amp=off.")
                continue
            bad_run = 0
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if ema is not None:
                ema.update(raw_model, cfg.ema_decay)
            step, bi = step + 1, bi + 1
            if step % cfg.log_every == 0 or step == 1:
                row = {"step": step, "epoch": epoch, "loss": common.all_reduce_mean(loss.detach()),
                       **{k: common.all_reduce_mean(v) for k, v in parts.items()},
                       "lr": sched.get_last_lr()[-1], "encoder_lr": sched.get_last_lr()[0],
                       "temperature": 1 / float(raw_model.scale().detach()), "elapsed_s": round(time.time() - t_start, 2)}
                logger.log(**row)
                if pbar:
                    pbar.set_postfix(loss=f"{row['loss']:.3f}", align=f"{row['align']:.3f}",
                                     dmlm=f"{row['dmlm']:.3f}")
            if pbar:
                pbar.update(1)
            if step % cfg.ckpt_every == 0:
                save(epoch, bi)
            if cfg.max_steps >= 0 and step >= cfg.max_steps:
                stop_reason = f"--max_steps={cfg.max_steps} reached"
            elif stopper.should_stop():
                stop_reason = f"{stopper.name or 'stop signal'} received"
            if stop_reason:
                break
        if stop_reason:
            save(epoch, bi)
            break
        # -- end of epoch: bad-sample report, checkpoint
        counter.check()
        start_batch = 0
        save(epoch + 1, 0)
    if pbar:
        pbar.close()
    stopper.restore()  # SIGTERM / Ctrl-C act normally again (and in processes forked from here on)
    common.print0(counter.summary())
    common.print0(f"training: {step} steps in {time.time() - t_start:.1f} s" + (f" ({stop_reason})" if stop_reason else ""))
    if stop_reason:
        common.print0(f"checkpoint written to {cfg.out_dir}/ckpt.pt; continue with --resume")
        common.cleanup_distributed()
        return {"stopped": stop_reason, "step": step}

    # -- zero-shot evaluation on the test split, on rank 0 (the others wait at the barrier: it is small)
    metrics = {}
    if di.is_main:
        metrics = zeroshot_eval(raw_model, te, di.device, cfg.eval_batch_size, cfg.zeroshot_score)
        metrics.update(step=step, train_seconds=round(time.time() - t_start, 1), bad_samples=dict(counter.counts),
                       skipped_nonfinite_steps=n_skipped)
        common.write_json_atomic(os.path.join(cfg.out_dir, "metrics.json"), metrics)
        print(f"zero-shot macro AUC on the test split: {metrics['zeroshot_auc_macro']:.4f} "
              f"({metrics['n_images']} images, score={cfg.zeroshot_score})")
        for n, a in metrics["zeroshot_auc_per_label"].items():
            print(f"  {n:<24} {'undefined (one class only)' if a is None else f'{a:.4f}'}")
        print(f"wrote {cfg.out_dir}/metrics.json")
    common.cleanup_distributed()
    return metrics


# ----------------------------------------------------------------------------------------------------
# ---- benchmark (python dmlm.py --preset=paper --pretrained=false --benchmark) ----


def benchmark(cfg: Config) -> dict:
    """Training steps of the preset's model and batch on synthetic tensors of the real shapes (random init, no
    data loading): samples/s, step time, peak memory, FLOPs per sample (FlopCounterMode on the eager model), MFU
    against the GPU's bf16 peak; once for the full D-MLM step (unmasked pass = alignment + Eq. 3 targets, masked
    pass, fusion transformer, Eq. 3-5) and once, on the same model and batch, for the alignment loss alone (a
    CLIP-like step), with the time and FLOPs ratios. `--benchmark=data` times the input pipeline instead."""
    _check(cfg)
    di = common.setup_distributed(cfg.device)
    common.set_cpu_threads(cfg.threads, di.device)
    common.seed_everything(cfg.seed)
    if cfg.benchmark == "data":
        cfg.data = common.benchmark_data_csv(cfg.data, Config.data, cfg.n_phantoms)
        tr = common.XrayCSV(cfg.data, split="train", require=("image",), require_text=True)
        know = load_knowledge(cfg.knowledge)
        tok = build_tokenizer(cfg, tr, know)
        tok.truncation_side = "left"
        ds = PairDataset(tr, cfg, know, train=True)
        keyed = [(i, i) for i in range(len(ds))]
        res = common.benchmark_data(torch.utils.data.Subset(ds, keyed), Collate(lambda t: dict(tok(
            list(t), padding=True, truncation=True, max_length=cfg.max_tokens, return_tensors="pt",
            return_token_type_ids=False)), tok, cfg.text_mask_ratio), batch_size=min(64, cfg.batch_size),
            workers=common.parse_workers(cfg.benchmark_workers), n_batches=10)
        common.cleanup_distributed()
        return {"data": res}
    if cfg.benchmark != "model":
        raise common.ConfigError(f"--benchmark={cfg.benchmark}: expected off | model | data")
    if di.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg.pretrained = False  # random init: the benchmark measures speed, not accuracy
    # a named BERT is built at BERT-base shape; its vocabulary is ClinicalBERT's (bert-base-cased, 28996 tokens)
    n_vocab = cfg.vocab_size if cfg.text_encoder == "tiny" else 28996
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(n_vocab - 5)]
    tok = common.tokenizer_from_vocab(vocab)
    model = build(cfg, tok, knowledge={}).to(di.device)
    ema = EMATarget(model).to(di.device) if cfg.target == "ema" else None
    b = cfg.batch_size // di.world_size
    grid = cfg.image_size // cfg.vit_patch
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    # structured reports are long: every row at --max_tokens ([CLS] ... [SEP]), 30% of its tokens masked
    ids = torch.randint(5, n_vocab, (b, cfg.max_tokens), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    am = torch.ones_like(ids)
    tmask = text_token_mask(ids, am, [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id], cfg.text_mask_ratio,
                            [np.random.default_rng(i) for i in range(b)])
    pmask = torch.from_numpy(np.stack([image_patch_mask("", grid, cfg.image_mask_ratio, "random", 0.0, rng)
                                       for _ in range(b)]))
    x, ids, am, tmask, pmask = (t.to(di.device) for t in (x, ids, am, tmask, pmask))
    mids = ids.masked_fill(tmask, tok.mask_token_id)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, fused=di.device.startswith("cuda"))
    autocast, scaler = amp_context(cfg, di.device)
    fwd = torch.compile(model) if cfg.compile else model
    # the alignment-only step leaves the fusion transformer unused, which DDP must be told about
    net = nn.parallel.DistributedDataParallel(fwd, find_unused_parameters=True) if di.ddp else fwd

    def backward_step(loss):
        (scaler.scale(loss) if scaler else loss).backward()
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad(set_to_none=True)

    def dmlm_step(m=net):  # the training loop's forward_loss + AdamW
        with autocast():
            out = m(x, ids, am, mids, pmask)
            if ema is not None:
                targets = ema(x, ids, am)
            else:
                targets = ((out["img_mu"].detach(), out["img_var"].detach()),
                           (out["txt_mu"].detach(), out["txt_var"].detach()))
        out = {k: v.float() for k, v in out.items()}
        targets = tuple((mu.float(), var.float()) for mu, var in targets)
        backward_step(dmlm_objective(out, targets, tmask, pmask, cfg, model.scale())[0])
        if ema is not None:
            ema.update(model, cfg.ema_decay)

    def align_step(m=net):  # the same encoders, heads and Eq. (4) alone: one unmasked pass, no fusion, no targets
        with autocast():
            out = m(x, ids, am)
        i_mu, i_var, t_mu, t_var = (out[k].float() for k in ("img_g_mu", "img_g_var", "txt_g_mu", "txt_g_var"))
        if cfg.align_norm_means:
            i_mu, t_mu = F.normalize(i_mu, dim=-1), F.normalize(t_mu, dim=-1)
        if cfg.align == "contrastive":
            loss = align_contrastive_loss(i_mu, i_var, t_mu, t_var, model.scale())
        else:
            loss = align_pairs_loss(i_mu, i_var, t_mu, t_var)
        backward_step(loss)

    size = (f"ViT {cfg.vit_width}x{cfg.vit_layers}/{cfg.vit_patch} {cfg.image_size}px + "
            f"{'tiny BERT' if cfg.text_encoder == 'tiny' else cfg.text_encoder.split('/')[-1]} {cfg.max_tokens} "
            f"tokens, fusion {cfg.fusion_width}x{cfg.fusion_layers}, {b} pairs per process, target={cfg.target}"
            + (", compiled" if cfg.compile else ""))
    out = {}
    for phase, step in (("dmlm", dmlm_step), ("align_only", align_step)):
        flops = common.count_flops(lambda: step(model))  # counted on the eager model, one process's share
        out[phase] = common.run_benchmark(step, b, di.device, warmup=3, steps=cfg.benchmark_steps,
                                          flops_per_step=flops, label=f"dmlm {cfg.preset} {phase} {size}")
    full, base = out["dmlm"], out["align_only"]
    out["time_ratio"] = full["step_ms_mean"] / base["step_ms_mean"]
    out["flops_ratio"] = full["flops_per_sample"] / base["flops_per_sample"]
    common.print0(f"benchmark dmlm vs alignment only (CLIP-like) on the same model and batch: step time x"
                  f"{out['time_ratio']:.2f} ({full['step_ms_mean']:.1f} / {base['step_ms_mean']:.1f} ms), FLOPs x"
                  f"{out['flops_ratio']:.2f} ({full['flops_per_sample'] / 1e9:.2f} / "
                  f"{base['flops_per_sample'] / 1e9:.2f} GFLOP/sample): the masked pass through both encoders, "
                  f"the fusion transformer and the per-token Gaussians"
                  + (" and the EMA target pass" if ema is not None else " (the targets reuse the unmasked pass)"))
    common.cleanup_distributed()
    return out


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv)
    if cfg.benchmark != "off":
        return benchmark(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
