"""
PedCLIP: A Vision-Language Model for Pediatric X-rays with Mixture of Body part Experts.
T. D. Huy, A. Shoby, S. Tran, ..., Z. Liao, M. H. Phan. MICCAI 2025, doi:10.1007/978-3-032-04971-1_46.

Map of the method (Sec. 2.2-2.3, 3.1):
    image x_v -> ViT-B/16 phi_v whose MLP in the MoBE layer(s) is a Mixture of Body-part Experts:
        s = softmax(v_[IMG] . W_G)                      Eq. (1), W_G in R^{C x E}, E = 23 body parts
        MoBE(V) = sum_e s_e B_e(V)                      Eq. (2), B_e an MLP of the ViT's MLP shape
    text x_t (the report excerpt of the image's body part, Sec. 2.1) -> BioClinicalBERT phi_t
    sim = cosine(v_[IMG], t_[CLS]) after projection; l_v2t, l_t2v: InfoNCE over the batch      Eq. (3), (4)
    l = 1/2 (l_v2t + l_t2v) + lambda l_G,  l_G = CE(s, x_b) on the body-part label x_b        Sec. 2.3
    epochs [0, 10): teacher forcing (x_b picks the expert), lambda = 1
    epochs [10, 50): the gate's scores s mix the experts, lambda annealed linearly to 0       Sec. 3.1
Equation -> function -> test: Eq. (1)-(2) MoBE.forward (tests/test_pedclip.py::test_mobe_*), Eq. (3)-(4)
infonce_losses (::test_infonce_*), l_G gate_loss, l total_loss (::test_gate_loss_*), schedule lambda_at /
teacher_forcing (::test_lambda_*).

Run:
    python pedclip.py                                     # demo: phantoms, small ViT + BERT, 2 CPU cores
    torchrun --nproc_per_node=2 pedclip.py                # the same demo in 2 processes
    python text_prep.py extract_bodyparts --csv=data/pexr.csv --model=<Llama-3.1 folder>   # the excerpts
    python pedclip.py --preset=paper --data=data/pexr.csv # ViT-B/16 (ImageNet) + BioClinicalBERT
    torchrun --nproc_per_node=8 pedclip.py --preset=paper --data=data/pexr.csv
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        pedclip.py --preset=paper --data=data/pexr.csv
    python pedclip.py --moe_layers=none                   # ablation: the plain ViT ("MLP", Fig. 5)
    python pedclip.py --preset=paper --moe_layers=4       # ablation: MoBE in an early layer (Fig. 4)

Departures from the paper are stated at their lines and in README.md ("PedCLIP")."""
from __future__ import annotations

import collections
import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vision_transformer import MLPBlock, VisionTransformer, interpolate_embeddings

import common
import phantoms

# ----------------------------------------------------------------------------------------------------
# ---- config ----


@dataclass
class Config:
    # data (Sec. 2.1, 3.1)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema (the demo draws phantoms here)
    image_size: int = 64  # input resolution (224 in the paper)
    body_parts: str = "phantom"  # the experts: pexr23 (the paper's 23 regions) | phantom (6) | a,b,c
    text_column: str = "report"  # x_t: the paper's body-part excerpt is data_prep's column `excerpt`
    text_sample: str = "full"  # full: the whole text | section: findings OR impression, drawn per step
    max_tokens: int = 120  # reports padded / truncated to 120 tokens (Sec. 3.1)
    # image encoder phi_v (Sec. 2.2, 3.1)
    pretrained: bool = False  # ImageNet ViT-B/16 and BioClinicalBERT weights (the paper)
    patch_size: int = 8  # ViT patch size (16)
    stem: str = "patch"  # patch: ViT's patchify | conv: strided convs (common.ConvStem; from scratch only)
    vit_width: int = 64  # C, the token size (768); also the demo BERT's width
    vit_depth: int = 4  # transformer layers L (12)
    vit_heads: int = 2  # attention heads (12)
    vit_mlp_dim: int = 128  # hidden size of the MLP and of every expert B_e (3072)
    moe_layers: str = "-1"  # layers whose MLP is MoBE (Sec. 3.3: best late; <0 from the end; none)
    # text encoder phi_t and the shared space (Sec. 2.2, 3.1)
    text_encoder: str = "tiny"  # tiny (2 layers, from scratch) | a BERT name or folder
    vocab_size: int = 1000  # WordPiece vocabulary fitted on the training reports (tiny encoder)
    embed_dim: int = 128  # shared image-text space (not given in the paper)
    # schedule (Sec. 3.1)
    epochs: int = 10  # training epochs (50)
    teacher_epochs: int = 2  # first epochs with teacher forcing and lambda = 1 (10 of 50)
    batch_size: int = 64  # GLOBAL batch of image-text pairs (256)
    lr: float = 1e-3  # AdamW peak learning rate (1e-5)
    weight_decay: float = 1e-2  # AdamW weight decay on weight matrices (not given in the paper)
    warmup_epochs: float = 0.5  # linear warm-up, then cosine decay to 0 (not given in the paper)
    grad_clip: float = 1.0  # max gradient norm, 0: off (the paper names none)
    # run
    seed: int = 0  # weights, data order and augmentations
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model
    num_workers: int = 0  # DataLoader workers per process
    threads: int = 0  # CPU: torch threads per process (0: the cores shared among the processes)
    out_dir: str = "out/pedclip"  # ckpt.pt, log.jsonl, metrics.json
    resume: bool = False  # continue out_dir/ckpt.pt exactly where it stopped
    overwrite: bool = False  # replace an existing run in out_dir
    max_steps: int = -1  # stop (with a checkpoint) after this many steps; the schedule still spans --epochs
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and at every epoch end)
    max_bad_frac: float = 0.01  # fail when more than this share of samples is unreadable or empty
    preset: str = "demo"  # set by --preset


PRESETS = {
    # Demo: phantoms at 64 px; a 4-layer ViT (8x8 tokens from a conv stem, and [IMG]) whose last MLP is MoBE
    # over the phantoms' 6 body parts, a 2-layer BERT, from scratch; ~2100 images / 64 = 32 steps x 40 epochs,
    # 0-7 teacher-forced (the paper's 10 of 50); one report section per step for the LLM's excerpt. 40 epochs:
    # the rare findings (31-61 training images each) are learned late.
    "demo": dict(epochs=40, teacher_epochs=8, batch_size=64, lr=1e-3, stem="conv", text_sample="section"),
    # Paper (Sec. 3.1): ViT-B/16 (ImageNet) + BioClinicalBERT, 224 px, one MoBE block of 23 experts in the
    # last layer, 50 epochs (10 teacher-forced), lr 1e-5, global batch 256 (2 GPUs x 128, as in the paper).
    "paper": dict(data="", image_size=224, body_parts="pexr23", text_column="excerpt", pretrained=True,
                  patch_size=16, vit_width=768, vit_depth=12, vit_heads=12, vit_mlp_dim=3072,
                  text_encoder="emilyalsentzer/Bio_ClinicalBERT", embed_dim=512, epochs=50, teacher_epochs=10,
                  batch_size=256, lr=1e-5, weight_decay=1e-4, warmup_epochs=1.0, grad_clip=0.0,
                  num_workers=8),
}
PHANTOMS = 3000  # images in the demo's phantom data set

# ----------------------------------------------------------------------------------------------------
# ---- model ----
# phi_v is torchvision's VisionTransformer (its ImageNet weights load as they are); in the MoBE layers its MLP
# block is replaced by a MoBE block (Fig. 3).


class MoBE(nn.Module):
    """Mixture of Body-part Experts (Sec. 2.2), in place of a ViT layer's MLP: E MLP experts
    B_e(V) = g(V W1_e + b1_e) W2_e + b2_e and a gate W_G that reads the [IMG] token.
    forward(x [B, S, C], expert_index [B] or None) -> (MoBE(V) [B, S, C], gate logits v_[IMG] . W_G [B, E]).

    The experts' weights are stacked as w1 [C, E, H], b1 [E, H], w2 [E, H, C], b2 [E, C], so that
      * the soft mixture of Eq. (2) is two dense matmuls, whatever E (`mixture`; `mixture_loop` is Eq. 2 as
        written, one expert after the other, and gives the same numbers):
            sum_e s_e B_e(V) = [s_1 g(V W1_1 + b1_1) | ... | s_E g(V W1_E + b1_E)] [W2_1; ...; W2_E] + s . b2,
        with [W1_1 | ... | W1_E] = w1.view(C, E*H) and [W2_1; ...; W2_E] = w2.view(E*H, C) (views, no copy);
      * teacher forcing sorts the images by expert, gathers the used experts' weights once and runs each on
        its group of images (`routed`): the plain MLP's cost."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, n_experts, bias=False)  # W_G of Eq. (1), stored transposed as [E, C]
        nn.init.normal_(self.gate.weight, std=0.02)
        experts = [MLPBlock(dim, hidden, 0.0) for _ in range(n_experts)]  # each its own draw of MLP's init
        self.w1 = nn.Parameter(torch.stack([m[0].weight.t() for m in experts], 1).detach())  # [C, E, H]
        self.b1 = nn.Parameter(torch.stack([m[0].bias for m in experts]).detach())  # [E, H]
        self.w2 = nn.Parameter(torch.stack([m[3].weight.t() for m in experts]).detach())  # [E, H, C]
        self.b2 = nn.Parameter(torch.stack([m[3].bias for m in experts]).detach())  # [E, C]

    def forward(self, x, expert_index=None):
        gate_logits = self.gate(x[:, 0])  # Eq. (1) before the softmax: v_[IMG] . W_G, [B, E]
        if expert_index is not None:  # teacher forcing (Sec. 3.1): the body-part label x_b picks the expert
            return self.routed(x, expert_index), gate_logits
        s = gate_logits.float().softmax(-1).to(x.dtype)  # Eq. (1): the expert assignment scores s [B, E]
        return self.mixture(x, s), gate_logits

    # Eq. (2), Sec. 2.2: MoBE(V) = sum_e s_e B_e(V), every expert on every token of the image.
    def mixture(self, x, s):  # x [B, S, C], s [B, E]
        B, S, C = x.shape
        E, H = self.b1.shape
        h = F.gelu(x @ self.w1.view(C, E * H) + self.b1.view(E * H))  # [B, S, E*H]: every expert's hidden
        h = (h.view(B, S, E, H) * s[:, None, :, None]).view(B, S, E * H)  # block e scaled by s_e
        return h @ self.w2.view(E * H, C) + (s @ self.b2)[:, None, :]  # [B, S, C]

    def mixture_loop(self, x, s):  # Eq. (2) as written, expert after expert: what `mixture` computes
        return sum(s_e[:, None, None] * (F.gelu(x @ w1 + b1) @ w2 + b2)  # s_e B_e(V)
                   for s_e, w1, b1, w2, b2 in zip(s.unbind(1), self.w1.unbind(1), self.b1, self.w2, self.b2))

    def routed(self, x, idx):  # x [B, S, C], idx [B] -> B_{idx[b]}(x[b]) [B, S, C]
        order = torch.argsort(idx, stable=True)  # the images grouped by expert
        used, counts = torch.unique_consecutive(idx[order], return_counts=True)
        experts = zip(self.w1[:, used].unbind(1), self.b1[used], self.w2[used], self.b2[used])  # one gather
        y = torch.cat([F.gelu(g @ w1 + b1) @ w2 + b2 for g, (w1, b1, w2, b2) in
                       zip(x[order].split(counts.tolist()), experts)])  # [B, S, C], images in `order`
        return y[torch.argsort(order)]  # back in batch order


def parse_moe_layers(spec: str, depth: int) -> list[int]:
    """'11' or '8,9,10,11' or '-1' (from the end) or 'none' -> sorted layer indices, checked against depth."""
    if spec.strip().lower() in ("", "none"):
        return []
    try:
        given = [int(t) for t in spec.split(",")]
    except ValueError:
        given = [depth]  # not a number: the error below
    layers = sorted({i % depth for i in given if -depth <= i < depth})
    if len(layers) != len(given):
        raise common.UserError(f"--moe_layers={spec}: expected layer indices of a {depth}-layer ViT, e.g. "
                               f"{depth - 1} or -1 (the last), or none")
    return layers


class PedCLIP(nn.Module):
    """phi_v (ViT with MoBE) + phi_t (BERT); [IMG] and [CLS] projected to the shared space, L2-normalised."""

    def __init__(self, cfg: Config, text_encoder: nn.Module, tokenizer, body_parts: list[str]):
        super().__init__()
        self.cfg, self.tokenizer, self.body_parts = cfg, tokenizer, body_parts
        self.visual = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vit_depth, cfg.vit_heads,
                                        cfg.vit_width, cfg.vit_mlp_dim)
        self.visual.heads = nn.Identity()  # no classifier: [IMG] is projected
        if cfg.stem == "conv":  # demo: strided convs make the tokens (common.ConvStem says why)
            self.visual.conv_proj = common.ConvStem(cfg.vit_width, cfg.patch_size)
        self.moe_layers = parse_moe_layers(cfg.moe_layers, cfg.vit_depth)
        self.mobe = [MoBE(cfg.vit_width, cfg.vit_mlp_dim, len(body_parts)) for _ in self.moe_layers]
        for i, m in zip(self.moe_layers, self.mobe):  # the gate reads [IMG] as the MLP would: after ln_2
            self.visual.encoder.layers[i].mlp = m
        self.text = text_encoder
        # The paper's sim is the cosine of v_[IMG] and t_[CLS] themselves (Sec. 2.3); ours (a departure) first
        # projects each linearly into a shared space, as CLIP does: the two encoders' widths need not agree.
        self.image_proj = nn.Linear(cfg.vit_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, cfg.embed_dim, bias=False)
        # 1/tau of Eq. (3)-(4), learnable as in CLIP (the paper gives no value): tau starts at 0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode(self, images, expert_index=None):
        """phi_v: images [B, 3, H, W] -> tokens V [B, 1+N, C] ([IMG] first) after the last LayerNorm, and the
        gate logits [B, E] of each MoBE layer. torchvision's encoder, layer by layer: a MoBE layer is written
        out (pre-LN attention, then MoBE in the MLP's place) because MoBE takes x_b and returns the gate."""
        vit = self.visual
        x = vit.conv_proj(images).flatten(2).transpose(1, 2)  # [B, N, C] patch tokens
        x = torch.cat([vit.class_token.expand(len(x), -1, -1), x], 1) + vit.encoder.pos_embedding
        gate_logits = []
        for layer in vit.encoder.layers:  # torchvision's EncoderBlock (its dropouts are 0)
            if not isinstance(layer.mlp, MoBE):
                x = layer(x)
                continue
            h = layer.ln_1(x)
            x = x + layer.self_attention(h, h, h, need_weights=False)[0]
            y, g = layer.mlp(layer.ln_2(x), expert_index)  # Eq. (1)-(2): the gate reads [IMG] after ln_2
            x, gate_logits = x + y, gate_logits + [g]
        return vit.encoder.ln(x), gate_logits

    def forward(self, images, input_ids, attention_mask, expert_index=None):
        """-> image [B, D], text [B, D] (their dot product is sim of Eq. 3-4), gate logits per MoBE layer."""
        tokens, gate_logits = self.encode(images, expert_index)
        img = F.normalize(self.image_proj(tokens[:, 0]), dim=-1)
        return img, self.encode_tokens(input_ids, attention_mask), gate_logits

    def encode_image(self, images):  # [B, 3, H, W] -> [B, D], the [IMG] token, soft gating (test time)
        return F.normalize(self.image_proj(self.encode(images)[0][:, 0]), dim=-1)

    def encode_tokens(self, input_ids, attention_mask):  # -> [B, D], the [CLS] token
        h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def encode_text(self, texts: list[str]):  # -> [B, D]
        return self.encode_tokens(**{k: v.to(self.logit_scale.device)
                                     for k, v in self.tokenize(texts).items()})

    def tokenize(self, texts) -> dict:
        return tokenize(texts, self.tokenizer, self.cfg.max_tokens)

    def image_tokens(self, images):  # [B, N, C] patch tokens after the last LayerNorm (segmentation heads)
        return self.encode(images)[0][:, 1:]

    def image_transform(self, train: bool):  # the same for training and evaluation
        return functools.partial(image_tensor, size=self.cfg.image_size)

    @staticmethod
    def zeroshot_prompts(label: str):
        """(positive prompts, negative prompts) for zero-shot classification. "No Finding" is itself a
        negation (the generic template gives "no no finding", CheXzero's bug): it is scored by normal-study
        phrases alone, with no negative, as CXR-CLIP's official prompts do. Reports seldom say "abnormal
        study", and a text encoder learns such a phrase only from them: one trained on reports from scratch
        put "Abnormal study." beside "Normal study." (cosine 0.98), so the difference cancelled the signal."""
        x = common.label_text(label)
        if x in ("no finding", "normal"):
            return ["No acute abnormality.", "No acute findings.", "Normal study."], []
        return [f"There is {x}.", f"{x.capitalize()} is present.", f"{x.capitalize()}."], \
            [f"There is no {x}.", f"No {x}.", f"No evidence of {x}."]


# ----------------------------------------------------------------------------------------------------
# ---- losses (Sec. 2.3) ----


# Eq. (3) and (4): InfoNCE over the global batch, image -> text and text -> image.
def infonce_losses(img, txt, scale):
    """img, txt [b, D] L2-normalised on this rank, scale = 1/tau -> (l_v2t, l_t2v): means over the b local
    pairs. Each local image is scored against all M = world * b texts (gathered with gradient) and vice versa;
    local row i's positive is global column rank * b + i. DDP's gradient averaging gives the global mean."""
    all_img, all_txt = common.all_gather_with_grad(img), common.all_gather_with_grad(txt)  # [M, D]
    target = torch.arange(len(img), device=img.device) + len(img) * common.rank()  # row i's global index
    l_v2t = F.cross_entropy(scale * img @ all_txt.t(), target)  # Eq. (3): sim(x_v^i, x_t^j) / tau
    l_t2v = F.cross_entropy(scale * txt @ all_img.t(), target)  # Eq. (4): sim(x_t^i, x_v^j) / tau
    return l_v2t, l_t2v


# Sec. 2.3, expert assignment: l_G = CE(s, x_b). The paper has one MoBE block; with several (an option) l_G is
# their mean, so that lambda keeps the paper's weight. The paper says l_G learns W_G; v_[IMG] is not detached,
# so here l_G trains the ViT layers below the gate as well (our reading).
def gate_loss(gate_logits: list, body_part):
    """gate_logits: one [b, E] per MoBE layer; body_part [b], the expert index x_b -> scalar."""
    if not gate_logits:
        return torch.zeros((), device=body_part.device)
    return sum(F.cross_entropy(g.float(), body_part) for g in gate_logits) / len(gate_logits)


# Sec. 2.3: l = 1/2 (l_v2t + l_t2v) + lambda l_G.
def total_loss(l_v2t, l_t2v, l_g, lam: float):
    return 0.5 * (l_v2t + l_t2v) + lam * l_g


# Sec. 3.1: "In the first 10 epochs, we use a fixed lambda = 1 and teacher forcing ... After this period, the
# model begins using the Gating network's output ..., with lambda linearly annealed during the remaining 40."
def teacher_forcing(epoch: int, cfg: Config) -> bool:
    return epoch < cfg.teacher_epochs


def lambda_at(epoch: int, cfg: Config) -> float:
    """lambda of epoch `epoch` (0-based): 1 while teacher-forced, then linear to 0 at the last epoch. The
    paper does not say the end value or whether lambda moves per step: ours is 0, constant within an epoch."""
    n = cfg.epochs - cfg.teacher_epochs  # annealed epochs: linspace(1, 0, n)
    if epoch < cfg.teacher_epochs or n <= 1:
        return 1.0 if epoch < cfg.teacher_epochs else 0.0
    return 1.0 - min(epoch - cfg.teacher_epochs, n - 1) / (n - 1)


# ----------------------------------------------------------------------------------------------------
# ---- data (Sec. 2.1: (XR, text, anatomy) triplets; one CSV row = one image, its excerpt, its body part) ----

# Sec. 3.1: "The MoBE block consists of 23 experts each for one of the 23 anatomical regions". The paper does
# not name them; these are the regions a paediatric radiology department images (our list).
BODY_PARTS = ["skull", "face", "neck", "cervical_spine", "thoracic_spine", "lumbar_spine", "whole_spine",
              "chest", "abdomen", "pelvis", "hip", "femur", "knee", "lower_leg", "ankle", "foot", "shoulder",
              "clavicle", "humerus", "elbow", "forearm", "wrist", "hand"]
# The words naming each region in a report or a CSV `body_part` (lower case; a word names one region only, and
# a longer phrase beats a word inside it: "femoral neck" is the hip's, "radial head" the elbow's). They map a
# `body_part` spelt otherwise onto its expert; text_prep.py's excerpt step reads reports with them.
BODY_PART_WORDS = {p: ws.split(", ") for p, ws in dict(
    skull="skull, head, cranium, cranial, calvarium, calvaria, calvarial, fontanelle",
    face="face, facial, facial bones, sinus, paranasal, mandible, mandibular, maxilla, maxillary, orbit, "
         "orbital, nasal bone, zygoma, zygomatic, temporomandibular",
    neck="neck, soft tissue neck, airway, adenoid, adenoidal, nasopharynx, nasopharyngeal, retropharyngeal, "
         "epiglottis, larynx, laryngeal",
    cervical_spine="cervical spine, c-spine, c spine, cspine, cervical vertebra, cervical vertebrae, "
                   "odontoid, atlantoaxial, prevertebral",
    thoracic_spine="thoracic spine, t-spine, t spine, tspine, thoracic vertebra, thoracic vertebrae",
    lumbar_spine="lumbar spine, l-spine, l spine, lspine, lumbar, lumbosacral, lumbar vertebra, "
                 "lumbar vertebrae",
    whole_spine="whole spine, spine, spinal, entire spine, scoliosis, kyphosis, vertebra, vertebrae, "
                "vertebral",
    chest="chest, thorax, cxr, lung, pulmonary, heart, cardiac, cardiomediastinal, cardiothymic, thymus, "
          "thymic, pleura, pleural, rib, diaphragm, hemidiaphragm, hilar, hila, mediastinum, mediastinal, "
          "airspace, costophrenic, pneumothorax, pneumonia, sternum, sternal, trachea, tracheal",
    abdomen="abdomen, abdominal, abdo, kub, bowel, stomach, gastric, liver, colon, kidney, renal, bladder",
    pelvis="pelvis, pelvic, sacroiliac, sacrum, sacral, iliac, ilium, iliac spine, ischium, ischial, pubic, "
           "pubis, symphysis, coccyx",
    hip="hip, femoral head, femoral neck, acetabulum, acetabular, trochanter, trochanteric, "
        "intertrochanteric, capital femoral epiphysis",
    femur="femur, femoral, femoral shaft, thigh",
    knee="knee, patella, patellar, tibial plateau, femoral condyle, tibial spine, tibial tubercle, "
         "tibial tuberosity, suprapatellar, intercondylar, distal femur, proximal tibia, proximal fibula",
    lower_leg="lower leg, leg, tibia, tibial, fibula, fibular, tib/fib, tib-fib, tib fib",
    ankle="ankle, malleolus, malleoli, malleolar, talus, talar, talar neck, mortise, tibiotalar, "
          "syndesmosis, distal tibia, distal tibial, distal fibula, distal fibular",
    foot="foot, feet, metatarsal, metatarsus, metatarsal head, calcaneus, calcaneal, toe, hallux, tarsal, "
         "navicular, cuboid, cuneiform",
    shoulder="shoulder, glenohumeral, glenoid, acromion, acromial, acromioclavicular, scapula, scapular, "
             "scapular spine, humeral head, humeral neck, surgical neck, proximal humerus, proximal humeral",
    clavicle="clavicle, clavicular, collarbone",
    humerus="humerus, humeral, humeral shaft, upper arm",
    elbow="elbow, olecranon, radial head, radial neck, capitellum, capitellar, trochlea, epicondyle, "
          "epicondylar, supracondylar, fat pad, radiocapitellar, humeral condyle, coronoid, distal humerus, "
          "distal humeral, proximal radius, proximal ulna",
    forearm="forearm, radius, ulna, radial, ulnar, arm",
    wrist="wrist, carpal, carpus, scaphoid, lunate, triquetrum, hamate, capitate, trapezium, radiocarpal, "
          "distal radius, distal radial, distal ulna, distal ulnar, distal radioulnar",
    hand="hand, metacarpal, metacarpal head, phalanx, phalanges, phalangeal, finger, thumb, digit, "
         "interphalangeal, metacarpophalangeal, bone age").items()}
# A CSV `body_part` (lower case, spaces and hyphens as "_"), singular or plural -> the region's expert.
BODY_PART_SYNONYMS = {k + s: p for p, ws in BODY_PART_WORDS.items() for k in (
    w.replace(" ", "_").replace("-", "_") for w in ws) for s in ("", "es" if k.endswith(("s", "x")) else "s")}
PHANTOM_BODY_PARTS = ["chest", "wrist", "hand", "knee", "elbow", "hip"]


def body_part_list(cfg: Config) -> list[str]:
    """The experts' names in expert-index order."""
    if cfg.body_parts in ("pexr23", "phantom"):
        return list(BODY_PARTS if cfg.body_parts == "pexr23" else PHANTOM_BODY_PARTS)
    return [p.strip().lower().replace(" ", "_").replace("-", "_") for p in cfg.body_parts.split(",")]


def body_part_labels(table: common.XrayCSV, parts: list[str]) -> np.ndarray:
    """CSV body_part -> expert index x_b per row; unknown values: one UserError naming each and its rows."""
    names = [(r.get("body_part") or "").strip().lower().replace(" ", "_").replace("-", "_")
             for r in table.rows]
    names = [v if v in parts else BODY_PART_SYNONYMS.get(v, v) for v in names]
    unknown = {}  # the CSV's value -> its rows
    for r, v in zip(table.rows, names):
        if v not in parts:
            unknown.setdefault(r.get("body_part"), []).append(r["_row"])
    if unknown:
        where = "; ".join(f"{v!r} in row(s) {', '.join(map(str, rows[:5]))}" + (
            f" and {len(rows) - 5} more" if len(rows) > 5 else "") for v, rows in unknown.items())
        raise common.UserError(f"{table.path}: body part {where}: none of the experts {parts} (other "
                               f"spellings mapped onto them: {sorted(BODY_PART_SYNONYMS)}); "
                               f"--body_parts=a,b,c chooses the experts")
    return np.array([parts.index(v) for v in names], dtype=np.int64)


def excerpt_sources(cfg: Config, table: common.XrayCSV):
    """Prints where the training excerpts came from (text_prep.py's excerpt_source: llm, Sec. 2.1's language
    model / rules, its fallback / empty), and a note when the paper preset trains on rule-made ones."""
    if "excerpt_source" not in table.columns:
        return
    n = collections.Counter((r["excerpt_source"] or "").strip() or "empty" for r in table.rows)
    common.print0("excerpt_source of the training rows: "
                  + ", ".join(f"{k} {c}" for k, c in sorted(n.items())))
    if cfg.preset == "paper" and n["rules"]:
        common.print0(f"note: {n['rules']} of {len(table)} training excerpts are rule-made, not the language "
                      f"model's of Sec. 2.1")


class TripletDataset(torch.utils.data.Dataset):
    """Item (row, sample seed) -> image x_v, text x_t, body-part index x_b. An unreadable image is replaced by
    the next readable row, reported in "bad" (counted): each rank keeps its batch size (gathered InfoNCE)."""

    def __init__(self, table: common.XrayCSV, parts: list[str], cfg: Config):
        self.t, self.cfg, self.body_part = table, cfg, body_part_labels(table, parts)

    def __len__(self):
        return len(self.t)

    def text(self, i: int, rng: np.random.Generator | None = None) -> str:
        """x_t of row i: its --text_column; with --text_sample=section and an rng, one non-empty report
        section (findings or impression) drawn per step."""
        sections = self.t.texts(i) if rng is not None and self.cfg.text_sample == "section" else []
        if sections:
            return sections[rng.integers(len(sections))]
        return self.t.rows[i][self.cfg.text_column].strip()

    def __getitem__(self, key):
        idx, seed = key
        bad = []
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
        return image_tensor(img, size=self.cfg.image_size), self.text(i, np.random.default_rng(seed)), \
            int(self.body_part[i]), bad


def image_tensor(img: np.ndarray, rng=None, *, size: int) -> torch.Tensor:
    """uint8 [H, W] -> [3, S, S], ImageNet-normalised. The paper names no image augmentation: none is done. It
    gives only the size, 224 x 224: every film is squashed to it (a long spine or leg film narrows; the aspect
    ratio is not kept, our choice)."""
    return common.to_tensor(common.resize(img, size))


def tokenize(texts, tokenizer, max_tokens: int) -> dict:  # -> input_ids, attention_mask [B, S], right-padded
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt", return_token_type_ids=False))


def collate(items, tokenizer, max_tokens: int) -> dict:  # in the DataLoader worker, which gets no model
    images, texts, parts, bad = zip(*items)
    return {"image": torch.stack(images), "text": tokenize(texts, tokenizer, max_tokens),
            "body_part": torch.tensor(parts), "bad": [b for bs in bad for b in bs]}


# ----------------------------------------------------------------------------------------------------
# ---- build / load ----


def build_text_encoder(cfg: Config, vocab_size: int, bert_config: dict | None = None):
    """phi_t: BioClinicalBERT (paper), a 2-layer BERT from scratch (demo), or a checkpoint's BERT."""
    from transformers import AutoModel, BertConfig, BertModel

    if bert_config is None and cfg.pretrained and cfg.text_encoder != "tiny":
        return common.load_pretrained(cfg.text_encoder, lambda: AutoModel.from_pretrained(
            cfg.text_encoder, add_pooling_layer=False, attn_implementation="sdpa"))
    if bert_config is not None:
        bc = BertConfig.from_dict(bert_config)
    elif cfg.text_encoder == "tiny":
        bc = BertConfig(vocab_size=vocab_size, hidden_size=cfg.vit_width, num_hidden_layers=2,
                        num_attention_heads=max(1, cfg.vit_width // 32), intermediate_size=4 * cfg.vit_width,
                        max_position_embeddings=max(128, cfg.max_tokens), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    else:  # --pretrained=false with a named BERT: BERT-base's architecture, random weights, our vocabulary
        bc = BertConfig(vocab_size=vocab_size)
    bc._attn_implementation = "sdpa"
    return BertModel(bc, add_pooling_layer=False)  # no pooler: [CLS] is projected directly


def build_tokenizer(cfg: Config, table: common.XrayCSV):
    """BioClinicalBERT's tokenizer (paper), or WordPiece fitted on the training texts and prompts (demo)."""
    if cfg.pretrained and cfg.text_encoder != "tiny":
        from transformers import AutoTokenizer

        return common.load_pretrained(cfg.text_encoder, lambda: AutoTokenizer.from_pretrained(
            cfg.text_encoder))
    texts = [r[cfg.text_column] for r in table.rows]
    prompts = [p for n in table.label_names for ps in PedCLIP.zeroshot_prompts(n) for p in ps]
    return common.train_wordpiece(texts + prompts, cfg.vocab_size)


def build(cfg: Config, tokenizer, bert_config: dict | None = None) -> PedCLIP:
    """Config -> PedCLIP; --pretrained: torchvision's ImageNet ViT-B/16 and BioClinicalBERT (Sec. 3.1)."""
    model = PedCLIP(cfg, build_text_encoder(cfg, len(tokenizer), bert_config), tokenizer, body_part_list(cfg))
    if cfg.pretrained and bert_config is None:
        if (cfg.patch_size, cfg.stem, cfg.vit_width, cfg.vit_depth, cfg.vit_heads, cfg.vit_mlp_dim) != \
                (16, "patch", 768, 12, 12, 3072):
            raise common.UserError("--pretrained loads ViT-B/16: it needs --patch_size=16 --stem=patch "
                                   "--vit_width=768 --vit_depth=12 --vit_heads=12 --vit_mlp_dim=3072")
        import torchvision

        # "ViT-B/16 pretrained on ImageNet" (Sec. 3.1) does not say which weights: torchvision's IMAGENET1K_V1
        tv = common.load_pretrained("torchvision's ViT-B/16 ImageNet weights",
                                    lambda: torchvision.models.vit_b_16(weights="IMAGENET1K_V1"))
        model.visual.load_state_dict(vit_state_from_torchvision(tv.state_dict(), model))
    return model


def vit_state_from_torchvision(tv_state: dict, model: PedCLIP) -> dict:
    """torchvision's ImageNet ViT state dict -> model.visual's: no classifier, position embeddings resized to
    --image_size (torchvision's interpolate_embeddings), each MoBE layer's pretrained MLP copied into all its
    experts (the paper does not say how they start; ours keeps ImageNet features), the gate's random init."""
    out = interpolate_embeddings(model.cfg.image_size, model.cfg.patch_size, tv_state, reset_heads=True)
    for i, m in zip(model.moe_layers, model.mobe):
        p, E = f"encoder.layers.encoder_layer_{i}.mlp.", m.b1.shape[0]
        w0, b0, w3, b3 = (out.pop(p + n) for n in ("0.weight", "0.bias", "3.weight", "3.bias"))
        out.update({p + "w1": w0.t().unsqueeze(1).repeat(1, E, 1), p + "b1": b0.repeat(E, 1),
                    p + "w2": w3.t().repeat(E, 1, 1), p + "b2": b3.repeat(E, 1),
                    p + "gate.weight": m.gate.weight})
    return {k: v for k, v in out.items() if not k.startswith("heads.")}


def load(path, map_location="cpu") -> tuple[PedCLIP, Config]:
    """A model from its checkpoint alone (ckpt.pt: config, BERT config, vocabulary)."""
    ck = common.load_checkpoint(path, map_location)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in Config.__dataclass_fields__})
    model = build(cfg, common.tokenizer_from_vocab(ck["vocab"], ck["lowercase"]), ck["bert_config"])
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


def param_groups(model: nn.Module, wd: float):
    """Weight decay on weight matrices only: not on biases (the experts' b1, b2 are 2-D, stacked biases),
    norms, the temperature, [IMG] or the position embeddings."""
    def decays(n, p):
        return p.ndim >= 2 and not n.endswith(("class_token", "pos_embedding", "mlp.b1", "mlp.b2"))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if decays(n, p)], "weight_decay": wd},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]


def warmup_cosine(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (the paper gives only the lr)."""
    return lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def check(cfg: Config):
    """Flag values that cannot work, before anything runs."""
    if cfg.text_sample not in ("full", "section") or not 0 <= cfg.teacher_epochs <= cfg.epochs:
        raise common.UserError("--text_sample is full | section, and 0 <= --teacher_epochs <= --epochs")
    parse_moe_layers(cfg.moe_layers, cfg.vit_depth)
    if not cfg.data:
        raise common.UserError("--preset=paper needs --data=<csv> (data_prep.py writes it)")


def train(cfg: Config) -> dict:
    check(cfg)
    rank, world, device, ctx, scaler = setup(cfg)
    ck = common.start_run(cfg)  # the checkpoint to continue (--resume), else None
    if cfg.data == Config.data:
        phantoms.ensure_phantoms(cfg.data, PHANTOMS)
    counter = common.BadSampleCounter(cfg.max_bad_frac)
    try:  # Sec. 2.1: x_t is the excerpt of the image's body part, which data_prep writes to `excerpt`
        tr = common.XrayCSV(cfg.data, "train", ("image", "body_part", cfg.text_column), (cfg.text_column,),
                            counter)
    except common.UserError as e:
        if f"no column {cfg.text_column!r}" in str(e) and cfg.text_column == "excerpt":
            e = common.UserError(f"{e}. The paper pairs each image with the report excerpt of its body "
                                 f"part (Sec. 2.1): `python text_prep.py extract_bodyparts --csv={cfg.data}` "
                                 f"writes it; --text_column=report trains on whole reports instead")
        raise e from None
    if cfg.preset == "paper" and cfg.text_column != "excerpt":
        common.print0(f"note: x_t is the column {cfg.text_column!r}, not the paper's body-part excerpt")
    te = common.XrayCSV(cfg.data, "test", ("image", "body_part"), counter=counter)
    parts = body_part_list(cfg)
    train_ds = TripletDataset(tr, parts, cfg)
    body_part_labels(te, parts)  # the test split's body parts are checked now, not after the last epoch
    excerpt_sources(cfg, tr)

    # -- model: the checkpoint's tokenizer, or one fitted on the training texts (the same on every rank)
    tok = common.tokenizer_from_vocab(ck["vocab"], ck["lowercase"]) if ck else build_tokenizer(cfg, tr)
    model = raw_model = build(cfg, tok, ck["bert_config"] if ck else None).to(device)
    torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own numbers
    local_batch = cfg.batch_size // world
    sampler = common.EpochSampler(len(train_ds), local_batch, rank, world, cfg.seed)
    loader = torch.utils.data.DataLoader(train_ds, local_batch, sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=functools.partial(collate, tokenizer=tok,
                                                                      max_tokens=cfg.max_tokens),
                                         pin_memory=device != "cpu", persistent_workers=cfg.num_workers > 0)
    total_steps = cfg.epochs * sampler.batches_per_epoch
    opt = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, fused=device != "cpu")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, max(1, round(
        cfg.warmup_epochs * sampler.batches_per_epoch))))
    counts = np.bincount(train_ds.body_part, minlength=len(parts))
    common.print0(f"pedclip: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M parameters, MoBE "
                  f"in layers {raw_model.moe_layers}; {len(tr)} training images, "
                  f"{sampler.batches_per_epoch} steps/epoch x {cfg.epochs} epochs ({cfg.teacher_epochs} "
                  f"teacher-forced), {world} process(es) on {device}; experts (images): "
                  + ", ".join(f"{p} ({c})" for p, c in zip(parts, counts)))
    meta = {"vocab": common.tokenizer_vocab(tok), "lowercase": getattr(tok, "do_lower_case", True),
            "bert_config": raw_model.text.config.to_dict(), "body_parts": parts}  # what load() needs
    loop = common.Loop(cfg, name="pedclip", model=raw_model, opt=opt, sched=sched, scaler=scaler,
                       sampler=sampler, counter=counter, ck=ck, extra=lambda: meta)
    model = torch.compile(model) if cfg.compile else model
    model = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    for epoch in loop.epochs():
        model.train()
        tf, lam = teacher_forcing(epoch, cfg), lambda_at(epoch, cfg)
        for batch in loop.batches(loader):
            x, xb = batch["image"].to(device), batch["body_part"].to(device)
            ids, am = batch["text"]["input_ids"].to(device), batch["text"]["attention_mask"].to(device)
            with ctx:
                v, t, gate_logits = model(x, ids, am, expert_index=xb if tf else None)
            l_v2t, l_t2v = infonce_losses(v.float(), t.float(), raw_model.logit_scale.exp())  # Eq. (3), (4)
            l_g = gate_loss(gate_logits, xb)
            loss = total_loss(l_v2t, l_t2v, l_g, lam)  # Sec. 2.3
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
            loop.step_done(loss=loss, v2t=l_v2t, t2v=l_t2v, gate=l_g, lam=lam, teacher_forcing=tf,
                           lr=opt.param_groups[0]["lr"])
        loop.end_epoch()
    metrics = evaluate(raw_model, te, device) if rank == 0 and not loop.stopped else {}
    result = loop.close(metrics)
    if world > 1:
        dist.destroy_process_group()
    return result


@torch.no_grad()
def evaluate(model: PedCLIP, table: common.XrayCSV, device) -> dict:
    """Zero-shot AUC on the test split (common.zeroshot_eval, soft gating) and, per MoBE layer, the gate's
    body-part accuracy: how often argmax_e s_e is x_b."""
    out, hits = common.zeroshot_eval(model, table, device), []
    ds = TripletDataset(table, model.body_parts, model.cfg)  # the images and their x_b
    for start in range(0, len(ds) if model.mobe else 0, 256):
        images, _, parts, _ = zip(*(ds[(i, 0)] for i in range(start, min(start + 256, len(ds)))))
        gates = model.encode(torch.stack(images).to(device))[1]
        hits.append(torch.stack([g.argmax(-1).cpu() == torch.tensor(parts) for g in gates]))
    if hits:
        acc = torch.cat(hits, 1).float().mean(1).tolist()
        out.update(gate_accuracy=float(np.mean(acc)), gate_accuracy_by_layer=dict(zip(model.moe_layers, acc)))
    return out


def main(argv=None):
    return train(common.parse_config(Config, PRESETS, argv))


if __name__ == "__main__":
    common.cli(main)
