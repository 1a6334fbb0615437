"""
data_prep.py: the public data sets of the four papers -> the project's CSV schema (DESIGN.md, "Data"),
plus the text steps that need a language model (PedCLIP excerpts, D-MLM knowledge, CXR-CLIP back-translation).

Converters (one row per image; `image`/`mask` paths are written relative to the CSV):

    python data_prep.py mimic_cxr       --root=physionet.org/files/mimic-cxr-jpg/2.1.0 --out=data/mimic.csv
    python data_prep.py chexpert        --root=CheXpert-v1.0-small --out=data/chexpert.csv
    python data_prep.py chexpert5x200   --root=CheXpert-v1.0-small --out=data/chexpert5x200.csv
    python data_prep.py nih             --root=ChestX-ray14 --out=data/nih.csv
    python data_prep.py vindr_cxr       --root=physionet.org/files/vindr-cxr/1.0.0 --out=data/vindr.csv --resize=512
    python data_prep.py vindr_pcxr      --root=physionet.org/files/vindr-pcxr/1.0.0 --out=data/pcxr.csv --resize=512
    python data_prep.py rsna_pneumonia  --root=rsna-pneumonia-detection-challenge --out=data/rsna.csv --resize=512
    python data_prep.py siim            --root=siim-acr-pneumothorax --out=data/siim.csv --resize=512
    python data_prep.py openi           --root=openi --out=data/openi.csv
    python data_prep.py cxr_lt          --root=physionet.org/files/mimic-cxr-jpg/2.1.0 --out=data/cxrlt.csv
    python data_prep.py grazpedwri      --root=GRAZPEDWRI-DX --out=data/graz.csv --resize=512
    python data_prep.py boneage         --root=rsna-bone-age --out=data/boneage.csv
    python data_prep.py covidx          --root=covidx-cxr --out=data/covidx.csv
    python data_prep.py mimic_edema     --root=physionet.org/files/mimic-cxr-jpg/2.1.0 --out=data/edema.csv
    python data_prep.py chd_cxr         --root=CHD-CXR --out=data/chd.csv

    --resize=N writes 8-bit PNG (or --resize_format=jpg) copies whose shorter side is N, once (existing
    files are kept), with --workers processes, and points the CSV at them; DICOM goes through
    common.load_image (MONOCHROME1 inverted, VOI LUT applied). Masks are resized with nearest neighbour.
    --decode_device=cuda decodes the JPEGs (MIMIC-CXR-JPG, CheXpert) on the GPU with nvJPEG, in batches;
    `python data_prep.py bench_decode [--images=<folder>] [--decode_device=cuda]` says whether that pays on
    your machine (images/s per CPU process count, on the GPU, and for reading the resized copies back).

Text steps (a local Hugging Face model: a folder or a cached name; nothing is downloaded here):

    python data_prep.py extract_bodyparts --csv=data/pexr.csv --model=meta-llama/Llama-3.1-8B-Instruct
    python data_prep.py knowledge --findings=data/mimic.csv --model=<llm> --out=data/knowledge.json
    python data_prep.py backtranslate --csv=data/mimic.csv --en_it=Helsinki-NLP/opus-mt-en-it \
        --it_en=Helsinki-NLP/opus-mt-it-en

Each text step works in batches, shows tqdm progress, saves as it goes and skips what is already done, so
an interrupted run is simply started again.

Splits are by patient with fixed seeds, as each paper describes (see each converter's comment); where a
paper gives none, 70/15/15. Caveat worth repeating: RSNA Pneumonia images are a subset of NIH ChestX-ray14,
so a model pretrained on NIH has seen the RSNA test images.
"""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

LP = common.LABEL_PREFIX
BASE_COLUMNS = ["image", "study_id", "patient_id", "split", "view", "body_part", "findings", "impression", "report"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


class DataPrepError(ValueError):
    """Bad input: the message names the data set, the file and (where it applies) the column."""


# ----------------------------------------------------------------------------------------------------
# ---- reading the official metadata files ----

def find_file(root: Path, names: list[str], dataset: str, required: bool = True) -> Path | None:
    """The first of `names` (relative paths or globs, tried in order) under root; error naming all of them."""
    for n in names:
        hits = sorted(glob.glob(str(root / n)))
        if hits:
            return Path(hits[0])
    if required:
        raise DataPrepError(f"{dataset}: metadata file not found under {root}: expected one of {names} "
                            f"(the official layout, as downloaded)")
    return None


def read_table(path: Path, required: list[str], dataset: str, delimiter: str = ",",
               fieldnames: list[str] | None = None) -> list[dict]:
    """CSV (plain or .gz) -> list of dicts with stripped keys/values; a missing column is an error."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter, fieldnames=fieldnames, skipinitialspace=True)
        # SIIM's train-rle.csv header is "ImageId, EncodedPixels": strip keys so the leading space is harmless
        rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()}
                for r in reader]
        header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataPrepError(f"{dataset}: {path}: missing column(s) {missing}; the file has {header}")
    return rows


def index_images(folder: Path, exts=IMAGE_EXTS) -> dict[str, Path]:
    """File stem -> path for every image below folder (data sets that nest images in sub-folders)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for fn in files:
            stem, ext = os.path.splitext(fn)
            if ext.lower() in exts:
                out.setdefault(stem, Path(dirpath) / fn)
    return out


def first_existing(candidates: list[Path]) -> Path:
    """The first candidate that exists, else the first one (finish() then counts it as missing)."""
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def split_fractions(s: str | None, default: tuple) -> tuple:
    if not s:
        return default
    f = tuple(float(x) for x in s.split(","))
    if len(f) != 3 or abs(sum(f) - 1) > 1e-6:
        raise DataPrepError(f"--fractions must be three numbers summing to 1 (train,valid,test), got {s}")
    return f


def row(image, study_id, patient_id, split="", view="", body_part="chest", findings="", impression="",
        report="", labels=None, **extra) -> dict:
    r = dict(image=str(image) if image else "", study_id=str(study_id), patient_id=str(patient_id), split=split,
             view=view, body_part=body_part, findings=findings, impression=impression, report=report)
    for k, v in (labels or {}).items():
        r[LP + k] = v
    r.update(extra)
    return r


def assign_splits(rows: list[dict], fractions, seed: int, only_blank: bool = True):
    """Fill `split` by patient (common.split_by_patient) for rows that have none yet."""
    todo = [r for r in rows if not (only_blank and r["split"])]
    m = common.split_by_patient([r["patient_id"] for r in todo], fractions=fractions, seed=seed)
    for r in todo:
        r["split"] = m[r["patient_id"]]


def chexpert_value(v: str) -> str:
    """CheXpert-style cell (1.0 / 0.0 / -1.0 / blank) -> "1" / "0" / "-1" / ""."""
    v = v.strip()
    if v == "":
        return ""
    return str(int(float(v)))


# ----------------------------------------------------------------------------------------------------
# ---- report text ----

SECTION_RE = re.compile(r"^\s*([A-Z][A-Z /&\-]{2,40}):", re.MULTILINE)


def parse_report_sections(text: str) -> dict[str, str]:
    """MIMIC-CXR free-text report -> {"FINDINGS": ..., "IMPRESSION": ...} (upper-case headers ending in ':').

    The reports are typed templates: "FINAL REPORT", then headers such as EXAMINATION:, INDICATION:,
    COMPARISON:, FINDINGS:, IMPRESSION: at the start of a line. A section runs to the next header; white
    space (the reports wrap at ~80 columns) is collapsed. Headers are matched case-sensitively, so a
    sentence like "Note: ..." inside a section does not end it.
    """
    out = {}
    heads = list(SECTION_RE.finditer(text))
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = " ".join(text[m.end():end].split())
        name = m.group(1).strip()
        if body:
            out[name] = (out[name] + " " + body) if name in out else body
    return out


def report_text(findings: str, impression: str) -> str:
    parts = [f"FINDINGS: {findings}" if findings else "", f"IMPRESSION: {impression}" if impression else ""]
    return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------------
# ---- converters: one function per data set, root -> rows (absolute paths; finish() makes them relative) ----

CHEXPERT_14 = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices"]


def mimic_metadata(root: Path, dataset: str, required: bool = True) -> dict[str, dict]:
    """dicom_id -> metadata row of mimic-cxr-2.0.0-metadata.csv(.gz) (ViewPosition, subject_id, study_id)."""
    p = find_file(root, ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"], dataset, required)
    if p is None:
        return {}
    return {r["dicom_id"]: r for r in read_table(p, ["dicom_id", "subject_id", "study_id", "ViewPosition"], dataset)}


def mimic_image(root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    # files/p{first two digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg, as in MIMIC-CXR-JPG 2.x
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def convert_mimic_cxr(root: Path, args) -> list[dict]:
    """MIMIC-CXR-JPG 2.x: metadata + official split (by patient) + CheXpert-labeler labels per study + reports.

    Reports come from MIMIC-CXR (not -JPG) as files/pXX/pNNNNNNNN/sNNNNNNNN.txt; pass --reports=<folder>
    if they are not unpacked into --root. CXR-CLIP uses the official train split for pre-training and the
    test split for retrieval; "validate" is renamed "valid".
    """
    ds = "mimic_cxr"
    meta = read_table(find_file(root, ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"], ds),
                      ["dicom_id", "subject_id", "study_id", "ViewPosition"], ds)
    split = {r["dicom_id"]: r["split"] for r in read_table(
        find_file(root, ["mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"], ds), ["dicom_id", "split"], ds)}
    chex = {r["study_id"]: r for r in read_table(
        find_file(root, ["mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"], ds),
        ["subject_id", "study_id"] + CHEXPERT_14, ds)}
    reports_root = Path(args.reports) if args.reports else root
    rows, cache = [], {}
    for m in meta:
        sid, pid, did = m["study_id"], m["subject_id"], m["dicom_id"]
        if sid not in cache:
            rp = reports_root / "files" / f"p{pid[:2]}" / f"p{pid}" / f"s{sid}.txt"
            secs = parse_report_sections(rp.read_text(errors="replace")) if rp.exists() else {}
            cache[sid] = (secs.get("FINDINGS", ""), secs.get("IMPRESSION", ""))
        fi, im = cache[sid]
        labels = {k: chexpert_value(chex[sid][k]) for k in CHEXPERT_14} if sid in chex else {k: "" for k in CHEXPERT_14}
        sp = {"validate": "valid"}.get(split.get(did, ""), split.get(did, ""))
        rows.append(row(mimic_image(root, pid, sid, did), sid, pid, sp, m["ViewPosition"].upper(), "chest",
                        fi, im, report_text(fi, im), labels))
    return rows


def chexpert_path(root: Path, p: str) -> Path:
    # Path in train.csv/valid.csv starts with the archive's folder name ("CheXpert-v1.0-small/train/...").
    parts = Path(p).parts
    return first_existing([root / p, root.parent / p, root / Path(*parts[1:])])


def chexpert_view(r: dict) -> str:
    return "LATERAL" if r["Frontal/Lateral"] == "Lateral" else (r["AP/PA"] or "FRONTAL").upper()


def chexpert_ids(p: str) -> tuple[str, str]:
    m = re.search(r"(patient\d+)/(study\d+)", p)
    return (f"{m.group(1)}/{m.group(2)}", m.group(1)) if m else (p, p)


def convert_chexpert(root: Path, args) -> list[dict]:
    """CheXpert v1.0: train.csv -> train/valid 80/20 by patient (D-MLM), valid.csv (official) -> test.

    Labels stay 1 / 0 / -1 / blank as published. If chexpert_5x200.csv is in root, those images are left
    out of training (CXR-CLIP, following GLoRIA, tests on them).
    """
    ds = "chexpert"
    need = ["Path", "Frontal/Lateral", "AP/PA"] + CHEXPERT_14
    train = read_table(find_file(root, ["train.csv"], ds), need, ds)
    valid = read_table(find_file(root, ["valid.csv"], ds), need, ds)
    p5 = find_file(root, ["chexpert_5x200.csv"], ds, required=False)
    excl = {Path(r["Path"]).parts[-3:] for r in read_table(p5, ["Path"], ds)} if p5 else set()
    rows = []
    for part, table in (("", train), ("test", valid)):
        for r in table:
            if part == "" and Path(r["Path"]).parts[-3:] in excl:
                continue
            sid, pid = chexpert_ids(r["Path"])
            rows.append(row(chexpert_path(root, r["Path"]), sid, pid, part, chexpert_view(r), "chest",
                            labels={k: chexpert_value(r[k]) for k in CHEXPERT_14}))
    assign_splits(rows, split_fractions(args.fractions, (0.8, 0.2, 0.0)), args.seed)
    return rows


CHEXPERT_5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def convert_chexpert5x200(root: Path, args) -> list[dict]:
    """CheXpert 5x200 (GLoRIA's chexpert_5x200.csv: 200 images positive for exactly one of five classes).

    All rows are test. Each image is positive for one class only, so the other four are 0 (not blank).
    The report impression is kept where the file has it ("Report Impression").
    """
    ds = "chexpert5x200"
    table = read_table(find_file(root, ["chexpert_5x200.csv"], ds), ["Path"] + CHEXPERT_5, ds)
    rows = []
    for r in table:
        pos = [k for k in CHEXPERT_5 if chexpert_value(r[k]) == "1"]
        if len(pos) != 1:  # the subset's definition; anything else is not a 5x200 row
            continue
        sid, pid = chexpert_ids(r["Path"])
        im = " ".join(r.get("Report Impression", "").split())
        rows.append(row(chexpert_path(root, r["Path"]), sid, pid, "test", chexpert_view(r) if "AP/PA" in r and "Frontal/Lateral" in r else "",
                        "chest", "", im, report_text("", im), {k: "1" if k in pos else "0" for k in CHEXPERT_5}))
    return rows


NIH_14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def convert_nih(root: Path, args) -> list[dict]:
    """NIH ChestX-ray14: Data_Entry_2017.csv ("Finding Labels" pipe-separated, "No Finding" = all 0).

    Official lists: train_val_list.txt -> train/valid 80/20 by patient (CXR-CLIP: 20% of the training set
    for validation), test_list.txt -> test (both lists are already patient-disjoint). The boxes of
    BBox_List_2017.csv (880 test images) go into a `bbox` column as JSON [[label, x, y, w, h], ...].
    """
    ds = "nih"
    entries = read_table(find_file(root, ["Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"], ds),
                         ["Image Index", "Finding Labels", "Patient ID", "View Position"], ds)
    test = set(find_file(root, ["test_list.txt"], ds).read_text().split())
    trainval = set(find_file(root, ["train_val_list.txt"], ds).read_text().split())
    boxes = defaultdict(list)
    pb = find_file(root, ["BBox_List_2017.csv"], ds, required=False)
    if pb:
        # header: Image Index,Finding Label,Bbox [x,y,w,h],,, -> read by position, not by name
        with open(pb, newline="", encoding="utf-8-sig") as f:
            rd = csv.reader(f)
            head = next(rd)
            if len(head) < 6 or head[0].strip() != "Image Index":
                raise DataPrepError(f"{ds}: {pb}: expected columns 'Image Index, Finding Label, Bbox [x,y,w,h]', "
                                    f"got {head}")
            for r in rd:
                if len(r) >= 6:
                    boxes[r[0]].append([r[1]] + [round(float(x), 1) for x in r[2:6]])
    idx = index_images(root, (".png",))
    rows = []
    for e in entries:
        name = e["Image Index"]
        found = set(e["Finding Labels"].split("|"))
        unknown = found - set(NIH_14) - {"No Finding"}
        if unknown:
            raise DataPrepError(f"{ds}: Data_Entry_2017.csv: column 'Finding Labels' has unknown label(s) {unknown}")
        sp = "test" if name in test else "" if name in trainval else None
        if sp is None:
            continue  # in neither official list
        pid = str(int(e["Patient ID"]))
        stem = Path(name).stem
        rows.append(row(idx.get(stem, root / "images" / name), f"{pid}_{e.get('Follow-up #', stem)}", pid, sp,
                        e["View Position"].upper(), "chest", labels={k: "1" if k in found else "0" for k in NIH_14},
                        bbox=json.dumps(boxes[name]) if boxes.get(name) else ""))
    assign_splits(rows, split_fractions(args.fractions, (0.8, 0.2, 0.0)), args.seed)
    return rows


def vindr_labels(root: Path, split: str, dataset: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Image-level labels from VinDr's annotation files for one official split.

    image_labels_<split>.csv: one row per (image, radiologist) with 0/1 per finding (local + global);
    annotations_<split>.csv: one row per radiologist box (image_id, rad_id, class_name, x_min, ...).
    The official rule (VinDr-CXR/-PCXR papers): the training images were read by 3 radiologists
    independently, so an image is positive for a finding if any of them marked it; the test set is the
    consensus of 5 and has one row per image. "No finding" rows carry no box and set nothing.
    """
    labels: dict[str, dict[str, str]] = defaultdict(dict)
    names: list[str] = []
    pl = find_file(root, [f"annotations/image_labels_{split}.csv", f"image_labels_{split}.csv"], dataset, False)
    pa = find_file(root, [f"annotations/annotations_{split}.csv", f"annotations_{split}.csv"], dataset, False)
    if pl is None and pa is None:
        raise DataPrepError(f"{dataset}: metadata file not found under {root}: need annotations/image_labels_{split}"
                            f".csv or annotations/annotations_{split}.csv")
    if pl:
        t = read_table(pl, ["image_id"], dataset)
        ids = {"image_id", "rad_id", "rad_ID", "rad_ids"}
        names = [c for c in t[0] if c not in ids] if t else []
        for r in t:
            for k in names:
                if chexpert_value(r[k] or "0") == "1":
                    labels[r["image_id"]][k] = "1"
                else:
                    labels[r["image_id"]].setdefault(k, "0")
    if pa:
        for r in read_table(pa, ["image_id", "class_name"], dataset):
            d = labels[r["image_id"]]
            if r["class_name"] not in names:
                names.append(r["class_name"])
            d[r["class_name"]] = "1"
    names = [n for n in names if n]
    for d in labels.values():
        for n in names:
            d.setdefault(n, "0")
        if any(v == "1" for k, v in d.items() if k.lower() != "no finding") and "No finding" in d:
            d["No finding"] = "0"  # a box from one reader outweighs another reader's "No finding"
        elif "No finding" in names and not any(v == "1" for v in d.values()):
            d["No finding"] = "1"
    return labels, names


def convert_vindr(root: Path, args, dataset: str = "vindr_cxr") -> list[dict]:
    """VinDr-CXR 1.0.0 (PhysioNet; DICOM in train/ and test/). Validation split from the training set (CXR-CLIP):
    80/20 by image (VinDr ships no patient ids: each image is its own patient id). The official test set is test.
    "Other disease(s)"/"Other lesion" are kept; CXR-CLIP's evaluation drops them (evaluate.py's job)."""
    rows = []
    for off in ("train", "test"):
        labels, names = vindr_labels(root, off, dataset)
        for image_id, lab in sorted(labels.items()):
            img = first_existing([root / off / f"{image_id}{e}" for e in (".dicom", ".dcm", ".png", ".jpg")])
            rows.append(row(img, image_id, image_id, "test" if off == "test" else "",
                            "PA" if dataset == "vindr_cxr" else "", "chest", labels=lab))
    names = sorted({k for r in rows for k in r if k.startswith(LP)})
    for r in rows:  # a finding that occurs in only one official split is 0 in the other
        for n in names:
            r.setdefault(n, "0")
    assign_splits(rows, split_fractions(args.fractions, (0.8, 0.2, 0.0)), args.seed)
    return rows


def convert_vindr_pcxr(root: Path, args) -> list[dict]:
    """VinDr-PCXR 1.0.0 (PedCLIP's "Pedi-CXR"): same layout as VinDr-CXR, pediatric findings."""
    return convert_vindr(root, args, "vindr_pcxr")


def convert_rsna_pneumonia(root: Path, args) -> list[dict]:
    """RSNA Pneumonia (Kaggle stage 2): stage_2_train_labels.csv has one row per box (several per patientId)
    or one row with Target 0; an image is positive if any row has Target 1. Only the training images carry
    labels, so they are re-split 70/15/15 by patient (CXR-CLIP, after GLoRIA; D-MLM uses --fractions=0.6,0.2,0.2).

    These images are a subset of NIH ChestX-ray14: a model pretrained on NIH has seen RSNA's test images.
    """
    ds = "rsna_pneumonia"
    t = read_table(find_file(root, ["stage_2_train_labels.csv"], ds), ["patientId", "Target"], ds)
    target, boxes = {}, defaultdict(list)
    for r in t:
        pid = r["patientId"]
        target[pid] = max(target.get(pid, 0), int(float(r["Target"])))
        if r.get("x"):
            boxes[pid].append([round(float(r[k]), 1) for k in ("x", "y", "width", "height")])
    rows = [row(root / "stage_2_train_images" / f"{pid}.dcm", pid, pid, labels={"Pneumonia": str(y)},
                bbox=json.dumps([["Pneumonia"] + b for b in boxes[pid]]) if boxes[pid] else "")
            for pid, y in target.items()]
    assign_splits(rows, split_fractions(args.fractions, (0.7, 0.15, 0.15)), args.seed)
    return rows


def rle_decode(rle: str, height: int, width: int, relative: bool = True) -> np.ndarray:
    """SIIM-ACR run-length string -> uint8 mask [H, W] (255 inside).

    Pixels are numbered column by column (the challenge's mask_functions.py reshapes to (width, height) and
    transposes). Stage 1 (train-rle.csv) is *relative*: each start is an offset from the end of the previous
    run. Stage 2 (stage_2_train.csv) uses the usual Kaggle form: absolute 1-based starts.
    """
    flat = np.zeros(height * width, dtype=np.uint8)
    v = [int(x) for x in rle.split()]
    pos = 0
    for start, length in zip(v[0::2], v[1::2]):
        if relative:
            pos += start
        else:
            pos = start - 1
        flat[pos:pos + length] = 255
        pos += length
    return flat.reshape((height, width), order="F")


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) without decoding pixels where possible (DICOM header, PIL header)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom
        d = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(d.Rows), int(d.Columns)
    from PIL import Image
    with Image.open(path) as im:
        return im.size[1], im.size[0]


def convert_siim(root: Path, args) -> list[dict]:
    """SIIM-ACR Pneumothorax: train-rle.csv (stage 1) or stage_2_train.csv; "-1" = no pneumothorax, several
    rows per ImageId = several regions (OR-ed). Masks are written as PNGs next to the CSV (positives only; an
    empty `mask` cell means an all-zero mask). Split 70/15/15 by patient (CXR-CLIP; D-MLM: 60/20/20)."""
    ds = "siim"
    p = find_file(root, ["train-rle.csv", "stage_2_train.csv"], ds)
    relative = p.name == "train-rle.csv" if args.rle == "auto" else args.rle == "relative"
    t = read_table(p, ["ImageId", "EncodedPixels"], ds)
    rles = defaultdict(list)
    for r in t:
        rles[r["ImageId"]].append(r["EncodedPixels"])
    idx = index_images(root, (".dcm", ".png"))
    mask_dir = Path(args.out).parent / (Path(args.out).stem + "_masks")
    rows = []
    for image_id, encs in rles.items():
        img = idx.get(image_id)
        pos = [e for e in encs if e and e != "-1"]
        r = row(img, image_id, image_id, labels={"Pneumothorax": "1" if pos else "0"}, mask="")
        if img is not None:
            if img.suffix.lower() == ".dcm":  # the DICOM header carries the (anonymised) patient id
                import pydicom
                r["patient_id"] = str(pydicom.dcmread(str(img), stop_before_pixels=True).get("PatientID", image_id))
            if pos:
                h, w = image_size(img)
                m = np.zeros((h, w), np.uint8)
                for e in pos:
                    m |= rle_decode(e, h, w, relative)
                mask_dir.mkdir(parents=True, exist_ok=True)
                mp = mask_dir / f"{image_id}.png"
                import cv2
                cv2.imwrite(str(mp), m)
                r["mask"] = str(mp)
        rows.append(r)
    assign_splits(rows, split_fractions(args.fractions, (0.7, 0.15, 0.15)), args.seed)
    return rows


def convert_openi(root: Path, args) -> list[dict]:
    """Open-I / Indiana University CXR: ecgen-radiology/*.xml reports + NLMCXR_png images.

    Each XML has <AbstractText Label="FINDINGS|IMPRESSION|..."> sections, <MeSH><major> terms such as
    "Opacity/lung/base/left" or "normal" (the first component is the finding) and <parentImage id=...> for
    the linked images. Open-I is used for retrieval only (CXR-CLIP), so every row is test; a MeSH finding
    present in the study is 1, absent 0 ("normal" becomes "No Finding").
    """
    ds = "openi"
    xmls = sorted(glob.glob(str(root / "**" / "*.xml"), recursive=True))
    if not xmls:
        raise DataPrepError(f"{ds}: metadata file not found under {root}: expected the report XMLs "
                            f"(ecgen-radiology/*.xml from NLMCXR_reports.tgz)")
    idx = index_images(root, (".png", ".jpg"))
    studies = []
    for x in xmls:
        tree = ET.parse(x).getroot()
        uid = tree.find("uId")
        sid = uid.get("id") if uid is not None else Path(x).stem
        sec = {a.get("Label", "").upper(): " ".join((a.text or "").split()) for a in tree.iter("AbstractText")}
        terms = set()
        for m in tree.iter("major"):
            t = (m.text or "").split("/")[0].strip()
            if t:
                terms.add("No Finding" if t.lower() == "normal" else t[0].upper() + t[1:])
        imgs = [pi.get("id") for pi in tree.iter("parentImage") if pi.get("id")]
        studies.append((sid, sec.get("FINDINGS", ""), sec.get("IMPRESSION", ""), terms, imgs))
    names = sorted({t for s in studies for t in s[3]})
    rows = []
    for sid, fi, im, terms, imgs in studies:
        for i in imgs:
            rows.append(row(idx.get(i, root / "NLMCXR_png" / f"{i}.png"), sid, sid, "test", "", "chest", fi, im,
                            report_text(fi, im), {n: "1" if n in terms else "0" for n in names}))
    return rows


def convert_cxr_lt(root: Path, args) -> list[dict]:
    """CXR-LT (MICCAI challenge on MIMIC-CXR-JPG; 2024: 40 classes). A label CSV with dicom_id, subject_id,
    study_id and one 0/1 column per class (every non-id column is taken as a class, so the 2023 26-class
    and 2024 40-class files both work). CXR-CML: frontal views only, 80/20 train/test by patient, 5-fold
    cross-validation inside train (`fold` column 0..4, also by patient)."""
    ds = "cxr_lt"
    p = Path(args.labels) if args.labels else find_file(
        root, ["cxr-lt*/train*.csv", "train_labeled.csv", "cxr-lt*.csv", "train.csv"], ds)
    if not p.exists():
        raise DataPrepError(f"{ds}: metadata file not found: {p}")
    t = read_table(p, ["dicom_id", "subject_id", "study_id"], ds)
    meta_cols = {"dicom_id", "subject_id", "study_id", "fpath", "ViewPosition", "split", "view", "path"}
    names = [c for c in t[0] if c not in meta_cols] if t else []
    meta = mimic_metadata(root, ds, required=False)
    rows = []
    for r in t:
        view = (r.get("ViewPosition") or meta.get(r["dicom_id"], {}).get("ViewPosition", "")).upper()
        if (view or meta) and view not in ("AP", "PA"):
            continue  # frontal only (CXR-CML, Sec. 3); without any view information all rows are kept
        img = root / r["fpath"] if r.get("fpath") else mimic_image(root, r["subject_id"], r["study_id"], r["dicom_id"])
        rows.append(row(img, r["study_id"], r["subject_id"], "", view, "chest",
                        labels={n: chexpert_value(r[n] or "0") for n in names}))
    assign_splits(rows, split_fractions(args.fractions, (0.8, 0.0, 0.2)), args.seed)
    folds = {}
    train_pids = sorted({r["patient_id"] for r in rows if r["split"] == "train"})
    perm = np.random.default_rng(args.seed).permutation(len(train_pids))
    for i, j in enumerate(perm):
        folds[train_pids[j]] = str(i % 5)
    for r in rows:
        r["fold"] = folds.get(r["patient_id"], "")
    return rows


GRAZ_YOLO_CLASSES = ["boneanomaly", "bonelesion", "foreignbody", "fracture", "metal", "periostealreaction",
                     "pronatorsign", "softtissue", "text"]  # order of the data set's yolov5 meta.yaml


def convert_grazpedwri(root: Path, args) -> list[dict]:
    """GRAZPEDWRI-DX (figshare): dataset.csv (filestem, patient_id, projection 1=PA 2=lateral 3=oblique,
    fracture_visible 1/blank) + 16-bit PNGs. Fracture boxes from the YOLO labels (folder_structure/yolov5/
    labels/<filestem>.txt, normalised cx cy w h) are drawn into mask PNGs for PedCLIP's segmentation task.
    No official split: 70/15/15 by patient."""
    ds = "grazpedwri"
    t = read_table(find_file(root, ["dataset.csv"], ds), ["filestem", "patient_id", "fracture_visible"], ds)
    idx = index_images(root, (".png",))
    yolo = {Path(p).stem: Path(p) for p in glob.glob(str(root / "**" / "labels" / "*.txt"), recursive=True)}
    mask_dir = Path(args.out).parent / (Path(args.out).stem + "_masks")
    rows = []
    for r in t:
        img = idx.get(r["filestem"])
        view = {"1": "PA", "2": "LATERAL", "3": "OBLIQUE"}.get(r.get("projection", ""), "")
        rr = row(img, r["filestem"], r["patient_id"], "", view, "wrist",
                 labels={"Fracture": "1" if chexpert_value(r["fracture_visible"] or "0") == "1" else "0"}, mask="")
        lab = yolo.get(r["filestem"])
        if img is not None and lab is not None:
            h, w = image_size(img)
            m = np.zeros((h, w), np.uint8)
            for line in lab.read_text().splitlines():
                f = line.split()
                if len(f) >= 5 and int(f[0]) == GRAZ_YOLO_CLASSES.index("fracture"):
                    cx, cy, bw, bh = (float(x) for x in f[1:5])
                    x0, x1 = int(round((cx - bw / 2) * w)), int(round((cx + bw / 2) * w))
                    y0, y1 = int(round((cy - bh / 2) * h)), int(round((cy + bh / 2) * h))
                    m[max(y0, 0):y1, max(x0, 0):x1] = 255
            mask_dir.mkdir(parents=True, exist_ok=True)
            import cv2
            cv2.imwrite(str(mask_dir / f"{r['filestem']}.png"), m)
            rr["mask"] = str(mask_dir / f"{r['filestem']}.png")
        rows.append(rr)
    assign_splits(rows, split_fractions(args.fractions, (0.7, 0.15, 0.15)), args.seed)
    return rows


def convert_boneage(root: Path, args) -> list[dict]:
    """RSNA Pediatric Bone Age: boneage-training-dataset.csv (id, boneage in months, male). Only the training
    set has public labels on Kaggle, so it is split 70/15/15 (one image per child). `target` = months."""
    ds = "boneage"
    t = read_table(find_file(root, ["boneage-training-dataset.csv", "train.csv"], ds), ["id", "boneage", "male"], ds)
    idx = index_images(root, (".png", ".jpg"))
    rows = [row(idx.get(r["id"], root / "boneage-training-dataset" / f"{r['id']}.png"), r["id"], r["id"], "", "PA",
                "hand", target=r["boneage"], sex="M" if r["male"].lower() == "true" else "F") for r in t]
    assign_splits(rows, split_fractions(args.fractions, (0.7, 0.15, 0.15)), args.seed)
    return rows


def convert_covidx(root: Path, args) -> list[dict]:
    """COVIDx CXR (v9+): train.txt / val.txt / test.txt, space separated, no header:
    `patient_id filename class data_source`, class positive/negative (older: COVID-19/pneumonia/normal).
    D-MLM pools them and splits 70/20/10 by patient; images are in train/, val/ or test/."""
    ds = "covidx"
    rows = []
    for part in ("train", "val", "test"):
        p = find_file(root, [f"{part}.txt", f"{part}_COVIDx*.txt"], ds, required=(part != "val"))
        if p is None:
            continue
        for line in p.read_text().splitlines():
            f = line.split()
            if not f:
                continue
            if len(f) < 3:
                raise DataPrepError(f"{ds}: {p}: expected 'patient_id filename class [source]' per line, got {line!r}")
            pid, fn, cls = f[0], f[1], f[2].lower()
            rows.append(row(first_existing([root / part / fn, root / fn]), f"{pid}/{fn}", pid,
                            labels={"COVID-19": "1" if cls in ("positive", "covid-19", "covid") else "0"}))
    assign_splits(rows, split_fractions(args.fractions, (0.7, 0.2, 0.1)), args.seed)
    return rows


def convert_mimic_edema(root: Path, args) -> list[dict]:
    """Pulmonary edema severity (Chauhan/Liao et al., PhysioNet, derived from MIMIC-CXR): a CSV with
    subject_id, study_id, dicom_id, edema_severity 0-3; images from MIMIC-CXR-JPG under --root (or pass the
    CSV with --labels). `target` = grade; split 60/20/20 by patient (D-MLM)."""
    ds = "mimic_edema"
    p = Path(args.labels) if args.labels else find_file(root, ["edema_severity.csv", "**/edema_severity.csv"], ds)
    if not p.exists():
        raise DataPrepError(f"{ds}: metadata file not found: {p}")
    t = read_table(p, ["subject_id", "study_id", "dicom_id", "edema_severity"], ds)
    meta = mimic_metadata(root, ds, required=False)
    rows = [row(mimic_image(root, r["subject_id"], r["study_id"], r["dicom_id"]), r["study_id"], r["subject_id"], "",
                meta.get(r["dicom_id"], {}).get("ViewPosition", "").upper(), "chest", target=str(int(float(r["edema_severity"]))))
            for r in t]
    assign_splits(rows, split_fractions(args.fractions, (0.6, 0.2, 0.2)), args.seed)
    return rows


def convert_chd_cxr(root: Path, args) -> list[dict]:
    """CHD-CXR (pediatric congenital heart disease, 828 images): one folder per class (e.g. ASD, VSD, PDA,
    Normal), images inside; one-vs-rest labels per class. No patient ids are published, so each image is its
    own patient; 70/15/15. A class folder named Normal/normal only sets its rows' other labels to 0."""
    ds = "chd_cxr"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and index_images(d))
    if not classes:
        raise DataPrepError(f"{ds}: no class folders with images under {root} (expected <class>/<image>.png)")
    names = [c for c in classes if c.lower() != "normal"]
    rows = []
    for c in classes:
        for stem, p in sorted(index_images(root / c).items()):
            rows.append(row(p, f"{c}/{stem}", f"{c}/{stem}", labels={n: "1" if n == c else "0" for n in names}))
    assign_splits(rows, split_fractions(args.fractions, (0.7, 0.15, 0.15)), args.seed)
    return rows


CONVERTERS = {
    "mimic_cxr": convert_mimic_cxr,
    "chexpert": convert_chexpert,
    "chexpert5x200": convert_chexpert5x200,
    "nih": convert_nih,
    "vindr_cxr": convert_vindr,
    "vindr_pcxr": convert_vindr_pcxr,
    "rsna_pneumonia": convert_rsna_pneumonia,
    "siim": convert_siim,
    "openi": convert_openi,
    "cxr_lt": convert_cxr_lt,
    "grazpedwri": convert_grazpedwri,
    "boneage": convert_boneage,
    "covidx": convert_covidx,
    "mimic_edema": convert_mimic_edema,
    "chd_cxr": convert_chd_cxr,
}


# ----------------------------------------------------------------------------------------------------
# ---- writing: missing images, optional resized copies, relative paths, summary ----

def _write_image(dst: str, img: np.ndarray, quality: int):
    """PNG / JPEG by dst's suffix, through a temporary name: a killed run leaves no half-written file that a
    rerun would trust (a rerun skips every dst that exists)."""
    import cv2
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp" + os.path.splitext(dst)[1]
    if not cv2.imwrite(tmp, img, [cv2.IMWRITE_JPEG_QUALITY, quality] if dst.endswith(".jpg") else []):
        raise OSError(f"{dst}: cv2.imwrite failed (disk full or the folder is not writable?)")
    os.replace(tmp, dst)


def _resize_one(job):
    """Worker: (src, dst, mask_src, mask_dst, size, quality) -> (ok, message)."""
    import cv2
    src, dst, msrc, mdst, size, quality = job
    try:
        if not os.path.exists(dst):
            img = common.load_image(src)
            s = size / min(img.shape)
            if s < 1:  # never upscale
                img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
            _write_image(dst, img, quality)
        if msrc and not os.path.exists(mdst):
            h, w = cv2.imread(dst, cv2.IMREAD_GRAYSCALE).shape
            m = cv2.imread(msrc, cv2.IMREAD_GRAYSCALE)
            os.makedirs(os.path.dirname(mdst), exist_ok=True)
            cv2.imwrite(mdst, cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST))
        return True, ""
    except common.BadImageError as e:
        return False, str(e)


# --decode_device=cuda: JPEG decoding on the GPU (nvJPEG through torchvision.io.decode_jpeg).
# At MIMIC scale the one-time resize is the slow step of the whole input pipeline: 377k JPEGs of about
# 2500 x 3000 pixels, and PIL decodes and shrinks about 24 of them a second per core (`bench_decode` below
# measures it; README "Decoding the originals"). Training afterwards reads the 512 px copies, about 18 times
# faster per core, so this one-time step is where GPU decoding pays. Batches of raw file bytes are read by threads, decoded in one call on the device, shrunk
# there with an area filter (as cv2.INTER_AREA does on the CPU path) and encoded to PNG / JPEG by threads.
# Anything the device cannot decode (a lossless or 12-bit JPEG, a corrupt file) is left to the CPU path, which
# either reads it or reports it as unreadable by name: nothing is skipped silently.
JPEG_EXTS = (".jpg", ".jpeg")


def torchvision_decode_jpeg(datas: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """Raw JPEG bytes (1-D uint8 CPU tensors) -> [1, H, W] uint8 grayscale tensors on `device`.

    One batched call: on CUDA a list is decoded much faster than one call per image (torchvision docs), and
    a batch with one bad file raises for the whole batch, which `decode_shrink_batch` handles.
    """
    common.require_torchvision()
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(datas, mode=ImageReadMode.GRAY, device=device)


def _read_bytes(path: str) -> torch.Tensor | None:
    try:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    except OSError:
        return None  # the CPU path reads it again and reports the error with the file name


def shrink(img: torch.Tensor, size: int) -> np.ndarray:
    """[1, H, W] uint8 (any device) -> uint8 [h, w] numpy with shorter side `size`; never upscales.

    mode="area" averages each output pixel's input footprint, the filter of the CPU path's cv2.INTER_AREA. At
    non-integer scales torch's windows are whole pixels where OpenCV weights the partial edge pixels: on
    radiograph-like (smooth) content the two differ by under one grey level on average (tested)."""
    h, w = img.shape[-2:]
    s = size / min(h, w)
    if s < 1:
        x = torch.nn.functional.interpolate(img[None].float(), size=(round(h * s), round(w * s)), mode="area")
        img = x.round_().clamp_(0, 255).to(torch.uint8)[0]
    return img[0].cpu().numpy()


def decode_shrink_batch(paths: list[str], size: int, device: str, decode=torchvision_decode_jpeg,
                        io_pool=None) -> list[np.ndarray | None]:
    """Read, decode on `device` and shrink a batch of JPEGs; None where the device could not (CPU retries)."""
    datas = list(io_pool.map(_read_bytes, paths) if io_pool else map(_read_bytes, paths))
    ok = [i for i, d in enumerate(datas) if d is not None and d.numel() > 0]
    out: list[np.ndarray | None] = [None] * len(paths)
    try:
        imgs = decode([datas[i] for i in ok], device) if ok else []
    except RuntimeError:  # one bad file fails the whole batched call: decode one by one to find it
        imgs = []
        for i in ok:
            try:
                imgs.append(decode([datas[i]], device)[0])
            except RuntimeError:
                imgs.append(None)
    for i, im in zip(ok, imgs):
        if im is not None:
            out[i] = shrink(im, size)
    return out


def resize_on_device(jobs: list[tuple], size: int, device: str, workers: int, batch_size: int = 32,
                     decode=torchvision_decode_jpeg) -> int:
    """Write the resized copies of the JPEG jobs whose copy is missing, decoding on `device`; returns how many
    were written. The rest (other formats, failures) is left for the CPU pass that follows."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [j for j in jobs if j[0].lower().endswith(JPEG_EXTS) and not os.path.exists(j[1])]
    written = 0
    # threads, not processes: file reads and cv2's PNG / JPEG encoders release the GIL
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = []
        for b in tqdm(range(0, len(todo), batch_size), desc=f"decode on {device}, resize to {size}",
                      dynamic_ncols=True, disable=not todo):
            batch = todo[b:b + batch_size]
            imgs = decode_shrink_batch([j[0] for j in batch], size, device, decode, pool)
            pending += [pool.submit(_write_image, j[1], im, j[5]) for j, im in zip(batch, imgs) if im is not None]
            if len(pending) > 4 * batch_size:  # bound the decoded images held in memory
                written += _wait_all(pending)
                pending = []
        written += _wait_all(pending)
    return written


def _wait_all(futures) -> int:
    for f in futures:
        f.result()  # a failed write (disk full) raises here, in the main thread
    return len(futures)


def resize_copies(rows: list[dict], root: Path, out_dir: Path, size: int, fmt: str, workers: int,
                  decode_device: str = "", decode=torchvision_decode_jpeg) -> list[str]:
    """Write <out_dir>/<csv stem>_<size>/<path under root>.<fmt> once per image; return the error per row.

    decode_device="cuda": JPEGs are decoded there first (resize_on_device); the CPU pass then only does
    masks, non-JPEG files and whatever the device could not decode."""
    jobs = []
    for r in rows:
        src = Path(r["image"])
        rel = src.relative_to(root) if src.is_relative_to(root) else Path(src.name)
        dst = out_dir / rel.with_suffix("." + fmt)
        mdst = out_dir / "masks" / rel.with_suffix(".png") if r.get("mask") else ""
        jobs.append((str(src), str(dst), r.get("mask") or "", str(mdst), size, 95))
    errors = [""] * len(rows)
    if decode_device:
        n = resize_on_device(jobs, size, decode_device, workers, decode=decode)
        print(f"decoded and resized {n} JPEGs on {decode_device}; the CPU pass does the rest")
    pool = Pool(workers) if workers > 1 else None
    try:
        it = pool.imap(_resize_one, jobs, chunksize=16) if pool else map(_resize_one, jobs)
        for i, (ok, msg) in enumerate(tqdm(it, total=len(jobs), desc=f"resize to {size}", dynamic_ncols=True)):
            errors[i] = "" if ok else msg
            if ok:
                rows[i]["image"] = jobs[i][1]
                if jobs[i][2]:
                    rows[i]["mask"] = jobs[i][3]
    finally:
        if pool:
            pool.close()
            pool.join()
    return errors


def _decode_shrink_cpu(job) -> bool:
    """bench_decode's CPU path: the same work as _resize_one without the write (PIL decode, cv2 INTER_AREA)."""
    import cv2
    path, size = job
    img = common.load_image(path)
    s = size / min(img.shape)
    if s < 1:
        cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
    return True


def synthetic_jpegs(out_dir: Path, n: int, h: int, w: int, seed: int = 0) -> list[str]:
    """n grayscale JPEGs (quality 95) of h x w with radiograph-like content: a smooth field plus film noise,
    which compresses about as real chest films do (a flat image would decode unrealistically fast)."""
    import cv2
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        low = cv2.resize(rng.uniform(30, 220, (max(2, h // 64), max(2, w // 64))).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_CUBIC)
        img = np.clip(low + rng.normal(0, 2, (h, w)), 0, 255).astype(np.uint8)
        paths.append(str(out_dir / f"synthetic_{i:04d}.jpg"))
        cv2.imwrite(paths[-1], img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return paths


def bench_decode(paths: list[str], size: int, workers: list[int], decode_device: str = "", batch_size: int = 32,
                 decode=torchvision_decode_jpeg) -> list[dict]:
    """Images/s of decode + shrink to `size` (no write), per CPU worker count and on `decode_device`; and, for
    comparison, of reading back the resized PNG copies, which is what training decodes."""
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor
    mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
    print(f"bench_decode: {len(paths)} JPEGs, {mb:.2f} MiB each on average, shrunk to shorter side {size}")
    rows = []

    def cpu_rows(files, what):
        for w in workers:
            jobs = [(p, size) for p in files]
            pool = Pool(w)  # started (and warmed on one image per worker) before the clock starts
            try:
                pool.map(_decode_shrink_cpu, jobs[:w], chunksize=1)
                t0 = time.perf_counter()
                pool.map(_decode_shrink_cpu, jobs, chunksize=1)
                dt = time.perf_counter() - t0
            finally:  # close + join: workers exit on their own (terminate() would rely on SIGTERM)
                pool.close()
                pool.join()
            rows.append({"decoder": f"{what}, PIL, {w} processes", "images_per_s": len(files) / dt})
            print(f"  {rows[-1]['decoder']:<48} {rows[-1]['images_per_s']:8.1f} images/s")

    cpu_rows(paths, "original JPEG")
    with tempfile.TemporaryDirectory() as d:  # what training reads afterwards: the --resize PNG copies
        copies = [os.path.join(d, f"{i}.png") for i in range(len(paths))]
        for p, c in zip(paths, copies):
            _resize_one((p, c, "", "", size, 95))
        cpu_rows(copies, f"resized {size} PNG copy")
    if decode_device:
        try:
            if decode is torchvision_decode_jpeg:  # a stand-in decoder (tests) needs no torchvision
                check_decode_device(decode_device, size)
        except DataPrepError as e:
            print(f"  {decode_device}: not measured: {e}")
            return rows
        sync = torch.cuda.synchronize if decode_device.startswith("cuda") else (lambda: None)
        with ThreadPoolExecutor(max(workers)) as io:
            decode_shrink_batch(paths[:batch_size], size, decode_device, decode, io)  # decoder start-up
            sync()
            t0 = time.perf_counter()
            for b in range(0, len(paths), batch_size):
                imgs = decode_shrink_batch(paths[b:b + batch_size], size, decode_device, decode, io)
                if any(im is None for im in imgs):
                    raise DataPrepError(f"bench_decode: {decode_device} could not decode some of {paths[b:b + 2]}...")
            dt = time.perf_counter() - t0
        rows.append({"decoder": f"original JPEG, decode_jpeg on {decode_device}, batch {batch_size}",
                     "images_per_s": len(paths) / dt})
        print(f"  {rows[-1]['decoder']:<48} {rows[-1]['images_per_s']:8.1f} images/s")
    return rows


def finish(dataset: str, rows: list[dict], args) -> dict:
    """Skip rows whose image is missing (counted), resize if asked, write the CSV, print the summary."""
    out = Path(args.out).resolve()
    out_dir = out.parent
    kept, missing = [], 0
    for r in rows:
        if r["image"] and Path(r["image"]).exists():
            kept.append(r)
        else:
            missing += 1
    unreadable = 0
    if args.resize:
        errs = resize_copies(kept, Path(args.root).resolve(), out_dir / f"{out.stem}_{args.resize}",
                             args.resize, args.resize_format, args.workers, args.decode_device)
        for e in filter(None, errs):
            print(f"warning: skipped unreadable image: {e}", file=sys.stderr)
        unreadable = sum(bool(e) for e in errs)
        kept = [r for r, e in zip(kept, errs) if not e]
    for r in kept:
        r["image"] = os.path.relpath(r["image"], out_dir)
        if r.get("mask"):
            r["mask"] = os.path.relpath(r["mask"], out_dir)
    labels = sorted({k for r in kept for k in r if k.startswith(LP)}, key=lambda k: k.lower())
    extra = sorted({k for r in kept for k in r} - set(BASE_COLUMNS) - set(labels))
    columns = BASE_COLUMNS + labels + extra
    common.write_csv_atomic(out, kept, columns)

    counts = {sp: Counter() for sp in ("train", "valid", "test")}
    nrows = Counter(r["split"] for r in kept)
    for r in kept:
        c = counts.setdefault(r["split"], Counter())
        for k in labels:
            if r.get(k) == "1":
                c[k] += 1
    print(f"{dataset}: wrote {len(kept)} rows to {out}; skipped {missing} with a missing image"
          + (f", {unreadable} unreadable" if args.resize else ""))
    splits = [s for s in counts if nrows[s]]
    print(f"  {'rows':<32}" + "".join(f"{s:>9}" for s in splits))
    print(f"  {'':<32}" + "".join(f"{nrows[s]:>9}" for s in splits))
    for k in labels:
        print(f"  {k[len(LP):][:32]:<32}" + "".join(f"{counts[s][k]:>9}" for s in splits))
    return {"written": len(kept), "skipped_missing": missing, "skipped_unreadable": unreadable,
            "rows_per_split": dict(nrows), "positives": {s: dict(counts[s]) for s in splits}}


def check_decode_device(device: str, resize: int):
    """--decode_device: only with --resize, a device that exists, and a torchvision that imports."""
    if not device:
        return
    if not resize:
        raise DataPrepError(f"--decode_device={device} only applies to --resize=N (the resized copies); add "
                            f"--resize=512, say, or drop --decode_device")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # "Torch not compiled with CUDA enabled", invalid ordinal, ...
        raise DataPrepError(f"--decode_device={device}: no such device here ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]}). Leave it out to decode with PIL on --workers CPU "
                            f"processes.") from None
    try:
        common.require_torchvision()
    except RuntimeError as e:
        raise DataPrepError(f"--decode_device={device} decodes with torchvision.io.decode_jpeg: {e}") from None


def run_converter(dataset: str, args) -> dict:
    root = Path(args.root).resolve()
    if not root.is_dir():
        raise DataPrepError(f"{dataset}: --root={args.root} is not a folder")
    check_decode_device(args.decode_device, args.resize)  # before the converter's long scan, not after it
    return finish(dataset, CONVERTERS[dataset](root, args), args)


# ----------------------------------------------------------------------------------------------------
# ---- local Hugging Face models (text steps) ----

def load_hf(kind: str, name: str, flag: str):
    """(tokenizer, model) from a local folder or the local cache only; fails at once with what to pass."""
    import transformers
    cls = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = cls.from_pretrained(name, local_files_only=True).eval()
    except (OSError, ValueError, ImportError) as e:
        raise DataPrepError(
            f"cannot load the {kind} model '{name}' given by {flag} from local files (local_files_only=True; "
            f"this script never downloads): {type(e).__name__}: {str(e).splitlines()[0][:200]}. Pass {flag}=<folder "
            f"with config.json, weights and tokenizer files> or a name already in the Hugging Face cache "
            f"(huggingface-cli download {name} on a machine with network).") from None
    if kind == "causal":
        tok.padding_side = "left"  # decoder-only generation continues from the right end of every prompt
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return tok, model


def make_generate(tok, model, max_new_tokens: int, chat: bool = True):
    """prompts -> answers with greedy decoding; chat template when the tokenizer has one (instruct models)."""
    import torch

    def generate(prompts: list[str]) -> list[str]:
        if chat and getattr(tok, "chat_template", None):
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=limit - max_new_tokens)
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return [s.strip() for s in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return generate


def make_translate(tok, model, max_new_tokens: int):
    import torch

    def translate(texts: list[str]) -> list[str]:
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]
    return translate


def read_csv_rows(path: str) -> tuple[list[dict], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        return [dict(r) for r in rd], list(rd.fieldnames or [])


def batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ----------------------------------------------------------------------------------------------------
# ---- PedCLIP body-part excerpts (Sec. 2.1, Fig. 2) ----

# One prompt does both steps of Sec. 2.1: drop history/context, then copy out each body part's text.
BODYPART_PROMPT = (
    "You are given a radiology report of one case with X-rays of these body parts: {parts}.\n"
    "First ignore the medical history, the clinical indication and other context that is not an imaging "
    "finding. Then, for each body part, copy the sentences of the report that describe that body part's X-ray.\n"
    "Answer with exactly one line per body part, in the form '<body part>: <text>', and nothing else. "
    "Write 'none' if the report says nothing about a body part.\n\n"
    "Report:\n{report}\n\nAnswer:\n")

BODYPART_KEYWORDS = {  # rule-based fallback; a sentence is assigned to the parts whose words it contains
    "chest": ["chest", "lung", "pulmonary", "heart", "cardiac", "cardiomediastinal", "pleural", "thorax", "thoracic",
              "rib", "diaphragm", "hilar", "mediastin", "pneumo", "airspace"],
    "abdomen": ["abdomen", "abdominal", "bowel", "stomach", "liver", "colon", "kidney"],
    "pelvis": ["pelvis", "pelvic", "sacroiliac", "sacrum", "iliac"],
    "hip": ["hip", "femoral head", "acetabul", "femoral neck", "trochanter"],
    "knee": ["knee", "patella", "tibial plateau", "femoral condyle", "joint effusion of the knee"],
    "ankle": ["ankle", "malleol", "talus", "talar"],
    "foot": ["foot", "feet", "metatars", "calcane", "toe"],
    "hand": ["hand", "metacarp", "phalan", "finger", "thumb"],
    "wrist": ["wrist", "carpal", "scaphoid", "distal radius", "distal ulna", "radius", "ulna"],
    "elbow": ["elbow", "olecranon", "radial head", "humeral condyle"],
    "forearm": ["forearm"],
    "shoulder": ["shoulder", "glenohumeral", "acromio", "humeral head"],
    "humerus": ["humerus", "humeral shaft"],
    "femur": ["femur", "femoral shaft"],
    "tibia": ["tibia", "fibula", "lower leg"],
    "spine": ["spine", "spinal", "vertebra", "lumbar", "cervical", "scoliosis"],
    "skull": ["skull", "cranial", "calvari"],
}
# a header starts a line or follows the end of a sentence: "HISTORY: ... Right hip: ... LEFT KNEE: ..."
HEADER_RE = re.compile(r"(?:^|(?<=[.!?])[ \t]+)\s*([A-Za-z][A-Za-z ,/()\-]{1,39}):\s*", re.MULTILINE)


def _parts_in(text: str, parts: list[str]) -> list[str]:
    t = " " + text.lower() + " "
    return [p for p in parts if any(re.search(r"\b" + re.escape(k), t) for k in BODYPART_KEYWORDS.get(p, [p]) + [p])]


def split_report_by_rules(report: str, parts: list[str]) -> dict[str, str]:
    """Rule-based excerpts: section headers naming a body part set the current part; a sentence that
    names parts goes to those parts (and sets the current part if it names one); other sentences go to the
    current part, or to every part when no part has been named yet (general statements)."""
    out = {p: [] for p in parts}
    current: list[str] = []
    pieces = []  # (header or None, text)
    last = 0
    for m in HEADER_RE.finditer(report):
        pieces.append((None, report[last:m.start()]))
        pieces.append((m.group(1), ""))
        last = m.end()
    pieces.append((None, report[last:]))
    for header, text in pieces:
        if header is not None:
            named = _parts_in(header, parts)
            if named:
                current = named
            elif re.search(r"history|indication|clinical|comparison|technique", header, re.I):
                current = ["__skip__"]  # Sec. 2.1: medical history and context are removed
            continue
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if not s:
                continue
            named = _parts_in(s, parts)
            if named:
                current = named
            if current == ["__skip__"] and not named:
                continue
            for p in (named or current or parts):
                if p in out:
                    out[p].append(s)
    return {p: " ".join(v) for p, v in out.items()}


def parse_bodypart_answer(answer: str, parts: list[str]) -> dict[str, str] | None:
    """'<part>: <text>' lines -> {part: text}; None (fallback) unless every requested part has a line."""
    got = {}
    for line in answer.splitlines():
        m = re.match(r"^\s*[-*]?\s*\**([A-Za-z ]+?)\**\s*:\s*(.*)$", line)
        if m and m.group(1).strip().lower() in parts:
            txt = m.group(2).strip()
            got[m.group(1).strip().lower()] = "" if txt.lower().rstrip(".") in ("none", "n/a", "") else txt
    return got if all(p in got for p in parts) else None


def extract_bodyparts(csv_path: str, generate, batch_size: int = 8, save_every: int = 10) -> dict:
    """Fill `excerpt` (and `excerpt_source` = llm / rules / empty) for every row, grouped by study.

    The text is each row's `report`, or findings + impression when `report` is blank. `generate` maps prompts
    to answers (None: rules only). Studies whose rows all have `excerpt_source` are skipped (resume).
    """
    rows, cols = read_csv_rows(csv_path)
    for c in ("excerpt", "excerpt_source"):
        if c not in cols:
            cols.append(c)
    studies = defaultdict(list)
    for i, r in enumerate(rows):
        studies[r.get("study_id") or f"row{i}"].append(i)
    todo = [s for s, ii in studies.items() if any(not rows[i].get("excerpt_source") for i in ii)]
    stats = Counter(skipped_done=len(studies) - len(todo))

    def text_of(i):
        r = rows[i]
        return r.get("report") or report_text(r.get("findings", ""), r.get("impression", ""))

    for b, group in enumerate(tqdm(list(batches(todo, batch_size)), desc="body-part excerpts", dynamic_ncols=True)):
        info = []
        for s in group:
            ii = studies[s]
            parts = sorted({(rows[i].get("body_part") or "").strip().lower() for i in ii} - {""}) or ["unknown"]
            info.append((s, ii, parts, text_of(ii[0])))
        asks = [k for k, (_, _, parts, text) in enumerate(info) if text.strip() and len(parts) > 1]
        answers = dict(zip(asks, generate([BODYPART_PROMPT.format(parts=", ".join(info[k][2]), report=info[k][3])
                                           for k in asks]))) if generate and asks else {}
        for k, (s, ii, parts, text) in enumerate(info):
            if not text.strip():
                got, src = {p: "" for p in parts}, "empty"
            elif len(parts) == 1:  # one body part: the whole report is its excerpt (no model needed)
                got, src = {parts[0]: " ".join(text.split())}, "single"
            else:
                got = parse_bodypart_answer(answers[k], parts) if k in answers else None
                src = "llm"
                if got is None:
                    got, src = split_report_by_rules(text, parts), "rules"
                    stats["fallback_unparsed" if k in answers else "rules_no_model"] += 1
            stats[src] += 1
            for i in ii:
                rows[i]["excerpt"] = got.get((rows[i].get("body_part") or "").strip().lower(), "") or got.get("unknown", "")
                rows[i]["excerpt_source"] = src
        if (b + 1) % save_every == 0:
            common.write_csv_atomic(csv_path, rows, cols)
    common.write_csv_atomic(csv_path, rows, cols)
    print(f"extract_bodyparts: {dict(stats)} (studies; 'rules' counts fallbacks)")
    return dict(stats)


# ----------------------------------------------------------------------------------------------------
# ---- D-MLM knowledge: definition and appearance per finding (Sec. 2.1, the paper's two prompts) ----

DEFINITION_PROMPT = "Define {name}. Give me only a single paragraph and short definition of the disease."
APPEARANCE_PROMPT = "What are the distinguishing radiographic signs of {name} compared to other similar conditions?"


def clean_answer(text: str, prefix: str) -> str:
    """Strip the answer prefix the paper's model returns ("Definition: ...", "Radiographic characteristics: ...")."""
    t = " ".join(text.split())
    return re.sub(r"^\**\s*" + prefix + r"\s*\**\s*:\s*\**\s*", "", t, flags=re.I).strip()


def finding_names(spec: str) -> list[str]:
    """--findings: a CSV (its label:<Name> columns), a text file (one per line) or a comma-separated list."""
    if os.path.isfile(spec):
        if spec.endswith(".csv"):
            with open(spec, newline="", encoding="utf-8") as f:
                return [c[len(LP):] for c in next(csv.reader(f)) if c.startswith(LP)]
        return [l.strip() for l in Path(spec).read_text().splitlines() if l.strip()]
    return [s.strip() for s in spec.split(",") if s.strip()]


def build_knowledge(names: list[str], generate, out_path: str, batch_size: int = 8) -> dict:
    """{"<Finding>": {"definition": ..., "appearance": ...}} written atomically after every batch; findings
    already complete in out_path are kept (resume). Underscores in label names become spaces in prompts."""
    know = json.loads(Path(out_path).read_text()) if os.path.exists(out_path) else {}
    todo = [n for n in names if not (know.get(n, {}).get("definition") and know.get(n, {}).get("appearance"))]
    stats = Counter(skipped_done=len(names) - len(todo))
    for group in tqdm(list(batches(todo, batch_size)), desc="knowledge", dynamic_ncols=True):
        readable = [n.replace("_", " ") for n in group]
        defs = generate([DEFINITION_PROMPT.format(name=n) for n in readable])
        apps = generate([APPEARANCE_PROMPT.format(name=n) for n in readable])
        for n, d, a in zip(group, defs, apps):
            d, a = clean_answer(d, "definition"), clean_answer(a, "radiographic characteristics")
            if d and a:
                know[n] = {"definition": d, "appearance": a}
                stats["done"] += 1
            else:
                stats["empty_answer"] += 1  # left out, so a rerun asks again
        common.write_json_atomic(out_path, know)
    common.write_json_atomic(out_path, know)
    print(f"knowledge: {dict(stats)} -> {out_path}")
    return dict(stats)


# ----------------------------------------------------------------------------------------------------
# ---- CXR-CLIP back-translation, English -> Italian -> English (Sec. 3.2, text augmentation A_t) ----

def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def backtranslate(csv_path: str, en_it, it_en, columns=("findings", "impression"), batch_size: int = 32,
                  rows_per_chunk: int = 512) -> dict:
    """Fill <col>_bt for each column. Sentence by sentence: translation models are trained on sentences,
    and report sentences repeat a lot ("No pneumothorax."), so each unique sentence is translated once per
    chunk of rows. Rows with <col>_bt filled are skipped (resume); the CSV is saved after every chunk. An empty
    translation keeps the original sentence (counted), so the column is never left blank for a non-empty text."""
    rows, cols = read_csv_rows(csv_path)
    for c in columns:
        if c not in cols:
            raise DataPrepError(f"backtranslate: {csv_path}: missing column '{c}'")
        if c + "_bt" not in cols:
            cols.append(c + "_bt")
    todo = [i for i, r in enumerate(rows) if any(r.get(c, "").strip() and not r.get(c + "_bt") for c in columns)]
    stats = Counter(rows_skipped_done=len(rows) - len(todo))
    bar = tqdm(total=len(todo), desc="back-translation", dynamic_ncols=True)
    for chunk in batches(todo, rows_per_chunk):
        sents = sorted({s for i in chunk for c in columns if not rows[i].get(c + "_bt")
                        for s in split_sentences(rows[i].get(c, ""))})
        back = {}
        for group in batches(sents, batch_size):
            it = en_it(group)
            en = it_en([t or s for t, s in zip(it, group)])
            for s, t in zip(group, en):
                if not t:
                    stats["empty_translation"] += 1
                back[s] = t or s
        for i in chunk:
            for c in columns:
                if rows[i].get(c, "").strip() and not rows[i].get(c + "_bt"):
                    rows[i][c + "_bt"] = " ".join(back[s] for s in split_sentences(rows[i][c]))
        stats["rows_done"] += len(chunk)
        stats["sentences"] += len(sents)
        common.write_csv_atomic(csv_path, rows, cols)
        bar.update(len(chunk))
    bar.close()
    common.write_csv_atomic(csv_path, rows, cols)
    print(f"backtranslate: {dict(stats)}")
    return dict(stats)


# ----------------------------------------------------------------------------------------------------
# ---- CLI ----

def run_bench_decode(args) -> list[dict]:
    import tempfile
    try:
        workers = [int(w) for w in args.workers.split(",")]
        h, w = (int(v) for v in args.synthetic.lower().split("x"))
    except ValueError:
        raise DataPrepError(f"bench_decode: --workers={args.workers} must be comma-separated integers and "
                            f"--synthetic={args.synthetic} HxW, like 3056x2544") from None
    if args.images:
        paths = sorted(p for p in glob.glob(os.path.join(args.images, "**", "*"), recursive=True)
                       if p.lower().endswith(JPEG_EXTS))[:args.n]
        if not paths:
            raise DataPrepError(f"bench_decode: no .jpg / .jpeg files under --images={args.images}")
        return bench_decode(paths, args.size, workers, args.decode_device, args.batch_size)
    with tempfile.TemporaryDirectory() as d:
        print(f"bench_decode: writing {args.n} synthetic {h}x{w} JPEGs (pass --images=<folder> for real ones)")
        return bench_decode(synthetic_jpegs(Path(d), args.n, h, w), args.size, workers, args.decode_device,
                            args.batch_size)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn in CONVERTERS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().split("\n")[0])
        p.add_argument("--root", required=True, help="the downloaded data set folder, as published")
        p.add_argument("--out", required=True, help="output CSV; image paths are written relative to it")
        p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
        p.add_argument("--fractions", default=None, help="train,valid,test fractions (default: the paper's)")
        p.add_argument("--resize", type=int, default=0, help="write copies with shorter side N (0: keep originals)")
        p.add_argument("--resize_format", choices=["png", "jpg"], default="png")
        p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
        p.add_argument("--decode_device", default="", help="--resize: decode JPEGs in batches on this device "
                       "with torchvision.io.decode_jpeg (cuda: nvJPEG); default: PIL in --workers processes")
        p.add_argument("--reports", default=None, help="mimic_cxr: folder holding files/pXX/pN/sN.txt reports")
        p.add_argument("--labels", default=None, help="cxr_lt / mimic_edema: the label CSV if not under --root")
        p.add_argument("--rle", choices=["auto", "relative", "absolute"], default="auto",
                       help="siim: RLE form (auto: train-rle.csv relative, stage_2_train.csv absolute)")
    p = sub.add_parser("bench_decode", help="--resize's decode speed: PIL per worker count vs decode_jpeg on GPU")
    p.add_argument("--images", default=None, help="a folder of JPEGs (searched recursively); default: synthetic")
    p.add_argument("--synthetic", default="3056x2544", help="HxW of the synthetic JPEGs (a MIMIC-CXR-JPG film)")
    p.add_argument("--n", type=int, default=64, help="images to decode")
    p.add_argument("--size", type=int, default=512, help="shorter side after the shrink")
    p.add_argument("--workers", default="1,2,4,8", help="CPU process counts to time, comma-separated")
    p.add_argument("--decode_device", default="", help="also time torchvision.io.decode_jpeg on it (cuda)")
    p.add_argument("--batch_size", type=int, default=32)
    p = sub.add_parser("extract_bodyparts", help="PedCLIP Sec. 2.1: body-part excerpts of multi-part reports")
    p.add_argument("--csv", required=True)
    p.add_argument("--model", default=None, help="local causal LM (folder or cached name); omit for rules only")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p = sub.add_parser("knowledge", help="D-MLM: definition + appearance per finding -> JSON")
    p.add_argument("--findings", required=True, help="a CSV (its label columns), a text file or 'A,B,C'")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p = sub.add_parser("backtranslate", help="CXR-CLIP: EN->IT->EN into findings_bt / impression_bt")
    p.add_argument("--csv", required=True)
    p.add_argument("--en_it", required=True, help="English->Italian model, e.g. Helsinki-NLP/opus-mt-en-it")
    p.add_argument("--it_en", required=True, help="Italian->English model, e.g. Helsinki-NLP/opus-mt-it-en")
    p.add_argument("--columns", default="findings,impression")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=256)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command in CONVERTERS:
            return run_converter(args.command, args)
        if args.command == "bench_decode":
            return run_bench_decode(args)
        if args.command == "extract_bodyparts":
            gen = make_generate(*load_hf("causal", args.model, "--model"), args.max_new_tokens) if args.model else None
            return extract_bodyparts(args.csv, gen, args.batch_size)
        if args.command == "knowledge":
            gen = make_generate(*load_hf("causal", args.model, "--model"), args.max_new_tokens)
            return build_knowledge(finding_names(args.findings), gen, args.out, args.batch_size)
        if args.command == "backtranslate":
            en_it = make_translate(*load_hf("seq2seq", args.en_it, "--en_it"), args.max_new_tokens)
            it_en = make_translate(*load_hf("seq2seq", args.it_en, "--it_en"), args.max_new_tokens)
            return backtranslate(args.csv, en_it, it_en, tuple(args.columns.split(",")), args.batch_size)
    except DataPrepError as e:
        if argv is not None:  # called from Python (tests): let the caller see the exception
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
