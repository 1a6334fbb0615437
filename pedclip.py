"""
PedCLIP: A Vision-Language Model for Pediatric X-rays with Mixture of Body part Experts.
Ta Duc Huy et al., 2025 (paper: ../shared/papers/pedclip.md; the authors' repository holds no code).

What this file implements, top to bottom:
    Config + presets         Sec. 3.1 hyperparameters (paper) and a tiny CPU demo
    model                    ViT (torchvision-compatible parameter names) whose later MLPs are MoBE blocks
                             (Sec. 2.2, Eq. 1-2), BERT text encoder, [IMG]/[CLS] projections
    losses                   InfoNCE image->text and text->image (Eq. 3-4), gate loss l_G = CE(s, x_b),
                             l = 1/2 (l_v2t + l_t2v) + lambda * l_G (Sec. 2.3); lambda / teacher-forcing schedule
    data                     one (image, report excerpt, body-part index) triplet per CSV row (Sec. 2.1)
    train                    AdamW, cosine lr, AMP bf16 on CUDA, DDP with a global-batch InfoNCE, exact resume
    evaluate                 zero-shot AUC (positive vs negative prompt) and the gate's body-part accuracy

Map of the method (Sec. 2.2-2.3, 3.1):
    image x_v -> ViT-B/16; in the layers of --moe_layers the MLP is replaced by MoBE:
        s = softmax(v_[IMG] . W_G)                        Eq. (1), one gate per MoBE layer, W_G in R^{C x E}
        MoBE(V) = sum_e s_e B_e(V)                        Eq. (2), B_e an MLP of the ViT's MLP shape
    text x_t -> BERT; [IMG] and [CLS] are projected to a shared space, cosine similarity / tau
    l = 1/2 (InfoNCE_v2t + InfoNCE_t2v) + lambda * sum_layers CE(s, x_b)
    epochs [0, 10): teacher forcing (the body-part label x_b picks the expert), lambda = 1
    epochs [10, 50): the gate's scores s weight the experts, lambda annealed linearly 1 -> 0

Run:
    python pedclip.py                                            # demo: phantoms, tiny ViT + BERT, 2 CPU cores
    torchrun --nproc_per_node=2 pedclip.py                       # the same demo in 2 processes (gloo)
    python pedclip.py --preset=paper --data=data/pexr.csv        # ViT-B/16 (ImageNet) + BioClinicalBERT
    torchrun --nproc_per_node=8 pedclip.py --preset=paper --data=data/pexr.csv     # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        pedclip.py --preset=paper --data=data/pexr.csv                            # two nodes
    python pedclip.py --moe_layers=none                          # ablation: plain MLP ViT (Fig. 5 "MLP")
    python pedclip.py --moe_layers=0,1 --moe_topk=2              # ablation: early layers (Fig. 4); top-2 routing
    python pedclip.py --resume                                   # continue out/pedclip/ckpt.pt exactly

Differences from the paper, and interpretations (all also in the README):
  * The 23 anatomical regions of PeXR are not named in the paper; BODY_PARTS below is our list of 23 regions
    that paediatric radiography covers, with the CSV spellings we map onto them (BODY_PART_SYNONYMS).
  * The gate reads the [IMG] token of the tokens the MoBE block receives (after ln_2, like the MLP it
    replaces). l_G is backpropagated like any loss term, so it also trains the layers below the gate.
  * "The later layers" (Fig. 4 ablation) is not given as indices: the default is the last 4 of 12.
  * During teacher forcing the gate is still computed and trained by lambda * l_G, but its scores do not enter
    the output, so the contrastive loss cannot reach W_G (tested).
  * lambda is constant within an epoch: 1 for the teacher-forcing epochs, then linspace(1, --lambda_end) over
    the remaining epochs, reaching --lambda_end in the last one.
  * --moe_topk=K keeps the K largest gate scores (renormalised) and runs only those experts: faster, but no
    longer Eq. (2). 0 (the default) is the paper's dense soft mixture.
  * lr schedule: the paper gives only lr 1e-5; we use a 1-epoch linear warm-up and cosine decay (CXR-CLIP's).
  * tau is learnable (CLIP's logit scale, initialised at 1/0.07, clamped at 100); the paper calls it a
    hyperparameter without a value.
  * The demo trains a 4-layer ViT (8x8 tokens, MoBE in its last 2 layers, the phantoms' 6 body parts as
    experts) and a 2-layer BERT from scratch, with a larger lr; its epochs keep the paper's 1/5 teacher-forced.
    Three demo-only choices lifted its zero-shot AUC from 0.67 to 0.86-0.88 (README): tokens from a conv stem,
    no image augmentation, and --text_sample=section. The last stands in for the paper's LLM-made excerpt
    (Sec. 2.1, Fig. 2): each step pairs the image with ONE report section, findings or impression. A tiny BERT
    trained for minutes on whole reports (findings + impression) did not learn to tell "No fracture." from
    "Fracture.", and positive-minus-negative prompt scoring then ranks some findings backwards.

Cost: Eq. (2) is dense, so a MoBE layer in the soft phase costs E MLPs (stacked-weight matmuls, no loop over
expert modules); teacher forcing runs each image through its one expert (images grouped by expert), so that
phase costs what the plain ViT costs; --moe_topk=K costs K MLPs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import common

# ----------------------------------------------------------------------------------------------------
# ---- config ----

# Sec. 2.1 / 3.1: "The MoBE block consists of 23 experts each for one of the 23 anatomical regions". The paper
# does not list them; these are the regions a paediatric radiology department images (our interpretation).
BODY_PARTS = [
    "skull", "face", "neck", "cervical_spine", "thoracic_spine", "lumbar_spine", "whole_spine", "chest",
    "abdomen", "pelvis", "hip", "femur", "knee", "lower_leg", "ankle", "foot", "shoulder", "clavicle",
    "humerus", "elbow", "forearm", "wrist", "hand",
]
assert len(BODY_PARTS) == 23
# CSV `body_part` spellings -> region. Values are lower-cased, and spaces / hyphens become "_" first.
BODY_PART_SYNONYMS = {
    "head": "skull", "facial_bones": "face", "sinuses": "face", "mandible": "face", "orbits": "face",
    "nasal_bones": "face", "soft_tissue_neck": "neck", "airway": "neck", "c_spine": "cervical_spine",
    "t_spine": "thoracic_spine", "l_spine": "lumbar_spine", "spine": "whole_spine", "scoliosis": "whole_spine",
    "thorax": "chest", "cxr": "chest", "ribs": "chest", "sternum": "chest", "abdo": "abdomen", "kub": "abdomen",
    "pelvic": "pelvis", "sacrum": "pelvis", "hips": "hip", "thigh": "femur", "patella": "knee",
    "tibia": "lower_leg", "fibula": "lower_leg", "tib_fib": "lower_leg", "leg": "lower_leg", "calcaneus": "foot",
    "toe": "foot", "toes": "foot", "scapula": "shoulder", "upper_arm": "humerus", "radius": "forearm",
    "ulna": "forearm", "arm": "forearm", "scaphoid": "wrist", "finger": "hand", "fingers": "hand",
    "thumb": "hand", "bone_age": "hand",
}


@dataclass
class Config:
    # data (Sec. 2.1, 3.1)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema; the demo makes phantoms here if absent
    n_phantoms: int = 3000  # images in the phantom data set made when --data is the default and missing
    image_size: int = 64  # input resolution (224 in the paper, Sec. 3.1)
    body_parts: str = "phantom"  # experts, Sec. 3.1: pexr23 (the paper's 23 regions) | phantom (demo's 6) | a,b,c
    unknown_body_part: str = "error"  # body_part not among the experts: error (names it) | other (an extra expert)
    text_column: str = "report"  # Sec. 2.1: the image's report excerpt x_t (report = findings + impression)
    max_tokens: int = 120  # Sec. 3.1: reports padded / truncated to 120 tokens
    augment: bool = True  # random resized crop + brightness/contrast jitter on training images (CXR-CLIP's; the paper names none)
    text_sample: str = "full"  # training text per step: full (the whole --text_column excerpt, the paper) | section (findings OR impression, drawn per step; the demo)
    # image encoder phi_v (Sec. 2.2, 3.1: ViT-B/16 pretrained on ImageNet)
    pretrained: bool = False  # ImageNet ViT-B/16 (torchvision) and BioClinicalBERT weights (paper preset)
    patch_size: int = 8  # ViT patch size (16 in the paper)
    stem: str = "patch"  # patch embedding: patch (one patch_size^2 conv, ViT's; the paper) | conv (strided 3x3 convs, a hybrid ViT; random init only; the demo)
    vit_width: int = 64  # C, the token feature size (768 in ViT-B)
    vit_depth: int = 4  # L transformer layers (12 in ViT-B)
    vit_heads: int = 2  # attention heads (12 in ViT-B)
    vit_mlp_dim: int = 128  # hidden size of the ViT MLP and of every expert B_e (3072 in ViT-B)
    moe_layers: str = "-2,-1"  # Sec. 3.3, Fig. 4: layers whose MLP is MoBE ("later layers"; <0 from the end; none = plain ViT)
    moe_topk: int = 0  # 0: Eq. (2), the dense soft mixture; K > 0: only the K best-scored experts run (not Eq. 2)
    # text encoder phi_t (Sec. 2.2, 3.1: BioClinicalBERT)
    text_encoder: str = "tiny"  # tiny | a Hugging Face BERT name or path, e.g. emilyalsentzer/Bio_ClinicalBERT
    tiny_width: int = 64  # tiny BERT hidden size
    tiny_layers: int = 2  # tiny BERT layers
    vocab_size: int = 1000  # WordPiece vocabulary fitted on the training reports when no pretrained tokenizer
    embed_dim: int = 128  # shared image-text space (not given in the paper; 512 as CXR-CLIP)
    init_temperature: float = 0.07  # tau of Eq. (3)-(4) at the start, learnable (CLIP); logit scale clamped at 100
    # schedule (Sec. 3.1)
    epochs: int = 10  # training epochs (50 in the paper)
    teacher_epochs: int = 2  # Sec. 3.1: first epochs with teacher forcing (10 of 50 in the paper: the same 1/5)
    lambda_start: float = 1.0  # Sec. 3.1: lambda = 1 during teacher forcing, the start of the linear anneal
    lambda_end: float = 0.0  # Sec. 3.1: lambda reached at the last epoch ("linearly annealed")
    batch_size: int = 64  # GLOBAL batch of image-text pairs (256 in the paper); each rank gets batch_size // world
    lr: float = 1e-3  # AdamW peak learning rate (1e-5 in the paper; the demo trains from scratch)
    weight_decay: float = 1e-2  # AdamW weight decay on matrices (not given in the paper)
    warmup_epochs: float = 0.5  # linear warm-up, then cosine annealing to 0 (not given in the paper)
    grad_clip: float = 1.0  # max gradient norm (0: off)
    # run
    seed: int = 0  # seed for weights (same on every rank), data order and augmentations
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 + GradScaler; off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model (same loss; faster on GPU after warm-up)
    grad_ckpt: bool = False  # gradient checkpointing: recompute each ViT / BERT layer in the backward (less memory, ~1/3 more compute)
    num_workers: int = 0  # DataLoader workers per rank
    threads: int = 0  # CPU only: intra-op threads per process; 0: the usable cores / the processes on this node (188 s of demo training with 2 threads, 290 s with 1, on an idle 2-core machine). On a busy machine pass 1 (OpenMP spin-waits)
    out_dir: str = "out/pedclip"  # ckpt.pt, ckpt_prev.pt, log.jsonl, metrics.json
    resume: bool = False  # continue from out_dir/ckpt.pt (weights, optimiser, schedule, data position, RNG)
    overwrite: bool = False  # allow a new run to replace an existing run's checkpoint in out_dir
    max_steps: int = -1  # stop (with a checkpoint) after this many optimiser steps; the schedule still spans --epochs
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and at every epoch end)
    max_bad_frac: float = 0.01  # fail when more than this share of samples are unreadable
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    fault_nan_step: int = -1  # TESTS ONLY: make rank 0's loss NaN at this step
    eval_batch_size: int = 256  # images per forward pass in the final zero-shot evaluation
    benchmark: str = "off"  # off | model (or bare --benchmark): time training steps (teacher-forced, soft) on synthetic tensors | data: the input pipeline
    benchmark_steps: int = 10  # timed steps per phase of --benchmark (after 3 warm-up steps)
    benchmark_workers: str = "0,1,2,4"  # DataLoader worker counts that --benchmark=data times
    preset: str = "demo"  # filled in by the CLI: demo | paper


PRESETS = {
    # Demo: phantoms at 64 px, a 4-layer ViT (8x8 tokens from a conv stem + [IMG]) whose last 2 MLPs are MoBE with
    # the phantoms' 6 body parts as experts, and a 2-layer BERT, from scratch. 2106 training images / 64 per batch
    # = 32 steps/epoch x 30 epochs = 960 steps; epochs 0-5 teacher-forced (the paper's 10/50 ratio). Three
    # departures, each measured (README, "PedCLIP demo"): the conv stem, no image augmentation (the paper names
    # none), and one report section per step as the excerpt x_t (--text_sample=section).
    "demo": dict(epochs=30, teacher_epochs=6, batch_size=64, lr=1e-3, stem="conv", augment=False, text_sample="section"),
    # Paper (Sec. 3.1): ViT-B/16 (ImageNet) + BioClinicalBERT, 224 px, 23 experts in the last 4 of 12 layers,
    # 50 epochs (10 teacher-forced), lr 1e-5, global batch 256 (the paper's 2 GPUs x 128).
    "paper": dict(image_size=224, body_parts="pexr23", pretrained=True, patch_size=16, stem="patch", vit_width=768, vit_depth=12,
                  vit_heads=12, vit_mlp_dim=3072, moe_layers="8,9,10,11",
                  text_encoder="emilyalsentzer/Bio_ClinicalBERT", embed_dim=512, epochs=50, teacher_epochs=10,
                  batch_size=256, lr=1e-5, weight_decay=1e-4, warmup_epochs=1.0, num_workers=8, data="",
                  augment=True, text_sample="full"),
}


# ----------------------------------------------------------------------------------------------------
# ---- model ----
# A ViT written out so that its parameter names are torchvision's VisionTransformer names (class_token,
# conv_proj, encoder.pos_embedding, encoder.layers.encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp}, encoder.ln):
# torchvision's ImageNet state dict then loads as it is, and each pretrained MLP is copied into every expert.

class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj) through one SDPA call."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):  # x [B, S, C]
        B, S, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, S, 3C]
        q, k, v = qkv.view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # each [B, h, S, C/h]
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, C))


def mlp_block(dim: int, hidden: int) -> nn.Sequential:
    """torchvision's MLPBlock layout: Linear (mlp.0), GELU, Dropout, Linear (mlp.3), Dropout."""
    m = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))
    for lin in (m[0], m[3]):
        nn.init.xavier_uniform_(lin.weight)
        nn.init.normal_(lin.bias, std=1e-6)
    return m


class MoBE(nn.Module):
    """Mixture of Body-part Experts (Sec. 2.2): E MLP experts B_e and a gate W_G on the [IMG] token.

    The experts' weights are stacked, w1 [E, C, H], b1 [E, H], w2 [E, H, C], b2 [E, C], so that
      * the soft mixture (Eq. 2) is one wide matmul for all experts' hidden layers, a gate-weighted scaling of
        the E hidden blocks, and one matmul back: sum_e s_e (g(x W1_e + b1_e) W2_e + b2_e)
                                                  = [s_1 g(.)_1 | ... | s_E g(.)_E] [W2_1; ...; W2_E] + s.b2;
      * routing (teacher forcing, top-k) sorts the images by expert and runs each used expert once on its group.
    forward(x [B, S, C], expert_index [B] or None) -> (out [B, S, C], gate logits [B, E]).
    """

    def __init__(self, dim: int, hidden: int, n_experts: int, topk: int = 0, img_index: int = 0):
        super().__init__()
        self.topk, self.img_index = topk, img_index
        self.gate = nn.Linear(dim, n_experts, bias=False)  # W_G of Eq. (1), stored transposed as [E, C]
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(n_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.normal_(self.gate.weight, std=0.02)
        for e in range(n_experts):  # every expert starts as its own draw of torchvision's MLP init
            ref = mlp_block(dim, hidden)
            self.load_mlp(ref[0].weight, ref[0].bias, ref[3].weight, ref[3].bias, expert=e)

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    @torch.no_grad()
    def load_mlp(self, w0, b0, w3, b3, expert: int | None = None):
        """Copy an nn.Linear pair (weights [H, C] and [C, H], torchvision's mlp.0 / mlp.3) into one or all experts."""
        sl = slice(None) if expert is None else slice(expert, expert + 1)
        self.w1[sl] = w0.t()
        self.b1[sl] = b0
        self.w2[sl] = w3.t()
        self.b2[sl] = b3

    def forward(self, x, expert_index=None):
        logits = self.gate(x[:, self.img_index])  # Eq. (1) before the softmax: v_[IMG] . W_G, [B, E]
        if expert_index is not None:  # teacher forcing (Sec. 3.1): the body-part label chooses the expert
            idx = expert_index.view(-1, 1)
            return self._routed(x, idx, None), logits
        s = logits.float().softmax(-1).to(x.dtype)  # Eq. (1): expert assignment scores s, [B, E]
        if 0 < self.topk < self.n_experts:  # departure from Eq. (2): only the K best experts, renormalised
            w, idx = s.topk(self.topk, dim=-1)
            return self._routed(x, idx, w / w.sum(-1, keepdim=True)), logits
        return self._dense(x, s), logits

    # Eq. (2), Sec. 2.2: MoBE(V) = sum_e s_e B_e(V), all experts on all tokens of the image.
    def _dense(self, x, s):  # x [B, S, C], s [B, E]
        B, S, C = x.shape
        E, _, H = self.w1.shape
        w1 = self.w1.transpose(0, 1).reshape(C, E * H)  # [C, E*H]: the E first layers side by side
        h = F.gelu(x @ w1 + self.b1.reshape(E * H))  # [B, S, E*H]
        h = (h.view(B, S, E, H) * s[:, None, :, None]).view(B, S, E * H)  # scale expert e's block by s_e
        return h @ self.w2.reshape(E * H, C) + (s @ self.b2)[:, None, :]  # [B, S, C]

    def _routed(self, x, idx, w):
        """Each image b goes to experts idx[b, :] (weights w[b, :], or 1 when w is None); per expert one matmul pair."""
        B, S, C = x.shape
        K = idx.shape[1]
        flat_e = idx.reshape(-1)  # [B*K] expert of each (image, slot)
        flat_b = torch.arange(B, device=x.device).repeat_interleave(K)  # [B*K] image of each (image, slot)
        order = torch.argsort(flat_e, stable=True)  # group the (image, slot) pairs by expert
        counts = torch.bincount(flat_e, minlength=self.n_experts).tolist()
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = flat_b[order[start:start + n]]
            h = F.gelu(x[rows] @ self.w1[e] + self.b1[e])  # [n, S, H]
            outs.append(h @ self.w2[e] + self.b2[e])  # [n, S, C]
            start += n
        y = torch.cat(outs, 0)  # [B*K, S, C] in expert-sorted order
        if w is not None:
            y = y * w.reshape(-1)[order].view(-1, 1, 1).to(y.dtype)
        return torch.zeros(B, S, C, dtype=y.dtype, device=x.device).index_add_(0, flat_b[order], y)


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer (torchvision's EncoderBlock); its MLP is a MoBE block when n_experts > 0."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, n_experts: int = 0, topk: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MoBE(dim, mlp_dim, n_experts, topk) if n_experts else mlp_block(dim, mlp_dim)

    def forward(self, x, expert_index=None):
        x = x + self.self_attention(self.ln_1(x))
        if isinstance(self.mlp, MoBE):
            y, logits = self.mlp(self.ln_2(x), expert_index)
            return x + y, logits
        return x + self.mlp(self.ln_2(x)), None


class Encoder(nn.Module):
    def __init__(self, seq_len, dim, depth, heads, mlp_dim, moe_layers, n_experts, topk):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, dim).normal_(std=0.02))
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderLayer(dim, heads, mlp_dim, n_experts if i in moe_layers else 0, topk))
            for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)


class ViT(nn.Module):
    """Vision transformer phi_v (Sec. 2.2). forward -> (tokens [B, 1+N, C] with [IMG] first, gate logits per MoBE layer)."""

    def __init__(self, image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072,
                 moe_layers=(), n_experts=0, topk=0, stem="patch"):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        n_patches = (image_size // patch_size) ** 2
        if stem == "conv":  # demo: a hybrid ViT, tokens from strided 3x3 convs (common.ConvStem says why)
            self.conv_proj = common.ConvStem(dim, patch_size)
        elif stem == "patch":
            self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (3 * patch_size ** 2)))
            nn.init.zeros_(self.conv_proj.bias)
        else:
            raise common.ConfigError(f"--stem={stem}: expected patch | conv")
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))  # the global image token [IMG]
        self.encoder = Encoder(n_patches + 1, dim, depth, heads, mlp_dim, set(moe_layers), n_experts, topk)
        self.moe_layers = sorted(moe_layers)
        self.grad_ckpt = False  # --grad_ckpt: keep only each layer's input, recompute the layer in the backward

    def forward(self, images, expert_index=None):
        x = self.conv_proj(images).flatten(2).transpose(1, 2)  # [B, N, C]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.encoder.pos_embedding
        gate_logits = []
        recompute = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layers:
            if recompute:
                x, logits = torch.utils.checkpoint.checkpoint(layer, x, expert_index, use_reentrant=False)
            else:
                x, logits = layer(x, expert_index)
            if logits is not None:
                gate_logits.append(logits)
        return self.encoder.ln(x), gate_logits


def parse_moe_layers(spec: str, depth: int) -> list[int]:
    """'8,9,10,11' or '-4,-3,-2,-1' (from the end) or 'none' -> sorted layer indices, checked against depth."""
    if spec.strip().lower() in ("", "none"):
        return []
    out = set()
    for tok in spec.split(","):
        i = int(tok)
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"--moe_layers: layer {i} does not exist in a {depth}-layer ViT")
        out.add(j)
    return sorted(out)


def vit_state_from_torchvision(tv_state: dict, vit: ViT) -> dict:
    """torchvision VisionTransformer state dict -> this ViT's: the classifier head is dropped, each MoBE
    layer's pretrained MLP (mlp.0 / mlp.3) is copied into all its experts (Sec. 3.1: ImageNet init), and the
    position embeddings are resized when --image_size is not the pretrained one."""
    own = vit.state_dict()
    out = {}
    for k, v in tv_state.items():
        if k.startswith("heads."):
            continue
        if k == "encoder.pos_embedding" and v.shape != own[k].shape:
            v = resize_pos_embedding(v, own[k].shape[1])
        out[k] = v
    for i in vit.moe_layers:
        p = f"encoder.layers.encoder_layer_{i}.mlp."
        w0, b0, w3, b3 = (out.pop(p + n) for n in ("0.weight", "0.bias", "3.weight", "3.bias"))
        E = own[p + "w1"].shape[0]
        out[p + "w1"] = w0.t().unsqueeze(0).repeat(E, 1, 1)
        out[p + "b1"] = b0.unsqueeze(0).repeat(E, 1)
        out[p + "w2"] = w3.t().unsqueeze(0).repeat(E, 1, 1)
        out[p + "b2"] = b3.unsqueeze(0).repeat(E, 1)
        out[p + "gate.weight"] = own[p + "gate.weight"]  # the gate is new: keep its random init
    return out


def resize_pos_embedding(pos, seq_len):
    """[1, 1+n*n, C] -> [1, seq_len, C]: bicubic resize of the patch grid, [IMG] position kept."""
    cls, grid = pos[:, :1], pos[:, 1:]
    n, m = int(math.isqrt(grid.shape[1])), int(math.isqrt(seq_len - 1))
    grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(m, m), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, m * m, -1)], 1)


class PedCLIP(nn.Module):
    """Image encoder phi_v (ViT with MoBE) + text encoder phi_t (BERT), [IMG] / [CLS] projected and L2-normalised."""

    def __init__(self, cfg: Config, text_encoder: nn.Module, tokenizer, body_parts: list[str]):
        super().__init__()
        self.cfg, self.tokenizer, self.body_parts = cfg, tokenizer, body_parts
        self.visual = ViT(cfg.image_size, cfg.patch_size, cfg.vit_width, cfg.vit_depth, cfg.vit_heads,
                          cfg.vit_mlp_dim, parse_moe_layers(cfg.moe_layers, cfg.vit_depth), len(body_parts),
                          cfg.moe_topk, cfg.stem)
        self.text = text_encoder
        self.image_proj = nn.Linear(cfg.vit_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))  # 1/tau of Eq. (3)-(4), learnable

    def forward(self, images, input_ids, attention_mask, expert_index=None):
        """-> image [B, D], text [B, D] (L2-normalised: their dot product is sim of Eq. 3-4), gate logits."""
        img, gate_logits = self.encode_image(images, expert_index, return_gate=True)
        return img, self.encode_tokens(input_ids, attention_mask), gate_logits

    def encode_image(self, images, expert_index=None, return_gate=False):
        tokens, gate_logits = self.visual(images, expert_index)
        z = F.normalize(self.image_proj(tokens[:, 0]), dim=-1)  # the [IMG] token
        return (z, gate_logits) if return_gate else z

    def encode_tokens(self, input_ids, attention_mask):
        h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)  # the [CLS] token

    def encode_text(self, texts):
        """list[str] (tokenised here) or a tokenizer batch -> [B, D]."""
        if isinstance(texts, (list, tuple)):
            texts = self.tokenize(texts)
        dev = self.logit_scale.device
        return self.encode_tokens(texts["input_ids"].to(dev), texts["attention_mask"].to(dev))

    def tokenize(self, texts) -> dict:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_tokens,
                                   return_tensors="pt", return_token_type_ids=False))

    def image_tokens(self, images):
        """Patch tokens [B, N, C] (without [IMG]) after the final LayerNorm, soft gating: for segmentation heads."""
        return self.visual(images)[0][:, 1:]

    def image_transform(self, train: bool):
        return ImageTransform(self.cfg.image_size, train)

    @staticmethod
    def zeroshot_prompts(label: str):
        """(positive prompts, negative prompts). "No Finding" is itself a negation and gets its own pair
        (the generic template would say "no no finding", CheXzero's bug)."""
        x = label.lower()
        if x in ("no finding", "normal"):
            return (["No acute abnormality.", "No acute findings.", "Normal study."],
                    ["Abnormal study.", "There are abnormal findings.", "Acute abnormality is present."])
        X = x[0].upper() + x[1:]
        return [f"There is {x}.", f"{X} is present.", f"{X}."], [f"There is no {x}.", f"No {x}.", f"No evidence of {x}."]

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)  # 1/tau, clamped at 100 as CLIP does


# ----------------------------------------------------------------------------------------------------
# ---- losses ----

# Eq. (3) and (4), Sec. 2.3: InfoNCE over the global batch, image->text and text->image.
def infonce_losses(img, txt, logit_scale):
    """img, txt [b, D] L2-normalised on this rank -> (l_v2t, l_t2v), each averaged over the b local pairs.

    Each local image is scored against all M = world*b texts (gathered with gradient), and vice versa; the
    positive of local row i is global column rank*b + i. DDP's gradient averaging makes this the global mean.
    """
    all_img, all_txt = common.all_gather_with_grad(img), common.all_gather_with_grad(txt)  # [M, D]
    scale = logit_scale.exp().clamp(max=100.0)  # 1/tau, clamped at 100 as CLIP does
    target = torch.arange(img.shape[0], device=img.device) + common.rank_offset(img.shape[0])
    l_v2t = F.cross_entropy(scale * img.float() @ all_txt.float().t(), target)  # Eq. (3): sim(x_v^i, x_t^j)/tau
    l_t2v = F.cross_entropy(scale * txt.float() @ all_img.float().t(), target)  # Eq. (4): sim(x_t^i, x_v^j)/tau
    return l_v2t, l_t2v


# Expert assignment, Sec. 2.3: l_G = CE(s, x_b), summed over the MoBE layers (each has its own gate).
def gate_loss(gate_logits: list, body_part):
    """gate_logits: one [b, E] per MoBE layer; body_part [b] expert index x_b -> scalar."""
    if not gate_logits:
        return torch.zeros((), device=body_part.device)
    return sum(F.cross_entropy(g.float(), body_part) for g in gate_logits)


# Sec. 2.3: l = 1/2 (l_v2t + l_t2v) + lambda * l_G.
def total_loss(l_v2t, l_t2v, l_g, lam: float):
    return 0.5 * (l_v2t + l_t2v) + lam * l_g


# Sec. 3.1: "In the first 10 epochs, we use a fixed lambda = 1 and teacher forcing ... After this period, the
# model begins using the Gating network's output ..., with lambda linearly annealed during the remaining 40."
def teacher_forcing(epoch: int, cfg: Config) -> bool:
    return epoch < cfg.teacher_epochs


def lambda_at(epoch: int, cfg: Config) -> float:
    """lambda of epoch `epoch` (0-based): lambda_start while teacher-forced, then linear to lambda_end at the last epoch."""
    if epoch < cfg.teacher_epochs:
        return cfg.lambda_start
    n = cfg.epochs - cfg.teacher_epochs  # annealed epochs: linspace(start, end, n)
    if n <= 1:
        return cfg.lambda_end
    t = min(epoch - cfg.teacher_epochs, n - 1) / (n - 1)
    return cfg.lambda_start + (cfg.lambda_end - cfg.lambda_start) * t


# ----------------------------------------------------------------------------------------------------
# ---- data (Sec. 2.1: (XR, text, anatomy) triplets; one CSV row = one image, its report excerpt, its body part) ----


def body_part_list(cfg: Config) -> list[str]:
    """The experts' names in expert-index order: the paper's 23 regions, the phantoms' 6, or a given list."""
    if cfg.body_parts == "pexr23":
        parts = list(BODY_PARTS)
    elif cfg.body_parts == "phantom":
        parts = list(common.PHANTOM_BODY_PARTS)
    else:
        parts = [p.strip().lower().replace(" ", "_").replace("-", "_") for p in cfg.body_parts.split(",") if p.strip()]
    if cfg.unknown_body_part not in ("error", "other"):
        raise common.ConfigError(f"--unknown_body_part={cfg.unknown_body_part}: expected error | other")
    if cfg.unknown_body_part == "other" and "other" not in parts:
        parts.append("other")
    return parts


def body_part_index(value: str, parts: list[str], unknown: str = "error", where: str = "") -> int:
    """CSV body_part -> expert index x_b. Spelling variants go through BODY_PART_SYNONYMS; a value that is not
    an expert is an error naming it, or (--unknown_body_part=other) the 'other' expert."""
    v = (value or "").strip().lower().replace(" ", "_").replace("-", "_")
    if v not in parts:
        v = BODY_PART_SYNONYMS.get(v, v)
    if v in parts:
        return parts.index(v)
    if unknown == "other":
        return parts.index("other")
    raise ValueError(f"unknown body part {value!r}{where}: the experts are {parts} (other spellings mapped onto "
                     f"them: {sorted(BODY_PART_SYNONYMS)}). Pass --unknown_body_part=other to send such images to "
                     f"an extra 'other' expert, or --body_parts=a,b,c to choose the experts.")


def body_part_labels(table: common.XrayCSV, parts: list[str], unknown: str) -> np.ndarray:
    return np.array([body_part_index(r.get("body_part", ""), parts, unknown, f" ({table.path} row {r['_row']})")
                     for r in table.rows], dtype=np.int64)


class ImageTransform:
    """Training: random resized crop with scale [0.8, 1.1] and brightness / contrast jitter (the paper names no
    augmentation; these are CXR-CLIP's). Eval: resize only. uint8 [H, W] -> normalised float [3, S, S]."""

    def __init__(self, size: int, train: bool):
        self.size, self.train = size, train

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        if not self.train:
            return common.to_tensor(common.resize(img, self.size))
        rng = rng or np.random.default_rng()
        if max(img.shape) > 2 * self.size:  # crop from a smaller copy: same result, far less work
            img = common.resize(img, 2 * self.size)
        img = common.random_resized_crop(img, self.size, rng, scale=(0.8, 1.1))
        img = common.color_jitter(img, rng, brightness=(0.9, 1.1), contrast=(0.8, 1.2))
        return common.to_tensor(img)


class TripletDataset(torch.utils.data.Dataset):
    """Item = one image row -> (image x_v, report excerpt x_t, body-part index x_b).

    Indexed by (row, sample seed) from common.EpochSampler, so augmentations are a function of (seed, epoch,
    row) alone. An unreadable image is replaced by the next readable row and reported in the item's "bad"
    field (counted by the loop): every rank keeps its batch size, which the all-gathered InfoNCE needs.
    """

    def __init__(self, table: common.XrayCSV, parts: list[str], cfg: Config, train: bool = True):
        self.t, self.cfg, self.train = table, cfg, train
        self.transform = ImageTransform(cfg.image_size, train and cfg.augment)
        self.body_part = body_part_labels(table, parts, cfg.unknown_body_part)  # checked once, before training

    def __len__(self):
        return len(self.t)

    def text(self, i: int, rng: np.random.Generator | None = None) -> str:
        """x_t of row i: the --text_column text (findings + impression when it is empty); with
        --text_sample=section and a training rng, one non-empty section (findings or impression) drawn per step."""
        t = (self.t.rows[i].get(self.cfg.text_column) or "").strip() or " ".join(self.t.texts(i))
        if rng is None or self.cfg.text_sample == "full":
            return t
        sections = self.t.texts(i)
        return sections[rng.integers(len(sections))] if sections else t

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
            raise RuntimeError(f"8 rows in a row around row {idx} have no readable image: is the image folder next "
                               f"to {self.t.path}? First error: {bad[0][1]}")
        return {"image": self.transform(img, rng), "text": self.text(i, rng if self.train else None),
                "body_part": int(self.body_part[i]), "bad": bad}


class Collate:
    """Stacks images and tokenises the texts in the worker (keeps the training process free)."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, items):
        return {"image": torch.stack([it["image"] for it in items]),
                "text": self.tokenize([it["text"] for it in items]),
                "body_part": torch.tensor([it["body_part"] for it in items]),
                "bad": [b for it in items for b in it["bad"]]}


def make_loader(ds, cfg: Config, di: common.DistInfo, local_batch: int, shuffle: bool, tokenize):
    sampler = common.EpochSampler(len(ds), local_batch, di.rank, di.world_size, cfg.seed, shuffle=shuffle)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=local_batch, sampler=sampler, collate_fn=Collate(tokenize), num_workers=cfg.num_workers,
        pin_memory=di.device.startswith("cuda"), persistent_workers=cfg.num_workers > 0, drop_last=True,
        prefetch_factor=4 if cfg.num_workers > 0 else None)
    return loader, sampler


# ----------------------------------------------------------------------------------------------------
# ---- build / load ----


def build_text_encoder(cfg: Config, vocab_size: int, bert_config: dict | None = None):
    """phi_t: BioClinicalBERT (paper), a tiny random BERT (demo), or the BERT of a checkpoint (bert_config)."""
    from transformers import AutoModel, BertConfig, BertModel

    if bert_config is not None:
        bc = BertConfig.from_dict(bert_config)
    elif cfg.text_encoder == "tiny":
        bc = BertConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_width, num_hidden_layers=cfg.tiny_layers,
                        num_attention_heads=max(1, cfg.tiny_width // 32), intermediate_size=cfg.tiny_width * 4,
                        max_position_embeddings=max(128, cfg.max_tokens), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    elif cfg.pretrained:
        return common.hf_from_pretrained(AutoModel, cfg.text_encoder, add_pooling_layer=False,
                                         attn_implementation="sdpa")
    else:  # --pretrained=false with a named model: BERT-base's architecture, random weights, our vocabulary
        bc = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, cfg.max_tokens))
    bc._attn_implementation = "sdpa"
    return BertModel(bc, add_pooling_layer=False)  # no pooler: [CLS] is projected directly (and DDP sees no unused weights)


def all_prompt_texts(labels: list[str]) -> list[str]:
    return [p for n in labels for ps in PedCLIP.zeroshot_prompts(n) for p in ps]


def build_tokenizer(cfg: Config, table: common.XrayCSV | None):
    """BioClinicalBERT's tokenizer (paper), or WordPiece fitted on the training reports + the prompts (demo)."""
    if cfg.text_encoder != "tiny" and cfg.pretrained:
        from transformers import AutoTokenizer

        return common.hf_from_pretrained(AutoTokenizer, cfg.text_encoder)
    if table is None:
        raise ValueError("a tokenizer fitted on the training reports needs the training CSV")
    ds_texts = [(r.get(cfg.text_column) or "").strip() or " ".join(table.texts(i)) for i, r in enumerate(table.rows)]
    texts = ds_texts + all_prompt_texts(table.label_names)
    for _ in range(3):
        tok = common.train_wordpiece(texts, cfg.vocab_size)
        # A WordPiece vocabulary holds every character of its corpus, so a healthy one never maps a training text to
        # [UNK]. Twice on a heavily loaded machine we got a vocabulary of the 5 special tokens only; refit then.
        if tok.unk_token_id not in tok(texts[0])["input_ids"]:
            return tok
        common.print0(f"warning: the fitted WordPiece vocabulary has {len(tok)} entries and misses training text; refitting")
    raise RuntimeError("common.train_wordpiece returned a broken vocabulary three times")


def build(cfg: Config, tokenizer=None, table: common.XrayCSV | None = None, bert_config: dict | None = None) -> PedCLIP:
    """Config -> PedCLIP. With --pretrained the ViT loads torchvision's ImageNet ViT-B/16 (each MoBE expert a copy
    of the pretrained MLP of its layer, Sec. 3.1) and the text encoder BioClinicalBERT."""
    tokenizer = tokenizer or build_tokenizer(cfg, table)
    model = PedCLIP(cfg, build_text_encoder(cfg, len(tokenizer), bert_config), tokenizer, body_part_list(cfg))
    if cfg.grad_ckpt:  # for batches that do not fit: activations of one layer at a time, recomputed in the backward
        model.visual.grad_ckpt = True
        common.hf_grad_ckpt(model.text)
    if cfg.pretrained:
        if (cfg.patch_size, cfg.stem, cfg.vit_width, cfg.vit_depth, cfg.vit_heads, cfg.vit_mlp_dim) != \
                (16, "patch", 768, 12, 12, 3072):
            raise common.ConfigError("--pretrained loads ViT-B/16: it needs --patch_size=16 --stem=patch --vit_width=768 "
                                     "--vit_depth=12 --vit_heads=12 --vit_mlp_dim=3072 (or --pretrained=false)")
        tv = common.load_torchvision_model("vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1")
        model.visual.load_state_dict(vit_state_from_torchvision(tv.state_dict(), model.visual))
    return model


def load(path: str, map_location="cpu") -> tuple[PedCLIP, Config]:
    """Rebuild the model from a checkpoint alone: config, BERT config and tokenizer vocabulary are stored in it."""
    ck = common.load_checkpoint(path, map_location)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    tok = tokenizer_from_vocab(ck["tokenizer_vocab"], ck.get("tokenizer_lower", True))
    cfg.pretrained = False  # the weights come from the checkpoint, not from ImageNet / the hub
    model = build(cfg, tok, bert_config=ck["bert_config"])
    model.load_state_dict(ck["model"])
    model.eval()
    return model, cfg


def tokenizer_from_vocab(vocab: list[str], lower: bool = True):
    """common.tokenizer_from_vocab, also for cased vocabularies (BioClinicalBERT's is cased)."""
    if lower:
        return common.tokenizer_from_vocab(vocab)
    import tempfile

    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "vocab.txt"
        p.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizerFast(vocab_file=str(p), do_lower_case=False)


# ----------------------------------------------------------------------------------------------------
# ---- evaluation: zero-shot classification and the gate's body-part accuracy ----


@torch.no_grad()
def embed_images(model: PedCLIP, table: common.XrayCSV, device, batch_size: int = 256, counter=None):
    """-> [N, D] normalised embeddings (eval transform, soft gating as at test time), a mask of readable rows,
    and the gate's predicted expert per MoBE layer [n_moe, N] (argmax of s, Eq. 1)."""
    tf = model.image_transform(False)
    feats, preds, ok = [], [], np.ones(len(table), bool)
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
        z, gate_logits = model.encode_image(torch.stack(xs).to(device), return_gate=True)
        feats.append(z.float().cpu())
        preds.append(torch.stack([g.argmax(-1).cpu() for g in gate_logits]) if gate_logits else
                     torch.zeros(0, len(xs), dtype=torch.long))
    return torch.cat(feats).numpy(), ok, torch.cat(preds, 1).numpy()


@torch.no_grad()
def zeroshot_eval(model: PedCLIP, table: common.XrayCSV, device, batch_size: int = 256) -> dict:
    """Per class: similarity to the mean positive-prompt embedding minus the mean negative-prompt one (the logit
    of the softmax over the pair); AUC per class and macro. Plus the gate's accuracy against the body parts."""
    model.eval()
    img, ok, gate_pred = embed_images(model, table, device, batch_size)
    scores = np.zeros((len(table), len(table.label_names)), np.float32)
    for j, name in enumerate(table.label_names):
        pos, neg = model.zeroshot_prompts(name)
        tp = F.normalize(model.encode_text(pos).mean(0), dim=-1).float().cpu().numpy()
        tn = F.normalize(model.encode_text(neg).mean(0), dim=-1).float().cpu().numpy()
        scores[:, j] = img @ tp - img @ tn
    res = common.auc_per_label(table.labels()[ok], scores[ok], table.label_names)
    out = {"zeroshot_auc_macro": res["macro"], "zeroshot_auc_per_label": res["per_label"], "n_images": int(ok.sum())}
    if gate_pred.shape[0]:
        y = body_part_labels(table, model.body_parts, model.cfg.unknown_body_part)[ok]
        per_layer = [float((p[ok] == y).mean()) for p in gate_pred]
        out["gate_accuracy"] = float(np.mean(per_layer))  # argmax_e s_e == x_b, mean over the MoBE layers
        out["gate_accuracy_per_layer"] = {str(l): a for l, a in zip(model.visual.moe_layers, per_layer)}
    return out


# ----------------------------------------------------------------------------------------------------
# ---- training ----


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine annealing to 0 at `total` (the paper gives only lr 1e-5)."""
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
    """Weight decay on matrices only (not on biases, norms, the temperature, [IMG] or position embeddings)."""
    def decays(n, p):
        return p.ndim >= 2 and not n.endswith(("class_token", "pos_embedding"))
    decay = [p for n, p in model.named_parameters() if p.requires_grad and decays(n, p)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not decays(n, p)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def train(cfg: Config) -> dict:
    di = common.setup_distributed(cfg.device)
    if cfg.batch_size % di.world_size:
        raise common.ConfigError(f"--batch_size={cfg.batch_size} (global) must divide by the {di.world_size} processes")
    if not 0 <= cfg.teacher_epochs <= cfg.epochs:
        raise common.ConfigError(f"--teacher_epochs={cfg.teacher_epochs} must lie in [0, --epochs={cfg.epochs}]")
    if cfg.text_sample not in ("full", "section"):
        raise common.ConfigError(f"--text_sample={cfg.text_sample}: expected full | section")
    local_batch = cfg.batch_size // di.world_size
    out = common.prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite) if di.is_main else None
    common.seed_everything(cfg.seed)
    if di.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed on Ampere+ for fp32 parts
        torch.backends.cudnn.allow_tf32 = True

    # -- data: the demo makes its phantom data set on first use
    if cfg.data == Config.data:
        common.ensure_phantoms(cfg.data, cfg.n_phantoms, seed=0, size=64)
    if not cfg.data:
        raise common.ConfigError("--data=<csv> is required with --preset=paper (see data_prep.py)")
    counter = common.BadSampleCounter(cfg.max_bad_frac, "bad samples: ")
    tr = common.XrayCSV(cfg.data, split="train", require=("image", "body_part"), require_text=True, counter=counter)
    te = common.XrayCSV(cfg.data, split="test", require=("image", "body_part"), counter=counter)
    parts = body_part_list(cfg)
    train_ds = TripletDataset(tr, parts, cfg, train=True)  # an unknown body part fails here, naming it

    # -- model: the demo tokenizer is fitted on the training reports (under DDP by rank 0, then broadcast)
    ck = common.load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")) if cfg.resume else None
    if ck is not None:
        tok = tokenizer_from_vocab(ck["tokenizer_vocab"], ck.get("tokenizer_lower", True))
        model = build(dataclasses.replace(cfg, pretrained=False), tok, bert_config=ck["bert_config"])
        model.cfg = cfg
    else:
        tok = None
        if di.ddp and not (cfg.text_encoder != "tiny" and cfg.pretrained):  # rank 0 fits the vocabulary, all use it
            vocab = [common.tokenizer_vocab(build_tokenizer(cfg, tr)) if di.is_main else None]
            torch.distributed.broadcast_object_list(vocab, src=0)
            tok = tokenizer_from_vocab(vocab[0])
        model = build(cfg, tok, tr)
    model = model.to(di.device)
    tok = model.tokenizer
    common.print0(f"tokenizer: {len(tok)} entries")
    loader, sampler = make_loader(train_ds, cfg, di, local_batch, True, model.tokenize)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch

    fused = di.device.startswith("cuda")
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, int(cfg.warmup_epochs * steps_per_epoch)))
    autocast, scaler = amp_context(cfg, di.device)

    step, start_epoch, start_batch = 0, 0, 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step, start_epoch, start_batch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        rngs = ck["rng"]
        common.set_rng_state(rngs[di.rank] if di.rank < len(rngs) else rngs[0])
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
        rngs = [common.rng_state()]  # every rank's RNG state (dropout differs per rank), for an exact resume
        if di.ddp:
            rngs = [None] * di.world_size
            torch.distributed.all_gather_object(rngs, common.rng_state())
        if di.is_main:
            common.save_checkpoint({
                "model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "rng": rngs, "config": dataclasses.asdict(cfg),
                "tokenizer_vocab": common.tokenizer_vocab(tok), "tokenizer_lower": bool(getattr(tok, "do_lower_case", True)),
                "bert_config": raw_model.text.config.to_dict(), "body_parts": parts, "paper": "pedclip",
            }, os.path.join(cfg.out_dir, "ckpt.pt"))
        if di.ddp:
            torch.distributed.barrier()

    def forward_loss(batch, epoch):
        dev = di.device
        x = batch["image"].to(dev, non_blocking=True)
        ids = batch["text"]["input_ids"].to(dev, non_blocking=True)
        mask = batch["text"]["attention_mask"].to(dev, non_blocking=True)
        xb = batch["body_part"].to(dev, non_blocking=True)
        tf, lam = teacher_forcing(epoch, cfg), lambda_at(epoch, cfg)
        with autocast():  # through the DDP wrapper's forward, so its gradient hooks see the whole graph
            v, t, gate_logits = model(x, ids, mask, expert_index=xb if tf else None)
        l_v2t, l_t2v = infonce_losses(v.float(), t.float(), raw_model.logit_scale)
        l_g = gate_loss(gate_logits, xb)
        with torch.no_grad():
            acc = torch.stack([(g.argmax(-1) == xb).float().mean() for g in gate_logits]).mean() if gate_logits \
                else torch.zeros(())
        parts_ = {"v2t": l_v2t.detach(), "t2v": l_t2v.detach(), "gate": l_g.detach(), "gate_acc": acc}
        return total_loss(l_v2t, l_t2v, l_g, lam), parts_

    stopper = common.StopSignal()
    n_moe = len(raw_model.visual.moe_layers)
    common.print0(f"pedclip: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, "
                  f"MoBE in layers {raw_model.visual.moe_layers} of {cfg.vit_depth} with {len(parts)} experts "
                  f"({'dense soft mixture, Eq. 2' if not cfg.moe_topk else f'top-{cfg.moe_topk} routing'}); "
                  f"{len(tr)} training images, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs "
                  f"({cfg.teacher_epochs} teacher-forced), global batch {cfg.batch_size} on {di.world_size} "
                  f"process(es), device {di.device}")
    common.print0("experts (training images): " + ", ".join(
        f"{p} ({c})" for p, c in zip(parts, np.bincount(train_ds.body_part, minlength=len(parts)))))
    t_start, bad_run, n_skipped, stop_reason, fault_done = time.time(), 0, 0, None, False
    pbar = None
    if di.is_main:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps if cfg.max_steps < 0 else min(total_steps, cfg.max_steps), initial=step,
                    desc="pedclip", unit="step", dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        model.train()
        bi = start_batch if epoch == start_epoch else 0
        for batch in loader:
            for kind, detail in batch["bad"]:
                counter.add(kind, detail)
            counter.seen += local_batch
            loss, parts_ = forward_loss(batch, epoch)
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
            step, bi = step + 1, bi + 1
            if step % cfg.log_every == 0 or step == 1:
                row = {"step": step, "epoch": epoch, "loss": common.all_reduce_mean(loss.detach()),
                       **{k: common.all_reduce_mean(v) for k, v in parts_.items()},
                       "lambda": lambda_at(epoch, cfg), "teacher_forcing": teacher_forcing(epoch, cfg),
                       "lr": sched.get_last_lr()[0], "temperature": 1 / raw_model.scale().item(),
                       "elapsed_s": round(time.time() - t_start, 2)}
                logger.log(**row)
                if pbar:
                    pbar.set_postfix(loss=f"{row['loss']:.3f}", gate=f"{row['gate']:.3f}", lam=f"{row['lambda']:.2f}",
                                     tf=int(row["teacher_forcing"]))
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
        metrics = zeroshot_eval(raw_model, te, di.device, cfg.eval_batch_size)
        metrics.update(step=step, train_seconds=round(time.time() - t_start, 1), bad_samples=dict(counter.counts),
                       skipped_nonfinite_steps=n_skipped, experts=parts, moe_layers=raw_model.visual.moe_layers,
                       moe_topk=cfg.moe_topk, world_size=di.world_size)
        common.write_json_atomic(os.path.join(cfg.out_dir, "metrics.json"), metrics)
        print(f"zero-shot macro AUC on the test split: {metrics['zeroshot_auc_macro']:.4f} "
              f"({metrics['n_images']} images)")
        for n, a in metrics["zeroshot_auc_per_label"].items():
            print(f"  {n:<24} {'undefined (one class only)' if a is None else f'{a:.4f}'}")
        if n_moe:
            print(f"gate body-part accuracy on the test split: {metrics['gate_accuracy']:.4f} "
                  f"(per MoBE layer: {metrics['gate_accuracy_per_layer']})")
        print(f"wrote {cfg.out_dir}/metrics.json")
    common.cleanup_distributed()
    return metrics


# ----------------------------------------------------------------------------------------------------
# ---- benchmark (python pedclip.py --preset=paper --benchmark) ----


def benchmark(cfg: Config) -> dict:
    """Training steps of the preset's model and batch on synthetic tensors of the real shapes (random init, no
    data loading), once teacher-forced and once with soft gating (Eq. 2 costs E MLPs per MoBE layer):
    samples/s, step time, peak memory, FLOPs per sample (FlopCounterMode), MFU against the GPU's bf16 peak.
    `--benchmark=data` times the input pipeline instead (load, augment, tokenise, collate) per worker count."""
    if cfg.benchmark not in ("model", "data"):
        raise common.ConfigError(f"--benchmark={cfg.benchmark}: expected off | model | data")
    di = common.setup_distributed(cfg.device)
    common.seed_everything(cfg.seed)
    if cfg.benchmark == "data":
        cfg.data = common.benchmark_data_csv(cfg.data, Config.data, cfg.n_phantoms)
        tr = common.XrayCSV(cfg.data, split="train", require=("image", "body_part"), require_text=True)
        tok = build_tokenizer(cfg, tr)
        ds = TripletDataset(tr, body_part_list(cfg), cfg, train=True)
        keyed = [(i, i) for i in range(len(ds))]
        res = common.benchmark_data(torch.utils.data.Subset(ds, keyed), Collate(lambda t: dict(tok(
            list(t), padding=True, truncation=True, max_length=cfg.max_tokens, return_tensors="pt",
            return_token_type_ids=False))), batch_size=min(64, cfg.batch_size),
            workers=common.parse_workers(cfg.benchmark_workers), n_batches=10)
        common.cleanup_distributed()
        return {"data": res}
    if di.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg.pretrained = False  # random init: the benchmark measures speed, not accuracy
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(cfg.vocab_size - 5)]
    tok = common.tokenizer_from_vocab(vocab)
    b = cfg.batch_size // di.world_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g).to(di.device)
    ids = torch.randint(5, cfg.vocab_size, (b, cfg.max_tokens), generator=g).to(di.device)
    mask = torch.ones_like(ids)
    n_parts = len(build(cfg, tok).body_parts)
    xb = torch.randint(0, n_parts, (b,), generator=g).to(di.device)
    autocast, scaler = amp_context(cfg, di.device)
    # the same batch through: the dense ViT (no MoBE), MoBE teacher-forced, MoBE soft (Eq. 2), MoBE top-2 routing
    variants = {"dense": (dataclasses.replace(cfg, moe_layers="none"), False),
                "teacher": (cfg, True), "soft": (dataclasses.replace(cfg, moe_topk=0), False),
                "soft_top2": (dataclasses.replace(cfg, moe_topk=min(2, n_parts)), False)}
    out = {}
    for phase, (vcfg, teacher) in variants.items():
        torch.manual_seed(cfg.seed)
        model = build(vcfg, tok).to(di.device)
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=di.device.startswith("cuda"))
        fwd = torch.compile(model) if cfg.compile else model
        net = nn.parallel.DistributedDataParallel(fwd) if di.ddp else fwd

        def step(m=net, model=model, opt=opt, teacher=teacher):
            with autocast():
                v, t, gl = m(x, ids, mask, expert_index=xb if teacher else None)
            l_v2t, l_t2v = infonce_losses(v.float(), t.float(), model.logit_scale)
            loss = total_loss(l_v2t, l_t2v, gate_loss(gl, xb), 1.0)
            (scaler.scale(loss) if scaler else loss).backward()
            (scaler.step(opt), scaler.update()) if scaler else opt.step()
            opt.zero_grad(set_to_none=True)

        flops = common.count_flops(lambda: step(model))  # counted on the eager model, one process's share
        out[phase] = common.run_benchmark(step, b, di.device, warmup=3, steps=cfg.benchmark_steps,
                                          flops_per_step=flops, label=f"pedclip {cfg.preset} {phase}")
    d, t, s_, k = out["dense"], out["teacher"], out["soft"], out["soft_top2"]
    out["ratios"] = {"teacher_vs_dense_time": t["step_ms_mean"] / d["step_ms_mean"],
                     "soft_vs_dense_flops_per_s": s_["achieved_tflops"] / d["achieved_tflops"],
                     "top2_speedup_vs_soft": s_["step_ms_mean"] / k["step_ms_mean"]}
    r = out["ratios"]
    common.print0(f"benchmark pedclip ratios: teacher-forced / dense step time {r['teacher_vs_dense_time']:.2f} "
                  f"(target <= 1.1) | soft-phase / dense achieved FLOP/s {r['soft_vs_dense_flops_per_s']:.2f} "
                  f"(target >= 0.9) | top-2 routing speed-up over soft {r['top2_speedup_vs_soft']:.2f}x")
    common.cleanup_distributed()
    return out


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv)
    if not (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())):
        torch.set_num_threads(common.cpu_threads(cfg.threads))
    if cfg.benchmark != "off":
        return benchmark(cfg)
    return train(cfg)


if __name__ == "__main__":
    main()
