"""CXR-CLIP: Toward Large Scale Chest X-ray Language-Image Pre-training. MICCAI 2023.
K. You, J. Gu, J. Ham, B. Park, J. Kim, E. K. Hong, W. Baek, B. Roh. doi:10.1007/978-3-031-43895-0_10

Map of the method (Sec. 3, 4.2; departures from the paper are stated at their lines and in README.md):
    a study s = {X, T} gives two images x^1, x^2 (two views, else x^2 = A_i(x^1)) and two texts
        t^1, t^2 (findings and impression, else t^2 = A_t(t^1): back-translation, sentence shuffle)  Sec. 3.1
    image-label studies: T = Concat({p ~ P(y)}_{y in Y}), a prompt sentence per labelled class  Sec. 3.1, 4.1
    v = f^i(E^i(x)) / ||.||, E^i ResNet-50 | Swin-T, average pooled: images V^1, V^2
    u = f^t(E^t(t)) / ||.||, E^t BioClinicalBERT at its [EOS] token: texts U^1, U^2             Sec. 3.2
    L_CLIP(U, V): symmetric InfoNCE with a learnable temperature tau                            Eq. (1)
    L_MVS = 1/4 (L_CLIP(V1, U1) + L_CLIP(V2, U1) + L_CLIP(V1, U2) + L_CLIP(V2, U2))             Eq. (2)
    L = L_MVS + lambda_I L_ICL + lambda_T L_TCL, ICL = L_CLIP(V1, V2), TCL = L_CLIP(U1, U2)     Sec. 3.3
    AdamW, cosine schedule after 1 warm-up epoch; the epoch of the lowest validation loss kept  Sec. 4.2
Equation -> function -> test: Eq. (1) clip_loss (tests/test_cxrclip.py::test_clip_loss_eq1), Eq. (2) mvs_loss,
icl_loss, tcl_loss, L cxrclip_loss (::test_mvs_icl_*), T label_prompt_text, A_t sentence_shuffle (::test_*).

Run:
    python cxrclip.py                                       # demo: phantoms, tiny CNN + BERT, 2 CPU cores
    python cxrclip.py --preset=paper --data=data/mimic_cxr.csv  # ImageNet ResNet-50 + BioClinicalBERT, 224 px
    torchrun --nproc_per_node=4 cxrclip.py --preset=paper --data=data/mimic_cxr.csv    # 4 GPUs x 32 studies
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        cxrclip.py --preset=paper --data=data/mimic_cxr.csv
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import phantoms

# ----------------------------------------------------------------------------------------------------
# ---- config ----


@dataclass
class Config:
    # data (Sec. 3.1, 4.1)
    data: str = "data/phantoms/phantoms.csv"  # CSV in the project's schema (the demo draws phantoms here)
    image_size: int = 64  # input resolution (224, Sec. 4.2)
    label_prompt_frac: float = 0.0  # share of training studies used as image-label data (reports withheld)
    prompt_file: str = ""  # prompts P(y), JSON {class: {"pos": [...], "neg": [...], "unc": [...]}} (official)
    # encoders E^i, E^t and projections f^i, f^t (Sec. 3.2)
    image_encoder: str = "tiny"  # tiny (a small CNN) | resnet50 | swin_t (torchvision)
    text_encoder: str = "tiny"  # tiny (2-layer BERT from scratch) | a BERT name or folder (BioClinicalBERT)
    pretrained: bool = False  # ImageNet V1 (torchvision) and BioClinicalBERT weights (the paper)
    embed_dim: int = 128  # shared embedding size (512, Sec. 4.2)
    max_tokens: int = 128  # texts truncated to this many tokens (256 in the official code)
    tiny_width: int = 64  # tiny encoders: CNN channels / BERT hidden size
    vocab_size: int = 2000  # WordPiece vocabulary fitted on the training texts (tiny / unpretrained BERT)
    # loss (Sec. 3.3, 4.2)
    lambda_icl: float = 1.0  # lambda_I, the weight of ICL
    lambda_tcl: float = 0.5  # lambda_T, the weight of TCL
    # optimisation (Sec. 4.2)
    epochs: int = 15  # training epochs
    batch_size: int = 128  # GLOBAL batch of studies (2 image-text pairs each)
    lr: float = 5e-5  # AdamW peak learning rate
    weight_decay: float = 1e-4  # AdamW weight decay on weight matrices
    warmup_epochs: float = 1.0  # linear warm-up, then cosine annealing to 0
    grad_clip: float = 0.0  # max gradient norm, 0: off (neither the paper nor the official code clips)
    patience: int = 0  # stop after this many epochs without a lower validation loss, 0: off (all epochs run)
    # run
    seed: int = 0  # weights, data order and augmentations
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off
    compile: bool = False  # torch.compile the model
    num_workers: int = 2  # DataLoader workers per process
    threads: int = 0  # CPU: torch threads per process (0: the cores shared among the processes)
    out_dir: str = "out/cxrclip"  # ckpt.pt, ckpt_best.pt, log.jsonl, metrics.json
    resume: bool = False  # continue out_dir/ckpt.pt exactly where it stopped
    overwrite: bool = False  # replace an existing run in out_dir
    max_steps: int = -1  # stop (with a checkpoint) after this many steps; the schedule still spans --epochs
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and at every epoch end)
    max_bad_frac: float = 0.01  # fail when more than this share of samples is unreadable or empty
    preset: str = "demo"  # set by --preset


PRESETS = {  # Demo: phantoms at 64 px, a tiny CNN, a 2-layer BERT from scratch (hence lr 2e-3 and clipping);
    # half of the studies play the image-label data (reports withheld), as CheXpert beside MIMIC-CXR does.
    "demo": dict(batch_size=32, epochs=40, lr=2e-3, grad_clip=1.0, label_prompt_frac=0.5, threads=1),
    # Paper (Sec. 4.2): 128 studies (256 image-text pairs) per global batch, 4 GPUs x 32. "Early stopped by
    # validation loss" as the official trainer does: all 15 epochs, and the best one (ckpt_best.pt) is kept.
    "paper": dict(data="", image_size=224, image_encoder="resnet50", pretrained=True, embed_dim=512,
                  text_encoder="emilyalsentzer/Bio_ClinicalBERT", max_tokens=256, num_workers=8)}
PHANTOMS = 3000  # images in the demo's phantom data set

# ----------------------------------------------------------------------------------------------------
# ---- model (Sec. 3.2) ----


class ImageEncoder(nn.Module):
    """E^i: torchvision's ResNet-50 or Swin-T, or the demo's CNN, as tokens [B, N, C], averaged to [B, C]."""

    def __init__(self, cfg: Config, pretrained: bool):
        super().__init__()
        self.kind, w = cfg.image_encoder, cfg.tiny_width
        if self.kind == "tiny":  # three 3x3 stride-2 convs (64 px -> 8 x 8) and a 1x1 one; GroupNorm, so that
            ch, layers = [3, w // 4 + 8, w // 2 + 16, w + 32, 2 * w], []  # no sample depends on its batch
            for i, (k, stride) in enumerate([(3, 2), (3, 2), (3, 2), (1, 1)]):
                conv = nn.Conv2d(ch[i], ch[i + 1], k, stride, padding=k // 2, bias=False)
                layers += [conv, nn.GroupNorm(8, ch[i + 1]), nn.GELU()]
            self.net, self.out_dim = nn.Sequential(*layers), 2 * w
            return
        if self.kind not in ("resnet50", "swin_t"):
            raise common.UserError(f"--image_encoder={self.kind}: expected tiny | resnet50 | swin_t")
        import torchvision

        make = getattr(torchvision.models, self.kind)  # V1: the official code's resnet50(pretrained=True)
        net = common.load_pretrained(f"torchvision's {self.kind} IMAGENET1K_V1 weights",
                                     lambda: make(weights="IMAGENET1K_V1")) if pretrained else make()
        if self.kind == "resnet50":  # up to layer4; the pooling and the ImageNet classifier dropped
            self.net, self.out_dim = nn.Sequential(*list(net.children())[:-2]), net.fc.in_features
        else:  # Swin-T: torchvision's weights (the official code uses microsoft/swin-tiny-patch4-window7-224)
            self.net, self.out_dim = nn.Sequential(net.features, net.norm), net.head.in_features

    def tokens(self, x):  # [B, 3, H, W] -> [B, N, C] (also for segmentation heads)
        f = self.net(x)  # [B, C, h, w]; Swin: [B, h, w, C]
        return f.flatten(1, 2) if self.kind == "swin_t" else f.flatten(2).transpose(1, 2)

    def forward(self, x):  # [B, 3, H, W] -> [B, C]
        return self.tokens(x).mean(1)


class CXRCLIP(nn.Module):
    """E^i and E^t, the linear projections f^i and f^t to the shared space, and the learnable temperature."""

    def __init__(self, cfg: Config, image_encoder, text_encoder, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer, self.image_encoder, self.text_encoder = (cfg, tokenizer, image_encoder,
                                                                           text_encoder)
        self.image_proj = nn.Linear(image_encoder.out_dim, cfg.embed_dim)  # f^i, "a linear layer"
        self.text_proj = nn.Linear(text_encoder.config.hidden_size, cfg.embed_dim)  # f^t
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # log(1/tau), tau from 0.07 (CLIP)

    def encode_image(self, images):  # v = f^i(E^i(x)) / ||f^i(E^i(x))||: [B, 3, H, W] -> [B, D]
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_text(self, texts):  # u = f^t(E^t(t)) / ||f^t(E^t(t))||: list[str] or tokens -> [B, D]
        if isinstance(texts, (list, tuple)):
            texts = tokenize(texts, self.tokenizer, self.cfg.max_tokens, self.logit_scale.device)
        h = self.text_encoder(**texts).last_hidden_state  # [B, S, C]
        eos = texts["attention_mask"].sum(1) - 1  # [EOS] (BERT's [SEP]): the last real token, right padding
        return F.normalize(self.text_proj(h[torch.arange(h.shape[0], device=h.device), eos]), dim=-1)

    def forward(self, images, texts1, texts2):  # [x^1; x^2] [2b, 3, H, W], t^1, t^2 -> V^1, V^2, U^1, U^2
        return *self.encode_image(images).chunk(2), self.encode_text(texts1), self.encode_text(texts2)

    def image_tokens(self, images):
        return self.image_encoder.tokens(images)

    def image_transform(self, train: bool):
        return functools.partial(transform, size=self.cfg.image_size, train=train)  # picklable for workers

    @staticmethod
    def zeroshot_prompts(label: str) -> tuple[list[str], list[str]]:
        """(positive, negative): our first three; `evaluate.py --prompts` takes Sec. 4.3's (others')."""
        return class_prompts(label, "pos")[:3], class_prompts(label, "neg")[:3]


# ----------------------------------------------------------------------------------------------------
# ---- losses (Sec. 3.3) ----


# Eq. (1), Sec. 3.3. u, v: [b, D] L2-normalised, row i of u paired with row i of v; symmetric in u and v.
def clip_loss(u, v, scale):  # each rank scores its b rows against the n = world * b gathered ones
    u_all, v_all = common.all_gather_with_grad(u), common.all_gather_with_grad(v)  # [n, D], with gradient
    target = torch.arange(len(u), device=u.device) + len(u) * common.rank()  # row i's global index
    loss_u = F.cross_entropy(scale * u @ v_all.T, target)  # -log exp(u_i.v_i/tau) / sum_j exp(u_i.v_j/tau)
    loss_v = F.cross_entropy(scale * v @ u_all.T, target)  # -log exp(v_i.u_i/tau) / sum_j exp(v_i.u_j/tau)
    return 0.5 * (loss_u + loss_v)  # the mean over ranks is Eq. (1)


# Eq. (2), Sec. 3.3: the 4 pairings of a study's images V^1, V^2 and texts U^1, U^2 (the names of Sec. 3.2 and
# of ICL / TCL; Sec. 3.3's sentence before Eq. (2) swaps them: L_CLIP is symmetric, so the sum is the same).
def mvs_loss(v1, v2, u1, u2, scale):
    return 0.25 * (clip_loss(v1, u1, scale) + clip_loss(v2, u1, scale)
                   + clip_loss(v1, u2, scale) + clip_loss(v2, u2, scale))


icl_loss = tcl_loss = clip_loss  # Sec. 3.3: ICL = L_CLIP(V^1, V^2), TCL = L_CLIP(U^1, U^2)


# Sec. 3.3: L = L_MVS + lambda_I ICL + lambda_T TCL; ICL pulls a study's images together, TCL its texts.
def cxrclip_loss(v1, v2, u1, u2, scale, lambda_icl: float, lambda_tcl: float):
    mvs, icl, tcl = mvs_loss(v1, v2, u1, u2, scale), icl_loss(v1, v2, scale), tcl_loss(u1, u2, scale)
    return mvs + lambda_icl * icl + lambda_tcl * tcl, {"mvs": mvs, "icl": icl, "tcl": tcl}


# ----------------------------------------------------------------------------------------------------
# ---- data (Sec. 3.1, 4.2) ----


def transform(img: np.ndarray, rng: np.random.Generator | None = None, *, size: int, train: bool):
    """uint8 [H, W] -> float [3, S, S]: for training A_i as the official config, else Resize + CenterCrop."""
    side = 2 * size if train else size  # training crops from a smaller copy: the same crop, far less work
    if not train or min(img.shape) > side:  # the shorter side to `side`, as torchvision's Resize(int)
        s = side / min(img.shape)
        img = cv2.resize(img, (max(side, round(img.shape[1] * s)), max(side, round(img.shape[0] * s))),
                         interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    if not train:  # CenterCrop
        y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        return common.to_tensor(img[y:y + size, x:x + size])
    img = common.random_resized_crop(img, size, rng, scale=(0.8, 1.1))
    if rng.random() < 0.5:  # CLAHE (doi:10.1007/BF03178082), albumentations' CLAHE(clip_limit=4.0), 8x8 tiles
        img = cv2.createCLAHE(clipLimit=float(rng.uniform(1.0, 4.0)), tileGridSize=(8, 8)).apply(img)
    return common.to_tensor(common.color_jitter(img, rng, brightness=(0.9, 1.1), contrast=(0.8, 1.2)))


def sentence_shuffle(text: str, rng: np.random.Generator) -> str:
    """A_t (Sec. 4.2): whole sentences reordered (the official one is a no-op); back-references may dangle."""
    sents = common.split_sentences(text)
    order = rng.permutation(len(sents))  # a new order: the identity is rolled by one
    return " ".join(sents[i] for i in (np.roll(order, 1) if (order == np.arange(len(sents))).all()
                                       else order))


# P(y) (Sec. 3.1), our own templates: sentences per class value, {x} the class as words, {X} capitalised.
PROMPTS = {  # the paper's radiologists' prompts (the official repository's JSON) are read with --prompt_file
    "pos": ["There is {x}.", "{X} is present.", "{X}.", "{X} is seen.", "{X} is noted.",
            "Findings consistent with {x}.", "Findings compatible with {x}.", "Evidence of {x}."],
    "neg": ["There is no {x}.", "No {x}.", "No evidence of {x}.", "No definite {x}.", "{X} is not seen.",
            "Negative for {x}.", "No radiographic evidence of {x}.", "{X} is absent."],
    "unc": ["Possible {x}.", "{X} cannot be excluded.", "Questionable {x}.", "Findings may represent {x}.",
            "Cannot rule out {x}.", "Suspected {x}.", "{X} is not excluded."]}
NORMAL = {  # "No Finding" is itself a negation: the templates would say "no no finding" (CheXzero's bug).
    "pos": ["No acute abnormality.", "No acute findings.", "Normal study.", "No abnormal findings.",
            "The study is within normal limits.", "Nothing abnormal is seen."],
    "neg": ["Abnormal study.", "The study is abnormal.", "There are abnormal findings."],
    "unc": ["The study may be abnormal.", "Possibly abnormal study."]}
ALIASES = {"effusion": "pleural effusion"}  # ChestX-ray14's name, as the official code reads the prompt file
SAMPLED_NEGATIVES = {"nih": 3}  # data sets whose 0 means "not found": n negatives stated (Sec. 4.1, num_negs)


def read_prompts(path: str) -> dict:
    """Official train_prompts_all.json -> {class as words: {"pos" | "neg" | "unc": sentences}}, "" dropped."""
    try:
        with open(path, encoding="utf-8") as f:
            return {common.label_text(c): {v: [s for s in ps if s.strip()] for v, ps in d.items()}
                    for c, d in json.load(f).items()}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise common.UserError(f"prompt file {path}: {e}; expected {{class: {{'pos': [...]}}}}") from None


def class_prompts(label: str, value: str, bank: dict | None = None) -> list[str]:
    """P(y) of class `label`, value pos/neg/unc: the prompt file's if listed (none: not stated), else ours."""
    x, bank = common.label_text(label), bank or {}
    if value in (file := bank.get(x) or bank.get(ALIASES.get(x), {})):
        return file[value]
    return NORMAL[value] if x in ("no finding", "normal") else [t.format(x=x, X=x[:1].upper() + x[1:])
                                                               for t in PROMPTS[value]]


def label_prompt_text(names: list[str], labels, rng: np.random.Generator | None, n_neg=-1, bank=None) -> str:
    """T = Concat({p ~ P(y)}_{y in Y}) (Sec. 3.1): a sampled sentence per class labelled 1, 0 or -1, in random
    order; n_neg >= 0: only n_neg sampled classes labelled 0 (ChestX-ray14, 0 = "not found": 3, Sec. 4.1)."""
    pos, neg, unc = ([names[j] for j, y in enumerate(labels) if y == v] for v in (1, 0, -1))
    if rng is None:  # validation, as the official code: each positive's first sentence, "No Finding" if none
        pos, neg, unc = pos or ["No Finding"], [], []
    elif 0 <= n_neg < len(neg):
        neg = [neg[j] for j in rng.choice(len(neg), n_neg, replace=False)]
    said = [(n, v) for v, ns in (("pos", pos), ("neg", neg), ("unc", unc)) for n in ns]
    sents = [str(ps[0] if rng is None else rng.choice(ps))
             for n, v in said if (ps := class_prompts(n, v, bank))]
    return " ".join(sents if rng is None else [sents[i] for i in rng.permutation(len(sents))])


class StudyDataset(torch.utils.data.Dataset):
    """(study index, sample seed) -> {x1, x2, t1, t2, bad} (Sec. 3.1, Fig. 1); unreadable images replaced."""

    def __init__(self, table: common.XrayCSV, cfg: Config, train: bool, bank=None):
        self.t, self.cfg, self.train, self.bank, n = table, cfg, train, bank, len(table.studies)
        k = round(cfg.label_prompt_frac * n) if train else 0  # studies that play image-label data, drawn once
        self.label_studies = set(np.random.default_rng(cfg.seed).permutation(n)[:k].tolist())

    def texts(self, idx: int, row: int, rng) -> list[str]:  # t^1, t^2 of study idx (its first row, Sec. 3.1)
        r, sections = self.t.rows[row], self.t.texts(row)
        if (idx in self.label_studies or not sections) and not np.isnan(r["_labels"]).all():  # 1. image-label
            n_neg, g = SAMPLED_NEGATIVES.get(r.get("dataset", ""), -1), rng if self.train else None
            return [label_prompt_text(self.t.label_names, r["_labels"], g, n_neg, self.bank)
                    for _ in range(2)]  # 2 prompt texts drawn apart (validation: the official fixed text)
        if not self.train:  # validation, the same each epoch: findings and impression, or one section twice
            return (sections * 2)[:2]
        bt = {(r.get(c) or "").strip(): (r.get(c + "_bt") or "").strip()
              for c in ("findings", "impression", "report")}
        a_t = [bt.get(s) or sentence_shuffle(s, rng) for s in sections]  # A_t: text_prep.py's, else a shuffle
        # 2. both sections in random order (TCL pairs them, Sec. 3.3), each given A_t with p = 0.5 (official)
        if len(sections) == 2:
            return [a_t[i] if rng.random() < 0.5 else sections[i] for i in rng.permutation(2)]
        return [sections[0], a_t[0]]  # 3. one section: t^2 = A_t(t^1) (Sec. 3.1)

    def images(self, rows: list[int], rng, bad: list) -> list[np.ndarray]:  # of distinct views where possible
        by_view, imgs = {}, []
        for i in rng.permutation(rows):
            by_view.setdefault(self.t.rows[i].get("view", ""), []).append(int(i))
        for i in [v[0] for v in by_view.values()] + [i for v in by_view.values() for i in v[1:]]:
            try:
                imgs.append(common.load_image(self.t.rows[i]["_path"]))
            except common.BadImageError as e:
                bad.append(("unreadable image", str(e)))
            if len(imgs) == 2:
                break
        return imgs * 2 if len(imgs) == 1 else imgs  # x^2 = A_i(x^1): one image, augmented twice

    def __getitem__(self, key):
        idx, seed = key
        rng, bad = np.random.default_rng(seed), []
        for attempt in range(8):
            i = (idx + attempt * 7919) % len(self.t.studies)
            if imgs := self.images(self.t.studies[i], rng, bad):
                t1, t2 = self.texts(i, self.t.studies[i][0], rng)
                x1, x2 = (transform(im, rng, size=self.cfg.image_size, train=self.train) for im in imgs)
                return {"x1": x1, "x2": x2, "t1": t1, "t2": t2, "bad": bad}
        raise common.UserError(f"8 studies around study {idx} of {self.t.path} have no readable image: is "
                               f"the image folder next to the CSV? First error: {bad[0][1]}")


def tokenize(texts, tokenizer, max_tokens: int, device="cpu") -> dict:  # -> input_ids, attention_mask [B, S]
    return {k: v.to(device) for k, v in tokenizer(list(texts), padding=True, truncation=True,
                                                  max_length=max_tokens, return_tensors="pt",
                                                  return_token_type_ids=False).items()}


def collate(items, tokenizer, max_tokens: int):  # in the DataLoader worker (which gets no model)
    return {**{k: torch.stack([it[k] for it in items]) for k in ("x1", "x2")},
            **{k: tokenize([it[k] for it in items], tokenizer, max_tokens) for k in ("t1", "t2")},
            "bad": [b for it in items for b in it["bad"]]}


# ----------------------------------------------------------------------------------------------------
# ---- build / load ----


def build_text_encoder(cfg: Config, vocab_size: int, bert_config: dict | None = None):
    """E^t: BioClinicalBERT (paper), a 2-layer BERT from scratch (demo), or a checkpoint's BERT."""
    from transformers import AutoModel, BertConfig, BertModel

    if bert_config is None and cfg.pretrained and cfg.text_encoder != "tiny":
        return common.load_pretrained(cfg.text_encoder, lambda: AutoModel.from_pretrained(
            cfg.text_encoder, add_pooling_layer=False, attn_implementation="sdpa"))
    if bert_config is not None:
        bc = BertConfig.from_dict(bert_config)
    elif cfg.text_encoder == "tiny":
        w = cfg.tiny_width
        bc = BertConfig(vocab_size=vocab_size, hidden_size=w, num_hidden_layers=2, intermediate_size=4 * w,
                        num_attention_heads=max(1, w // 32), max_position_embeddings=cfg.max_tokens,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:  # --pretrained=false with a named BERT: BERT-base's architecture, random weights, our vocabulary
        bc = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, cfg.max_tokens))
    bc._attn_implementation = "sdpa"
    return BertModel(bc, add_pooling_layer=False)


def build_tokenizer(cfg: Config, table: common.XrayCSV, bank=None):
    """BioClinicalBERT's tokenizer (paper), or WordPiece fitted on the training texts and all prompts."""
    if cfg.pretrained and cfg.text_encoder != "tiny":
        from transformers import AutoTokenizer

        return common.load_pretrained(cfg.text_encoder,
                                      lambda: AutoTokenizer.from_pretrained(cfg.text_encoder))
    texts = [t for i in range(len(table)) for t in table.texts(i)]
    texts += [p for n in table.label_names for v in PROMPTS for p in class_prompts(n, v, bank)]
    return common.train_wordpiece(texts, cfg.vocab_size)


def build(cfg: Config, tokenizer, bert_config: dict | None = None) -> CXRCLIP:
    """Config -> CXRCLIP, from ImageNet and BioClinicalBERT weights with --pretrained and no bert_config."""
    model = CXRCLIP(cfg, ImageEncoder(cfg, cfg.pretrained and bert_config is None),
                    build_text_encoder(cfg, len(tokenizer), bert_config), tokenizer)
    if cfg.image_encoder == "resnet50":
        model.image_encoder.to(memory_format=torch.channels_last)  # cuDNN's fast layout for convolutions
    if common.ddp_active() and dist.get_backend() == "nccl":  # ResNet's BatchNorm over the global batch,
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # as the official code does
    return model


def load(path, map_location="cpu") -> tuple[CXRCLIP, Config]:
    """A model from its checkpoint alone (ckpt.pt or ckpt_best.pt: config, vocabulary, BERT config)."""
    ck = common.load_checkpoint(path, map_location)
    cfg = Config(**{k: v for k, v in ck["config"].items() if k in Config.__dataclass_fields__})
    model = build(cfg, common.tokenizer_from_vocab(ck["vocab"], ck["lowercase"]), ck["bert_config"])
    model.load_state_dict(ck["model"])
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------------
# ---- training ----


def setup(cfg: Config):
    """CUDA and DDP from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), as nanoGPT's train.py does."""
    ddp = "RANK" in os.environ  # `python x.py` runs as rank 0 of 1
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
    return rank, world, device, ctx, scaler  # -> rank, world size, device, autocast context, GradScaler


def param_groups(model: nn.Module, wd: float):
    """Weight decay on weight matrices only, not on biases, norms or tau (the official code decays all)."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def warmup_cosine(total: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (Sec. 4.2)."""
    return lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def to_device(batch: dict, device):  # -> images [2b, 3, H, W] (x^1 then x^2), tokens of t^1, of t^2
    x = torch.cat([batch["x1"], batch["x2"]]).to(device, non_blocking=True)
    return x, *({k: v.to(device, non_blocking=True) for k, v in batch[t].items()} for t in ("t1", "t2"))


def check(cfg: Config):
    """Flag values that cannot work, before anything runs."""
    if not cfg.data:
        raise common.UserError("--preset=paper needs --data=<csv> (data_prep.py writes it)")


def train(cfg: Config) -> dict:
    check(cfg)
    rank, world, device, ctx, scaler = setup(cfg)
    ck = common.start_run(cfg)  # the checkpoint to continue (--resume), else None
    if cfg.data == Config.data:
        phantoms.ensure_phantoms(cfg.data, PHANTOMS)
    counter = common.BadSampleCounter(cfg.max_bad_frac)
    text = ("findings", "impression", "report", "labels")  # a study needs a report or labels (Sec. 3.1)
    tr, va = (common.XrayCSV(cfg.data, split, ("image", "study_id"), text, counter)
              for split in ("train", "valid"))
    te = common.XrayCSV(cfg.data, "test", ("image",), counter=counter)
    bank = read_prompts(cfg.prompt_file) if cfg.prompt_file else {}
    # -- model: the checkpoint's tokenizer, or one fitted on the training texts (the same on every rank)
    tok = common.tokenizer_from_vocab(ck["vocab"], ck["lowercase"]) if ck else build_tokenizer(cfg, tr, bank)
    model = raw_model = build(cfg, tok, ck["bert_config"] if ck else None).to(device)
    torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own numbers
    local_batch = cfg.batch_size // world
    sampler = common.EpochSampler(len(tr.studies), local_batch, rank, world, cfg.seed)
    collate_fn = functools.partial(collate, tokenizer=tok, max_tokens=cfg.max_tokens)
    loader = torch.utils.data.DataLoader(StudyDataset(tr, cfg, True, bank), local_batch, sampler=sampler,
                                         num_workers=cfg.num_workers, collate_fn=collate_fn,
                                         pin_memory=device != "cpu", persistent_workers=cfg.num_workers > 0)
    val_loader = None  # L compares within a global batch: validation needs whole ones, the same each epoch
    if len(va.studies) >= cfg.batch_size:
        vs = common.EpochSampler(len(va.studies), local_batch, rank, world, cfg.seed, shuffle=False)
        val_loader = torch.utils.data.DataLoader(StudyDataset(va, cfg, False, bank), local_batch, sampler=vs,
                                                 num_workers=cfg.num_workers, collate_fn=collate_fn,
                                                 persistent_workers=cfg.num_workers > 0)
    opt = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, fused=device != "cpu")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * sampler.batches_per_epoch, max(
        1, round(cfg.warmup_epochs * sampler.batches_per_epoch))))
    common.print0(f"cxrclip: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M parameters; "
                  f"{len(tr.studies)} training studies, {sampler.batches_per_epoch} steps/epoch; "
                  f"{len(va.studies) * bool(val_loader)} validation studies; {world} process(es) on {device}")
    meta = {"vocab": common.tokenizer_vocab(tok), "lowercase": getattr(tok, "do_lower_case", True),
            "bert_config": raw_model.text_encoder.config.to_dict()}  # what load() needs
    loop = common.Loop(cfg, name="cxrclip", model=raw_model, opt=opt, sched=sched, scaler=scaler,
                       sampler=sampler, counter=counter, ck=ck, extra=lambda: meta)
    model = torch.compile(model) if cfg.compile else model
    model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    for epoch in loop.epochs():
        model.train()
        for batch in loop.batches(loader):
            with ctx:
                v1, v2, u1, u2 = model(*to_device(batch, device))  # each [b, D]
            loss, parts = cxrclip_loss(v1.float(), v2.float(), u1.float(), u2.float(),  # Sec. 3.3
                                       raw_model.logit_scale.exp(), cfg.lambda_icl, cfg.lambda_tcl)
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
            loop.step_done(loss=loss, **parts, tau=1 / raw_model.logit_scale.exp(),
                           lr=opt.param_groups[0]["lr"])
        val_loss = (validate(raw_model, val_loader, device, ctx, cfg) if val_loader and not loop.stopped
                    else None)
        loop.end_epoch(val_loss)  # ckpt_best.pt: the weights of the lowest validation loss (Sec. 4.2)
    metrics = evaluate(raw_model, te, device, loop) if rank == 0 and not loop.stopped else {}
    result = loop.close(metrics)
    if world > 1:
        dist.destroy_process_group()
    return result


@torch.no_grad()
def validate(model: CXRCLIP, loader, device, ctx, cfg: Config) -> float:
    """L on the validation split, each rank its part of every global batch (gathered as in training)."""
    model.eval()
    total = 0.0
    for batch in loader:
        with ctx:
            v1, v2, u1, u2 = (e.float() for e in model(*to_device(batch, device)))
        total += float(cxrclip_loss(v1, v2, u1, u2, model.logit_scale.exp(), cfg.lambda_icl,
                                    cfg.lambda_tcl)[0])
    return common.all_reduce_mean(total / max(1, len(loader)))


@torch.no_grad()
def evaluate(model: CXRCLIP, table: common.XrayCSV, device, loop: common.Loop) -> dict:
    """Zero-shot AUC on the test split with ckpt_best.pt (lowest validation loss), else the last weights."""
    best = {"best_epoch": None, "best_val_loss": None}
    if loop.best_val < math.inf:
        ck = common.load_checkpoint(loop.out / "ckpt_best.pt", device)
        model.load_state_dict(ck["model"])
        best = {"best_epoch": ck["epoch"], "best_val_loss": ck["val_loss"]}
        common.print0(f"evaluating ckpt_best.pt (epoch {ck['epoch']}, val loss {ck['val_loss']:.4f})")
    return {**common.zeroshot_eval(model, table, device), **best, "epochs": loop.epoch}


def main(argv=None):
    return train(common.parse_config(Config, PRESETS, argv))


if __name__ == "__main__":
    common.cli(main)
