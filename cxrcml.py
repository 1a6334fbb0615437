"""
CXR-CML: Improved zero-shot classification of long-tailed multi-label diseases in Chest X-Rays.
R. Madhipati, S. Bhat, L. Buess, A. Maier. MICCAI 2025, arXiv:2507.19398.

Map of the method (Sec. 2-3):
    image -> CLIP ViT-B/32 (from CheXzero, doi:10.1038/s41551-022-00936-9) -> v [B, d], L2-normalised
    meta-label text "adenopathy is present, pleural effusion is present" (Sec. 2) -> u [B, d]
    L_c: CLIP's symmetric InfoNCE over the global batch
    p(z) = sum_k pi_k T(z | mu_k, Sigma_k, nu), K = 40, nu = 4, on the image embeddings   Eq. (1)
    T(z | mu, Sigma, nu): the multivariate Student t density                             Eq. (2)
        fitted as a GMM refined by the t: k-means++ -> Gaussian EM -> t EM (Peel & McLachlan)
    pseudo-label of v: argmax_k P(k | v); L_m = sum max(0, d(a, p) - d(a, n) + alpha)     Eq. (3)
    L = L_c + L_m; AdamW lr 1e-6, batch 32, ReduceLROnPlateau(0.1, 2 epochs)             Eq. (4), Sec. 3
    zero-shot AUC of all / base / rare (< 1,000 samples) classes, the average of 5 runs  Sec. 3-4
Equation -> function -> test (tests/test_cxrcml.py): Eq. (1) StudentTMixture, kmeans_pp (::test_mixture_*,
::test_kmeans_*); Eq. (2) student_t_log_density (::test_student_t_*); Eq. (3) triplet_loss (::test_triplet_*);
L_c clip_loss, Eq. (4) cml_loss, train() (::test_clip_loss_*, ::test_cml_loss_*, ::test_end_to_end_*);
CheXzero's pixels, weights, prompts (::test_chexzero_*); 5 runs patient_folds, fold_rows, summarize
(::test_*fold*, ::test_summ*)

Run:
    python cxrcml.py                                      # demo: phantoms, tiny CLIP, 2 CPU cores
    torchrun --nproc_per_node=2 cxrcml.py                 # the same demo in 2 processes
    python cxrcml.py --preset=paper --data=data/cxr_lt.csv --chexzero=best_64_5e-05_original_22000_0.864.pt
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        cxrcml.py --preset=paper --data=data/cxr_lt.csv --chexzero=<CheXzero .pt>
    python cxrcml.py --preset=paper --init=openai ...    # from OpenAI's CLIP instead (not the paper)
The paper's 5 runs (Sec. 3), fold k of the training patients validating each, and their mean and std:
    for k in 0 1 2 3 4; do python cxrcml.py --preset=paper --data=data/cxr_lt.csv --chexzero=<CheXzero .pt> \\
        --fold=$k --out_dir=out/cxrcml_fold$k; done; python cxrcml.py summarize out/cxrcml_fold*

Departures from the paper are stated at their lines and in README.md ("CXR-CML").
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import phantoms

# ----------------------------------------------------------------------------------------------------
# ---- config ----


@dataclass
class Config:
    # data (Sec. 3)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema (the demo draws phantoms here)
    image_size: int = 64  # input resolution (224 in the paper, as in CLIP)
    fold: int = -1  # 0..4: fold k of the training patients validates, the rest trains; -1: the valid split
    fold_seed: int = 0  # draws the 5 folds, whatever --seed: runs at several seeds share them
    rare_below: int = 1000  # rare: fewer positive images than this in the whole CSV (Sec. 3: 1,000)
    # model (Sec. 3)
    clip: str = "tiny"  # tiny (--width, --layers, --patch_size, a conv stem) | ViT-B/32 (Sec. 3)
    init: str = "random"  # random | chexzero (the paper, Sec. 4: --chexzero=<file>) | openai (OpenAI's CLIP)
    chexzero: str = ""  # CheXzero weights: a .pt state dict from its authors' release
    width: int = 64  # tiny CLIP: hidden size of both towers and of the shared space
    layers: int = 2  # tiny CLIP: transformer layers per tower
    patch_size: int = 8  # tiny CLIP: token size in pixels (32 in ViT-B/32)
    # Student-t mixture and triplet loss (Sec. 2)
    n_clusters: int = 40  # K of Eq. (1) (Sec. 3: N = 40, one per CXR-LT class)
    dof: float = 4.0  # nu of Eq. (2) (Table 3: 4 is best)
    em_iters: int = 10  # EM iterations of the Gaussian mixture, then as many of the t-mixture, per fit
    n_init: int = 3  # starts per fit (greedy k-means++ each); the one of best log-likelihood is kept
    bank_size: int = 2048  # recent image embeddings the mixture is fitted on (the paper: each batch)
    refit_every: int = 50  # steps between fits of the mixture to the bank
    margin: float = 0.2  # alpha of Eq. (3) (not given in the paper; FaceNet's)
    prompts: str = "chexzero"  # zero-shot pair: chexzero ("{}" / "no {}", Table 2's baseline) | present
    # optimisation (Sec. 3)
    epochs: int = 10  # training epochs (not given in the paper; the official code's 10)
    batch_size: int = 32  # GLOBAL batch of image-text pairs (Sec. 3: 32)
    lr: float = 1e-6  # AdamW learning rate (Sec. 3)
    weight_decay: float = 1e-4  # AdamW weight decay on weight matrices (the official code's; the paper: none)
    warmup_steps: int = 0  # linear warm-up steps before the plateau schedule takes over (the demo's)
    plateau_patience: int = 2  # epochs without a lower validation loss before lr x 0.1 (Sec. 3: 2)
    grad_clip: float = 0.0  # max gradient norm, 0: off (the paper names none)
    # run
    seed: int = 0  # weights, data order and augmentations
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model
    num_workers: int = 2  # DataLoader workers per process
    threads: int = 0  # CPU: torch threads per process (0: the cores shared among the processes)
    out_dir: str = "out/cxrcml"  # ckpt.pt, ckpt_best.pt, log.jsonl, metrics.json
    resume: bool = False  # continue out_dir/ckpt.pt exactly where it stopped
    overwrite: bool = False  # replace an existing run in out_dir
    max_steps: int = -1  # stop (with a checkpoint) after this many steps; the schedule still spans --epochs
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and at every epoch end)
    max_bad_frac: float = 0.01  # fail when more than this share of samples is unreadable or empty
    preset: str = "demo"  # set by --preset


PRESETS = {
    # Demo: phantoms at 64 px, a tiny CLIP from scratch. ~2100 training images / 64 = 32 steps per epoch x 30
    # epochs. K = 12, one per phantom class, as the paper's K = 40 is one per CXR-LT class. lr 1e-3 after a
    # 30-step warm-up: the paper's 1e-6 fine-tunes pretrained weights and moves random ones nowhere. The
    # phantoms' three rare findings have 40-100 positive images, the others >= 110: rare below 105. Zero-shot
    # on the training phrase "x is present": a CLIP trained from scratch on meta-labels never reads "no x".
    "demo": dict(n_clusters=12, bank_size=512, refit_every=25, epochs=30, batch_size=64, lr=1e-3,
                 weight_decay=0.05, warmup_steps=30, plateau_patience=3, grad_clip=1.0, rare_below=105,
                 prompts="present"),
    # Paper (Sec. 3): CLIP ViT-B/32 from CheXzero, 224 px, K = 40, nu = 4, batch 32 (1 GPU in the paper),
    # lr 1e-6; fold 0 of the five runs. The bank holds 64 global batches of 32.
    "paper": dict(data="", image_size=224, fold=0, clip="ViT-B/32", init="chexzero", num_workers=8),
}
PHANTOMS = 3000  # images in the demo's phantom data set
FOLDS = 5  # Sec. 3: "5-fold cross-validation"; "the average of 5 runs"
VOCAB_SIZE = 2000  # the WordPiece vocabulary a random CLIP's tokenizer is fitted with
OPENAI = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32 on the Hugging Face hub: --init=openai, its tokenizer
CHEXZERO_URL = "https://drive.google.com/drive/folders/1makFLiEMbSleYltaRxw81aBhEDMpVwno"  # its weights
CHEXZERO_MEAN, CHEXZERO_STD = 101.48761, 83.43944  # CheXzero's pixel statistics, 0-255, every channel

# ----------------------------------------------------------------------------------------------------
# ---- model (Sec. 2-3): CLIP from transformers ----


def meta_label_text(names: list[str], labels: np.ndarray) -> str:
    """Sec. 2, "Text Generation": "adenopathy is present, pleural effusion is present", every class marked
    present (1) in the study, a positive "Normal" too ("normal is present"). Uncertain (-1) is not present.
    A study with no class present gets the empty text, as in the official code."""
    return ", ".join(f"{common.label_text(n)} is present" for n, y in zip(names, labels) if y == 1)


def pixels(img: np.ndarray, size: int, chexzero: bool) -> torch.Tensor:
    """uint8 [H, W] -> float [3, size, size]. The demo resizes its square phantoms (ImageNet statistics).

    chexzero: CheXzero's preprocessing, which its weights (and the official CXR-CML code) expect
    (rajpurkarlab/CheXzero data_process.py and train.py): the longer side resized to 320 with Lanczos, aspect
    kept, zero-padded to 320 x 320 at the centre; (x - 101.48761) / 83.43944 on 0-255 pixels, the same for
    the 3 channels; then a bicubic resize to `size` (torchvision's on tensors, without antialiasing)."""
    if not chexzero:
        return common.to_tensor(common.resize(img, size))
    r = 320 / max(img.shape)
    small = Image.fromarray(img).resize((int(img.shape[1] * r), int(img.shape[0] * r)), Image.LANCZOS)
    square = Image.new("L", (320, 320))
    square.paste(small, ((320 - small.width) // 2, (320 - small.height) // 2))
    x = (torch.from_numpy(np.asarray(square, np.float32)) - CHEXZERO_MEAN) / CHEXZERO_STD
    x = F.interpolate(x[None, None], size=(size, size), mode="bicubic", align_corners=False)
    return x[0].expand(3, -1, -1)


class CXRCML(nn.Module):
    """CLIP (transformers' CLIPModel) and what common.zeroshot_eval / evaluate.py use. The Student-t mixture
    is no module: a function of the embeddings, refit in training and stored in the checkpoint beside it."""

    def __init__(self, cfg: Config, tokenizer, clip_config, class_names=()):
        super().__init__()
        from transformers import CLIPModel

        self.cfg, self.tokenizer, self.class_names, self.mixture = cfg, tokenizer, list(class_names), None
        self.clip = CLIPModel(clip_config)
        if cfg.clip == "tiny":  # strided convs make the tokens: far faster to train from scratch (ConvStem)
            self.clip.vision_model.embeddings.patch_embedding = common.ConvStem(cfg.width, cfg.patch_size)

    def encode_image(self, images):  # [B, 3, H, W] -> [B, d]: ViT [CLS] -> LayerNorm -> projection
        h = self.clip.vision_model(pixel_values=images).pooler_output
        return F.normalize(self.clip.visual_projection(h), dim=-1)

    def encode_tokens(self, input_ids, attention_mask):  # -> [B, d]: the causal transformer at end-of-text
        h = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.clip.text_projection(h), dim=-1)

    def encode_text(self, texts: list[str]):
        t, dev = self.tokenize(texts), self.clip.logit_scale.device
        return self.encode_tokens(t["input_ids"].to(dev), t["attention_mask"].to(dev))

    def forward(self, images, input_ids, attention_mask):  # training: v, u [B, d] (through DDP's hooks)
        return self.encode_image(images), self.encode_tokens(input_ids, attention_mask)

    def tokenize(self, texts) -> dict:
        return tokenize(texts, self.tokenizer, self.max_tokens)

    @property
    def max_tokens(self) -> int:  # CLIP's text context (77)
        return self.clip.config.text_config.max_position_embeddings

    @property
    def logit_scale(self) -> nn.Parameter:  # log(1/tau), learnable (CLIP's)
        return self.clip.logit_scale

    def image_tokens(self, images):  # [B, N, C] patch tokens, no [CLS] (segmentation heads)
        return self.clip.vision_model(pixel_values=images).last_hidden_state[:, 1:]

    def image_transform(self, train: bool):  # the paper names no augmentation; none is done
        return functools.partial(pixels, size=self.cfg.image_size, chexzero=self.cfg.clip == "ViT-B/32")

    def zeroshot_prompts(self, label: str):
        """(positive, negative prompts) that common.zeroshot_scores ranks on: --prompts=chexzero, CheXzero's
        pair; present, the training phrase "x is present" against the data set's normal class ("no finding is
        present", "normal is present"), that class itself against nothing."""
        if self.cfg.prompts == "chexzero":
            return chexzero_prompts(label)
        x = common.label_text(label)
        normal = [n for n in map(common.label_text, self.class_names) if n in ("no finding", "normal")]
        return [f"{x} is present"], [f"{n} is present" for n in normal if n != x]


def chexzero_prompts(label: str) -> tuple[list[str], list[str]]:
    """CheXzero's zero-shot pair "{}" / "no {}" (rajpurkarlab/CheXzero zero_shot.py), with which Table 2
    scores its CheXzero baseline (the paper names no other; common.zeroshot_scores ranks as CheXzero's softmax
    over it). A class that is a negation ("No Finding") gets no "no no finding": its positive prompt alone."""
    x = common.label_text(label)
    return [x], [] if x.startswith("no ") else [f"no {x}"]


# ----------------------------------------------------------------------------------------------------
# ---- losses and the Student-t mixture (Sec. 2) ----


# L_c: CLIP's symmetric InfoNCE. u, v [b, d] on this rank, row i of one paired with row i of the other; each
# local row is scored against the world * b rows of u_all, v_all [B, d] (the global batch, gathered with
# gradient by the caller), its positive at column rank * b + i.
def clip_loss(u, v, u_all, v_all, scale):
    target = torch.arange(len(u), device=u.device) + len(u) * common.rank()  # row i's global index
    return 0.5 * (F.cross_entropy(scale * u @ v_all.T, target) + F.cross_entropy(scale * v @ u_all.T, target))


# Eq. (2), Sec. 2, Sigma_k = diag(var_k): z [N, d], mu, var [K, d] -> (log T [N, K], delta^2 [N, K]), with
#   log T = lnG((nu+d)/2) - lnG(nu/2) - d/2 ln(nu pi) - 1/2 sum_j ln var_kj - (nu+d)/2 ln(1 + delta^2/nu),
#   delta^2 = (z - mu_k)^T Sigma_k^-1 (z - mu_k); nu = inf is the Gaussian. The constant is formed in float64:
#   at large nu its two lnG terms are ~1e9 and cancel, which float32 cannot do.
def student_t_log_density(z, mu, var, dof: float):
    d, prec = z.shape[1], 1.0 / var
    # delta^2 as three matrix products (the caller centres z, so the terms stay small); >= 0 against rounding
    maha = ((z * z) @ prec.T - 2.0 * z @ (mu * prec).T + (mu * mu * prec).sum(1)).clamp_min(0.0)
    if math.isinf(dof):
        return -0.5 * d * math.log(2 * math.pi) - 0.5 * torch.log(var).sum(1) - 0.5 * maha, maha
    const = math.lgamma((dof + d) / 2) - math.lgamma(dof / 2) - 0.5 * d * math.log(dof * math.pi)
    return const - 0.5 * torch.log(var).sum(1) - 0.5 * (dof + d) * torch.log1p(maha / dof), maha


def kmeans_pp(X, K: int, gen: torch.Generator):
    """Greedy k-means++ seeds [K, d] (Arthur & Vassilvitskii, 2007, as scikit-learn does it): of 2 + ln K
    candidates drawn with probability proportional to D(x)^2, the one that lowers sum D(x)^2 the most."""
    N, trials = X.shape[0], 2 + int(math.log(K))
    first = torch.randint(N, (1,), generator=gen, device=X.device)
    centres, closest = [X[first]], torch.cdist(X, X[first])[:, 0] ** 2  # [N] D(x)^2 to the nearest centre
    for _ in range(1, K):
        r = torch.rand(trials, generator=gen, device=X.device) * closest.sum()
        cand = torch.searchsorted(closest.cumsum(0), r).clamp(max=N - 1)  # [T] drawn as D(x)^2
        pot = torch.minimum(closest, torch.cdist(X[cand], X) ** 2)  # [T, N] D(x)^2 with each candidate added
        best = pot.sum(1).argmin()
        centres.append(X[cand[best]][None])
        closest = pot[best]
    return torch.cat(centres)


class StudentTMixture:
    """Eq. (1), fitted by EM with nu fixed (Peel & McLachlan, doi:10.1023/A:1008981510081) in torch on the
    data's device. A fit follows Sec. 2 ("GMM ... refined by Student t"): greedy k-means++ seeds, em_iters
    EM steps of a Gaussian mixture, em_iters of the t-mixture; n_init times, keeping the start with the best
    log-likelihood. The t E-step's latent scale u_ik = (nu + d) / (nu + delta_ik^2) down-weights points far
    from mu_k: the robustness to outliers the paper chose it for. Sigma_k is diagonal: a full 512 x 512
    Sigma_k needs far more points than a bank holds (the paper does not say; the official code fits full
    ones to each batch of 32)."""

    def __init__(self, K: int, dof: float, em_iters: int = 10, n_init: int = 3, reg_covar: float = 1e-6):
        self.K, self.dof, self.em_iters, self.n_init, self.reg = K, float(dof), em_iters, n_init, reg_covar
        self.means = self.variances = self.weights = self.center = None

    @property
    def fitted(self) -> bool:
        return self.means is not None

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("means", "variances", "weights", "center")}

    def load_state_dict(self, s: dict, device="cpu"):
        self.__dict__.update({k: None if v is None else v.to(device) for k, v in s.items()})

    def _m_step(self, X, resp, u=None):
        """pi, mu, diag Sigma from responsibilities [N, K] and t scales u [N, K] (None: Gaussian M-step)."""
        eps = 10 * torch.finfo(X.dtype).eps
        nk = resp.sum(0) + eps  # [K]
        w = resp if u is None else resp * u
        sw = w.sum(0) + eps
        means = (w.T @ X) / sw[:, None]
        # Sigma_k = sum_i r_ik u_ik (x_i - mu_k)^2 / sum_i r_ik (Peel & McLachlan: no u in the denominator)
        var = (w.T @ (X * X) - 2 * means * (w.T @ X) + means * means * sw[:, None]) / nk[:, None]
        var = var.clamp_min(0) + self.reg
        dead = (resp.sum(0) < eps)[:, None]  # a component that lost all its points stays where it was
        means, var = torch.where(dead, self.means, means), torch.where(dead, self.variances, var)
        self.means, self.variances, self.weights = means, var, nk / nk.sum()

    def _e_step(self, X, dof: float):
        """-> responsibilities [N, K], t scales u [N, K], log p(x_i) [N] (Eq. 1)."""
        logp, maha = student_t_log_density(X, self.means, self.variances, dof)
        weighted = logp + torch.log(self.weights)  # log pi_k T(x_i | k)
        ll = torch.logsumexp(weighted, dim=1)
        return torch.exp(weighted - ll[:, None]), (dof + X.shape[1]) / (dof + maha), ll

    def _em(self, X, n: int, dof: float):
        """n EM steps -> the mean log-likelihood of X under the final parameters (starts are ranked on it)."""
        for _ in range(n):
            resp, u, _ = self._e_step(X, dof)
            self._m_step(X, resp, None if math.isinf(dof) else u)
        return self._e_step(X, dof)[2].mean()

    @torch.no_grad()
    def fit(self, X, seed: int = 0):
        """X [N, d] -> self, fitted from scratch."""
        X = X.detach().float() if X.dtype in (torch.float16, torch.bfloat16) else X.detach()
        # centred data: the expanded delta^2 then works with small numbers (float32 at d = 512)
        self.center = X.mean(0)
        Xc, gen, best = X - self.center, torch.Generator(X.device).manual_seed(seed), None
        for _ in range(self.n_init):
            seeds = kmeans_pp(Xc, self.K, gen)
            # the start: each point to its nearest seed; a seed that gets none keeps its place and the data's
            # variance (the dead-component rule of _m_step)
            self.means, self.variances = seeds, (Xc.var(0) + self.reg).expand_as(seeds)
            self._m_step(Xc, F.one_hot(torch.cdist(Xc, seeds).argmin(1), self.K).to(X))
            self._em(Xc, self.em_iters, math.inf)  # the Gaussian mixture the t-mixture starts from
            ll = self._em(Xc, self.em_iters, self.dof)
            if best is None or ll > best[0]:
                best = (ll, self.state_dict())
        self.load_state_dict(best[1], X.device)
        return self

    @torch.no_grad()
    def score(self, X):  # -> P(k | x_i) [N, K], log p(x_i) [N] (scikit-learn's predict_proba, score_samples)
        resp, _, ll = self._e_step(X.detach().to(self.means) - self.center, self.dof)
        return resp, ll

    def predict(self, X):  # [N] pseudo-labels argmax_k P(k | x_i) (Sec. 2, "Metric Learning")
        return self.score(X)[0].argmax(1)


# Eq. (3), Sec. 2: L_m = sum over triplets of max(0, d(a, p) - d(a, n) + alpha), d Euclidean, a and p in one
# cluster, n in another. The paper does not say how triplets are mined: batch-hard, one triplet per anchor
# (its farthest positive and nearest negative, Hermans et al., arXiv:1703.07737). Averaged over the n_a
# anchors of the global batch that have a triplet, not summed: Eq. (4) with L_m weighted 1 / n_a (1/32 at the
# paper's batch 32 when every anchor has one). Summed, L_m starts near B alpha against L_c's ln B and swamps
# it (the demo's L_c then stays at ln 64).
def triplet_loss(emb, labels, margin: float):
    """emb [n, d] L2-normalised, labels [n] pseudo-labels (None: no mixture yet, L_m = 0) -> scalar."""
    if labels is None:
        return emb.sum() * 0.0  # keeps every parameter in the graph (DDP)
    sq = (emb * emb).sum(1)
    D = (sq[:, None] + sq[None, :] - 2 * emb @ emb.T).clamp_min(1e-12).sqrt()  # [n, n]; finite grad at 0
    same = labels[:, None] == labels[None, :]
    pos, neg = same & ~torch.eye(len(labels), dtype=torch.bool, device=emb.device), ~same
    d_ap = D.masked_fill(~pos, -math.inf).amax(1)  # hardest positive; -inf where there is none
    d_an = D.masked_fill(~neg, math.inf).amin(1)  # hardest negative; +inf where there is none
    valid = (pos.any(1) & neg.any(1)).float()  # [n]: n_a anchors with a triplet (others add relu(-inf) = 0)
    return (F.relu(d_ap - d_an + margin) * valid).sum() / valid.sum().clamp_min(1)


# Eq. (4), Sec. 2: L = L_c + L_m, for training and validation alike. v, u [b, d]: this rank's image and text
# embeddings; v_all [B, d]: the global batch's images (gathered once by the caller, which also banks them).
def cml_loss(v, u, v_all, scale, mixture: StudentTMixture, margin: float):
    """-> (L_c, L_m); L_m on the mixture's pseudo-labels of v_all, 0 before its first fit."""
    l_c = clip_loss(u, v, common.all_gather_with_grad(u), v_all, scale)
    pseudo = mixture.predict(v_all) if mixture.fitted else None  # [B] cluster pseudo-labels
    return l_c, triplet_loss(v_all, pseudo, margin)


def refit(mixture: StudentTMixture, bank, step: int, cfg: Config):
    """Fit the mixture to the bank [N, d] from scratch on rank 0; every rank then holds rank 0's parameters,
    so that all ranks mine the same pseudo-labels."""
    if common.is_main_process():
        mixture.fit(bank, cfg.seed * 1_000_003 + step)
    if common.ddp_active():  # the other ranks allocate the parameters at the first fit, then receive them
        K, d = mixture.K, bank.shape[1]
        if not mixture.fitted:
            mixture.load_state_dict({"means": torch.zeros(K, d), "variances": torch.ones(K, d),
                                     "weights": torch.ones(K), "center": torch.zeros(d)}, bank.device)
        for t in mixture.state_dict().values():
            dist.broadcast(t, src=0)


# ----------------------------------------------------------------------------------------------------
# ---- data (Sec. 3): one image per item, with its meta-label text ----


class MetaLabelDataset(torch.utils.data.Dataset):
    """Item (index, sample seed) -> image, meta-label text, bad samples. An unreadable image is replaced by
    another row and reported in "bad" (the loop counts it): every rank keeps its batch size."""

    def __init__(self, table: common.XrayCSV, rows, transform):
        self.t, self.rows, self.transform = table, list(rows), transform

    def __len__(self):
        return len(self.rows)

    def text(self, i: int) -> str:
        return meta_label_text(self.t.label_names, self.t.rows[self.rows[i]]["_labels"])

    def __getitem__(self, key):
        idx, _ = key  # no augmentation: the sample seed is not needed
        bad = []
        for attempt in range(8):
            i = (idx + attempt * 7919) % len(self.rows)
            try:
                img = common.load_image(self.t.rows[self.rows[i]]["_path"])
                break
            except common.BadImageError as e:
                bad.append(("unreadable image", str(e)))
        else:
            raise common.UserError(f"8 rows in a row around row {idx} of {self.t.path} have no readable "
                                   f"image: is the image folder next to the CSV? First error: {bad[0][1]}")
        return self.transform(img), self.text(i), bad


def tokenize(texts, tokenizer, max_tokens: int) -> dict:  # -> input_ids, attention_mask [B, S], right-padded
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt", return_token_type_ids=False))


def collate(items, tokenizer, max_tokens: int) -> dict:  # in the DataLoader worker (which gets no model)
    images, texts, bad = zip(*items)
    return {"image": torch.stack(images), **tokenize(texts, tokenizer, max_tokens),
            "bad": [b for bs in bad for b in bs]}


def patient_folds(table: common.XrayCSV, folds: int, seed: int) -> np.ndarray:
    """Fold index [N] of each row: scikit-learn's StratifiedGroupKFold with patients as groups (never split)
    and each patient's rarest positive class (fewest positive images in the table; none: a stratum of its own)
    as the stratum, so the few patients of a rare class spread over the folds. The official k_fold_cross.py
    stratifies images (StratifiedKFold), so one patient's images can train and validate at once."""
    from sklearn.model_selection import StratifiedGroupKFold

    pid = [r.get("patient_id") or r.get("study_id") or f"_row{i}" for i, r in enumerate(table.rows)]
    patients, group = np.unique(pid, return_inverse=True)  # group [N]: each row's patient
    pos = table.labels() == 1  # [N, L]
    has = np.zeros((len(patients), pos.shape[1]), bool)  # [P, L]: the patient has a positive image
    np.logical_or.at(has, group, pos)
    rarest = np.where(has.any(1), np.where(has, pos.sum(0), np.inf).argmin(1), pos.shape[1])  # [P]
    fold, splits = np.zeros(len(pid), int), StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    try:
        for k, (_, rows) in enumerate(splits.split(pid, rarest[group], group)):
            fold[rows] = k
    except ValueError as e:  # fewer patients than folds, or every stratum smaller than the folds
        raise common.UserError(f"--fold: the train split of {table.path} gives no {folds} patient folds: {e}")
    return fold


def fold_rows(table: common.XrayCSV, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Sec. 3, the five runs: (training rows, validation rows) of --fold=k: fold k of the training patients
    validates. Folds come from --fold_seed, so five runs at any --seed use five disjoint validation folds."""
    fold = patient_folds(table, FOLDS, cfg.fold_seed)
    return np.flatnonzero(fold != cfg.fold), np.flatnonzero(fold == cfg.fold)


# ----------------------------------------------------------------------------------------------------
# ---- build / load ----


def build(cfg: Config, tokenizer, clip_config: dict | None = None, class_names=()) -> CXRCML:
    """Config -> CXRCML: with a checkpoint's CLIP config (load, resume) as it was, else the preset's CLIP with
    CheXzero's weights (--init=chexzero, the paper), OpenAI's (--init=openai) or random ones."""
    from transformers import CLIPConfig, CLIPModel

    tok = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id or tokenizer.cls_token_id,  # BERT's [CLS], [SEP]
               eos_token_id=tokenizer.eos_token_id or tokenizer.sep_token_id, max_position_embeddings=77)
    if clip_config is not None:
        conf = CLIPConfig.from_dict(clip_config)
    elif cfg.clip == "ViT-B/32":  # transformers' defaults: vision 768 x 12, patch 32, text 512 x 12
        conf = CLIPConfig(text_config=tok, vision_config=dict(image_size=cfg.image_size))
    else:
        w = dict(hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
                 num_attention_heads=max(1, cfg.width // 32))
        conf = CLIPConfig(text_config={**tok, **w}, projection_dim=cfg.width,
                          vision_config=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, **w))
    model = CXRCML(cfg, tokenizer, conf, class_names)
    if clip_config is None and cfg.init == "chexzero":
        load_chexzero(model.clip, cfg.chexzero)
    elif clip_config is None and cfg.init == "openai":
        model.clip.load_state_dict(common.load_pretrained(f"OpenAI's CLIP ({OPENAI})", lambda: CLIPModel.
                                                          from_pretrained(OPENAI)).state_dict())
    return model


def build_tokenizer(cfg: Config, train_ds, names: list[str]):
    """CLIP's BPE (CheXzero and OpenAI's CLIP share it), or for a random CLIP a WordPiece vocabulary fitted on
    the training texts and the prompts."""
    if cfg.init == "random":
        prompts = [f"{common.label_text(n)} is present" for n in names]
        return common.train_wordpiece([train_ds.text(i) for i in range(len(train_ds))] + prompts, VOCAB_SIZE)
    from transformers import AutoTokenizer

    return common.load_pretrained(f"CLIP's tokenizer {OPENAI}", lambda: AutoTokenizer.from_pretrained(OPENAI))


def tokenizer_files(tokenizer) -> dict:  # its files, so that a checkpoint rebuilds it offline
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(d)


def load(path, map_location="cpu") -> tuple[CXRCML, Config]:
    """A model from its checkpoint alone (ckpt.pt or ckpt_best.pt), with its fitted mixture in .mixture."""
    ck = common.load_checkpoint(path, map_location)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in Config.__dataclass_fields__})
    model = build(cfg, tokenizer_from_files(ck["tokenizer"]), ck["clip_config"], ck["class_names"])
    model.load_state_dict(ck["model"])
    if ck["mixture"]["means"] is not None:
        model.mixture = StudentTMixture(cfg.n_clusters, cfg.dof)
        model.mixture.load_state_dict(ck["mixture"])
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------------
# ---- training ----


def setup(cfg: Config):
    """CUDA and DDP from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), as nanoGPT's train.py does;
    `python x.py` runs as rank 0 of 1. -> rank, world size, device, autocast context, GradScaler."""
    ddp = "RANK" in os.environ
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(common.cpu_threads(cfg.threads))
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cfg.batch_size % world:
        raise common.UserError(f"--batch_size={cfg.batch_size} (global) must divide by {world} processes")
    if cfg.amp == "auto":  # bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler
        cfg.amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": torch.float32}[cfg.amp]
    ctx = torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=cfg.amp != "off")
    scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=cfg.amp == "fp16")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    return rank, world, device, ctx, scaler


def param_groups(model: nn.Module, wd: float):
    """Weight decay on weight matrices only: not on biases, norms, the class embedding or the temperature."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def check(cfg: Config):
    """Flag values that cannot work, before anything runs."""
    if cfg.clip not in ("tiny", "ViT-B/32") or cfg.init not in ("random", "chexzero", "openai") or \
            cfg.init != "random" and cfg.clip != "ViT-B/32" or not -1 <= cfg.fold < FOLDS or \
            cfg.bank_size < cfg.batch_size or cfg.prompts not in ("chexzero", "present"):
        raise common.UserError(f"--clip is tiny | ViT-B/32; --init random | chexzero | openai (these two "
                               f"with --clip=ViT-B/32); --fold -1 (the CSV's valid split) or 0..{FOLDS - 1}; "
                               f"--bank_size at least --batch_size; --prompts chexzero | present")
    if not cfg.data:
        raise common.UserError("--preset=paper needs --data=<csv> (data_prep.py cxr_lt writes it)")
    if cfg.init == "chexzero" and not cfg.resume and not Path(cfg.chexzero).is_file():
        raise common.UserError(
            f"the paper fine-tunes CheXzero (Tiu et al., doi:10.1038/s41551-022-00936-9): --init=chexzero "
            f"needs its weights, --chexzero=<file.pt> (given: {cfg.chexzero!r}). Its authors publish them at "
            f"{CHEXZERO_URL} (github.com/rajpurkarlab/CheXzero, README, 'Model Checkpoints'); download one "
            f"there. --init=openai starts from OpenAI's CLIP instead, which is not the paper")
    if cfg.init == "openai":
        common.print0(f"note: --init=openai starts from OpenAI's CLIP ({OPENAI}), not from CheXzero as the "
                      f"paper does (Sec. 4)")


def train(cfg: Config) -> dict:
    check(cfg)
    rank, world, device, ctx, scaler = setup(cfg)
    ck = common.start_run(cfg)  # the checkpoint to continue (--resume), else None
    if cfg.data == Config.data:
        phantoms.ensure_phantoms(cfg.data, PHANTOMS)
    counter = common.BadSampleCounter(cfg.max_bad_frac)
    tr, va, te = (common.XrayCSV(cfg.data, split, counter=counter) for split in ("train", "valid", "test"))
    # Sec. 3: rare classes have fewer than 1,000 samples (positive images) in the data set, all splits
    names, counts = tr.label_names, sum((t.labels() == 1).sum(0) for t in (tr, va, te))
    rare = [n for n, c in zip(names, counts) if c < cfg.rare_below]
    if cfg.fold >= 0:  # Sec. 3, the 5 runs: fold k of the training patients validates, the others train
        va, (train_rows, val_rows) = tr, fold_rows(tr, cfg)
    else:
        train_rows, val_rows = range(len(tr)), range(len(va))
    if not len(val_rows):
        raise common.UserError(f"{cfg.data} has no valid split: --fold=k (0..{FOLDS - 1}) validates on "
                               f"fold k of the training patients")
    transform = functools.partial(pixels, size=cfg.image_size, chexzero=cfg.clip == "ViT-B/32")
    train_ds, val_ds = MetaLabelDataset(tr, train_rows, transform), MetaLabelDataset(va, val_rows, transform)

    # -- model: the checkpoint's tokenizer, or one fitted on the training texts (the same on every rank)
    tok = tokenizer_from_files(ck["tokenizer"]) if ck else build_tokenizer(cfg, train_ds, names)
    model = raw_model = build(cfg, tok, ck["clip_config"] if ck else None, names).to(device)
    torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own numbers
    local_batch = cfg.batch_size // world
    sampler = common.EpochSampler(len(train_ds), local_batch, rank, world, cfg.seed)
    val_sampler = common.EpochSampler(len(val_ds), local_batch, rank, world, cfg.seed, shuffle=False)
    collate_fn = functools.partial(collate, tokenizer=tok, max_tokens=raw_model.max_tokens)
    loader, val_loader = (torch.utils.data.DataLoader(ds, local_batch, sampler=s, num_workers=cfg.num_workers,
                                                      collate_fn=collate_fn, pin_memory=device != "cpu",
                                                      persistent_workers=cfg.num_workers > 0)
                          for ds, s in ((train_ds, sampler), (val_ds, val_sampler)))
    opt = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=device != "cpu")  # CLIP's betas and eps
    # Sec. 3: ReduceLROnPlateau, factor 0.1, patience 2, on the validation loss once per epoch
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=cfg.plateau_patience)
    mixture = StudentTMixture(cfg.n_clusters, cfg.dof, cfg.em_iters, cfg.n_init)
    # the mixture is fitted to a bank of the last --bank_size image embeddings [bank_size, d] (no gradient),
    # the same on every rank (the gathered global batches). The paper fits each batch of 32, which cannot hold
    # K = 40 components (its code fits min(5, 32 / 3) = 5); a bank can. L_m is 0 until the bank first fills
    # (the first 2048 / 32 = 64 steps of the paper preset). `seen`: embeddings pushed so far
    bank, seen = torch.zeros(cfg.bank_size, raw_model.clip.config.projection_dim, device=device), 0
    if ck is not None:
        mixture.load_state_dict(ck["mixture"], device)
        bank, seen = ck["bank"].to(device), ck["seen"]
    common.print0(f"cxrcml: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M parameters "
                  f"({cfg.clip}, init {cfg.init}); {len(train_ds)} training / {len(val_ds)} validation images"
                  f"{f' (fold {cfg.fold})' * (cfg.fold >= 0)}, {sampler.batches_per_epoch} steps/epoch x "
                  f"{cfg.epochs} epochs, {world} process(es) on {device}; {len(rare)} of {len(names)} "
                  f"classes rare: {', '.join(rare)}")
    meta = {"tokenizer": tokenizer_files(tok), "clip_config": raw_model.clip.config.to_dict(),
            "class_names": names, "rare_classes": rare}  # what load() needs; with the mixture and bank:
    loop = common.Loop(cfg, name="cxrcml", model=raw_model, opt=opt, sched=sched, scaler=scaler,
                       sampler=sampler, counter=counter, ck=ck,
                       extra=lambda: {**meta, "mixture": mixture.state_dict(), "bank": bank.cpu(),
                                      "seen": seen})
    model = torch.compile(model) if cfg.compile else model
    model = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    for epoch in loop.epochs():
        model.train()
        for batch in loop.batches(loader):
            if loop.step < cfg.warmup_steps:  # linear warm-up (the demo's); then the plateau schedule owns lr
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * (loop.step + 1) / cfg.warmup_steps
            x, ids, am = (batch[k].to(device) for k in ("image", "input_ids", "attention_mask"))
            with ctx:
                v, u = model(x, ids, am)  # image and text embeddings [b, d]
            v, u = v.float(), u.float()
            v_all = common.all_gather_with_grad(v)  # [B, d]: L_c's columns, L_m's triplets, bank entries
            l_c, l_m = cml_loss(v, u, v_all, raw_model.logit_scale.exp(), mixture, cfg.margin)
            loss = l_c + l_m  # Eq. (4): equal weights (Sec. 3)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # the true gradients, for clipping and the check
            grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            if loop.bad_step(loss, grad_norm):  # not finite on some rank: every rank drops the step
                opt.zero_grad(set_to_none=True)
                scaler.update()  # fp16: an overflow lowers the loss scale
                continue
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # 1/tau <= 100, as CLIP clamps it: after the step, so its gradient lives
                raw_model.logit_scale.clamp_(0, math.log(100))
            bank[(seen + torch.arange(len(v_all), device=device)) % cfg.bank_size] = v_all.detach()
            seen += len(v_all)
            if seen >= cfg.bank_size and (not mixture.fitted or (loop.step + 1) % cfg.refit_every == 0):
                refit(mixture, bank, loop.step, cfg)  # Eq. (1)-(2) on the last --bank_size embeddings
            loop.step_done(loss=loss, l_c=l_c, l_m=l_m, lr=opt.param_groups[0]["lr"])
        val_loss = (validation_loss(raw_model, val_loader, mixture, device, ctx, cfg)
                    if not loop.stopped else None)
        if val_loss is not None and loop.step >= cfg.warmup_steps:
            sched.step(val_loss)  # Sec. 3: ReduceLROnPlateau on the validation loss
        loop.end_epoch(val_loss)
    metrics = evaluate(raw_model, te, device, rare) if rank == 0 and not loop.stopped else {}
    result = loop.close(metrics)
    if world > 1:
        dist.destroy_process_group()
    return result


@torch.no_grad()
def validation_loss(model: CXRCML, loader, mixture: StudentTMixture, device, ctx, cfg: Config) -> float:
    """Eq. (4) on the validation images (each rank its share), with the current mixture's pseudo-labels."""
    model.eval()
    losses = []
    for b in loader:
        with ctx:
            v, u = model(b["image"].to(device), b["input_ids"].to(device), b["attention_mask"].to(device))
        v, u = v.float(), u.float()
        l_c, l_m = cml_loss(v, u, common.all_gather_with_grad(v),
                            model.logit_scale.exp(), mixture, cfg.margin)
        losses.append(float(l_c + l_m))
    return common.all_reduce_mean(float(np.mean(losses)))


@torch.no_grad()
def evaluate(model: CXRCML, table: common.XrayCSV, device, rare: list[str]) -> dict:
    """Zero-shot AUC on the test split (common.zeroshot_scores) per class, and its mean over all, base and
    rare classes (Sec. 3-4, Table 2)."""
    emb, ok = common.embed_images(model, table, device)
    names = table.label_names
    per = common.auc_per_label(table.labels()[ok], common.zeroshot_scores(model, emb[ok], names), names)
    out = {"zeroshot_auc_macro": per["macro"], "zeroshot_auc_per_label": per["per_label"],
           "n_images": int(ok.sum()), "rare_classes": rare}
    for group, keep in (("base", lambda n: n not in rare), ("rare", lambda n: n in rare)):
        aucs = [a for n, a in per["per_label"].items() if keep(n) and a is not None]
        out[f"zeroshot_auc_{group}"] = float(np.mean(aucs)) if aucs else None
    common.print0(f"zero-shot AUC, mean over the base classes {out['zeroshot_auc_base']!s:.6}, over the rare "
                  f"ones {out['zeroshot_auc_rare']!s:.6}")
    return out


def summarize(runs: list[str]) -> dict:
    """`python cxrcml.py summarize out/cxrcml_fold*` (folders or their metrics.json): the mean and standard
    deviation (n - 1) of the runs' test AUCs, as the paper reports "the average of 5 runs" (Sec. 3)."""
    paths = [Path(r) / "metrics.json" if Path(r).is_dir() else Path(r) for r in runs]
    if not paths or not all(p.is_file() for p in paths):
        raise common.UserError(f"summarize: give finished runs, e.g. out/cxrcml_fold*; no metrics.json in "
                               f"{[str(p) for p in paths if not p.is_file()]}")
    metrics, out = [json.loads(p.read_text()) for p in paths], {}
    for key in ("zeroshot_auc_macro", "zeroshot_auc_base", "zeroshot_auc_rare"):
        vals = [m[key] for m in metrics if m.get(key) is not None]
        out[key] = {"mean": float(np.mean(vals)) if vals else None, "n": len(vals),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
        print(f"{key}: {out[key]['mean'] or math.nan:.4f} +- {out[key]['std'] or 0:.4f} ({len(vals)} runs)")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["summarize"]:
        return summarize(argv[1:])
    cfg = common.parse_config(Config, PRESETS, argv)
    return train(cfg)


# ----------------------------------------------------------------------------------------------------
# ---- appendix: CheXzero's weights (an OpenAI-CLIP state dict) -> transformers' CLIPModel ----
# OpenAI's CLIP, which CheXzero fine-tunes and saves as torch.save(model.state_dict()), keeps each attention's
# q, k, v stacked in one in_proj [3W, W] (nn.MultiheadAttention's layout), and its projections as [W, E]
# matrices used as x @ proj; CLIPModel has separate q / k / v Linear layers and projections as Linear [E, W].

_NAMES = [  # (OpenAI name pattern, CLIPModel name), substituted in this order
    (r"^module\.", ""), (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."), (r"\.ln_1\.", ".layer_norm1."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."), (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."), (r"^text_projection$", "text_projection.weight"),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."), (r"^visual\.proj$", "visual_projection.weight"),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm.")]


def openai_to_hf(sd: dict) -> dict:
    """OpenAI-CLIP / CheXzero state dict -> CLIPModel state dict (a name without a counterpart stays as it is,
    for load_chexzero to report)."""
    out = {}
    for k, v in sd.items():
        for pattern, name in _NAMES:
            k = re.sub(pattern, name, k)
        if k in ("text_projection.weight", "visual_projection.weight"):
            v = v.t()  # x @ proj is a Linear with weight proj^T
        if m := re.fullmatch(r"(.+)\.attn\.in_proj_(weight|bias)", k):  # in nn.MultiheadAttention's order
            out.update({f"{m[1]}.self_attn.{n}_proj.{m[2]}": part for n, part in zip("qkv", v.chunk(3))})
        else:
            out[k] = v
    return out


def load_chexzero(clip: nn.Module, path: str):
    """CheXzero's weights into a CLIPModel; any missing, unknown or mis-shaped weight is a UserError listing
    them (a partial load would train a half-random model)."""
    sd = common.load_checkpoint(path)
    sd = sd.get("model", sd.get("state_dict", sd))  # the official CXR-CML code saves {"model": ...}
    hf, own = openai_to_hf(sd), clip.state_dict()
    missing, unknown = sorted(own.keys() - hf.keys()), sorted(hf.keys() - own.keys())
    shapes = [f"{k} {tuple(hf[k].shape)}, CLIP {tuple(own[k].shape)}" for k in hf if k in own and
              hf[k].shape != own[k].shape]
    if missing or unknown or shapes:
        raise common.UserError(f"--chexzero={path} is no CheXzero CLIP ViT-B/32 at --image_size="
                               f"{clip.config.vision_config.image_size}: missing {missing[:8]}, unknown "
                               f"{unknown[:8]}, shapes {shapes[:4]}")
    clip.load_state_dict(hf)


if __name__ == "__main__":
    common.cli(main)
