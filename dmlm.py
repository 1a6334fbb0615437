"""D-MLM: Distribution-Based Masked Medical Vision-Language Model Using Structured Reports.
S. N. Gowda, R. Zhang, X. Gu, Y. Weng, L. Yang. arXiv:2507.21794 (2025).

Map of the method (Sec. 2.1-2.3, 3.5):
    report -> Definition / Appearance (per finding, from a knowledge file) / Observations / Verdicts  Sec. 2.1
    image I -> ViT-B E^i, report T -> ClinicalBERT E^t; each patch / token h_i = N(mu_i, sigma_i^2) Eq. (1)
    mask 30% of the tokens, and 30% of the patches, drawn towards the regions Appearance names  Sec. 2.2, 3.5
    a fusion transformer predicts N(mu^_i, sigma^_i^2) of each masked token from the full image and the
        rest of the report, p(h_i | I, T\\i), and of each masked patch from the full report          Eq. (2)
    L_D-MLM: KL(N(mu^, sigma^2) || N(mu, sigma^2)) over the masked tokens and patches, the targets from the
        unmasked pair; the targets' variances learn the prediction's error                           Eq. (3)
    L_align: 2-Wasserstein distance of the image's and the report's Gaussians                       Eq. (4)
    L = lambda L_D-MLM + (1 - lambda) L_align, lambda = 0.2                                Eq. (5), Sec. 3.6
Equation -> function -> test (tests/test_dmlm.py::test_...):
    Eq. (1)   GaussianHead, DMLM.patch_variances, DMLM.token_variances    gaussian_head_*, patch_and_token_*
    Eq. (2)   DMLM.forward, DMLM.fuse, DMLM.unmasked                                 eq2_*, targets_*, vit_*
    Eq. (3)   gaussian_kl, dmlm_loss, evaluate                gaussian_kl_*, dmlm_loss_*, harder_*, sigma2_*
    Eq. (4)   w2_squared_pairwise, align_contrastive_loss, mean_gaussian,            w2_*, align_*, pooled_*
              DMLM.pooled_image
    Eq. (5)   total_loss                                                    align_contrastive_*, short_run_*
    Sec. 2.1  structured_report, zeroshot_prompts                                        structured_report_*
    Sec. 2.2  text_token_mask, image_patch_mask, region_prior        text_mask_*, image_mask_*, region_map_*

Run:
    python dmlm.py                                          # demo: phantoms, small ViT + BERT, 2 CPU cores
    torchrun --nproc_per_node=2 dmlm.py                     # the same demo in 2 processes
    python text_prep.py knowledge --findings=data/mimic_cxr.csv --model=<LLM folder> --out=data/knowledge.json
    python dmlm.py --preset=paper --data=data/mimic_cxr.csv --knowledge=data/knowledge.json
    torchrun --nproc_per_node=4 \\
        dmlm.py --preset=paper --data=data/mimic_cxr.csv --knowledge=data/knowledge.json
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        dmlm.py --preset=paper --data=data/mimic_cxr.csv --knowledge=data/knowledge.json
    python dmlm.py --align=pairs --target=ema --image_mask=random   # the other readings (Eq. 3-4, Sec. 2.2)

Departures from the paper are stated at their lines and in README.md ("D-MLM")."""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import spearmanr

import common
import phantoms


# ----------------------------------------------------------------------------------------------------
# ---- config ----


@dataclass
class Config:
    # data (Sec. 2.1, 3.1)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema (the demo draws phantoms here)
    knowledge: str = "knowledge/phantom_chexpert.json"  # Sec. 2.1: {finding: {definition, appearance}} JSON
    image_size: int = 64  # input resolution (224, Sec. 3.5)
    max_tokens: int = 96  # structured reports truncated to this many tokens, from the left (not given)
    # encoders E^i, E^t (Sec. 2.2, 3.5)
    pretrained: bool = False  # ImageNet ViT-B/16 and ClinicalBERT weights (the paper)
    patch_size: int = 8  # ViT patch size (16: the paper says ViT-B, not its patch size)
    stem: str = "patch"  # patch: ViT's patchify | conv / hmlp: strided 3x3 / 2x2 convs (common.ConvStem)
    vit_width: int = 64  # ViT token size (768); also the width of the demo's BERT and of the fusion
    vit_depth: int = 2  # ViT layers (12); also the demo BERT's
    vit_heads: int = 2  # attention heads of the ViT, the demo's BERT and the fusion transformer (12)
    text_encoder: str = "tiny"  # tiny (from scratch) | a BERT name or folder (ClinicalBERT)
    # D-MLM (Sec. 2.2-2.3)
    embed_dim: int = 64  # Eq. (1): dimension D of mu and sigma^2 (768, "latent dimension", Sec. 3.5)
    fusion_layers: int = 1  # Eq. (2): layers of the fusion transformer (the paper names none)
    mask_ratio: float = 0.3  # share of the text tokens (Sec. 2.2) and of the image patches (Sec. 3.6) masked
    image_mask: str = "adaptive"  # adaptive: towards the regions the Appearance names (Sec. 2.2) | random
    target: str = "stopgrad"  # Eq. (3) targets: stopgrad (the encoders' unmasked pass) | ema (momentum copy)
    pool: str = "mean"  # Eq. (4)'s image Gaussian: mean of its patch Gaussians (Eq. 1), as the report's | max
    align: str = "contrastive"  # Eq. (4): contrastive (-W2^2 / 2 as InfoNCE logits) | pairs (literal)
    lam: float = 0.2  # Eq. (5): L = lam L_D-MLM + (1 - lam) L_align (Sec. 3.6)
    # optimisation (Sec. 3.5)
    epochs: int = 100  # pre-training epochs (100)
    batch_size: int = 128  # GLOBAL batch of image-report pairs (128)
    lr: float = 3e-4  # AdamW peak lr of the Gaussian heads, fusion, mask token and temperature (3e-4)
    encoder_lr: float = 1e-5  # AdamW peak lr of the ViT and the BERT (1e-5)
    weight_decay: float = 0.05  # AdamW weight decay on weight matrices (0.05)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0 (the length is not given)
    grad_clip: float = 1.0  # max gradient norm, 0: off (the paper names none)
    # run
    seed: int = 0  # weights, data order and augmentations
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model
    num_workers: int = 2  # DataLoader workers per process
    threads: int = 0  # CPU: torch threads per process (0: the cores shared among the processes)
    out_dir: str = "out/dmlm"  # ckpt.pt, log.jsonl, metrics.json
    resume: bool = False  # continue out_dir/ckpt.pt exactly where it stopped
    overwrite: bool = False  # replace an existing run in out_dir
    max_steps: int = -1  # stop (with a checkpoint) after this many steps; the schedule still spans --epochs
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and at every epoch end)
    max_bad_frac: float = 0.01  # fail when more than this share of samples is unreadable or empty
    preset: str = "demo"  # set by --preset


PRESETS = {
    # Demo: phantoms at 64 px; a 2-layer ViT (8x8 tokens from a conv stem) and BERT, one fusion layer, width
    # 64, from scratch at the heads' lr; ~2100 images / 32 = 66 steps x 13 epochs (batch 32: twice the updates
    # of 64 in the same time). pool=max: a phantom's finding may fill 1 of 64 patches, which a mean dilutes.
    "demo": dict(epochs=13, batch_size=32, lr=2e-3, encoder_lr=2e-3, stem="conv", num_workers=0, pool="max"),
    # Paper (Sec. 3.5): ViT-B/16 (ImageNet) + ClinicalBERT, 224 px, D = 768, global batch 128 (4 GPUs x 32),
    # AdamW wd 0.05, warm-up to 3e-4 then cosine, encoders at 1e-5, 100 epochs; 30% masking, lambda = 0.2.
    "paper": dict(data="", image_size=224, max_tokens=256, pretrained=True, patch_size=16, vit_width=768,
                  vit_depth=12, vit_heads=12, text_encoder="emilyalsentzer/Bio_ClinicalBERT", embed_dim=768,
                  fusion_layers=4, num_workers=8),
}
PHANTOMS = 3000  # images in the demo's phantom data set
VOCAB_SIZE = 1500  # the demo's WordPiece vocabulary, fitted on the training reports and the prompts

# ----------------------------------------------------------------------------------------------------
# ---- model (Sec. 2.2) ----
# A ViT with torchvision's parameter names (class_token, conv_proj, encoder.pos_embedding, encoder.layers.
# encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp}, encoder.ln): its ImageNet state dict loads as it is.


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters through one SDPA call; with a context (fusion), queries see both."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * dim, dim)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, context=None, keep=None):  # x [B, S, C], context [B, T, C]; keep [B, S+T]: not pad
        B, S, C = x.shape
        w, b, h = self.in_proj_weight, self.in_proj_bias, self.heads
        q = F.linear(x, w[:C], b[:C]).view(B, S, h, C // h).transpose(1, 2)  # [B, h, S, C/h]
        kv = F.linear(x if context is None else torch.cat([x, context], 1), w[C:], b[C:])  # [B, S+T, 2C]
        k, v = kv.view(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # each [B, h, S+T, C/h]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if keep is None else keep[:, None, None])
        return self.out_proj(y.transpose(1, 2).reshape(B, S, C))


class Block(nn.Module):
    """Pre-LN transformer layer (torchvision's EncoderBlock: ln_1, self_attention, ln_2, mlp.0, mlp.3)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim),
                                 nn.Dropout(0.0))
        for lin in (self.mlp[0], self.mlp[3]):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, x, context=None, keep=None):
        x = x + self.self_attention(self.ln_1(x), None if context is None else self.ln_1(context), keep)
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """E^i: images [B, 3, H, W] -> tokens [B, 1+N, C], the class token first. A masked patch's token is
    replaced by the mask token after the stem (SimMIM-style): one encoder serves both passes."""

    def __init__(self, cfg: Config):
        super().__init__()
        C, n_patches = cfg.vit_width, (cfg.image_size // cfg.patch_size) ** 2
        if cfg.stem == "patch":
            self.conv_proj = nn.Conv2d(3, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (3 * cfg.patch_size ** 2)))
            nn.init.zeros_(self.conv_proj.bias)
        else:  # demo: strided convs (common.ConvStem); 3x3 ("conv") show a token a masked neighbour's
            # edge pixels, 2x2 ("hmlp") keep a masked patch hidden and train slower
            self.conv_proj = common.ConvStem(C, cfg.patch_size, overlap=cfg.stem == "conv")
        self.class_token = nn.Parameter(torch.zeros(1, 1, C))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.empty(1, n_patches + 1, C).normal_(std=0.02))
        self.encoder.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", Block(C, cfg.vit_heads)) for i in range(cfg.vit_depth)))
        self.encoder.ln = nn.LayerNorm(C, eps=1e-6)

    def forward(self, images, patch_mask=None, mask_token=None):  # patch_mask [B, N], True: masked
        p = self.conv_proj(images).flatten(2).transpose(1, 2)  # [B, N, C]
        if patch_mask is not None:
            p = torch.where(patch_mask[..., None], mask_token.to(p.dtype), p)
        cls = self.class_token.expand(p.shape[0], -1, -1).to(p.dtype)
        return self.encoder.ln(self.encoder.layers(torch.cat([cls, p], 1) + self.encoder.pos_embedding))


class GaussianHead(nn.Module):
    """Eq. (1): features [..., C] -> (mu, sigma^2) [..., D], in float32 under autocast too (bf16 puts a nearly
    converged KL percents off). Ours (not given): unit mu (zero-shot cosine); sigma^2 = (softplus + 1e-4) / D,
    so sum_d sigma_d^2 is O(1) like ||mu||^2 and W2's variance term (Eq. 4) does not swamp the means."""

    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.mu, self.var = nn.Linear(c_in, dim), nn.Linear(c_in, dim)
        nn.init.normal_(self.var.weight, std=0.01)  # every sigma^2 starts near softplus(0) / D
        nn.init.zeros_(self.var.bias)

    def forward(self, h):
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            return F.normalize(self.mu(h), dim=-1), (F.softplus(self.var(h)) + 1e-4) / self.var.out_features


def mean_gaussian(mu, var, keep):  # [B, S, D] each, keep [B, S] -> the kept positions' mean, mu L2-normalised
    w = (keep / keep.sum(1, keepdim=True).clamp(min=1)).to(mu.dtype)[..., None]  # [B, S, 1]
    return F.normalize((mu * w).sum(1), dim=-1), (var * w).sum(1)


class DMLM(nn.Module):
    """E^i + E^t, the Gaussian heads of Eq. (1) and the fusion transformer of Eq. (2)."""

    def __init__(self, cfg: Config, text_encoder: nn.Module, tokenizer, knowledge: dict):
        super().__init__()
        self.cfg, self.tokenizer, self.knowledge = cfg, tokenizer, knowledge
        self.tokenizer.truncation_side = "left"  # a long report loses its Definition's start, not its Verdict
        self.visual, self.text = ViT(cfg), text_encoder
        C, ct, D = cfg.vit_width, text_encoder.config.hidden_size, cfg.embed_dim
        self.image_gauss, self.text_gauss = GaussianHead(C, D), GaussianHead(ct, D)  # Eq. (1): patch, token
        self.mask_token = nn.Parameter(torch.empty(1, 1, C).normal_(std=0.02))  # a masked patch's token
        # Eq. (2): the paper names no fusion module. Ours: pre-LN layers, queries one modality's tokens, keys
        # and values those and the other's (told apart by a modality embedding); a Gaussian head per modality.
        self.fuse_image, self.fuse_text = nn.Linear(C, C), nn.Linear(ct, C)
        self.modality = nn.Parameter(torch.zeros(2, C))
        self.fusion = nn.ModuleList(Block(C, cfg.vit_heads) for _ in range(cfg.fusion_layers))
        self.fusion_ln = nn.LayerNorm(C, eps=1e-6)
        self.pred_image, self.pred_text = GaussianHead(C, D), GaussianHead(C, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # 1/tau of --align=contrastive

    def forward(self, images, input_ids, attention_mask, masked_ids, patch_mask, teacher=None):
        """-> Eq. (4)'s Gaussians (mu, sigma^2) "image", "text" [B, D]; Eq. (3)'s targets "target_image"
        [B, N, D], "target_text" [B, L, D] (--target=ema: means from `teacher`); Eq. (2)'s "pred_*". Passes:
            images -> ViT -> hv;  report -> BERT -> ht  Eq. (1) heads: the targets (Eq. 3), pooled: Eq. (4)
            images with patch_mask -> ViT -> hv_m -> fusion, context ht (detached) -> "pred_image"  Eq. (2)
            masked_ids -> BERT -> ht_m -> fusion, context hv (detached) -> "pred_text"              Eq. (2)"""
        hv, ht = self.unmasked(images, input_ids, attention_mask)  # [B, 1+N, C], [B, L, Ct]
        hv_m = self.visual(images, patch_mask, self.mask_token)  # [B, 1+N, C]
        ht_m = self.text(input_ids=masked_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, Ct]
        # Eq. (2), p(h_i | I, T\i): a masked token from the rest of its report and the FULL image, a patch
        # from the rest of its image and the full report (as MaskVLM); context detached (ours: aligns faster).
        masked_image, context_image = (self.fuse_image(h) + self.modality[0] for h in (hv_m, hv.detach()))
        masked_text, context_text = (self.fuse_text(h) + self.modality[1] for h in (ht_m, ht.detach()))
        ones = attention_mask.new_ones(hv.shape[:2])
        z_image = self.fuse(masked_image, context_text, torch.cat([ones, attention_mask], 1))  # [B, 1+N, C]
        z_text = self.fuse(masked_text, context_image, torch.cat([attention_mask, ones], 1))  # [B, L, C]
        # Eq. (3)'s targets: Eq. (1)'s Gaussians of the unmasked pass. Their means carry no gradient (else
        # prediction and target meet at a constant); their variances do, and so sigma^2 learns (dmlm_loss).
        patches, tokens = self.image_gauss(hv[:, 1:]), self.text_gauss(ht)  # [B, N, D], [B, L, D] each
        means = (patches[0], tokens[0]) if teacher is None else [  # --target=ema: the momentum copy's means
            g[0] for g in teacher.targets(images, input_ids, attention_mask).values()]
        return {"image": self.pooled_image(hv, patches), "text": mean_gaussian(*tokens, attention_mask),
                "target_image": (means[0].detach(), patches[1]),
                "target_text": (means[1].detach(), tokens[1]),
                "pred_image": self.pred_image(z_image[:, 1:]), "pred_text": self.pred_text(z_text)}

    def unmasked(self, images, input_ids, attention_mask):
        """No dropout (it makes Eq. 3's targets), so Eq. (4)'s gradient sees none: a third pass costs 1/3."""
        modes = self.visual.training, self.text.training
        self.visual.eval(), self.text.eval()
        hv, ht = self.visual(images), self.text(input_ids=input_ids, attention_mask=attention_mask)
        self.visual.train(modes[0]), self.text.train(modes[1])
        return hv, ht.last_hidden_state

    def fuse(self, z, context, keep):  # z [B, S, C] attends to itself and context [B, T, C]; keep [B, S+T]
        for blk in self.fusion:
            z = blk(z, context, keep.bool())
        return self.fusion_ln(z)

    # Eq. (4) pairs Gaussians over a set of aligned pairs it does not define. Ours: one Gaussian per image and
    # per report, the mean of its patches' / real tokens' Eq. (1) Gaussians (--pool=mean, paper), or the image
    # head on the channel-wise max of the patch features (--pool=max, demo: one patch marks the image).
    def pooled_image(self, hv, patches=None):  # [B, 1+N, C] (, its patch Gaussians) -> (mu, sigma^2) [B, D]
        if self.cfg.pool == "max":
            return self.image_gauss(hv[:, 1:].amax(1))
        return mean_gaussian(*(patches or self.image_gauss(hv[:, 1:])), torch.ones_like(hv[:, 1:, 0]))

    @torch.no_grad()
    def targets(self, images, input_ids, attention_mask):  # Eq. (1)'s Gaussians alone (of the EMA copy)
        hv, ht = self.unmasked(images, input_ids, attention_mask)
        return {"target_image": self.image_gauss(hv[:, 1:]), "target_text": self.text_gauss(ht)}

    def encode_image(self, images):  # [B, 3, H, W] -> [B, D]: the image Gaussian's mean, L2-normalised
        return self.pooled_image(self.visual(images))[0]

    def encode_text(self, texts: list[str]):  # -> [B, D]: the report Gaussian's mean, L2-normalised
        t = {k: v.to(self.logit_scale.device)
             for k, v in tokenize(texts, self.tokenizer, self.cfg.max_tokens).items()}
        return mean_gaussian(*self.text_gauss(self.text(**t).last_hidden_state), t["attention_mask"])[0]

    def patch_variances(self, images):  # [B, 3, H, W] -> [B, N]: each patch's sigma^2 (Eq. 1), mean over D
        return self.image_gauss(self.visual(images)[:, 1:])[1].mean(-1).detach()

    def token_variances(self, texts: list[str]):  # -> each text's word pieces (no padding), their sigma^2
        t = {k: v.to(self.logit_scale.device)
             for k, v in tokenize(texts, self.tokenizer, self.cfg.max_tokens).items()}
        var = self.text_gauss(self.text(**t).last_hidden_state)[1].mean(-1).detach().cpu().numpy()  # [B, L]
        ids, keep = t["input_ids"].cpu().numpy(), t["attention_mask"].bool().cpu().numpy()
        return [self.tokenizer.convert_ids_to_tokens(i[k].tolist()) for i, k in zip(ids, keep)], \
            [v[k] for v, k in zip(var, keep)]

    def image_tokens(self, images):  # [B, N, C] patch tokens after the last LayerNorm (segmentation heads)
        return self.visual(images)[:, 1:]

    def image_transform(self, train: bool):  # uint8 [H, W] (, rng) -> [3, S, S]
        return lambda img, rng=None: image_tensor(img, self.cfg.image_size, rng if train else None)

    def zeroshot_prompts(self, label: str):
        return zeroshot_prompts(label, self.knowledge)


@torch.no_grad()  # --target=ema: Eq. (3)'s target means from a BYOL-style momentum copy (source not given)
def ema_update(ema: DMLM, model: DMLM, decay: float = 0.996):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------------------------------
# ---- losses (Sec. 2.3) ----


# Eq. (3)'s summand: KL(N(mu_p, var_p) || N(mu_q, var_q)) of diagonal Gaussians, summed over the D dimensions.
def gaussian_kl(mu_p, var_p, mu_q, var_q):  # [..., D] -> [...]
    return 0.5 * (torch.log(var_q) - torch.log(var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0).sum(-1)


# Eq. (3), Sec. 2.3: KL(prediction || target) over masked tokens and patches, averaged over them and D (not
# summed: a departure, so lambda = 0.2 weighs it as Eq. 5 intends). How sigma^2 learns (ours: the paper names
# no stop-gradient or prior): in KL(N(mu^, v^) || N(mu, v)) the best v^ is v whatever the error, the best v is
# v^ + (mu^ - mu)^2. So the target's v gets the gradient (its mu does not), and `prior` (0.1) x
# KL(N(0, v) || N(0, 1/D)) stops it growing without bound (KL -> 0). Per dimension the optimum is v = v^ =
# (1 + sqrt(1 + 4 D e / prior)) / (2 D), e = (mu^ - mu)^2: positions harder to predict get larger sigma^2.
def dmlm_loss(pred_text, target_text, text_mask, pred_image, target_image, patch_mask, prior: float = 0.1):
    """pred_* / target_*: (mu, sigma^2), each [B, L, D] (text) / [B, N, D] (image); *_mask [B, L] / [B, N]."""
    def kl(pred, target):  # [B, S]: Eq. (3)'s KL and the prior on the target's variance
        unit = torch.full_like(target[1], 1 / target[1].shape[-1])
        return gaussian_kl(*pred, *target) + prior * gaussian_kl(0.0, target[1], 0.0, unit)
    per_position = torch.cat([torch.where(text_mask, kl(pred_text, target_text), 0.0),
                              torch.where(patch_mask, kl(pred_image, target_image), 0.0)], 1)  # [B, L + N]
    per_pair = per_position.sum(1) / (text_mask.sum(1) + patch_mask.sum(1)).clamp(min=1)  # DDP-exact
    return per_pair.mean() / pred_text[0].shape[-1]


# Eq. (4)'s W squared (smooth at 0): for diagonal Gaussians the 2-Wasserstein distance is that of [mu, sigma].
def w2_squared(mu1, var1, mu2, var2):  # [..., D] -> [...]: ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2
    return ((mu1 - mu2) ** 2).sum(-1) + ((var1.sqrt() - var2.sqrt()) ** 2).sum(-1)


# The same for every pair of rows, [n, D] x [m, D] -> [n, m], from differences in float32 (cdist without its
# matmul): ||a||^2 + ||b||^2 - 2 a.b cancels catastrophically when ||a||^2 >> W2^2, worst in TF32 or bf16.
def w2_squared_pairwise(mu1, var1, mu2, var2):
    a, b = (torch.cat([mu.float(), var.float().sqrt()], -1) for mu, var in ((mu1, var1), (mu2, var2)))
    with torch.autocast(a.device.type, enabled=False):
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square()


# Eq. (4), Sec. 2.3, literally (--align=pairs): W2^2 of each aligned (report, image) pair, over the batch.
def align_pairs_loss(image, text):  # (mu, sigma^2) [b, D] each
    return w2_squared(*text, *image).mean()


# Eq. (4) with negatives (--align=contrastive). Eq. (4) alone has a trivial optimum: all images and reports at
# one point (W2 = 0; zero-shot impossible), and at lambda = 0.2 it is 80% of the loss; the paper does not say
# what stops it. So -W2^2 / 2 is the similarity of a symmetric InfoNCE over the global batch. With unit means
# -W2^2 / 2 = cos(mu1, mu2) - 1 - ||sigma1 - sigma2||^2 / 2: CLIP's logit plus a variance term (CLIP's 1/tau).
def align_contrastive_loss(image, text, scale):
    """image, text: (mu, sigma^2) [b, D] on this rank; each row is scored against the M = world * b gathered
    rows of the other modality, the positive of local row i being global row rank * b + i."""
    all_image = [common.all_gather_with_grad(t) for t in image]  # [M, D] each
    all_text = [common.all_gather_with_grad(t) for t in text]
    target = torch.arange(len(image[0]), device=image[0].device) + len(image[0]) * common.rank()  # global row
    l_i2t = F.cross_entropy(-0.5 * scale * w2_squared_pairwise(*image, *all_text), target)
    l_t2i = F.cross_entropy(-0.5 * scale * w2_squared_pairwise(*text, *all_image), target)
    return 0.5 * (l_i2t + l_t2i)


def total_loss(l_dmlm, l_align, lam: float):  # Eq. (5), Sec. 2.3: L = lambda L_D-MLM + (1 - lambda) L_align
    return lam * l_dmlm + (1 - lam) * l_align


# ----------------------------------------------------------------------------------------------------
# ---- data (Sec. 2.1: structured reports; Sec. 2.2: masking) ----

NORMAL_LABELS = ("no finding", "normal")  # negative statements: "normal study", never "no no finding"


def load_knowledge(path: str) -> dict:
    """{"<Finding>": {"definition": str, "appearance": str}}: Sec. 2.1's texts (text_prep.py knowledge)."""
    if not os.path.exists(path):
        raise common.UserError(f"knowledge file {path} not found: `python text_prep.py knowledge` makes one "
                               f"(Sec. 2.1); the demo's is knowledge/phantom_chexpert.json")
    with open(path, encoding="utf-8") as f:
        know = json.load(f)
    for k, v in know.items():
        if not isinstance(v, dict) or not {"definition", "appearance"} <= set(v):
            raise common.UserError(f"{path}: entry {k!r} needs 'definition' and 'appearance' strings")
    return know


def lookup(know: dict, name: str) -> dict | None:
    return next((v for k, v in know.items() if common.label_text(k) == common.label_text(name)), None)


def structured_report(names: list[str], labels: np.ndarray, row: dict, know: dict) -> str:
    """Sec. 2.1: Definition and Appearance of each positive or uncertain finding (of "No Finding" when none);
    Observations: the findings (M&M's source), else the impression or report; Verdicts: the impression after
    findings, "normal / abnormal study", the labels (1 "x", -1 "possible x", 0 "no x"); no LLM rewrite."""
    said = {common.label_text(n): y for n, y in zip(names, labels) if y in (1, -1, 0)}  # blank: not said
    no_finding = [said.pop(x) for x in NORMAL_LABELS if x in said]  # "No Finding" is not a finding
    found = [x for x, y in said.items() if y != 0]  # positive or uncertain
    is_normal = no_finding[0] == 1 if no_finding and no_finding[0] != -1 else not found
    verdicts = ["normal study" if is_normal else "abnormal study"] + [x if said[x] == 1 else "possible " + x
                                                                       for x in found]
    verdicts += ["no " + x for x, y in said.items() if y == 0]
    entries = [e for e in (lookup(know, x) for x in found or ["no finding"]) if e]
    findings, impression, report = ((row.get(k) or "").strip() for k in ("findings", "impression", "report"))
    concluded = f"{impression} " if findings and impression else ""
    return (f"Definition: {' '.join(e['definition'].strip() for e in entries)} "
            f"Appearance: {' '.join(e['appearance'].strip() for e in entries)} "
            f"Observations: {findings or impression or report} Verdicts: {concluded}{', '.join(verdicts)}.")


def appearance_of(report: str) -> str:  # the Appearance section of a structured report (adaptive masking)
    m = re.search(r"Appearance:(.*?)(Observations:|$)", report, flags=re.S)
    return m.group(1) if m else ""


def zeroshot_prompts(label: str, know: dict) -> tuple[list[str], list[str]]:
    """(positive, negative) prompts structured as in training: the finding vs a normal report denying it."""
    x = common.label_text(label)
    d, n = (f"Definition: {e['definition']} Appearance: {e['appearance']} " if e else ""
            for e in (lookup(know, label), lookup(know, "No Finding")))
    if x in NORMAL_LABELS:
        yes, no = "Verdicts: normal study.", "Verdicts: abnormal study."
        return [yes, "Observations: no acute abnormality. " + yes] + [d + yes] * bool(d), \
            [no, "Observations: abnormal findings are present. " + no]
    yes = f"Verdicts: abnormal study, {x}."
    return [d + f"Observations: there is {x}. " + yes, d + yes], \
        [n + f"Observations: there is no {x}. Verdicts: normal study, no {x}."]


# Sec. 2.2 / 3.5: masking "focused on diagnostically relevant regions identified from the Appearance section",
# "an adaptive ratio for images based on the paired text"; Sec. 3.6: "a fixed masking ratio of 0.3". Ours:
# --mask_ratio of the patches, those of the regions the Appearance names 1 + REGION_BOOST times as likely.
REGION_BOOST = 4.0  # the draw is uniform when the Appearance names no region
REGION_MAP = [  # boxes (top, bottom, left, right) on a FRONTAL film, as fractions
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
    """[grid * grid] in [0, 1]: for each patch, the largest share of it covered by a region the text names."""
    prior, text, edges = np.zeros((grid, grid), np.float32), appearance.lower(), np.arange(grid + 1) / grid
    for pattern, boxes in REGION_MAP:
        for t, b, left, r in boxes if re.search(pattern, text) else []:
            rows = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], t), 0, None) * grid  # [grid]
            cols = np.clip(np.minimum(edges[1:], r) - np.maximum(edges[:-1], left), 0, None) * grid
            prior = np.maximum(prior, np.outer(rows, cols))
    return prior.reshape(-1)


def image_patch_mask(appearance: str, grid: int, ratio: float, mode: str, rng: np.random.Generator):
    """[grid * grid] bool, exactly round(ratio * N) True, drawn without replacement with weights 1 +
    REGION_BOOST * region_prior (adaptive) or 1 (random): the top k of log(weight) + Gumbel noise."""
    w = np.ones(grid * grid) if mode == "random" else 1.0 + REGION_BOOST * region_prior(appearance, grid)
    mask = np.zeros(grid * grid, bool)
    mask[np.argsort(-(np.log(w) + rng.gumbel(size=w.shape)))[:int(round(ratio * w.size))]] = True
    return mask


def text_token_mask(input_ids, attention_mask, special_ids: list[int], ratio: float, seeds) -> torch.Tensor:
    """[B, L] bool: round(ratio * n) of each row's n real tokens (not special, not padding), at least one.
    They become [MASK] (BERT's masking without its 80/10/10 split, which the paper does not mention)."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    real = ~torch.isin(input_ids, torch.tensor(special_ids)) & (attention_mask == 1)
    for b, seed in enumerate(seeds):  # row b's draw depends on its seed alone
        cand = real[b].nonzero().flatten().numpy()
        k = min(len(cand), max(1, int(round(ratio * len(cand)))))
        mask[b, torch.from_numpy(np.random.default_rng(seed).choice(cand, k, replace=False))] = True
    return mask


def image_tensor(img: np.ndarray, size: int, rng: np.random.Generator | None = None) -> torch.Tensor:
    """uint8 [H, W] -> float [3, S, S]. With an rng (training): a mild random resized crop (the region prior
    must still point at the right patches) and brightness / contrast jitter; the paper names none."""
    if rng is None:
        return common.to_tensor(common.resize(img, size))
    if max(img.shape) > 2 * size:  # crop from a smaller copy: the same result, far less work
        img = common.resize(img, 2 * size)
    img = common.random_resized_crop(img, size, rng, scale=(0.9, 1.05), ratio=(0.95, 1.05))
    return common.to_tensor(common.color_jitter(img, rng, brightness=(0.9, 1.1), contrast=(0.9, 1.1)))


class PairDataset(torch.utils.data.Dataset):
    """Item (row, sample seed) -> image (augmented if `train`), structured report, patch mask, text-mask seed;
    the next readable row replaces an unreadable image, reported in "bad" (the alignment needs b rows)."""

    def __init__(self, table: common.XrayCSV, cfg: Config, know: dict, train: bool = True):
        self.t, self.cfg, self.train = table, cfg, train
        self.reports = [structured_report(table.label_names, r["_labels"], r, know) for r in table.rows]

    def __len__(self):
        return len(self.t)

    def __getitem__(self, key):
        idx, seed = key
        rng, bad = np.random.default_rng(seed), []
        for attempt in range(8):
            i = (idx + attempt * 7919) % len(self.t)
            try:
                img = common.load_image(self.t.rows[i]["_path"])
                break
            except common.BadImageError as e:
                bad.append(("unreadable image", str(e)))
        else:
            raise common.UserError(f"8 rows in a row around row {idx} of {self.t.path} have no readable "
                                   f"image: is the image folder next to the CSV? First error: {bad[0][1]}")
        c = self.cfg
        pmask = image_patch_mask(appearance_of(self.reports[i]), c.image_size // c.patch_size, c.mask_ratio,
                                 c.image_mask, rng)
        text_seed = int(rng.integers(2**62))  # the report's text mask, drawn in Collate
        return (image_tensor(img, c.image_size, rng if self.train else None), self.reports[i],
                torch.from_numpy(pmask), text_seed, bad)


def tokenize(texts, tokenizer, max_tokens: int) -> dict:  # -> input_ids, attention_mask [B, S], right-padded
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt", return_token_type_ids=False))


def collate(items, tokenizer, max_tokens: int, ratio: float) -> dict:
    """Stacks images and patch masks, tokenises the reports, draws their text masks (in a loader worker)."""
    images, reports, pmasks, seeds, bad = zip(*items)
    t = tokenize(reports, tokenizer, max_tokens)
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    tmask = text_token_mask(t["input_ids"], t["attention_mask"], special, ratio, seeds)
    return {"image": torch.stack(images), **t, "text_mask": tmask, "patch_mask": torch.stack(pmasks),
            "masked_ids": t["input_ids"].masked_fill(tmask, tokenizer.mask_token_id), "bad": sum(bad, [])}


BATCH_KEYS = ("image", "input_ids", "attention_mask", "masked_ids", "text_mask", "patch_mask")

# ----------------------------------------------------------------------------------------------------
# ---- build / load ----


def build_text_encoder(cfg: Config, vocab_size: int, bert_config: dict | None = None):
    """E^t: ClinicalBERT (paper), a small BERT from scratch (demo), or a checkpoint's BERT."""
    from transformers import AutoModel, BertConfig, BertModel

    if bert_config is None and cfg.pretrained and cfg.text_encoder != "tiny":
        return common.load_pretrained(cfg.text_encoder, lambda: AutoModel.from_pretrained(
            cfg.text_encoder, add_pooling_layer=False, attn_implementation="sdpa"))
    if bert_config is not None:
        bc = BertConfig.from_dict(bert_config)
    elif cfg.text_encoder == "tiny":
        bc = BertConfig(vocab_size=vocab_size, hidden_size=cfg.vit_width, num_hidden_layers=cfg.vit_depth,
                        num_attention_heads=cfg.vit_heads, intermediate_size=4 * cfg.vit_width,
                        max_position_embeddings=max(128, cfg.max_tokens), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    else:  # --pretrained=false with a named BERT: BERT-base's architecture, random weights, our vocabulary
        bc = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, cfg.max_tokens))
    bc._attn_implementation = "sdpa"
    return BertModel(bc, add_pooling_layer=False)


def build_tokenizer(cfg: Config, reports: list[str], label_names: list[str], know: dict):
    """ClinicalBERT's tokenizer (paper), or WordPiece fitted on the structured reports and prompts (demo)."""
    if cfg.pretrained and cfg.text_encoder != "tiny":
        from transformers import AutoTokenizer

        return common.load_pretrained(cfg.text_encoder, lambda: AutoTokenizer.from_pretrained(
            cfg.text_encoder))
    prompts = [p for n in label_names for ps in zeroshot_prompts(n, know) for p in ps]
    return common.train_wordpiece(reports + prompts + [e[k] for e in know.values() for k in e], VOCAB_SIZE)


def build(cfg: Config, tokenizer, know: dict, bert_config: dict | None = None) -> DMLM:
    """Config -> DMLM; --pretrained loads torchvision's ImageNet ViT-B/16 and ClinicalBERT E^t (Sec. 3.5)."""
    model = DMLM(cfg, build_text_encoder(cfg, len(tokenizer), bert_config), tokenizer, know)
    if cfg.pretrained and bert_config is None:
        if (cfg.image_size, cfg.patch_size, cfg.stem, cfg.vit_width, cfg.vit_depth, cfg.vit_heads) != \
                (224, 16, "patch", 768, 12, 12):
            raise common.UserError("--pretrained loads ViT-B/16: it needs --image_size=224 --patch_size=16 "
                                   "--stem=patch --vit_width=768 --vit_depth=12 --vit_heads=12")
        import torchvision

        tv = common.load_pretrained("torchvision's ViT-B/16 ImageNet weights",
                                    lambda: torchvision.models.vit_b_16(weights="IMAGENET1K_V1"))
        model.visual.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("heads.")})
    return model


def load(path, map_location="cpu") -> tuple[DMLM, Config]:
    """A model from its checkpoint alone (ckpt.pt: config, BERT config, vocabulary)."""
    ck = common.load_checkpoint(path, map_location)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in {f.name for f in fields(Config)}})
    tok = common.tokenizer_from_vocab(ck["vocab"], ck["lowercase"])
    model = build(cfg, tok, ck["knowledge"], ck["bert_config"])
    model.load_state_dict(ck["model"])
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


def param_groups(model: DMLM, cfg: Config):
    """Sec. 3.5: the encoders at --encoder_lr, the rest at --lr. Weight decay on weight matrices only: not on
    biases, norms, the temperature, or the tokens added to the inputs (class, position, mask, modality)."""
    def decays(n, p):
        return p.ndim >= 2 and not n.endswith(("class_token", "pos_embedding", "mask_token", "modality"))
    groups = []
    for encoder, lr in ((True, cfg.encoder_lr), (False, cfg.lr)):
        ps = [(n, p) for n, p in model.named_parameters() if n.startswith(("visual.", "text.")) == encoder]
        groups += [{"params": [p for n, p in ps if decays(n, p)], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for n, p in ps if not decays(n, p)], "weight_decay": 0.0, "lr": lr}]
    return groups


def warmup_cosine(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (the paper gives only the lr)."""
    return lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def check(cfg: Config):
    """Flag values that cannot work, before anything runs."""
    for k, ok in (("stem", ("patch", "conv", "hmlp")), ("image_mask", ("adaptive", "random")),
                  ("target", ("stopgrad", "ema")), ("align", ("contrastive", "pairs")),
                  ("pool", ("mean", "max"))):
        if getattr(cfg, k) not in ok:
            raise common.UserError(f"--{k}={getattr(cfg, k)}: expected {' | '.join(ok)}")
    if cfg.image_size % cfg.patch_size:
        raise common.UserError(f"--image_size={cfg.image_size} must divide by --patch_size={cfg.patch_size}")
    if not cfg.data:
        raise common.UserError("--preset=paper needs --data=<csv> (data_prep.py writes it)")


def train(cfg: Config) -> dict:
    check(cfg)
    rank, world, device, ctx, scaler = setup(cfg)
    ck = common.start_run(cfg)  # the checkpoint to continue (--resume), else None
    if cfg.data == Config.data:
        phantoms.ensure_phantoms(cfg.data, PHANTOMS)
    counter = common.BadSampleCounter(cfg.max_bad_frac)
    tr = common.XrayCSV(cfg.data, "train", require_text=("findings", "impression", "report", "labels"),
                        counter=counter)  # rows need text or labels (the structured report's parts, Sec. 2.1)
    te = common.XrayCSV(cfg.data, "test", counter=counter)
    know = ck["knowledge"] if ck else load_knowledge(cfg.knowledge)
    if missing := [n for n in tr.label_names if lookup(know, n) is None]:
        common.print0(f"warning: {cfg.knowledge} has no definition / appearance (Sec. 2.1) for {missing}")
    train_ds = PairDataset(tr, cfg, know)

    # -- model: the checkpoint's tokenizer, or one fitted on the training texts (the same on every rank)
    tok = common.tokenizer_from_vocab(ck["vocab"], ck["lowercase"]) if ck else \
        build_tokenizer(cfg, train_ds.reports, tr.label_names, know)
    model = raw_model = build(cfg, tok, know, ck["bert_config"] if ck else None).to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False) if cfg.target == "ema" else None
    if ema is not None and ck is not None:
        ema.load_state_dict(ck["ema"])
    torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own numbers
    local_batch = cfg.batch_size // world
    sampler = common.EpochSampler(len(train_ds), local_batch, rank, world, cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_ds, local_batch, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=functools.partial(collate, tokenizer=tok, max_tokens=cfg.max_tokens, ratio=cfg.mask_ratio),
        pin_memory=device != "cpu", persistent_workers=cfg.num_workers > 0)
    total_steps = cfg.epochs * sampler.batches_per_epoch
    opt = torch.optim.AdamW(param_groups(raw_model, cfg), lr=cfg.lr, fused=device != "cpu")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, max(1, round(
        cfg.warmup_epochs * sampler.batches_per_epoch))))
    common.print0(f"dmlm: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M parameters; {len(tr)} "
                  f"training images, {sampler.batches_per_epoch} steps/epoch x {cfg.epochs} epochs, {world} "
                  f"process(es) on {device}; {cfg.align} alignment, {cfg.target} targets, "
                  f"{cfg.pool}-pooled images")
    meta = {"vocab": common.tokenizer_vocab(tok), "lowercase": getattr(tok, "do_lower_case", True),
            "bert_config": raw_model.text.config.to_dict(), "knowledge": know}  # what load() needs
    loop = common.Loop(cfg, name="dmlm", model=raw_model, opt=opt, sched=sched, scaler=scaler,
                       sampler=sampler, counter=counter, ck=ck,
                       extra=lambda: {**meta, "ema": ema.state_dict() if ema is not None else None})
    model = torch.compile(model) if cfg.compile else model
    model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg.align == "pairs") \
        if world > 1 else model  # --align=pairs leaves the temperature unused, which DDP must be told

    for epoch in loop.epochs():
        model.train()
        for batch in loop.batches(loader):
            x, ids, am, masked_ids, text_mask, patch_mask = (batch[k].to(device) for k in BATCH_KEYS)
            with ctx:
                out = model(x, ids, am, masked_ids, patch_mask, ema)
            l_dmlm = dmlm_loss(out["pred_text"], out["target_text"], text_mask, out["pred_image"],
                               out["target_image"], patch_mask)  # Eq. (3), with the prior on sigma^2
            l_align = align_contrastive_loss(out["image"], out["text"], raw_model.logit_scale.exp()) \
                if cfg.align == "contrastive" else align_pairs_loss(out["image"], out["text"])  # Eq. (4)
            loss = total_loss(l_dmlm, l_align, cfg.lam)  # Eq. (5)
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
            sched.step()
            with torch.no_grad():  # 1/tau <= 100, as CLIP clamps it: after the step, so its gradient lives
                raw_model.logit_scale.clamp_(0, math.log(100))
            if ema is not None:
                ema_update(ema, raw_model)
            q = torch.cat([out["pred_text"][1].mean(-1)[text_mask],
                           out["pred_image"][1].mean(-1)[patch_mask]])
            q = q.detach().quantile(q.new_tensor([0.1, 0.5, 0.9]))  # the spread of the predicted sigma^2
            loop.step_done(loss=loss, dmlm=l_dmlm, align=l_align, sigma2_p10=q[0], sigma2_p50=q[1],
                           sigma2_p90=q[2], lr=opt.param_groups[0]["lr"])
        loop.end_epoch()  # no model selection (the paper names none): the last weights are evaluated
    metrics = evaluate(raw_model, te, device) if rank == 0 and not loop.stopped else {}
    result = loop.close(metrics)
    if world > 1:
        dist.destroy_process_group()
    return result


@torch.no_grad()
def evaluate(model: DMLM, table: common.XrayCSV, device) -> dict:
    """Zero-shot AUC; and Spearman's rho between each masked token's / patch's predicted sigma^2 (Eq. 2,
    mean over D) and its error ||mu^ - mu||^2 (Eq. 3), masks fixed by row, over both modalities and each."""
    c, pairs = model.eval().cfg, {"text": [], "image": []}  # (sigma^2, error) of each masked position
    loader = torch.utils.data.DataLoader(
        PairDataset(table, c, model.knowledge, train=False), c.batch_size,
        sampler=[(i, i) for i in range(len(table))],  # sample seed = row
        collate_fn=functools.partial(collate, tokenizer=model.tokenizer, max_tokens=c.max_tokens,
                                     ratio=c.mask_ratio))
    for batch in loader:
        x, ids, am, masked_ids, text_mask, patch_mask = (batch[k].to(device) for k in BATCH_KEYS)
        out = model(x, ids, am, masked_ids, patch_mask)
        for k, m in (("text", text_mask), ("image", patch_mask)):
            (mu_hat, var_hat), mu = out["pred_" + k], out["target_" + k][0]
            pairs[k].append(torch.stack([var_hat.mean(-1)[m], ((mu_hat - mu) ** 2).sum(-1)[m]], 1).cpu())
    pairs = {k: torch.cat(v).numpy() for k, v in pairs.items()}
    rho = {f"sigma2_error_spearman_{k}": float(spearmanr(*p.T)[0]) for k, p in pairs.items()}
    both = spearmanr(*np.concatenate([pairs["text"], pairs["image"]]).T)[0]
    return {**common.zeroshot_eval(model, table, device), "sigma2_error_spearman": float(both), **rho}


def main(argv=None):
    return train(common.parse_config(Config, PRESETS, argv))


if __name__ == "__main__":
    common.cli(main)
