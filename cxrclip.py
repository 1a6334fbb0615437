"""
CXR-CLIP: Toward Large Scale Chest X-ray Language-Image Pre-training.
K. You, J. Gu, J. Ham, B. Park, J. Kim, E. K. Hong, W. Baek, B. Roh. MICCAI 2023.
doi:10.1007/978-3-031-43895-0_10 (paper: ../shared/papers/cxrclip.md)

What this file implements, top to bottom (one file, sharing only common.py):

    study s = {X images, T texts}         Sec. 3.1: two images per study (distinct views where possible, else an
                                          augmented copy), two texts (findings + impression, else an augmented copy)
    image-label rows -> texts             Sec. 3.1: T = Concat({p ~ P(y)}) from class prompts per label value
    E^i: ResNet-50 | Swin-T | tiny CNN    Sec. 3.2: global average pooled, linear projection to 512, L2-normalised
    E^t: BioClinicalBERT | tiny BERT      Sec. 3.2: the [EOS] (BERT's [SEP]) token's output, projection, L2-norm
    L_CLIP                                Eq. (1): symmetric InfoNCE with a learnable temperature
    L_MVS                                 Eq. (2): mean of L_CLIP over the 4 (image, text) view pairings
    ICL, TCL                              Sec. 3.3: L_CLIP between the two images / the two texts of each study
    L = L_MVS + λ_I ICL + λ_T TCL         λ_I = 1.0, λ_T = 0.5 (Sec. 4.2)
    AdamW 5e-5 / wd 1e-4, cosine + 1 warm-up epoch, 15 epochs, AMP, 128 studies per global batch (Sec. 4.2)

Run it:

    python cxrclip.py                                        # demo: phantom data, tiny encoders, ~3 min on 2 CPU cores
    python cxrclip.py --preset=paper --data=data/mimic.csv   # the paper: ResNet-50 + BioClinicalBERT, 224 px
    python cxrclip.py --preset=paper --image_encoder=swin_t --data=data/mimic.csv
    torchrun --nproc_per_node=2 cxrclip.py                   # 2 processes (GPUs, or gloo on CPU); --batch_size is global
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 cxrclip.py --preset=paper ...
    python cxrclip.py --resume                               # continue out/cxrclip/ckpt.pt exactly where it stopped
    python cxrclip.py --help                                 # every flag, with the paper section it comes from

Where this differs from the paper or its published code, and why:
  * Text augmentation A_t: sentence shuffle that really changes the order (the published one is a no-op), and
    back-translation read from `findings_bt` / `impression_bt` columns when data_prep.py has written them.
  * Swin-T is mean-pooled over its last feature map (Swin has no class token; the published code takes token 0).
  * Hue/saturation jitter (Sec. 4.2) are no-ops on grayscale radiographs and are left out; CLAHE via OpenCV.
  * The demo replaces the pretrained encoders by a small CNN and a 2-layer BERT with a WordPiece vocabulary
    fitted on the training reports, and uses a larger lr and more epochs, because it trains from scratch.
  * Early stopping on validation loss is `--patience` (the paper gives no patience; off by default).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
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
    # data (Sec. 3.1, 4.1)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema; the demo makes phantoms here if absent
    n_phantoms: int = 3000  # images in the phantom data set made when --data is the default and missing
    image_size: int = 64  # input resolution (224 in the paper, Sec. 4.2)
    text_source: str = "auto"  # auto: report sections, label prompts where a study has none | labels: prompts only
    prompt_negatives: int = 3  # negative classes sampled into a label prompt (3 for ChestX-ray14, Sec. 4.1)
    label_prompt_frac: float = 0.0  # share of training studies used as image-label data (reports withheld), like
    #                                 the paper's MIMIC + CheXpert mix (Table 2, "M,C"); the demo uses 0.5
    # model (Sec. 3.2)
    image_encoder: str = "tiny"  # tiny | resnet50 | swin_t
    text_encoder: str = "tiny"  # tiny | a Hugging Face BERT name or path, e.g. emilyalsentzer/Bio_ClinicalBERT
    pretrained: bool = False  # ImageNet / BioClinicalBERT weights (needs them downloaded or cached)
    embed_dim: int = 512  # shared embedding size (Sec. 4.2)
    max_tokens: int = 128  # text length after tokenisation
    tiny_width: int = 64  # tiny encoders: channels / hidden size
    tiny_layers: int = 2  # tiny BERT layers
    vocab_size: int = 2000  # WordPiece vocabulary fitted on the training reports when no pretrained tokenizer
    # loss (Sec. 3.3, 4.2)
    lambda_icl: float = 1.0  # λ_I
    lambda_tcl: float = 0.5  # λ_T
    init_temperature: float = 0.07  # τ at the start, learnable (CLIP); logit scale clamped at 100
    # optimisation (Sec. 4.2)
    epochs: int = 15  # training epochs
    batch_size: int = 128  # studies per GLOBAL batch (256 image-text pairs); each rank gets batch_size // world
    lr: float = 5e-5  # AdamW peak learning rate
    weight_decay: float = 1e-4  # AdamW weight decay (matrices only; not biases, norms, temperature)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine annealing to 0
    grad_clip: float = 1.0  # max gradient norm (0: off)
    patience: int = 0  # early stop after this many epochs without a lower validation loss (0: off)
    # run
    seed: int = 0  # seed for weights (same on every rank), data order and augmentations
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 + GradScaler; off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model (same loss; faster on GPU after warm-up)
    grad_ckpt: bool = False  # gradient checkpointing: recompute each ResNet / Swin stage and BERT layer in the backward (less memory, ~1/3 more compute)
    num_workers: int = 2  # DataLoader workers per rank
    threads: int = 1  # CPU only: torch intra-op threads per process (0: the usable cores / the processes on this node); 1 avoids OpenMP spin-waits
    #                   fighting the DataLoader workers for 2 cores (measured several times faster on a busy machine)
    out_dir: str = "out/cxrclip"  # ckpt.pt, ckpt_prev.pt, log.jsonl, metrics.json
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
    benchmark_steps: int = 10  # timed steps of --benchmark (after 3 warm-up steps)
    benchmark_workers: str = "0,1,2,4"  # DataLoader worker counts that --benchmark=data times
    preset: str = "demo"  # filled in by the CLI: demo | paper


PRESETS = {
    # Demo: phantoms at 64 px, tiny encoders from scratch (hence lr 2e-3). 3000 images -> ~990 training studies;
    # 32 studies per batch -> 31 steps/epoch; 40 epochs -> ~1240 steps. Half of the studies play the image-label
    # data (reports withheld, label prompts with 1 sampled negative class), as MIMIC + CheXpert do in the paper.
    "demo": dict(batch_size=32, epochs=40, lr=2e-3, weight_decay=1e-4, warmup_epochs=1.0, embed_dim=128,
                 label_prompt_frac=0.5, prompt_negatives=1),
    # Paper (Sec. 4.2): ResNet-50 + BioClinicalBERT, 224 px, 128 studies x 2 = 256 pairs per global batch
    # (e.g. 4 GPUs x 32 studies), lr 5e-5, wd 1e-4, cosine with 1 warm-up epoch, 15 epochs.
    "paper": dict(image_encoder="resnet50", text_encoder="emilyalsentzer/Bio_ClinicalBERT", pretrained=True,
                  image_size=224, embed_dim=512, batch_size=128, epochs=15, lr=5e-5, weight_decay=1e-4,
                  warmup_epochs=1.0, vocab_size=30522, num_workers=8, threads=0, data=""),
}

# ----------------------------------------------------------------------------------------------------
# ---- prompts (Sec. 3.1: class prompts per label value; the paper's appendix lists radiologists' prompts) ----
# {x} is the lower-case class name. "No Finding" is itself a negative statement: giving it the generic
# templates would produce "no no finding" (CheXzero's bug, AUC 0.07 for that class), so it has its own.

PROMPTS = {
    "positive": ["{x}.", "There is {x}.", "Findings consistent with {x}.", "{X} is present.", "{X} is seen."],
    "negative": ["No {x}.", "There is no {x}.", "No evidence of {x}.", "{X} is not seen.", "Negative for {x}."],
    "uncertain": ["Possible {x}.", "{X} cannot be excluded.", "Questionable {x}.", "Findings may represent {x}."],
}
NORMAL_LABELS = {"no finding", "normal"}
NORMAL_PROMPTS = {
    "positive": ["No acute abnormality.", "No acute findings.", "Normal study.", "No abnormal findings."],
    # not "acute abnormality is present": it shares its words with the normal "no acute abnormality"
    "negative": ["Abnormal study.", "The study is abnormal.", "There are abnormal findings."],
    "uncertain": ["The study may be abnormal."],
}
# Zero-shot evaluation (Sec. 4.3): one positive and one negative prompt set per class, averaged embeddings.
ZS_TEMPLATES = {"positive": ["There is {x}.", "{X} is present.", "{x}."],
                "negative": ["There is no {x}.", "No {x}.", "No evidence of {x}."]}


def class_prompts(label: str, value: str, templates=PROMPTS) -> list[str]:
    """All prompt sentences P(y) for class `label` with value positive / negative / uncertain."""
    if label.lower() in NORMAL_LABELS:
        return NORMAL_PROMPTS[value]
    x = label.lower()
    return [t.format(x=x, X=x[0].upper() + x[1:]) for t in templates[value]]


def zeroshot_prompts(label: str) -> tuple[list[str], list[str]]:
    if label.lower() in NORMAL_LABELS:
        return NORMAL_PROMPTS["positive"][:3], NORMAL_PROMPTS["negative"]
    return class_prompts(label, "positive", ZS_TEMPLATES), class_prompts(label, "negative", ZS_TEMPLATES)


def all_prompt_texts(labels: list[str]) -> list[str]:
    """Every prompt the model can be asked about (the demo tokenizer is fitted on these too)."""
    out = []
    for n in labels:
        for v in ("positive", "negative", "uncertain"):
            out += class_prompts(n, v)
        p, q = zeroshot_prompts(n)
        out += p + q
    return out


# ----------------------------------------------------------------------------------------------------
# ---- model (Sec. 3.2) ----


class TinyCNN(nn.Module):
    """Demo image encoder: three strided 3x3 conv blocks (64 px -> an 8x8 map) and a 1x1 conv, ~7 MMAC per
    64 px image. GroupNorm, not BatchNorm, so a sample's features do not depend on which rank's batch it sits
    in (the DDP equality test needs that)."""

    def __init__(self, width: int = 64):
        super().__init__()
        chans = [3, width // 4 + 8, width // 2 + 16, width + 32]
        blocks = []
        for i in range(3):
            blocks += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(8, chans[i + 1]), nn.GELU()]
        blocks += [nn.Conv2d(chans[3], 2 * width, 1, bias=False), nn.GroupNorm(8, 2 * width), nn.GELU()]
        self.body = nn.Sequential(*blocks)
        self.out_dim = 2 * width

    def tokens(self, x):  # [B, 3, H, W] -> [B, N, C]
        return self.body(x).flatten(2).transpose(1, 2)


class ImageEncoder(nn.Module):
    """E^i: global average pooled features of ResNet-50 / Swin-T (torchvision) or the tiny CNN."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.kind = cfg.image_encoder
        if self.kind == "tiny":
            self.net = TinyCNN(cfg.tiny_width)
            self.out_dim = self.net.out_dim
        elif self.kind == "resnet50":
            w = "ResNet50_Weights.IMAGENET1K_V2" if cfg.pretrained else None
            self.net = common.load_torchvision_model("resnet50", w)
            self.out_dim = self.net.fc.in_features
            self.net.fc = nn.Identity()
        elif self.kind == "swin_t":
            w = "Swin_T_Weights.IMAGENET1K_V1" if cfg.pretrained else None
            self.net = common.load_torchvision_model("swin_t", w)
            self.out_dim = self.net.head.in_features
            self.net.head = nn.Identity()
        else:
            raise ValueError(f"--image_encoder={self.kind}: expected tiny | resnet50 | swin_t")
        self.grad_ckpt = cfg.grad_ckpt

    def tokens(self, x):
        """Patch / feature-map tokens [B, N, C] (for segmentation heads)."""
        if self.kind == "tiny":
            return self.net.tokens(x)
        if self.kind == "resnet50":
            n = self.net
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
            return x.flatten(2).transpose(1, 2)
        return self.net.norm(self.net.features(x)).flatten(1, 2)  # Swin: [B, H, W, C] -> [B, HW, C]

    def forward(self, x):  # [B, 3, H, W] -> [B, C], mean over tokens (Swin has no class token)
        if self.grad_ckpt and self.training and torch.is_grad_enabled():
            return self._forward_recomputed(x)
        if self.kind == "tiny":
            return self.tokens(x).mean(1)
        return self.net(x)

    def _forward_recomputed(self, x):
        """--grad_ckpt: the same forward, each stage's activations recomputed in the backward (its input kept).
        ResNet's BatchNorm running statistics then see the recomputed stages a second time."""
        ck = lambda f, x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)  # noqa: E731
        n = self.net
        if self.kind == "tiny":
            return ck(n.body, x).flatten(2).mean(2)
        if self.kind == "resnet50":
            x = ck(nn.Sequential(n.conv1, n.bn1, n.relu, n.maxpool), x)
            for stage in (n.layer1, n.layer2, n.layer3, n.layer4):
                x = ck(stage, x)
            return torch.flatten(n.avgpool(x), 1)
        for stage in n.features:  # Swin-T
            x = ck(stage, x)
        return n.flatten(n.avgpool(n.permute(n.norm(x))))


def build_text_encoder(cfg: Config, vocab_size: int):
    from transformers import AutoModel, BertConfig, BertModel

    if cfg.text_encoder == "tiny":
        bc = BertConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_width, num_hidden_layers=cfg.tiny_layers,
                        num_attention_heads=max(1, cfg.tiny_width // 32), intermediate_size=cfg.tiny_width * 4,
                        max_position_embeddings=cfg.max_tokens, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
        bc._attn_implementation = "sdpa"
        return BertModel(bc, add_pooling_layer=False)
    if cfg.pretrained:
        return common.hf_from_pretrained(AutoModel, cfg.text_encoder, add_pooling_layer=False,
                                         attn_implementation="sdpa")
    # --pretrained=false with a named model: the architecture of BERT-base, random weights, our own vocabulary
    bc = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, cfg.max_tokens))
    bc._attn_implementation = "sdpa"
    return BertModel(bc, add_pooling_layer=False)


class CXRCLIP(nn.Module):
    def __init__(self, cfg: Config, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = build_text_encoder(cfg, len(tokenizer))
        if cfg.grad_ckpt:
            common.hf_grad_ckpt(self.text_encoder)
        self.image_proj = nn.Linear(self.image_encoder.out_dim, cfg.embed_dim, bias=False)  # f^i
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, cfg.embed_dim, bias=False)  # f^t
        # learnable temperature as a log logit scale (CLIP): exp(s) = 1/τ
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    # v = f^i(E^i(x)) / ||f^i(E^i(x))||   (Sec. 3.2)
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    # u = f^t(E^t(t)) / ||f^t(E^t(t))||, E^t(t) = output at the [EOS] token (BERT's [SEP]: the last real token)
    def encode_text(self, texts) -> torch.Tensor:
        if isinstance(texts, (list, tuple)):
            dev = self.logit_scale.device
            texts = {k: v.to(dev) for k, v in self.tokenize(texts).items()}
        h = self.text_encoder(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"]).last_hidden_state
        eos = texts["attention_mask"].sum(1) - 1  # [B] index of [SEP]
        feat = h[torch.arange(h.shape[0], device=h.device), eos]
        return F.normalize(self.text_proj(feat), dim=-1)

    def forward(self, images: torch.Tensor, texts1: dict, texts2: dict):
        """Training forward (through DDP): both image views in one pass, [2b, 3, H, W] -> v [2b, D]; u1, u2 [b, D]."""
        return self.encode_image(images), self.encode_text(texts1), self.encode_text(texts2)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.tokens(images)

    def tokenize(self, texts: list[str]) -> dict:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_tokens,
                                   return_tensors="pt", return_token_type_ids=False))

    def image_transform(self, train: bool):
        return ImageTransform(self.cfg.image_size, train)

    @staticmethod
    def zeroshot_prompts(label: str):
        return zeroshot_prompts(label)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)  # CLIP clamps 1/τ at 100 for stability


# ----------------------------------------------------------------------------------------------------
# ---- losses (Sec. 3.3) ----


# Eq. (1), Sec. 3.3. u, v: [b, D] L2-normalised, row i of u paired with row i of v. Under DDP each rank holds
# b rows of the global batch n = world*b: it scores its own rows against all n gathered columns, so the mean
# over ranks of this loss is exactly Eq. (1) over the global batch.
def clip_loss(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    u_all, v_all = common.all_gather_with_grad(u), common.all_gather_with_grad(v)  # [n, D]
    target = torch.arange(u.shape[0], device=u.device) + common.rank_offset(u.shape[0])
    loss_u = F.cross_entropy(scale * u @ v_all.T, target)  # -log exp(u_i.v_i/τ) / Σ_j exp(u_i.v_j/τ)
    loss_v = F.cross_entropy(scale * v @ u_all.T, target)  # -log exp(v_i.u_i/τ) / Σ_j exp(v_i.u_j/τ)
    return 0.5 * (loss_u + loss_v)


# Eq. (2), Sec. 3.3: the four pairings of two images (V^1, V^2) and two texts (U^1, U^2) of each study.
def mvs_loss(u1, u2, v1, v2, scale):
    return 0.25 * (clip_loss(u1, v1, scale) + clip_loss(u2, v1, scale)
                   + clip_loss(u1, v2, scale) + clip_loss(u2, v2, scale))


# Sec. 3.3: ICL = L_CLIP(V^1, V^2) (images of one study attract), TCL = L_CLIP(U^1, U^2) (texts of one study).
def icl_loss(v1, v2, scale):
    return clip_loss(v1, v2, scale)


def tcl_loss(u1, u2, scale):
    return clip_loss(u1, u2, scale)


# Sec. 3.3: L = L_MVS + λ_I ICL + λ_T TCL
def cxrclip_loss(u1, u2, v1, v2, scale, lambda_icl: float, lambda_tcl: float) -> tuple[torch.Tensor, dict]:
    mvs, icl, tcl = mvs_loss(u1, u2, v1, v2, scale), icl_loss(v1, v2, scale), tcl_loss(u1, u2, scale)
    total = mvs + lambda_icl * icl + lambda_tcl * tcl
    return total, {"mvs": mvs.detach(), "icl": icl.detach(), "tcl": tcl.detach()}


# ----------------------------------------------------------------------------------------------------
# ---- data (Sec. 3.1) ----


class ImageTransform:
    """A_i (Sec. 4.2): random resized crop with scale [0.8, 1.1], CLAHE half of the time, brightness [0.9, 1.1]
    and contrast [0.8, 1.2] jitter. Eval: resize only. uint8 [H, W] -> normalised float [3, S, S]."""

    def __init__(self, size: int, train: bool):
        self.size, self.train = size, train

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        if not self.train:
            return common.to_tensor(common.resize(img, self.size))
        rng = rng or np.random.default_rng()
        if max(img.shape) > 2 * self.size:  # crop from a smaller copy: same result, far less work
            img = common.resize(img, 2 * self.size)
        img = common.random_resized_crop(img, self.size, rng, scale=(0.8, 1.1))
        if rng.random() < 0.5:
            img = common.clahe(img)
        img = common.color_jitter(img, rng, brightness=(0.9, 1.1), contrast=(0.8, 1.2))
        return common.to_tensor(img)


def sentence_shuffle(text: str, rng: np.random.Generator) -> str:
    """A_t (Sec. 4.2): swap the order of the report's sentences (meaning is kept; a real permutation)."""
    sents = [s.strip() for s in text.replace("\n", " ").split(".") if s.strip()]
    if len(sents) < 2:
        return text
    order = rng.permutation(len(sents))
    if (order == np.arange(len(sents))).all():
        order = np.roll(order, 1)
    return " ".join(sents[i] + "." for i in order)


def label_prompt_text(names: list[str], labels: np.ndarray, rng: np.random.Generator, n_neg: int) -> str:
    """T = Concat({p ~ P(y)}_{y in Y}) (Sec. 3.1): a sampled prompt for every positive / uncertain class and
    for `n_neg` sampled negative classes (as the paper does for ChestX-ray14)."""
    parts, negs = [], []
    for j in rng.permutation(len(names)):
        y = labels[j]
        if names[j].lower() in NORMAL_LABELS and y in (0, 1):  # the study-level summary label is always stated
            parts.append(rng.choice(class_prompts(names[j], "positive" if y == 1 else "negative")))
        elif y == 1:
            parts.append(rng.choice(class_prompts(names[j], "positive")))
        elif y == -1:
            parts.append(rng.choice(class_prompts(names[j], "uncertain")))
        elif y == 0:
            negs.append(j)
    for j in negs[:n_neg]:
        parts.append(rng.choice(class_prompts(names[j], "negative")))
    return " ".join(parts) if parts else rng.choice(NORMAL_PROMPTS["positive"])


class StudyDataset(torch.utils.data.Dataset):
    """Item = one study -> two images (x^1, x^2) and two texts (t^1, t^2), as in Sec. 3.1 / Fig. 1.

    Indexed by (study index, sample seed) from common.EpochSampler, so every random choice is a function of
    (seed, epoch, study) alone. An unreadable image is replaced by another image of the study, or the study
    by the next one; every replacement is reported in the sample's "bad" field and counted by the loop.
    """

    def __init__(self, table: common.XrayCSV, cfg: Config, train: bool = True):
        self.t, self.cfg, self.train = table, cfg, train
        self.transform = ImageTransform(cfg.image_size, train)

    def __len__(self):
        return len(self.t.studies)

    def _texts(self, idx: int, rows: list[int], rng) -> tuple[str, str]:
        r0 = self.t.rows[rows[0]]
        sections = self.t.texts(rows[0]) if self.cfg.text_source == "auto" else []
        # a fixed subset of studies plays the image-label data set (the same studies in every epoch)
        if self.train and self.t.label_names and (idx * 2654435761 % 2**32) / 2**32 < self.cfg.label_prompt_frac:
            sections = []
        if not sections:  # image-label study: two independently sampled prompt texts
            lab = self.t.rows[rows[0]]["_labels"]
            return (label_prompt_text(self.t.label_names, lab, rng, self.cfg.prompt_negatives),
                    label_prompt_text(self.t.label_names, lab, rng, self.cfg.prompt_negatives))
        if len(sections) >= 2:
            t1, t2 = sections[0], sections[1]
            if rng.random() < 0.5:
                t1, t2 = t2, t1
        else:
            t1 = t2 = sections[0]
        if self.train:  # A_t: back-translation where data_prep wrote it, else sentence shuffle
            bt = [r0.get(k, "").strip() for k in ("findings_bt", "impression_bt") if r0.get(k, "").strip()]
            if len(sections) < 2:
                t2 = bt[0] if bt and rng.random() < 0.5 else sentence_shuffle(t1, rng)
            elif rng.random() < 0.5:
                t2 = sentence_shuffle(t2, rng)
        return t1, t2

    def _images(self, rows: list[int], rng, bad: list):
        """Two images from distinct views where the study has them (Sec. 3.1), else one image twice."""
        by_view: dict[str, list[int]] = {}
        for i in rng.permutation(rows):
            by_view.setdefault(self.t.rows[i].get("view", ""), []).append(int(i))
        views = list(by_view)
        order = [by_view[v][0] for v in views] + [i for v in views for i in by_view[v][1:]]
        imgs = []
        for i in order:
            try:
                imgs.append(common.load_image(self.t.rows[i]["_path"]))
            except common.BadImageError as e:
                bad.append(("unreadable image", str(e)))
            if len(imgs) == 2:
                break
        if len(imgs) == 1:
            imgs.append(imgs[0])  # x^2 = A_i(x^1): the same image, augmented independently below
        return imgs

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        bad = []
        for attempt in range(8):
            rows = self.t.studies[(idx + attempt * 7919) % len(self.t.studies)]
            imgs = self._images(rows, rng, bad)
            if imgs:
                break
        else:
            raise RuntimeError(f"8 studies in a row around study {idx} have no readable image: is the image "
                               f"folder next to {self.t.path}? First error: {bad[0][1]}")
        t1, t2 = self._texts((idx + attempt * 7919) % len(self.t.studies), rows, rng)
        x1, x2 = self.transform(imgs[0], rng), self.transform(imgs[1], rng)
        return {"x1": x1, "x2": x2, "t1": t1, "t2": t2, "bad": bad}


class Collate:
    """Stacks images and tokenises both texts in the worker (keeps the training process free)."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, items):
        out = {"x1": torch.stack([it["x1"] for it in items]), "x2": torch.stack([it["x2"] for it in items]),
               "bad": [b for it in items for b in it["bad"]]}
        for k in ("t1", "t2"):
            out[k] = self.tokenize([it[k] for it in items])
        return out


def make_loader(ds, cfg: Config, di: common.DistInfo, local_batch: int, shuffle: bool, tokenize):
    sampler = common.EpochSampler(len(ds), local_batch, di.rank, di.world_size, cfg.seed, shuffle=shuffle)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=local_batch, sampler=sampler, collate_fn=Collate(tokenize), num_workers=cfg.num_workers,
        pin_memory=di.device.startswith("cuda"), persistent_workers=cfg.num_workers > 0, drop_last=True,
        prefetch_factor=4 if cfg.num_workers > 0 else None)
    return loader, sampler


# ----------------------------------------------------------------------------------------------------
# ---- build / load ----


def build_tokenizer(cfg: Config, table: common.XrayCSV | None):
    if cfg.text_encoder != "tiny" and cfg.pretrained:
        from transformers import AutoTokenizer

        return common.hf_from_pretrained(AutoTokenizer, cfg.text_encoder)
    if table is None:
        raise ValueError("a tokenizer fitted on the training reports needs the training CSV")
    texts = [t for i in range(len(table)) for t in table.texts(i)] + all_prompt_texts(table.label_names)
    return common.train_wordpiece(texts, cfg.vocab_size)


def build(cfg: Config, tokenizer=None, table: common.XrayCSV | None = None) -> CXRCLIP:
    tokenizer = tokenizer or build_tokenizer(cfg, table)
    return CXRCLIP(cfg, tokenizer)


def load(path: str, map_location="cpu") -> tuple[CXRCLIP, Config]:
    """Rebuild the model from a checkpoint alone: config and tokenizer vocabulary are stored in it."""
    ck = common.load_checkpoint(path, map_location)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    tok = common.tokenizer_from_vocab(ck["tokenizer_vocab"]) if ck.get("tokenizer_vocab") else None
    if tok is None:  # a pretrained tokenizer (paper preset): loaded by name, like the weights were
        from transformers import AutoTokenizer

        tok = common.hf_from_pretrained(AutoTokenizer, cfg.text_encoder)
    cfg.pretrained = False  # the weights come from the checkpoint, not from ImageNet / the hub
    model = CXRCLIP(cfg, tok)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg


# ----------------------------------------------------------------------------------------------------
# ---- evaluation: zero-shot classification (Sec. 4.3) ----


@torch.no_grad()
def embed_images(model, table: common.XrayCSV, device, batch_size: int = 256, counter=None):
    """[N, D] normalised embeddings of every row of `table` (eval transform), and a mask of readable rows."""
    tf = model.image_transform(False)
    feats, ok = [], np.ones(len(table), bool)
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
        feats.append(model.encode_image(torch.stack(xs).to(device)).float().cpu())
    return torch.cat(feats).numpy(), ok


@torch.no_grad()
def zeroshot_eval(model, table: common.XrayCSV, device, batch_size: int = 256) -> dict:
    """Per class: similarity to the mean positive-prompt embedding minus the mean negative-prompt one, i.e. the
    logit of CheXzero's softmax over the (positive, negative) pair; AUC per class and macro."""
    model.eval()
    img, ok = embed_images(model, table, device, batch_size)
    scores = np.zeros((len(table), len(table.label_names)), np.float32)
    for j, name in enumerate(table.label_names):
        pos, neg = model.zeroshot_prompts(name)
        tp = F.normalize(model.encode_text(pos).mean(0), dim=-1).float().cpu().numpy()
        tn = F.normalize(model.encode_text(neg).mean(0), dim=-1).float().cpu().numpy()
        scores[:, j] = img @ tp - img @ tn
    res = common.auc_per_label(table.labels()[ok], scores[ok], table.label_names)
    return {"zeroshot_auc_macro": res["macro"], "zeroshot_auc_per_label": res["per_label"], "n_images": int(ok.sum())}


# ----------------------------------------------------------------------------------------------------
# ---- training ----


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine annealing to 0 at `total` (Sec. 4.2)."""
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


def param_groups(model: nn.Module, wd: float):
    """Weight decay on matrices only (not on biases, norms or the temperature)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def train(cfg: Config) -> dict:
    di = common.setup_distributed(cfg.device)
    common.set_cpu_threads(cfg.threads, di.device)
    if cfg.batch_size % di.world_size:
        raise common.ConfigError(f"--batch_size={cfg.batch_size} (global) must divide by the {di.world_size} processes")
    local_batch = cfg.batch_size // di.world_size
    out = common.prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite) if di.is_main else None
    common.seed_everything(cfg.seed)
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
    tr = common.XrayCSV(cfg.data, split="train", require=("image", "study_id"), require_text=True, counter=counter)
    va = common.XrayCSV(cfg.data, split="valid", require=("image", "study_id"), counter=counter)
    te = common.XrayCSV(cfg.data, split="test", require=("image",), counter=counter)

    # -- model: the tokenizer is fitted on the training reports on rank 0's data; every rank fits the same one
    ck = common.load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")) if cfg.resume else None
    tok = common.tokenizer_from_vocab(ck["tokenizer_vocab"]) if ck and ck.get("tokenizer_vocab") else None
    model = build(cfg, tok, tr).to(di.device)
    if cfg.image_encoder != "tiny" and di.device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    vocab = None if (cfg.text_encoder != "tiny" and cfg.pretrained) else common.tokenizer_vocab(model.tokenizer)

    train_ds = StudyDataset(tr, cfg, train=True)
    loader, sampler = make_loader(train_ds, cfg, di, local_batch, True, model.tokenize)
    val_loader = None
    if len(va.studies) >= cfg.batch_size:
        val_loader, _ = make_loader(StudyDataset(va, cfg, train=False), cfg, di, local_batch, False, model.tokenize)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch

    fused = di.device.startswith("cuda")
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
    autocast, scaler = amp_context(cfg, di.device)

    step, start_epoch, start_batch, best_val, bad_epochs = 0, 0, 0, float("inf"), 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, start_epoch, start_batch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        best_val, bad_epochs = ck.get("best_val", best_val), ck.get("bad_epochs", 0)
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
        model = nn.parallel.DistributedDataParallel(model, device_ids=[di.local_rank] if fused else None)

    def save(epoch, batch_in_epoch):
        if di.is_main:
            common.save_checkpoint({
                "model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "rng": common.rng_state(), "config": dataclasses.asdict(cfg),
                "tokenizer_vocab": vocab, "best_val": best_val, "bad_epochs": bad_epochs, "paper": "cxrclip",
            }, os.path.join(cfg.out_dir, "ckpt.pt"))
        if di.ddp:
            torch.distributed.barrier()

    def forward_loss(batch):
        dev = di.device
        x1, x2 = batch["x1"].to(dev, non_blocking=True), batch["x2"].to(dev, non_blocking=True)
        t1 = {k: v.to(dev, non_blocking=True) for k, v in batch["t1"].items()}
        t2 = {k: v.to(dev, non_blocking=True) for k, v in batch["t2"].items()}
        with autocast():
            # one pass per encoder over both views: [2b, ...] keeps the GPU busy; called through the DDP
            # wrapper (not .module) so its gradient hooks are armed for this forward
            v, u1, u2 = model(torch.cat([x1, x2]), t1, t2)
        b = x1.shape[0]
        v1, v2 = v[:b].float(), v[b:].float()
        return cxrclip_loss(u1.float(), u2.float(), v1, v2, raw_model.scale(), cfg.lambda_icl, cfg.lambda_tcl)

    stopper = common.StopSignal()
    common.print0(f"cxrclip: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, "
                  f"{len(tr.studies)} training studies, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
                  f"global batch {cfg.batch_size} studies on {di.world_size} process(es), device {di.device}")
    t_start, bad_run, n_skipped, stop_reason, fault_done = time.time(), 0, 0, None, False
    pbar = None
    if di.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps if cfg.max_steps < 0 else min(total_steps, cfg.max_steps), initial=step,
                    desc="cxrclip", unit="step", dynamic_ncols=True)
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
                    if pbar:
                        pbar.close()
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
            step, bi = step + 1, bi + 1
            if step % cfg.log_every == 0 or step == 1:
                row = {"step": step, "epoch": epoch, "loss": common.all_reduce_mean(loss.detach()),
                       **{k: common.all_reduce_mean(v) for k, v in parts.items()},
                       "lr": sched.get_last_lr()[0], "temperature": 1 / float(raw_model.scale().detach()),
                       "elapsed_s": round(time.time() - t_start, 2)}
                logger.log(**row)
                if pbar:
                    pbar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
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
        # -- end of epoch: bad-sample report, validation loss (sharded over ranks), checkpoint
        common.print0(counter.summary())
        if pbar and counter.seen and counter.total / counter.seen > counter.max_bad_frac:
            pbar.close()  # the check below raises: close the bar first so it is not printed at exit
        counter.check()
        val = validate(model, val_loader, forward_loss) if val_loader is not None else None
        if val is not None:
            logger.log(step=step, epoch=epoch, val_loss=val)
            best_val, bad_epochs = (val, 0) if val < best_val else (best_val, bad_epochs + 1)
        start_batch = 0
        save(epoch + 1, 0)
        if cfg.patience and bad_epochs >= cfg.patience:
            stop_reason = f"early stop: validation loss has not improved for {cfg.patience} epochs"
            break
    if pbar:
        pbar.close()
    stopper.restore()  # SIGTERM / Ctrl-C act normally again (and in processes forked from here on)
    common.print0(f"training: {step} steps in {time.time() - t_start:.1f} s" + (f" ({stop_reason})" if stop_reason else ""))
    if stop_reason and not stop_reason.startswith("early"):
        common.print0(f"checkpoint written to {cfg.out_dir}/ckpt.pt; continue with --resume")
        common.cleanup_distributed()
        return {"stopped": stop_reason, "step": step}

    # -- zero-shot evaluation on the test split, on rank 0 (the others wait at the barrier: it is small)
    metrics = {}
    if di.is_main:
        metrics = zeroshot_eval(raw_model, te, di.device, cfg.eval_batch_size)
        metrics.update(step=step, train_seconds=round(time.time() - t_start, 1), bad_samples=dict(counter.counts),
                       skipped_nonfinite_steps=n_skipped)
        common.write_json_atomic(os.path.join(cfg.out_dir, "metrics.json"), metrics)
        print(f"zero-shot macro AUC on the test split: {metrics['zeroshot_auc_macro']:.4f} "
              f"({metrics['n_images']} images)")
        for n, a in metrics["zeroshot_auc_per_label"].items():
            print(f"  {n:<24} {'undefined (one class only)' if a is None else f'{a:.4f}'}")
        print(f"wrote {cfg.out_dir}/metrics.json")
    common.cleanup_distributed()
    return metrics


@torch.no_grad()
def validate(model, loader, forward_loss) -> float:
    model.eval()
    tot, n = 0.0, 0
    for batch in loader:
        loss, _ = forward_loss(batch)
        tot, n = tot + common.all_reduce_mean(loss), n + 1
    model.train()
    return tot / max(n, 1)


# ----------------------------------------------------------------------------------------------------
# ---- benchmark (python cxrclip.py --preset=paper --benchmark) ----


def benchmark(cfg: Config) -> dict:
    """Training steps of the preset's model and batch on synthetic tensors of the real shapes (random init,
    no data loading): samples/s, step time, peak memory, FLOPs per sample (FlopCounterMode on the eager
    model), MFU against the GPU's bf16 peak. `--benchmark=data` times the input pipeline instead."""
    di = common.setup_distributed(cfg.device)
    common.set_cpu_threads(cfg.threads, di.device)
    common.seed_everything(cfg.seed)
    if cfg.benchmark == "data":
        cfg.data = common.benchmark_data_csv(cfg.data, Config.data, cfg.n_phantoms)
        tr = common.XrayCSV(cfg.data, split="train", require=("image", "study_id"))
        tok = build_tokenizer(cfg, tr)
        ds = StudyDataset(tr, cfg, train=True)
        keyed = [(i, i) for i in range(len(ds))]
        res = common.benchmark_data(torch.utils.data.Subset(ds, keyed), Collate(lambda t: dict(
            tok(list(t), padding=True, truncation=True, max_length=cfg.max_tokens, return_tensors="pt"))),
            batch_size=min(64, cfg.batch_size), workers=common.parse_workers(cfg.benchmark_workers), n_batches=10)
        common.cleanup_distributed()
        return {"data": res}
    if di.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg.pretrained = False  # random init: the benchmark measures speed, not accuracy
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(cfg.vocab_size - 5)]
    model = CXRCLIP(cfg, common.tokenizer_from_vocab(vocab)).to(di.device)
    if cfg.image_encoder != "tiny" and di.device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    b = cfg.batch_size // di.world_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * b, 3, cfg.image_size, cfg.image_size, generator=g).to(di.device)
    if di.device.startswith("cuda") and cfg.image_encoder != "tiny":
        x = x.contiguous(memory_format=torch.channels_last)
    texts = [{"input_ids": torch.randint(5, cfg.vocab_size, (b, cfg.max_tokens), generator=g).to(di.device),
              "attention_mask": torch.ones(b, cfg.max_tokens, dtype=torch.long, device=di.device)} for _ in range(2)]
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=di.device.startswith("cuda"))
    autocast, scaler = amp_context(cfg, di.device)
    fwd = torch.compile(model) if cfg.compile else model
    net = nn.parallel.DistributedDataParallel(fwd) if di.ddp else fwd

    def step(m=net):
        with autocast():
            v, u1, u2 = m(x, texts[0], texts[1])
        loss, _ = cxrclip_loss(u1.float(), u2.float(), v[:b].float(), v[b:].float(), model.scale(), 1.0, 0.5)
        (scaler.scale(loss) if scaler else loss).backward()
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad(set_to_none=True)

    flops = common.count_flops(lambda: step(model))  # counted on the eager model, one process's share
    res = common.run_benchmark(step, 2 * b, di.device, warmup=3, steps=cfg.benchmark_steps, flops_per_step=flops,
                               label=f"cxrclip {cfg.image_encoder}+{cfg.text_encoder.split('/')[-1]} "
                                     f"{cfg.image_size}px, {b} studies ({2 * b} image-text pairs) per process"
                                     + (", compiled" if cfg.compile else ""))
    common.cleanup_distributed()
    return res


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv)
    if cfg.benchmark != "off":
        return benchmark(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
