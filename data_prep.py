"""
data_prep.py: the public data sets of the four papers, read exactly as published, -> the project's CSV schema.
(The text steps that need a language model are in text_prep.py.)

The schema: one row per image with `image` (a path relative to the CSV), `study_id`, `patient_id`, `split`
(train / valid / test, always by patient), `view`, `body_part`, `findings`, `impression`, `report`,
`label:<Name>` (1 positive, 0 negative, -1 uncertain, blank not mentioned), `dataset` (the data set below that
wrote the row, so a merged CSV keeps each row's source), and `mask` / `target` where the data set has a
segmentation or regression task.

    python data_prep.py <data set> --root=<folder as downloaded> [--out=data/<data set>.csv] [--resize=512]
    python data_prep.py <data set> --help     # the files it reads and the split it writes

    data set         reads                                                split written
    mimic_cxr        MIMIC-CXR-JPG 2.x metadata, split, CheXpert labels   MIMIC's official split
                     + MIMIC-CXR reports (--reports)
    chexpert         CheXpert v1.0 train.csv, valid.csv                   D-MLM 80/20 (or CXR-CLIP's)
    chexpert5x200    GLoRIA's chexpert_5x200.csv                          all test
    nih              ChestX-ray14 Data_Entry_2017.csv + official lists    train_val 80/20, test_list
    vindr_cxr        VinDr-CXR image_labels_{train,test}.csv              train 80/20, official test
    vindr_pcxr       VinDr-PCXR image_labels_{train,test}.csv             train 80/20, official test
    rsna_pneumonia   stage_2_train_labels.csv (boxes -> masks)            70/15/15
    siim             stage_2_train.csv / train-rle.csv (RLE -> masks)     70/15/15
    openi            ecgen-radiology/*.xml, PNGs, view from the DICOMs    all test
    cxr_lt           CXR-LT 2024 train_labeled.csv (frontal images)       CXR-CML's 80:20 (or MIMIC's)
    mimic_edema      edema severity grades (regex + consensus)            consensus images = test
    grazpedwri       GRAZPEDWRI-DX dataset.csv + YOLO boxes -> masks      70/15/15
    boneage          RSNA Bone Age boneage-training-dataset.csv           70/15/15
    covidx           COVIDx CXR train.txt / val.txt / test.txt            70/20/10
    chd_cxr          CHD-CXR, one folder per class                        70/15/15

--out defaults to data/<data set>.csv, which evaluate.py's presets read. A run whose images are not where the
release puts them (a wrong --root) stops with the first missing path; a few missing images are left out and
counted. --resize=N writes 8-bit PNG copies whose shorter side is N (DICOM through common.load_image:
MONOCHROME1 inverted, VOI LUT applied; masks with nearest neighbour) once, in --workers processes, and points
the CSV at them: decode the full-size films once rather than in every epoch. Splits are drawn with --seed.
RSNA Pneumonia's images are a subset of NIH ChestX-ray14: a model pre-trained on NIH has seen them."""
from __future__ import annotations

import argparse
import csv
import glob
import gzip
import inspect
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common

LP = common.LABEL_PREFIX
BASE_COLUMNS = ["image", "study_id", "patient_id", "split", "view", "body_part", "findings", "impression",
                "report", "dataset"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


# ----------------------------------------------------------------------------------------------------
# ---- reading the official files ----

def find_file(root: Path, names: list[str], dataset: str, required: bool = True) -> Path | None:
    """The first of `names` (paths relative to root, `*` allowed) that exists; a UserError naming them all."""
    for n in names:
        hits = sorted(glob.glob(str(root / n)))
        if hits:
            return Path(hits[0])
    if required:
        raise common.UserError(f"{dataset}: none of {names} under {root} (the layout as published)")
    return None


def read_table(path: Path, required: list[str], dataset: str) -> list[dict]:
    """CSV (plain or .gz) -> dicts with stripped keys and values; a missing column is a UserError."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [(h or "").strip() for h in reader.fieldnames or []]
        # SIIM's train-rle.csv header is "ImageId, EncodedPixels": stripping makes its leading space harmless
        rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()}
                for r in reader]
    missing = [c for c in required if c not in header]
    if missing:
        raise common.UserError(f"{dataset}: {path}: no column {missing[0]!r} (it has: {', '.join(header)})")
    return rows


def index_images(folder: Path, exts=IMAGE_EXTS) -> dict[str, Path]:
    """File stem -> path of every image below folder (for data sets that nest their images)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for fn in sorted(files):
            stem, ext = os.path.splitext(fn)
            if ext.lower() in exts:
                out.setdefault(stem, Path(dirpath) / fn)
    return out


def first_existing(candidates: list[Path]) -> Path:
    """The first candidate that exists, else the first one (which finish() then counts as missing)."""
    return next((c for c in candidates if c.exists()), candidates[0])


def row(image, study_id, patient_id, split="", view="", body_part="chest", findings="", impression="",
        report="", labels=None, **extra) -> dict:
    r = dict(image=str(image) if image else "", study_id=str(study_id), patient_id=str(patient_id),
             split=split, view=view, body_part=body_part, findings=findings, impression=impression,
             report=report)
    r.update({LP + k: v for k, v in (labels or {}).items()})
    r.update(extra)
    return r


def fractions(args, default: tuple) -> tuple:
    """--fractions=train,valid,test, or the paper's default."""
    if not args.fractions:
        return default
    try:
        f = tuple(float(x) for x in args.fractions.split(","))
    except ValueError:
        f = ()
    if len(f) != 3 or abs(sum(f) - 1) > 1e-6 or min(f) < 0:
        raise common.UserError(f"--fractions={args.fractions}: three numbers summing to 1 (train,valid,test)")
    return f


def assign_splits(rows: list[dict], frac: tuple, seed: int):
    """Fill the split of the rows that have none, by patient (common.split_by_patient)."""
    todo = [r for r in rows if not r["split"]]
    by_patient = common.split_by_patient([r["patient_id"] for r in todo], fractions=frac, seed=seed)
    for r in todo:
        r["split"] = by_patient[r["patient_id"]]


def label_value(v: str) -> str:
    """A CheXpert-style cell (1.0 / 0.0 / -1.0 / blank) -> "1" / "0" / "-1" / ""."""
    v = v.strip()
    return str(int(float(v))) if v else ""


# ----------------------------------------------------------------------------------------------------
# ---- MIMIC-CXR: images, official split, report sections ----

MAX_MISSING_FRAC = 0.01  # the share of studies without a report file (MIMIC-CXR) past which a run stops
MIMIC_META = ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"]
MIMIC_SPLIT = ["mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"]
SPLIT_NAMES = {"validate": "valid"}


def mimic_image(root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    # files/p{first two digits}/p{subject_id}/s{study_id}/{dicom_id}.jpg, as in MIMIC-CXR-JPG 2.x
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def mimic_patient_splits(root: Path, dataset: str) -> dict[str, str]:
    """subject_id -> train / valid / test of MIMIC-CXR-JPG's own split (made by patient)."""
    t = read_table(find_file(root, MIMIC_SPLIT, dataset), ["subject_id", "split"], dataset)
    return {r["subject_id"]: SPLIT_NAMES.get(r["split"], r["split"]) for r in t}


# A header opens a line in capitals and ends in ':' ("FINDINGS:", "FINDINGS AND IMPRESSION:", "CHEST, PA AND
# LATERAL:"); "Note:" inside a section is not one. Names are normalised as MIMIC-CXR's own section parser
# (github.com/MIT-LCP/mimic-cxr, txt/section_parser.py) does: an impression under any name that contains
# it, or CONCLUSION; a header describing the views of the study stands for the findings.
MIMIC_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)])[ \t]*:", re.MULTILINE)
STUDY_WORDS = re.compile(r"chest|portable|pa and lat|ap and lat|lateral and|frontal|views?\b|upright|ribs")
CONTEXT_WORDS = ("histor", "indication", "reason", "comparison", "technique", "exam", "notification")


def section_name(header: str) -> str:
    h = " ".join(header.lower().split())
    for key, name in (("impress", "impression"), ("conclusion", "impression"), ("finding", "findings")):
        if key in h:
            return name
    if not any(w in h for w in CONTEXT_WORDS) and STUDY_WORDS.search(h):
        return "findings"
    return h


def parse_report_sections(text: str) -> dict[str, str]:
    """A MIMIC-CXR report -> {section name: text} (white space collapsed; names as in `section_name`).

    A report with neither findings nor impression takes its last paragraph as the impression (after the
    last header's own first paragraph), as MIMIC-CXR's parser does for the reports written without them."""
    heads = list(MIMIC_HEADER.finditer(text))
    bodies = [(section_name(m[1]), text[m.end():nxt.start() if nxt else len(text)])
              for m, nxt in zip(heads, heads[1:] + [None])]
    out: dict[str, str] = {}
    for name, body in bodies:
        body = " ".join(body.split())
        if body:
            out[name] = f"{out[name]} {body}" if name in out else body
    if "findings" in out or "impression" in out:
        return out
    tail = bodies[-1][1] if bodies else re.sub(r"^\s*FINAL (REPORT|ADDENDUM)\b", "", text)
    paras = [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", tail) if p.strip()]
    if bodies and len(paras) > 1:
        out[bodies[-1][0]] = paras[0]
    if paras[1 if bodies else 0:]:
        out["impression"] = paras[-1]
    return out


def report_text(findings: str, impression: str) -> str:
    return " ".join(p for p in (f"FINDINGS: {findings}" if findings else "",
                                f"IMPRESSION: {impression}" if impression else "") if p)


# ----------------------------------------------------------------------------------------------------
# ---- masks: SIIM's run-length strings, boxes (RSNA, GRAZPEDWRI-DX) ----

def rle_decode(rle: str, height: int, width: int, relative: bool = True) -> np.ndarray:
    """A SIIM-ACR run-length string -> uint8 mask [H, W], 255 inside; "" and "-1" (no pneumothorax) are empty.

    Pixels are numbered column by column (the challenge's mask_functions.py reads the flat mask as (width,
    height) and transposes it). Stage 1's train-rle.csv is *relative*: each start counts from the end of the
    previous run; stage 2's stage_2_train.csv has the usual absolute, 1-based starts (relative=False)."""
    flat = np.zeros(height * width, dtype=np.uint8)
    s = (rle or "").strip()
    if s and s != "-1":
        v = [int(x) for x in s.split()]
        if len(v) % 2:
            raise common.UserError(f"run-length string with an odd count of numbers: {s[:60]}...")
        pos = 0
        for start, length in zip(v[0::2], v[1::2]):
            pos = pos + start if relative else start - 1
            flat[pos:pos + length] = 255
            pos += length
    return flat.reshape((height, width), order="F")


def boxes_mask(boxes: list[tuple], height: int, width: int) -> np.ndarray:
    """[(x, y, w, h) in pixels] -> uint8 mask [H, W], 255 inside any box."""
    m = np.zeros((height, width), np.uint8)
    for x, y, w, h in boxes:
        m[max(0, round(y)):round(y + h), max(0, round(x)):round(x + w)] = 255
    return m


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the DICOM or PNG header, without decoding the pixels."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        d = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(d.Rows), int(d.Columns)
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def write_mask(args, name: str, mask: np.ndarray) -> str:
    """<out stem>_masks/<name>.png next to the CSV (SIIM, RSNA and GRAZPEDWRI-DX alike)."""
    import cv2

    path = Path(args.out).resolve().parent / f"{Path(args.out).stem}_masks" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), mask):
        raise common.UserError(f"cannot write {path} (disk full, or the folder is not writable?)")
    return str(path)


# ----------------------------------------------------------------------------------------------------
# ---- converters: root -> rows with absolute paths (finish() makes them relative). The docstring of each
# ---- is its `--help`: the files it reads and the split it writes.

CHEXPERT_14 = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
               "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
               "Pleural Other", "Fracture", "Support Devices"]


def convert_mimic_cxr(root: Path, args) -> list[dict]:
    """MIMIC-CXR-JPG 2.x, with the reports of MIMIC-CXR 2.x (CXR-CLIP, D-MLM pre-training).

    Reads (--root = mimic-cxr-jpg/2.x.x): mimic-cxr-2.0.0-metadata.csv.gz (dicom_id, subject_id, study_id,
    ViewPosition), mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz (14 labels per study,
    1.0 / 0.0 / -1.0 / blank), images files/pXX/pSUBJECT/sSTUDY/DICOM.jpg, and the reports
    files/pXX/pSUBJECT/sSTUDY.txt under --reports (MIMIC-CXR's mimic-cxr-reports: MIMIC-CXR-JPG has none;
    a run stops when over 1% of the studies have no report, and counts them below that). Section headers are
    normalised as MIMIC-CXR's own parser does ("FINDINGS AND IMPRESSION:", "CONCLUSION:" -> impression; the
    last paragraph is the impression of a report without headers).
    Split: MIMIC's official split, by patient ("validate" -> valid).
    """
    ds = "mimic_cxr"
    meta = read_table(find_file(root, MIMIC_META, ds), ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                      ds)
    split = {r["dicom_id"]: r["split"] for r in read_table(find_file(root, MIMIC_SPLIT, ds),
                                                            ["dicom_id", "split"], ds)}
    chex = {r["study_id"]: r for r in read_table(find_file(root, ["mimic-cxr-2.0.0-chexpert.csv.gz",
        "mimic-cxr-2.0.0-chexpert.csv"], ds), ["subject_id", "study_id"] + CHEXPERT_14, ds)}
    reports = Path(args.reports) if args.reports else root
    rdir = reports if reports.name == "files" else reports / "files"  # --reports=<...>/files works too
    rows, sections, no_report = [], {}, []
    for m in meta:
        sid, pid, did = m["study_id"], m["subject_id"], m["dicom_id"]
        img = mimic_image(root, pid, sid, did)
        if sid not in sections and img.exists():  # the report of each study whose images are here
            rp = rdir / f"p{pid[:2]}" / f"p{pid}" / f"s{sid}.txt"
            secs = parse_report_sections(rp.read_text(errors="replace")) if rp.exists() else {}
            sections[sid] = secs.get("findings", ""), secs.get("impression", "")
            no_report += [] if rp.exists() else [str(rp)]
        fi, im = sections.get(sid, ("", ""))
        labels = {k: label_value(chex[sid][k]) if sid in chex else "" for k in CHEXPERT_14}
        sp = SPLIT_NAMES.get(split.get(did, ""), split.get(did, ""))
        rows.append(row(img, sid, pid, sp, m["ViewPosition"].upper(), "chest", fi, im, report_text(fi, im),
                        labels))
    # MIMIC-CXR-JPG ships no reports: without --reports, or with the wrong folder, every text would be empty
    if len(no_report) > MAX_MISSING_FRAC * len(sections):
        raise common.UserError(
            f"{ds}: {len(no_report)} of {len(sections)} studies have no report (the first: "
            f"{', '.join(no_report[:3])}): pass --reports=<MIMIC-CXR's report folder, mimic-cxr-reports, "
            f"holding files/pXX/pSUBJECT/sSTUDY.txt>" + ("" if args.reports else "; without --reports they "
                                                    "are looked for under --root: MIMIC-CXR-JPG has none"))
    empty = sum(not (fi or im) for fi, im in sections.values())
    print(f"{ds}: {len(sections)} studies with images; without a report file: {len(no_report)}"
          + (f" (their rows have no text; the first: {no_report[0]})" if no_report else "")
          + f"; reports with neither findings nor impression: {empty}")
    return rows


def chexpert_path(root: Path, p: str) -> Path:
    # a Path starts with the archive's folder: CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    return first_existing([root / p, root.parent / p, root / Path(*Path(p).parts[1:])])


def chexpert_view(r: dict) -> str:
    return "LATERAL" if r.get("Frontal/Lateral") == "Lateral" else (r.get("AP/PA") or "FRONTAL").upper()


def chexpert_ids(p: str) -> tuple[str, str]:
    m = re.search(r"(patient\d+)/(study\d+)", p)
    return (f"{m[1]}/{m[2]}", m[1]) if m else (p, p)


def convert_chexpert(root: Path, args) -> list[dict]:
    """CheXpert v1.0 (or v1.0-small) as downloaded.

    Reads (--root = CheXpert-v1.0-small): train.csv and valid.csv (Path, Sex, Age, Frontal/Lateral, AP/PA and
    14 labels 1.0 / 0.0 / -1.0 / blank, kept as 1 / 0 / -1 / blank) and, when it is there, GLoRIA's
    chexpert_5x200.csv: every image of its patients is left out, so that no CheXpert 5x200 test patient is
    trained on (CXR-CLIP, Table 1). Without that file nothing is left out, and a warning says so.
    Split (--split): dmlm     train.csv 80/20 by patient -> train / valid, valid.csv -> test (D-MLM);
                     cxrclip  train.csv -> train, valid.csv -> valid (CXR-CLIP; it tests on CheXpert 5x200).
    """
    ds = "chexpert"
    need = ["Path", "Frontal/Lateral", "AP/PA"] + CHEXPERT_14
    train = read_table(find_file(root, ["train.csv"], ds), need, ds)
    valid = read_table(find_file(root, ["valid.csv"], ds), need, ds)
    p5 = find_file(root, ["chexpert_5x200.csv"], ds, required=False)
    if p5 is None:
        print(f"warning: chexpert: no chexpert_5x200.csv in {root}: the CheXpert 5x200 test patients stay in "
              f"training; put GLoRIA's file there to leave them out")
    held_out = {chexpert_ids(r["Path"])[1] for r in read_table(p5, ["Path"], ds)} if p5 else set()
    rows, left_out = [], 0
    for table, split in ((train, ""), (valid, "test" if args.split == "dmlm" else "valid")):
        for r in table:
            sid, pid = chexpert_ids(r["Path"])
            if pid in held_out:
                left_out += 1
                continue
            rows.append(row(chexpert_path(root, r["Path"]), sid, pid, split, chexpert_view(r), "chest",
                            labels={k: label_value(r[k]) for k in CHEXPERT_14}))
    if held_out:
        print(f"chexpert: left out {left_out} images of the {len(held_out)} CheXpert 5x200 patients")
    if args.split == "cxrclip":
        for r in rows:
            r["split"] = r["split"] or "train"
    assign_splits(rows, fractions(args, (0.8, 0.2, 0.0)), args.seed)
    return rows


CHEXPERT_5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def convert_chexpert5x200(root: Path, args) -> list[dict]:
    """CheXpert 5x200, CXR-CLIP's zero-shot test set (after GLoRIA): 5 classes x 200 images.

    Each image is positive for just one of Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion.

    Reads (--root = the CheXpert folder): chexpert_5x200.csv from the GLoRIA repository (Path, the five
    labels, and "Report Impression" where the file has it) and the CheXpert images it names. The other four
    labels of each image are 0, not blank.
    Split: all test.
    """
    ds = "chexpert5x200"
    rows = []
    for r in read_table(find_file(root, ["chexpert_5x200.csv"], ds), ["Path"] + CHEXPERT_5, ds):
        pos = [k for k in CHEXPERT_5 if label_value(r[k]) == "1"]
        if len(pos) != 1:  # the subset's definition
            continue
        sid, pid = chexpert_ids(r["Path"])
        im = " ".join(r.get("Report Impression", "").split())
        rows.append(row(chexpert_path(root, r["Path"]), sid, pid, "test", chexpert_view(r), "chest", "", im,
                        report_text("", im), {k: "1" if k in pos else "0" for k in CHEXPERT_5}))
    return rows


NIH_14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
          "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def convert_nih(root: Path, args) -> list[dict]:
    """NIH ChestX-ray14 (CXR-CLIP, D-MLM).

    Reads (--root = the ChestX-ray14 folder): Data_Entry_2017.csv ("Finding Labels" separated by '|', "No
    Finding" = all 0), train_val_list.txt, test_list.txt, images/*.png (or images_0XX/images/*.png). The boxes
    of BBox_List_2017.csv are not read: no protocol of the four papers uses them.
    Split: test_list.txt -> test; train_val_list.txt 80/20 by patient -> train / valid (CXR-CLIP validates on
    20% of the training set). The two official lists are already patient-disjoint.
    """
    ds = "nih"
    entries = read_table(find_file(root, ["Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"], ds),
                         ["Image Index", "Finding Labels", "Patient ID", "View Position"], ds)
    test = set(find_file(root, ["test_list.txt"], ds).read_text().split())
    trainval = set(find_file(root, ["train_val_list.txt"], ds).read_text().split())
    idx = index_images(root, (".png",))
    rows = []
    for e in entries:
        name, found = e["Image Index"], set(e["Finding Labels"].split("|"))
        unknown = found - set(NIH_14) - {"No Finding"}
        if unknown:
            raise common.UserError(f"nih: Data_Entry_2017.csv, 'Finding Labels' of {name}: unknown {unknown}")
        if name not in test and name not in trainval:
            continue  # in neither official list
        pid, stem = str(int(e["Patient ID"])), Path(name).stem
        rows.append(row(idx.get(stem, root / "images" / name), f"{pid}_{e.get('Follow-up #', stem)}", pid,
                        "test" if name in test else "", e["View Position"].upper(), "chest",
                        labels={k: "1" if k in found else "0" for k in NIH_14}))
    assign_splits(rows, fractions(args, (0.8, 0.2, 0.0)), args.seed)
    return rows


def vindr_labels(root: Path, part: str, dataset: str, rename: dict) -> dict[str, dict[str, str]]:
    """image_id -> {label: "1" / "0"} from the official image-level file of one split.

    image_labels_train.csv has one row per (image, radiologist): three readers labelled each training image
    independently and an image is positive for a finding any of them marked (the data sets' papers, Sec. 3);
    image_labels_test.csv has one consensus row per image. "No finding" is 1 only where no finding is."""
    p = find_file(root, [f"annotations/image_labels_{part}.csv", f"image_labels_{part}.csv"], dataset)
    table = read_table(p, ["image_id"], dataset)
    names = [c for c in (table[0] if table else {}) if c.lower() not in ("image_id", "rad_id", "rad_ids")]
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for r in table:
        d = out[r["image_id"]]
        for c in names:
            k = rename.get(c, c)
            d[k] = "1" if d.get(k) == "1" or label_value(r[c] or "0") == "1" else "0"
    for d in out.values():
        if "No finding" in d:
            d["No finding"] = "0" if any(v == "1" for k, v in d.items() if k != "No finding") else "1"
    return out


def convert_vindr(root: Path, args, dataset: str = "vindr_cxr") -> list[dict]:
    """VinDr-CXR 1.0.0 from PhysioNet (CXR-CLIP; arXiv:2012.15029).

    Reads (--root = vindr-cxr/1.0.0): annotations/image_labels_train.csv (image_id, rad_id, 28 findings and
    diagnoses, 0 / 1; a training image is positive where any of its three radiologists marked it) and
    annotations/image_labels_test.csv (the 5-radiologist consensus), DICOMs train/*.dicom and test/*.dicom.
    The release spells one label "Other diseases" (train) and "Other disease" (test): one column, "Other
    diseases". The box files (annotations_*.csv) are not needed for the image-level labels.
    Split: the official test; train 80/20 -> train / valid (no patient ids published: one image, one patient).
    """
    rename = {"Other disease": "Other diseases"} if dataset == "vindr_cxr" else {}
    rows = []
    for part in ("train", "test"):
        for image_id, lab in sorted(vindr_labels(root, part, dataset, rename).items()):
            img = first_existing([root / part / f"{image_id}{e}" for e in (".dicom", ".dcm", ".png", ".jpg")])
            rows.append(row(img, image_id, image_id, "test" if part == "test" else "",
                            "PA" if dataset == "vindr_cxr" else "", "chest", labels=lab))
    names = sorted({k for r in rows for k in r if k.startswith(LP)})
    for r in rows:  # a label that only one split's file has is 0 in the other
        for n in names:
            r.setdefault(n, "0")
    assign_splits(rows, fractions(args, (0.8, 0.2, 0.0)), args.seed)
    return rows


def convert_vindr_pcxr(root: Path, args) -> list[dict]:
    """VinDr-PCXR 1.0.0 from PhysioNet, PedCLIP's "Pedi-CXR" (arXiv:2203.10612).

    Reads (--root = vindr-pcxr/1.0.0): image_labels_train.csv and image_labels_test.csv (image_id, rad_ID and
    the official image-level diseases: No finding, Bronchitis, Brocho-pneumonia, Bronchiolitis, Pneumonia,
    Other disease, ...; names as published), DICOMs train/*.dicom and test/*.dicom. The lesion classes of
    the box files (annotations_*.csv) are not image-level labels and are not read.
    Split: the official test; train 80/20 -> train / valid (one image, one patient).
    """
    return convert_vindr(root, args, "vindr_pcxr")


def convert_rsna_pneumonia(root: Path, args) -> list[dict]:
    """RSNA Pneumonia Detection Challenge, stage 2 (CXR-CLIP classification, D-MLM segmentation).

    Reads (--root = rsna-pneumonia-detection-challenge): stage_2_train_labels.csv (patientId, x, y, width,
    height, Target: one row per box, several per image, or one row with Target 0) and
    stage_2_train_images/*.dcm. An image is positive where a row has Target 1; its boxes are drawn into a
    mask PNG (255 inside) in <out>_masks/, as SIIM's masks are; a blank `mask` is an empty mask.
    Split: only the training images carry labels: 70/15/15 by patient (CXR-CLIP; D-MLM:
    --fractions=0.6,0.2,0.2). These images are a subset of NIH ChestX-ray14.
    """
    ds = "rsna_pneumonia"
    t = read_table(find_file(root, ["stage_2_train_labels.csv"], ds),
                   ["patientId", "x", "y", "width", "height", "Target"], ds)
    target, boxes = {}, defaultdict(list)
    for r in t:
        pid = r["patientId"]
        target[pid] = max(target.get(pid, 0), int(float(r["Target"])))
        if r["Target"].startswith("1") and r["x"]:
            boxes[pid].append(tuple(float(r[k]) for k in ("x", "y", "width", "height")))
    rows = []
    for pid, y in target.items():
        img = root / "stage_2_train_images" / f"{pid}.dcm"
        mask = ""
        if boxes[pid] and img.exists():
            mask = write_mask(args, pid, boxes_mask(boxes[pid], *image_size(img)))
        rows.append(row(img, pid, pid, labels={"Pneumonia": str(y)}, mask=mask))
    assign_splits(rows, fractions(args, (0.7, 0.15, 0.15)), args.seed)
    return rows


def convert_siim(root: Path, args) -> list[dict]:
    """SIIM-ACR Pneumothorax Segmentation (CXR-CLIP classification, D-MLM segmentation).

    Reads (--root = siim-acr-pneumothorax): stage_2_train.csv (ImageId, EncodedPixels in the absolute form;
    the stage-2 labels CXR-CLIP used, read when both are there), else stage 1's train-rle.csv (the relative
    form); which one was read is printed; "-1" = no pneumothorax, several rows of one ImageId = several
    regions (OR-ed); the DICOMs anywhere below --root (dicom-images-train/<study>/<series>/<ImageId>.dcm),
    whose header gives the patient id. Masks are PNGs (255 inside) in <out>_masks/ for the positive images;
    a blank `mask` is an empty mask.
    Split: 70/15/15 by patient (CXR-CLIP; D-MLM: --fractions=0.6,0.2,0.2).
    """
    import pydicom

    ds = "siim"
    p = find_file(root, ["stage_2_train.csv", "train-rle.csv"], ds)
    print(f"siim: read {p} ({'stage 1, relative' if p.name == 'train-rle.csv' else 'stage 2, absolute'} RLE)")
    rles = defaultdict(list)
    for r in read_table(p, ["ImageId", "EncodedPixels"], ds):
        rles[r["ImageId"]].append(r["EncodedPixels"])
    idx = index_images(root, (".dcm",))
    rows = []
    for image_id, encs in rles.items():
        img, pos = idx.get(image_id), [e for e in encs if e and e != "-1"]
        r = row(img, image_id, image_id, labels={"Pneumothorax": "1" if pos else "0"}, mask="")
        if img is not None:
            header = pydicom.dcmread(str(img), stop_before_pixels=True)
            r["patient_id"] = str(header.get("PatientID", image_id))
            if pos:
                h, w = image_size(img)
                m = np.zeros((h, w), np.uint8)
                for e in pos:
                    m |= rle_decode(e, h, w, relative=p.name == "train-rle.csv")
                r["mask"] = write_mask(args, image_id, m)
        rows.append(r)
    assign_splits(rows, fractions(args, (0.7, 0.15, 0.15)), args.seed)
    return rows


def dicom_view(path: Path | None) -> str:
    """ViewPosition of a DICOM header (PA, AP, LATERAL for LL / RL / LAT), or "" when it has none."""
    if path is None:
        return ""
    import pydicom

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
        v = str(header.get("ViewPosition", "") or "").strip().upper()
    except (OSError, pydicom.errors.InvalidDicomError):
        return ""
    return "LATERAL" if v in ("LL", "RL", "LAT", "LATERAL") else v


def convert_openi(root: Path, args) -> list[dict]:
    """Open-I / Indiana University chest X-rays (CXR-CLIP retrieval).

    Reads (--root = the folder holding the unpacked NLMCXR archives): ecgen-radiology/*.xml (reports, from
    NLMCXR_reports.tgz: <AbstractText Label="FINDINGS|IMPRESSION">, MeSH <major> terms whose first part is
    the finding, "normal" -> No Finding, and <parentImage id="CXR1_1_IM-0001-3001"> per image), the PNGs
    (NLMCXR_png.tgz: CXR1_1_IM-0001-3001.png) and, where unpacked, the DICOMs (NLMCXR_dcm.tgz:
    1/1_IM-0001-3001.dcm), whose ViewPosition gives `view`. An image without one gets view UNKNOWN, never a
    frontal view by default.
    Split: all test. A MeSH finding of the study is 1 on its images, the others 0.
    """
    ds = "openi"
    xmls = sorted(glob.glob(str(root / "ecgen-radiology" / "*.xml")))
    if not xmls:
        raise common.UserError(f"{ds}: no ecgen-radiology/*.xml under {root} (NLMCXR_reports.tgz, unpacked)")
    pngs, dicoms = index_images(root, (".png",)), index_images(root, (".dcm",))
    studies = []
    for x in xmls:
        tree = ET.parse(x).getroot()
        uid = tree.find("uId")
        sec = {a.get("Label", "").upper(): " ".join((a.text or "").split())
               for a in tree.iter("AbstractText")}
        terms = set()
        for m in tree.iter("major"):
            t = (m.text or "").split("/")[0].strip()
            if t:
                terms.add("No Finding" if t.lower() == "normal" else t[0].upper() + t[1:])
        imgs = [pi.get("id") for pi in tree.iter("parentImage") if pi.get("id")]
        studies.append((uid.get("id") if uid is not None else Path(x).stem, sec.get("FINDINGS", ""),
                        sec.get("IMPRESSION", ""), terms, imgs))
    names = sorted({t for s in studies for t in s[3]})
    rows = []
    for sid, fi, im, terms, imgs in studies:
        for i in imgs:  # the DICOM of PNG "CXR1_1_IM-0001-3001" is 1/1_IM-0001-3001.dcm
            view = dicom_view(dicoms.get(i.split("_", 1)[-1]) or dicoms.get(i)) or "UNKNOWN"
            rows.append(row(pngs.get(i, root / "NLMCXR_png" / f"{i}.png"), sid, sid, "test", view, "chest",
                            fi, im, report_text(fi, im), {n: "1" if n in terms else "0" for n in names}))
    return rows


CXR_LT_FILES = ["train_labeled.csv", "cxr-lt-2024/train_labeled.csv", "2.0.0/cxr-lt-2024/train_labeled.csv",
                "cxr-lt-iccv-workshop-cvamd/2.0.0/cxr-lt-2024/train_labeled.csv"]
CXR_LT_META = {"dicom_id", "subject_id", "study_id", "ViewPosition", "ViewCodeSequence_CodeMeaning", "fpath",
               "path", "split"}
FRONTAL_CODES = {"AP": "AP", "PA": "PA", "antero-posterior": "AP", "postero-anterior": "PA"}


def convert_cxr_lt(root: Path, args) -> list[dict]:
    """CXR-LT 2024 (PhysioNet cxr-lt-iccv-workshop-cvamd 2.0.0) on MIMIC-CXR-JPG images (CXR-CML).

    Reads: --label_root = the CXR-LT release folder, or train_labeled.csv itself (found as
    cxr-lt-iccv-workshop-cvamd/2.0.0/cxr-lt-2024/train_labeled.csv or any tail of that path): dicom_id,
    subject_id, study_id, ViewPosition, ViewCodeSequence_CodeMeaning, fpath and one 0 / 1 column per class
    (40 in 2024; any 0 / 1 column that is not an id is a class). --root = mimic-cxr-jpg/2.x.x: the images
    (fpath, else files/pXX/...) and mimic-cxr-2.0.0-split.csv.gz. Frontal images only (CXR-CML, Sec. 3):
    ViewPosition AP / PA, or ViewCodeSequence_CodeMeaning antero- / postero-anterior.
    Split (--split): paper  CXR-CML's 80:20 by patient (Sec. 3), drawn with --seed; test patients of MIMIC's
                            train split are counted (CheXzero and a mimic_cxr checkpoint trained on them);
                     mimic  MIMIC's test patients -> test, all others -> train: for a checkpoint pre-trained
                            on mimic_cxr, which then never saw a test patient.
    `mimic_split` keeps each patient's MIMIC split. CXR-CML's five runs draw their folds from the training
    patients themselves (cxrcml.py --fold=k).
    """
    ds = "cxr_lt"
    labels = Path(args.label_root) if args.label_root else root
    p = labels if labels.is_file() else find_file(labels, CXR_LT_FILES, ds)
    t = read_table(p, ["dicom_id", "subject_id", "study_id"], ds)
    cols = [c for c in (t[0] if t else {}) if c not in CXR_LT_META]
    names = [c for c in cols if all(r[c] in ("0", "1", "0.0", "1.0", "") for r in t)]
    if not names:
        raise common.UserError(f"{ds}: {p}: no 0 / 1 class columns (it has: {', '.join(t[0] if t else [])})")
    if set(cols) - set(names):
        print(f"cxr_lt: not classes (values other than 0 / 1): {sorted(set(cols) - set(names))}")
    mimic_split = mimic_patient_splits(root, ds)
    rows, dropped = [], Counter()
    for r in t:
        view = FRONTAL_CODES.get(r.get("ViewPosition", "").upper()) or \
            FRONTAL_CODES.get(r.get("ViewCodeSequence_CodeMeaning", "").lower())
        if not view:
            dropped["not frontal"] += 1
            continue
        img = root / r["fpath"] if r.get("fpath") else mimic_image(root, r["subject_id"], r["study_id"],
                                                                   r["dicom_id"])
        rows.append(row(img, r["study_id"], r["subject_id"], "", view, "chest", mimic_split=mimic_split.get(
            r["subject_id"], ""), labels={n: label_value(r[n] or "0") for n in names}))
    unknown = len({r["patient_id"] for r in rows if not r["mimic_split"]})
    print(f"cxr_lt: {len(names)} classes; left out: {dict(dropped) or 'none'}; patients missing from MIMIC's "
          f"split file (--split=mimic: train): {unknown}")
    if args.split == "mimic":
        for r in rows:
            r["split"] = "test" if r["mimic_split"] == "test" else "train"
    else:
        assign_splits(rows, fractions(args, (0.8, 0.0, 0.2)), args.seed)
        test = {r["patient_id"]: r["mimic_split"] for r in rows if r["split"] == "test"}
        print(f"cxr_lt: --split=paper: {sum(s == 'train' for s in test.values())} of the {len(test)} test "
              f"patients are in MIMIC's train split (column mimic_split); --split=mimic tests on MIMIC's "
              f"test patients")
    return rows


EDEMA_FILES = ["{}", "*/{}", "mimic-cxr-pe-severity/*/{}"]


def convert_mimic_edema(root: Path, args) -> list[dict]:
    """Pulmonary edema severity grades of MIMIC-CXR (PhysioNet mimic-cxr-pe-severity 1.0.1; D-MLM).
    Grades: 0 none, 1 vascular congestion, 2 interstitial edema, 3 alveolar edema -> `target`.

    Reads: --label_root = the release folder (default: --root): regex_report_edema_severity.csv (subject_id,
    study_id, edema_severity: a grade per study, from its report) and consensus_image_edema_severity.csv
    (subject_id, study_id, dicom_id, edema_severity: 141 images graded by radiologists in consensus).
    --root = mimic-cxr-jpg/2.x.x: mimic-cxr-2.0.0-metadata.csv.gz (each graded study -> its images, all
    views, `view` set), mimic-cxr-2.0.0-split.csv.gz, the images.
    Split: test = the 141 consensus images, as the data set's authors recommend (doi:10.13026/rz5p-rc64);
    their patients and MIMIC's test patients are left out of train / valid; the other graded studies 75/25 by
    patient -> train / valid (D-MLM's 60:20). `mimic_split` keeps each patient's MIMIC split: a test image of
    a patient in MIMIC's train split was seen by a checkpoint pre-trained on mimic_cxr (the count is printed).
    """
    ds = "mimic_edema"
    lroot = Path(args.label_root) if args.label_root else root
    need = ["subject_id", "study_id", "edema_severity"]
    regex = read_table(find_file(lroot, [f.format("regex_report_edema_severity.csv") for f in EDEMA_FILES],
                                 ds), need, ds)
    consensus = read_table(find_file(lroot, [f.format("consensus_image_edema_severity.csv")
                                             for f in EDEMA_FILES], ds), need + ["dicom_id"], ds)
    images = defaultdict(list)
    for m in read_table(find_file(root, MIMIC_META, ds), ["dicom_id", "study_id", "ViewPosition"], ds):
        images[m["study_id"]].append((m["dicom_id"], m["ViewPosition"].upper()))
    views = {d: v for ims in images.values() for d, v in ims}
    mimic_split = mimic_patient_splits(root, ds)

    def grade(r):
        return str(int(float(r["edema_severity"])))

    rows = [row(mimic_image(root, r["subject_id"], r["study_id"], r["dicom_id"]), r["study_id"],
                r["subject_id"], "test", views.get(r["dicom_id"], ""), target=grade(r),
                mimic_split=mimic_split.get(r["subject_id"], "")) for r in consensus]
    test_patients, left_out = {r["subject_id"] for r in consensus}, Counter()
    in_mimic_train = sum(r["mimic_split"] == "train" for r in rows)  # rows: the consensus images so far
    for r in regex:
        pid = r["subject_id"]
        why = "consensus patient" if pid in test_patients else \
            "MIMIC test patient" if mimic_split.get(pid) == "test" else \
            "study not in the metadata" if r["study_id"] not in images else ""
        if why:
            left_out[why] += 1
            continue
        rows += [row(mimic_image(root, pid, r["study_id"], did), r["study_id"], pid, "", view,
                     target=grade(r), mimic_split=mimic_split.get(pid, ""))
                 for did, view in images[r["study_id"]]]
    print(f"mimic_edema: graded studies left out of train / valid: {dict(left_out) or 'none'}; test images "
          f"of patients in MIMIC's train split: {in_mimic_train}")
    assign_splits(rows, fractions(args, (0.75, 0.25, 0.0)), args.seed)
    return rows


GRAZ_YOLO_CLASSES = ["boneanomaly", "bonelesion", "foreignbody", "fracture", "metal", "periostealreaction",
                     "pronatorsign", "softtissue", "text"]  # the order of the data set's yolov5 meta.yaml


def convert_grazpedwri(root: Path, args) -> list[dict]:
    """GRAZPEDWRI-DX, paediatric wrist radiographs (PedCLIP classification and segmentation).

    Reads (--root = the figshare download): dataset.csv (filestem, patient_id, projection 1 PA / 2 lateral
    / 3 oblique, fracture_visible 1 / blank), the 16-bit PNGs anywhere below --root, and the YOLO labels
    folder_structure/yolov5/labels/<filestem>.txt (class cx cy w h, normalised): the fracture boxes are drawn
    into mask PNGs in <out>_masks/.
    Split: no official split: 70/15/15 by patient.
    """
    ds = "grazpedwri"
    t = read_table(find_file(root, ["dataset.csv"], ds), ["filestem", "patient_id", "fracture_visible"], ds)
    idx = index_images(root, (".png",))
    yolo = {Path(p).stem: Path(p) for p in glob.glob(str(root / "**" / "labels" / "*.txt"), recursive=True)}
    rows = []
    for r in t:
        img, lab = idx.get(r["filestem"]), yolo.get(r["filestem"])
        view = {"1": "PA", "2": "LATERAL", "3": "OBLIQUE"}.get(r.get("projection", ""), "")
        rr = row(img, r["filestem"], r["patient_id"], "", view, "wrist", mask="",
                 labels={"Fracture": "1" if label_value(r["fracture_visible"] or "0") == "1" else "0"})
        if img is not None and lab is not None:
            h, w = image_size(img)
            yolo_rows = [[float(v) for v in ln.split()[:5]] for ln in lab.read_text().splitlines()
                         if len(ln.split()) >= 5]
            boxes = [((cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h) for c, cx, cy, bw, bh in yolo_rows
                     if int(c) == GRAZ_YOLO_CLASSES.index("fracture")]
            rr["mask"] = write_mask(args, r["filestem"], boxes_mask(boxes, h, w))
        rows.append(rr)
    assign_splits(rows, fractions(args, (0.7, 0.15, 0.15)), args.seed)
    return rows


def convert_boneage(root: Path, args) -> list[dict]:
    """RSNA Pediatric Bone Age Challenge (PedCLIP regression).

    Reads (--root = the Kaggle download): boneage-training-dataset.csv (id, boneage in months, male) and
    boneage-training-dataset/<id>.png. `target` = bone age in months (PedCLIP regresses it from the image
    alone: `male` is not written).
    Split: only the training set has public labels: 70/15/15 (one image per child).
    """
    ds = "boneage"
    p = find_file(root, ["boneage-training-dataset.csv", "train.csv"], ds)
    idx = index_images(root, (".png", ".jpg"))
    rows = [row(idx.get(r["id"], root / "boneage-training-dataset" / f"{r['id']}.png"), r["id"], r["id"], "",
                "PA", "hand", target=r["boneage"]) for r in read_table(p, ["id", "boneage"], ds)]
    assign_splits(rows, fractions(args, (0.7, 0.15, 0.15)), args.seed)
    return rows


def convert_covidx(root: Path, args) -> list[dict]:
    """COVIDx CXR, v9 or later (D-MLM).

    Reads (--root = the Kaggle download): train.txt, val.txt, test.txt (space separated, no header:
    patient_id filename class source; class positive / negative, older releases COVID-19 / pneumonia /
    normal) and the images in train/, val/, test/.
    Split: D-MLM pools the three and splits 70/20/10 by patient.
    """
    ds = "covidx"
    rows = []
    for part in ("train", "val", "test"):
        p = find_file(root, [f"{part}.txt", f"{part}_COVIDx*.txt"], ds, required=part != "val")
        for line in (p.read_text().splitlines() if p else []):
            f = line.split()
            if not f:
                continue
            if len(f) < 3:
                raise common.UserError(f"{ds}: {p}: expected 'patient_id filename class source': {line!r}")
            pid, fn, cls = f[0], f[1], f[2].lower()
            rows.append(row(first_existing([root / part / fn, root / fn]), f"{pid}/{fn}", pid,
                            labels={"COVID-19": "1" if cls in ("positive", "covid-19", "covid") else "0"}))
    assign_splits(rows, fractions(args, (0.7, 0.2, 0.1)), args.seed)
    return rows


def convert_chd_cxr(root: Path, args) -> list[dict]:
    """CHD-CXR, paediatric congenital heart disease (PedCLIP zero-shot).

    Reads (--root): one folder per class (ASD, VSD, PDA, Normal, ...) with the images inside. One-vs-rest
    labels, one per class other than Normal.
    Split: no patient ids are published (one image, one patient): 70/15/15.
    """
    ds = "chd_cxr"
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and index_images(d))
    if not classes:
        raise common.UserError(f"{ds}: no class folders with images under {root} (<class>/<image>.png)")
    names = [c for c in classes if c.lower() != "normal"]
    rows = [row(p, f"{c}/{stem}", f"{c}/{stem}", labels={n: "1" if n == c else "0" for n in names})
            for c in classes for stem, p in sorted(index_images(root / c).items())]
    assign_splits(rows, fractions(args, (0.7, 0.15, 0.15)), args.seed)
    return rows


CONVERTERS = {
    "mimic_cxr": convert_mimic_cxr, "chexpert": convert_chexpert, "chexpert5x200": convert_chexpert5x200,
    "nih": convert_nih, "vindr_cxr": convert_vindr, "vindr_pcxr": convert_vindr_pcxr,
    "rsna_pneumonia": convert_rsna_pneumonia, "siim": convert_siim, "openi": convert_openi,
    "cxr_lt": convert_cxr_lt, "mimic_edema": convert_mimic_edema, "grazpedwri": convert_grazpedwri,
    "boneage": convert_boneage, "covidx": convert_covidx, "chd_cxr": convert_chd_cxr,
}
MIMIC_LAYOUT = "--root=mimic-cxr-jpg/2.x.x holding files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg"
IMAGE_LAYOUT = {  # where each release keeps its images: the error of a run that finds none of them
    "mimic_cxr": MIMIC_LAYOUT, "cxr_lt": MIMIC_LAYOUT + " (train_labeled.csv's fpath)",
    "mimic_edema": MIMIC_LAYOUT, "chexpert": "--root=CheXpert-v1.0(-small) holding "
                                             "train/patientN/studyN/viewN_frontal.jpg (the Path column)",
    "chexpert5x200": "--root=the CheXpert folder holding the images chexpert_5x200.csv names",
    "nih": "--root=the ChestX-ray14 folder holding images/*.png or images_0XX/images/*.png",
    "vindr_cxr": "--root=vindr-cxr/1.0.0 holding train/<image_id>.dicom and test/<image_id>.dicom",
    "vindr_pcxr": "--root=vindr-pcxr/1.0.0 holding train/<image_id>.dicom and test/<image_id>.dicom",
    "rsna_pneumonia": "--root=rsna-pneumonia-detection-challenge holding "
                      "stage_2_train_images/<patientId>.dcm",
    "siim": "--root=siim-acr-pneumothorax with <ImageId>.dcm below it (dicom-images-train/<study>/<series>/)",
    "openi": "--root holding NLMCXR_png/<image id>.png (NLMCXR_png.tgz unpacked)",
    "grazpedwri": "--root=the figshare download with <filestem>.png below it (the images_part*.zip unpacked)",
    "boneage": "--root=the Kaggle download holding boneage-training-dataset/<id>.png",
    "covidx": "--root=the Kaggle download holding train/, val/, test/ with the files the lists name",
    "chd_cxr": "--root holding <class>/<image>.png",
}
SPLIT_SCHEMES = {"chexpert": ("dmlm", "cxrclip"), "cxr_lt": ("paper", "mimic")}  # the first is the default


# ----------------------------------------------------------------------------------------------------
# ---- writing: missing images, resized copies, relative paths, a summary ----

def _resize_one(job) -> str:
    """Worker: (src, dst, mask_src, mask_dst, size) -> "" or the error. A copy that exists is kept; a new
    one goes through a temporary name, so a killed run leaves nothing half-written that a rerun trusts."""
    import cv2

    src, dst, msrc, mdst, size = job
    try:
        for s, d, how in ((src, dst, cv2.INTER_AREA), (msrc, mdst, cv2.INTER_NEAREST)):
            if not s or os.path.exists(d):
                continue
            img = common.load_image(s)
            k = size / min(img.shape)
            if k < 1:  # never upscale
                img = cv2.resize(img, (round(img.shape[1] * k), round(img.shape[0] * k)), interpolation=how)
            os.makedirs(os.path.dirname(d), exist_ok=True)
            if not cv2.imwrite(d + ".tmp.png", img):
                raise OSError(f"{d}: cv2.imwrite failed (disk full, or the folder is not writable?)")
            os.replace(d + ".tmp.png", d)
        return ""
    except common.BadImageError as e:
        return str(e)


def resize_copies(rows: list[dict], root: Path, out_dir: Path, size: int, workers: int) -> list[str]:
    """<out_dir>/<path under root>.png with shorter side `size`, once per image; -> the error of each row."""
    jobs = []
    for r in rows:
        src = Path(r["image"])
        rel = src.relative_to(root) if src.is_relative_to(root) else Path(src.name)
        mdst = str(out_dir / "masks" / rel.with_suffix(".png")) if r.get("mask") else ""
        jobs.append((str(src), str(out_dir / rel.with_suffix(".png")), r.get("mask") or "", mdst, size))
    pool = Pool(workers) if workers > 1 else None
    try:
        it = pool.imap(_resize_one, jobs, chunksize=16) if pool else map(_resize_one, jobs)
        errors = list(tqdm(it, total=len(jobs), desc=f"resize to {size}", dynamic_ncols=True))
    finally:  # close + join: the workers exit on their own
        if pool:
            pool.close()
            pool.join()
    for r, job, err in zip(rows, jobs, errors):
        if not err:
            r["image"] = job[1]
            if job[2]:
                r["mask"] = job[3]
    return errors


def check_images(dataset: str, rows: list[dict], root: Path, sample: int = 1000):
    """Stop, naming the first missing path and the layout expected, when no image of an even sample of the
    rows exists (a wrong --root, or the images unpacked elsewhere); finish() then counts the missing ones."""
    if not rows:
        raise common.UserError(f"{dataset}: the release's files under {root} list no image")
    some = rows[::max(1, len(rows) // sample)]
    if not any(r["image"] and Path(r["image"]).exists() for r in some):
        first = next((r["image"] for r in some if r["image"]),
                     f"{some[0]['study_id']} (searched below --root)")
        raise common.UserError(f"{dataset}: no image found where the release keeps them (none of {len(some)} "
                               f"checked; the first: {first}): expected {IMAGE_LAYOUT[dataset]}")


def finish(dataset: str, rows: list[dict], args) -> dict:
    """Skip rows whose image is missing (counted), resize if asked, write the CSV, print the summary."""
    out = Path(args.out).resolve()
    check_images(dataset, rows, Path(args.root).resolve())
    found = [bool(r["image"]) and Path(r["image"]).exists() for r in rows]
    kept = [r for r, f in zip(rows, found) if f]
    gone = [r["image"] or r["study_id"] for r, f in zip(rows, found) if not f]
    missing, unreadable = len(gone), 0
    if args.resize:
        errs = resize_copies(kept, Path(args.root).resolve(), out.parent / f"{out.stem}_{args.resize}",
                             args.resize, args.workers)
        for e in filter(None, errs):
            print(f"warning: skipped an unreadable image: {e}")
        unreadable = sum(map(bool, errs))
        kept = [r for r, e in zip(kept, errs) if not e]
    for r in kept:
        r["image"], r["dataset"] = os.path.relpath(r["image"], out.parent), dataset
        if r.get("mask"):
            r["mask"] = os.path.relpath(r["mask"], out.parent)
    labels = sorted({k for r in kept for k in r if k.startswith(LP)}, key=str.lower)
    extra = sorted({k for r in kept for k in r} - set(BASE_COLUMNS) - set(labels))
    common.write_csv_atomic(out, kept, BASE_COLUMNS + labels + extra)

    nrows = Counter(r["split"] for r in kept)
    splits = [s for s in ("train", "valid", "test") if nrows[s]]
    pos = {s: Counter(k for r in kept if r["split"] == s for k in labels if r.get(k) == "1") for s in splits}
    print(f"{dataset}: wrote {len(kept)} rows to {out}; skipped {missing} with a missing image"
          + (f" (the first: {gone[0]})" if gone else "")
          + (f", {unreadable} unreadable" if args.resize else ""))
    print(f"  {'rows':<32}" + "".join(f"{s:>9}" for s in splits))
    print(f"  {'':<32}" + "".join(f"{nrows[s]:>9}" for s in splits))
    for k in labels:
        print(f"  {k[len(LP):][:32]:<32}" + "".join(f"{pos[s][k]:>9}" for s in splits))
    return {"written": len(kept), "skipped_missing": missing, "skipped_unreadable": unreadable,
            "rows_per_split": dict(nrows), "positives": {s: dict(pos[s]) for s in splits}}


def run_converter(dataset: str, args) -> dict:
    root = Path(args.root).resolve()
    if not root.is_dir():
        raise common.UserError(f"{dataset}: --root={args.root} is not a folder")
    return finish(dataset, CONVERTERS[dataset](root, args), args)


# ----------------------------------------------------------------------------------------------------
# ---- CLI ----

def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="data_prep.py", description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="command", required=True, metavar="<data set>")
    for name, fn in CONVERTERS.items():
        doc = inspect.cleandoc(fn.__doc__) + (f"\nWrites: data/{name}.csv (--out), "
                                              f"`dataset` = {name} on every row.")
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc, formatter_class=raw)
        p.add_argument("--root", required=True, help="the data set's folder, as downloaded")
        p.add_argument("--out", default=f"data/{name}.csv", help="the CSV to write, its image paths "
                       "relative to it (default: %(default)s, the name evaluate.py's presets read)")
        if name in SPLIT_SCHEMES:
            p.add_argument("--split", choices=SPLIT_SCHEMES[name], default=SPLIT_SCHEMES[name][0],
                           help="the split scheme (above); default %(default)s")
        p.add_argument("--fractions", default="", help="train,valid,test fractions of the random patient "
                       "split (default: the paper's, above)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random patient split")
        p.add_argument("--resize", type=int, default=0, help="write PNG copies with this shorter side")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="--resize processes")
        if name == "mimic_cxr":
            p.add_argument("--reports", default="", help="MIMIC-CXR's report folder (mimic-cxr-reports, "
                           "holding files/pXX/pN/sN.txt); default: --root")
        if name in ("cxr_lt", "mimic_edema"):
            p.add_argument("--label_root", default="",
                           help="the label release (folder or file); default: --root")
    return ap


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    return run_converter(args.command, args)


if __name__ == "__main__":
    common.cli(main)
