"""The synthetic phantom data set that the demos and the tests run on (no download, deterministic in `seed`).

Procedurally drawn "radiographs" of six body parts, paediatric and adult, two or three views per study,
findings drawn into the pixels with their masks, and reports written from templates with synonyms, negations
and uncertainty, in the project's CSV schema (README, "Data"). Built so that a model which learns image-text
alignment scores a high zero-shot AUC and one that does not scores 0.5. Nothing here belongs to a paper: the
paper files call `ensure_phantoms` when they run on the demo data (common.py knows no data set).

Each finding is drawn large enough for the demos' models to see at 64 px (8-px tokens): the demo ViT, trained
on the labels themselves for 20 epochs, reaches a foreign-body AUC of 0.99 on the coin below, and stays at
chance (0.47-0.58) on a 6x4-px hollow bar; the rare findings stay rare.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

import common

PHANTOM_BODY_PARTS = {"chest": 0.44, "wrist": 0.15, "hand": 0.12, "knee": 0.12, "elbow": 0.09, "hip": 0.08}
_BONES = ("hand", "wrist", "knee", "elbow", "hip")
# name: (body parts where it can occur, prevalence among those studies). The last three are the rare tail.
PHANTOM_FINDINGS = {
    "Cardiomegaly": (("chest",), 0.22),
    "Pleural Effusion": (("chest",), 0.20),
    "Consolidation": (("chest",), 0.16),
    "Edema": (("chest",), 0.12),
    "Pneumothorax": (("chest",), 0.10),
    "Nodule": (("chest",), 0.10),
    "Fracture": (_BONES, 0.25),
    "Joint Effusion": (("knee", "elbow", "hip"), 0.18),
    "Pneumoperitoneum": (("chest",), 0.05),
    "Soft Tissue Swelling": (("hand", "wrist", "knee", "elbow"), 0.06),
    "Foreign Body": (tuple(PHANTOM_BODY_PARTS), 0.04),
}
PHANTOM_RARE = ("Pneumoperitoneum", "Soft Tissue Swelling", "Foreign Body")
PHANTOM_LABELS = list(PHANTOM_FINDINGS) + ["No Finding"]

# Report phrases. {side}: right/left; {bone}: the fractured bone; {joint}: the joint.
_POS = {
    "Cardiomegaly": ["cardiomegaly", "the cardiac silhouette is enlarged", "the heart is enlarged",
                     "enlarged cardiac silhouette"],
    "Pleural Effusion": ["{side} pleural effusion", "{side} pleural fluid blunting the costophrenic angle",
                         "a small {side} effusion", "{side} pleural effusion at the costophrenic angle"],
    "Consolidation": ["{side} lower lobe consolidation", "airspace opacity in the {side} lower lobe",
                      "focal consolidation at the {side} base"],
    "Edema": ["pulmonary edema", "interstitial edema", "perihilar haziness in keeping with edema",
              "vascular congestion with edema"],
    "Pneumothorax": ["{side} apical pneumothorax", "a {side} pneumothorax",
                     "air in the {side} pleural space at the apex"],
    "Nodule": ["a {side} lung nodule", "a small {side} pulmonary nodule",
               "a rounded nodular opacity in the {side} lung"],
    "Fracture": ["a fracture of the {bone}", "{bone} fracture", "a cortical break through the {bone}"],
    "Joint Effusion": ["a {joint} joint effusion", "joint effusion", "fluid distending the {joint} joint"],
    "Pneumoperitoneum": ["free air under the diaphragm", "pneumoperitoneum", "subdiaphragmatic free gas"],
    "Soft Tissue Swelling": ["soft tissue swelling", "swelling of the soft tissues",
                             "soft tissue thickening"],
    "Foreign Body": ["a radiopaque foreign body", "a metallic foreign body", "a retained foreign body"],
}
_NEG = ["no {x}", "there is no {x}", "no evidence of {x}", "{x} is not seen", "without {x}"]
_UNC = ["possible {x}", "{x} cannot be excluded", "questionable {x}", "findings may represent {x}"]


def _soft(d, edge):
    """d: normalised distance (<1 inside). A soft-edged 0..1 mask, like a blurred projection."""
    return np.clip((1.0 - d) / edge, 0.0, 1.0)


def _ellipse(yy, xx, cy, cx, ry, rx, edge=0.15, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return _soft(np.sqrt((u / rx) ** 2 + (v / ry) ** 2), edge)


def _capsule(yy, xx, p0, p1, r, edge=0.2):
    """Soft mask of the points within r of the segment p0-p1 (a long bone)."""
    (y0, x0), (y1, x1) = p0, p1
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / max(vy * vy + vx * vx, 1e-9), 0, 1)
    d = np.sqrt((yy - y0 - t * vy) ** 2 + (xx - x0 - t * vx) ** 2) / r
    return _soft(d, edge)


def _bone_layout(part, view, s, rng):
    """Long bones as capsules ((y0,x0),(y1,x1), radius, name) and the joint centre, in [0,1] coordinates."""
    j = lambda: rng.normal(0, 0.015)  # noqa: E731  small positional jitter
    lat = view == "LATERAL"
    if part == "knee":
        b = [((-0.05, 0.5 + j()), (0.45, 0.5), 0.09 * s, "distal femur"),
             ((0.55, 0.5 + j()), (1.05, 0.5), 0.08 * s, "proximal tibia"),
             ((0.6, 0.5 + (0.03 if lat else 0.13) * s), (1.05, 0.5 + (0.04 if lat else 0.14) * s), 0.03 * s,
              "fibula")]
        if lat:
            b.append(((0.42, 0.5 - 0.15 * s), (0.47, 0.5 - 0.15 * s), 0.045 * s, "patella"))
        return b, (0.5, 0.5)
    if part == "elbow":
        ang = 0.9 if lat else 0.25
        ex, ey = 0.5 + j(), 0.5
        cy, sy = ey + 0.55 * math.cos(ang), 0.55 * math.sin(ang)  # forearm bones end here
        b = [((-0.05, ex), (ey, ex), 0.075 * s, "distal humerus"),
             ((ey + 0.03, ex - 0.03), (cy, ex - 0.03 + sy), 0.045 * s, "proximal radius"),
             ((ey + 0.03, ex + 0.04), (cy, ex + 0.04 + sy * 0.9), 0.05 * s, "proximal ulna")]
        return b, (ey, ex)
    if part == "hip":
        sep = 0.0 if lat else 0.22
        b = [((0.42, 0.5 - sep), (1.05, 0.42 - sep - 0.08), 0.07 * s, "proximal femur"),
             ((0.42, 0.5 + sep), (1.05, 0.58 + sep + 0.08), 0.07 * s, "femoral neck")]
        return b, (0.42, 0.5 - sep)
    if part == "wrist":
        off = 0.03 if lat else 0.09
        b = [((1.05, 0.5 - off), (0.5, 0.5 - off), 0.06 * s, "distal radius"),
             ((1.05, 0.5 + off), (0.52, 0.5 + off), 0.04 * s, "distal ulna"),
             ((0.38, 0.45), (0.05, 0.42), 0.03 * s, "metacarpal")]
        return b, (0.45, 0.5)
    # hand: five rays of metacarpal + phalanges fanning out from the wrist
    b = [((1.05, 0.45), (0.8, 0.47), 0.06 * s, "distal radius")]
    n = 3 if lat else 5
    for k in range(n):
        a = (k - (n - 1) / 2) * (0.12 if lat else 0.22)
        base = (0.72, 0.5 + a * 0.3)
        mid = (base[0] - 0.28 * math.cos(a), base[1] + 0.28 * math.sin(a))
        tip = (mid[0] - 0.3 * math.cos(a), mid[1] + 0.3 * math.sin(a))
        b.append((base, mid, 0.028 * s, "metacarpal"))
        b.append(((mid[0] - 0.02, mid[1]), tip, 0.022 * s, "proximal phalanx"))
    return b, (0.75, 0.5)


def _draw_phantom(part, view, age_years, findings, uncertain, size, rng):
    """Render one view. findings: {name: detail dict}; returns (uint8 image, uint8 mask of finding ids)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = (yy + 0.5) / size, (xx + 0.5) / size
    img = np.full((size, size), 0.06, np.float32)
    mask = np.zeros((size, size), np.uint8)
    s = 0.62 + 0.38 * min(age_years, 18) / 18  # body size grows until 18 (paediatric anatomy is smaller)
    fid = {n: i + 1 for i, n in enumerate(PHANTOM_FINDINGS)}

    def put(name, m, value, mode="set"):
        """Blend a finding in (half strength when reported as uncertain) and record it in the mask."""
        k = 0.5 if name in uncertain else 1.0
        nonlocal img
        if mode == "set":
            img = img * (1 - k * m) + value * k * m
        else:
            img = img + value * k * m
        mask[m > 0.5] = fid[name]

    if part == "chest":
        lat = view == "LATERAL"
        cy = 0.52 + rng.normal(0, 0.015)
        body = _ellipse(yy, xx, cy + 0.03, 0.5, 0.47 * s, (0.3 if lat else 0.43) * s, 0.1)
        img = np.maximum(img, 0.33 * body)
        lungs = [(cy - 0.02, 0.48, 0.3 * s, 0.2 * s, "right")] if lat else \
            [(cy - 0.02, 0.5 - 0.17 * s, 0.29 * s, 0.12 * s, "right"),
             (cy - 0.02, 0.5 + 0.17 * s, 0.29 * s, 0.12 * s, "left")]
        texture = 0.04 * np.sin(xx * 60 + rng.uniform(0, 6)) * np.sin(yy * 47 + rng.uniform(0, 6))
        lungmask = np.zeros_like(img)
        for (ly, lx, ry, rx, _) in lungs:
            lm = _ellipse(yy, xx, ly, lx, ry, rx, 0.12)
            lungmask = np.maximum(lungmask, lm)
        img = img * (1 - lungmask) + (0.13 + texture) * lungmask
        for k in range(6):  # ribs: faint bright curved bands over the lungs
            ry0 = cy - 0.24 * s + k * 0.085 * s
            band = _soft(np.abs(yy - ry0 - 0.25 * (xx - 0.5) ** 2) / 0.012, 0.5)
            img = img + 0.07 * band * lungmask
        spine_x = 0.72 if lat else 0.5
        img = np.maximum(img, 0.5 * _capsule(yy, xx, (0.05, spine_x), (0.98, spine_x), 0.035 * s))
        hy, hx = (cy + 0.1, 0.38) if lat else (cy + 0.1, 0.53)
        big = 1.55 if "Cardiomegaly" in findings else 1.0
        if big > 1 and "Cardiomegaly" in uncertain:
            big = 1.3
        heart = _ellipse(yy, xx, hy, hx, 0.12 * s * (1 + (big - 1) * 0.5), 0.12 * s * big, 0.15)
        img = np.maximum(img, 0.52 * heart)
        if "Cardiomegaly" in findings:
            mask[heart > 0.5] = fid["Cardiomegaly"]
        side_lung = lambda side: lungs[0] if lat or side == "right" else lungs[1]  # noqa: E731
        for name, d in findings.items():
            if name == "Pleural Effusion":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                lvl = ly + ry * rng.uniform(0.25, 0.45)
                m = _ellipse(yy, xx, ly, lx, ry, rx, 0.1) * (yy > lvl - 0.06 * np.abs(xx - lx) / rx)
                put(name, m.astype(np.float32), 0.5)
            elif name == "Pneumothorax":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                off = 0 if lat else (-1 if d["side"] == "right" else 1) * rx * 0.35
                e = _ellipse(yy, xx, ly - ry * 0.5, lx + off, ry * 0.5, rx * 0.85, 0.05)
                put(name, e * (lungmask > 0.3), 0.0)
                # the visceral pleural line: the bright edge of the collapsed lung, the sign radiologists seek
                edge = np.clip(_ellipse(yy, xx, ly - ry * 0.5, lx + off, ry * 0.62, rx * 1.0, 0.05) - e, 0, 1)
                put(name, edge * (lungmask > 0.3), 0.45)
            elif name == "Consolidation":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                m = np.maximum(_ellipse(yy, xx, ly + ry * 0.35, lx, 0.1 * s, 0.075 * s, 0.4),
                               _ellipse(yy, xx, ly + ry * 0.2, lx + 0.03, 0.06 * s, 0.06 * s, 0.4))
                # mottled airspace opacity
                patchy = 0.5 + 0.5 * (np.sin(xx * 90 + 1.3) * np.sin(yy * 70) > -0.3)
                put(name, m * patchy, 0.62)
            elif name == "Nodule":
                ly, lx, ry, rx, _ = side_lung(d["side"])
                m = _ellipse(yy, xx, ly + rng.uniform(-0.5, 0.3) * ry, lx + rng.uniform(-0.4, 0.4) * rx,
                             0.05, 0.05, 0.3)
                put(name, m, 0.8)
            elif name == "Edema":
                for (ly, lx, ry, rx, _) in lungs:
                    hilum = _ellipse(yy, xx, ly + 0.02, 0.5 if not lat else lx, ry * 0.9, rx * 1.6, 0.9)
                    put(name, hilum * lungmask, 0.25, mode="add")
            elif name == "Pneumoperitoneum":
                # free air: a lucent cap under each dome of the diaphragm, 0.055 of the film deep (3-4 px at
                # 64 px); a 1-px arc is below what the demo ViT resolves (module docstring)
                for (ly, lx, ry, rx, _) in lungs:
                    cap = _ellipse(yy, xx, ly + ry * 0.97, lx, 0.055, rx * 0.9, 0.2) * (yy > ly + ry * 0.97)
                    put(name, cap, 0.0)
    else:
        bones, joint = _bone_layout(part, view, s, rng)
        tissue = np.zeros_like(img)
        for (p0, p1, r, _) in bones:
            tissue = np.maximum(tissue, _capsule(yy, xx, p0, p1, r * 2.2, 0.3))
        if part == "hip":
            tissue = np.maximum(tissue, _ellipse(yy, xx, 0.45, 0.5, 0.5, 0.55, 0.1))
            img = np.maximum(img, 0.45 * _ellipse(yy, xx, 0.2, 0.5, 0.2, 0.42, 0.2)
                             * (1 - _ellipse(yy, xx, 0.25, 0.5, 0.1, 0.25, 0.2)))  # pelvic ring
        if "Soft Tissue Swelling" in findings:
            p0, p1, r, _ = bones[0]
            sw = _capsule(yy, xx, p0, p1, r * 4.5, 0.3) * (1 - tissue)
            put("Soft Tissue Swelling", sw, 0.36)
        img = np.maximum(img, 0.26 * tissue)
        if "Joint Effusion" in findings:
            m = _ellipse(yy, xx, joint[0], joint[1], 0.15 * s, 0.2 * s, 0.3)
            put("Joint Effusion", m, 0.3, mode="add")
        for (p0, p1, r, name) in bones:
            bm = _capsule(yy, xx, p0, p1, r, 0.25)
            img = img * (1 - bm) + 0.62 * bm
            cortex = bm * (1 - _capsule(yy, xx, p0, p1, r * 0.6, 0.5))
            img = img + 0.12 * cortex
            if age_years < 16 and name != "patella":  # growth plate: a dark band across the bone near its end
                distal_end = name.startswith("distal") or name in ("metacarpal", "proximal phalanx")
                near, far = (p1, p0) if distal_end else (p0, p1)
                py, px = near[0] + (far[0] - near[0]) * 0.1, near[1] + (far[1] - near[1]) * 0.1
                w = 0.012 + 0.02 * (1 - age_years / 16)  # narrows with age: another bone-age cue
                L = max(math.hypot(far[0] - near[0], far[1] - near[1]), 1e-6)
                along = ((yy - py) * (far[0] - near[0]) + (xx - px) * (far[1] - near[1])) / L
                img = img - 0.3 * _soft(np.abs(along) / w, 0.6) * bm
        if part in ("hand", "wrist"):  # carpal ossification centres appear with age (a bone-age cue)
            n_carpal = 0 if age_years < 1 else min(8, int(age_years * 0.7) + 1)
            for k in range(n_carpal):
                cy0, cx0 = joint[0] - 0.05 + 0.05 * (k // 4), joint[1] - 0.09 + 0.06 * (k % 4)
                img = np.maximum(img, 0.6 * _ellipse(yy, xx, cy0, cx0, 0.022, 0.022, 0.4))
        if "Fracture" in findings:
            p0, p1, r, _ = bones[findings["Fracture"]["bone_index"] % len(bones)]
            t = findings["Fracture"]["t"]
            cy0, cx0 = p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t
            L = max(math.hypot(p1[0] - p0[0], p1[1] - p0[1]), 1e-6)
            along = ((yy - cy0) * (p1[0] - p0[0]) + (xx - cx0) * (p1[1] - p0[1])) / L
            line = _soft(np.abs(along + 0.5 * (xx - cx0) * 0.6) / 0.035, 0.6) \
                * _capsule(yy, xx, p0, p1, r * 1.2, 0.2)
            put("Fracture", line, 0.08)
    if "Foreign Body" in findings:
        fy, fx = findings["Foreign Body"]["pos"]
        # the classic paediatric foreign body, a swallowed coin or button battery (~2 cm: an eighth of a
        # child's chest): a disc 0.13 of the film wide, denser than bone, with the battery's inner ring
        put("Foreign Body", _ellipse(yy, xx, fy, fx, 0.065, 0.065, 0.15), 1.0)
        put("Foreign Body", _ellipse(yy, xx, fy, fx, 0.04, 0.04, 0.3), 0.75)
    img = img.astype(np.float32)
    import cv2

    img = cv2.GaussianBlur(img, (0, 0), sigmaX=0.5 * size / 64)
    sigma = 0.055 if age_years < 18 else 0.03  # paediatric protocols use lower doses: noisier images
    img = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    img = (img * rng.uniform(0.85, 1.15)) ** rng.uniform(0.85, 1.15) if img.min() >= 0 else img
    img = np.clip(img, 0, 1)
    return np.round(img * 255).astype(np.uint8), mask


def _phrase(options, rng, **kw):
    return options[rng.integers(len(options))].format(**kw)


def _phantom_report(part, findings, uncertain, rng):
    """Findings and impression sections for one study, with synonyms, negations and uncertainty."""
    def kw(name):
        d = findings[name]
        return dict(side=d.get("side", "right"), bone=d.get("bone", "bone"), joint=part)

    sents, imp = [], []
    for name in rng.permutation(list(findings)):
        p = _phrase(_POS[name], rng, **kw(name))
        if name in uncertain:
            p = _phrase(_UNC, rng, x=p)
            imp.append(_phrase(_UNC, rng, x=name.lower()))
        else:
            imp.append(name.lower() if rng.random() < 0.6 else p)
        s = p if rng.random() < 0.5 or name in uncertain else "there is " + p
        sents.append(s[0].upper() + s[1:] + ".")
    for name, (parts, prev) in PHANTOM_FINDINGS.items():
        # Negations ("no pneumothorax") are kept rarer than positive mentions of the same finding: with a 10%
        # finding negated in a third of all reports, the word itself would point at its absence, and a small
        # text encoder trained from scratch for minutes has not learnt negation yet.
        if part in parts and name not in findings and rng.random() < min(0.35, 0.5 * prev / (1 - prev)):
            s = _phrase(_NEG, rng, x=name.lower())
            sents.append(s[0].upper() + s[1:] + ".")
    order = rng.permutation(len(sents))
    sents = [sents[i] for i in order]
    if part == "chest":
        sents.append(["The lungs are otherwise clear.",
                      "Otherwise no acute cardiopulmonary process."][rng.integers(2)])
    else:
        sents.append(["Alignment is otherwise normal.", "The bones are otherwise intact."][rng.integers(2)])
    findings_txt = " ".join(sents)
    if imp:
        imp_txt = (", ".join(imp[:-1]) + " and " + imp[-1]) if len(imp) > 1 else imp[0]
        imp_txt = imp_txt[0].upper() + imp_txt[1:] + "."
    else:
        imp_txt = ["No acute abnormality.", "Normal study.", "No acute findings."][rng.integers(3)]
    u = rng.random()  # some studies lack one section (CXR-CLIP then augments the other one)
    if u < 0.08:
        findings_txt = ""
    elif u < 0.16:
        imp_txt = ""
    return findings_txt, imp_txt


def make_phantoms(n: int, seed: int, out_dir: str | os.PathLike, size: int = 64,
                  csv_name: str = "phantoms.csv",
                  progress: bool = True) -> Path:
    """Write about `n` phantom images (+ masks) and `<out_dir>/<csv_name>` in the project's schema.

    Deterministic in `seed`. Studies have 2 views (10% have a third); patients have 1-2 studies and the
    train/valid/test split (70/15/15) is by patient. Labels are the drawn ground truth: 1 present, -1
    reported as uncertain (drawn at half strength), 0 absent, blank where the finding cannot occur in that
    body part. `target` is the age in months (a bone-age-like regression target).
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts, pw = list(PHANTOM_BODY_PARTS), np.array(list(PHANTOM_BODY_PARTS.values()))
    rows, n_img, study, patient = [], 0, 0, 0
    plan = []
    while n_img < n:
        patient += 1
        peds = rng.random() < 0.5
        age = float(rng.uniform(0.5, 17.9) if peds else rng.uniform(18, 85))
        for _ in range(1 if rng.random() < 0.7 else 2):
            study += 1
            k = 3 if rng.random() < 0.1 else 2
            plan.append((patient, study, age, parts[rng.choice(len(parts), p=pw / pw.sum())], k))
            n_img += k
    split = common.split_by_patient([f"P{p:05d}" for p, *_ in plan], seed=seed)
    it = plan
    if progress:
        from tqdm import tqdm

        it = tqdm(plan, desc=f"phantoms -> {out}", unit="study", leave=False)
    for patient, st, age, part, k in it:
        srng = np.random.default_rng([seed, st])
        findings, uncertain = {}, set()
        for name, (where, prev) in PHANTOM_FINDINGS.items():
            if part in where and srng.random() < prev:
                d = {"side": ["right", "left"][srng.integers(2)]}
                if name == "Fracture":
                    n_bones = len(_bone_layout(part, "AP", 1.0, srng)[0]) - (1 if part == "knee" else 0)
                    d["bone_index"] = int(srng.integers(n_bones))
                    d["t"] = float(srng.uniform(0.35, 0.7))
                    d["bone"] = _bone_layout(part, "AP", 1.0, np.random.default_rng(0))[0][d["bone_index"]][3]
                if name == "Foreign Body":
                    d["pos"] = (float(srng.uniform(0.25, 0.75)), float(srng.uniform(0.3, 0.7)))
                findings[name] = d
                if srng.random() < 0.1:
                    uncertain.add(name)
        fx, imp = _phantom_report(part, findings, uncertain, srng)
        labels = {}
        for name, (where, _) in PHANTOM_FINDINGS.items():
            present = "-1" if name in uncertain else "1"
            labels[name] = present if name in findings else ("0" if part in where else "")
        labels["No Finding"] = "1" if not findings else "0"
        frontal = "PA" if part == "chest" and age >= 12 else "AP"
        views = [frontal, "LATERAL", frontal][:k]
        for v_i, view in enumerate(views):
            img, mask = _draw_phantom(part, view, age, findings, uncertain, size, srng)
            name = f"S{st:05d}_{v_i}"
            Image.fromarray(img).save(out / "images" / f"{name}.png", compress_level=1)
            Image.fromarray(mask).save(out / "masks" / f"{name}.png", compress_level=1)
            row = {"image": f"images/{name}.png", "mask": f"masks/{name}.png", "study_id": f"S{st:05d}",
                   "patient_id": f"P{patient:05d}", "split": split[f"P{patient:05d}"], "view": view,
                   "body_part": part, "findings": fx, "impression": imp,
                   "report": " ".join(t for t in (fx, imp) if t), "target": str(int(round(age * 12)))}
            row.update({common.LABEL_PREFIX + k2: v for k2, v in labels.items()})
            rows.append(row)
    cols = ["image", "mask", "study_id", "patient_id", "split", "view", "body_part", "findings", "impression",
            "report", "target"] + [common.LABEL_PREFIX + k for k in PHANTOM_LABELS]
    path = out / csv_name
    common.write_csv_atomic(path, rows, cols)
    return path


def ensure_phantoms(csv_path, n: int, size: int = 64):
    """The demos' data set at csv_path, drawn on first use (rank 0 draws, the other ranks wait for it)."""
    import torch.distributed as dist

    if common.is_main_process() and not Path(csv_path).exists():
        common.print0(f"drawing {n} phantom images into {Path(csv_path).parent}")
        make_phantoms(n, 0, Path(csv_path).parent, size=size, csv_name=Path(csv_path).name)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
