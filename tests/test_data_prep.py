"""Tests of data_prep.py: tiny fixtures in each data set's official layout (written here from the published
column layouts), converted and checked row by row; the text steps with tiny random transformers models."""
import csv
import gzip
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_prep as dp  # noqa: E402

LP = dp.LP


# ---- helpers ----

def write_csv(path, header, rows, gz=False):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def png(path, h=8, w=6, value=100, mode="L"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (np.arange(h * w).reshape(h, w) % 200 + value).astype(np.uint16 if mode == "I;16" else np.uint8)
    Image.fromarray(a).save(path)
    return path


def dicom(path, h=8, w=6, photometric="MONOCHROME2", patient_id="P"):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientID = patient_id
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(h * w).reshape(h, w) * 10).astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def read_out(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def convert(name, root, tmp_path, *extra):
    out = tmp_path / "out" / f"{name}.csv"
    summary = dp.main([name, f"--root={root}", f"--out={out}", "--workers=1", *extra])
    return read_out(out), summary, out


def assert_patient_disjoint(rows):
    seen = {}
    for r in rows:
        assert seen.setdefault(r["patient_id"], r["split"]) == r["split"], f"patient {r['patient_id']} in 2 splits"


# ---- report parsing and RLE ----

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.  Note: prior films.

 FINDINGS:
 
 Heart size is normal.  No focal consolidation,
 pleural effusion or pneumothorax.
 
 IMPRESSION:
 
 No acute cardiopulmonary process.
"""


def test_parse_report_sections():
    s = dp.parse_report_sections(MIMIC_REPORT)
    assert s["FINDINGS"] == "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax."
    assert s["IMPRESSION"] == "No acute cardiopulmonary process."
    assert s["INDICATION"] == "___F with cough. Note: prior films."  # "Note:" is not a header


def test_rle_decode_against_hand_made_mask():
    # 4 x 3 image, pixels numbered column by column: (1,0)=1 (2,0)=2 (1,1)=5 (2,1)=6 (3,2)=11
    mask = np.zeros((4, 3), np.uint8)
    mask[1:3, 0:2] = 255
    mask[3, 2] = 255
    assert np.array_equal(dp.rle_decode("1 2 2 2 4 1", 4, 3, relative=True), mask)  # stage 1: offsets
    assert np.array_equal(dp.rle_decode("2 2 6 2 12 1", 4, 3, relative=False), mask)  # stage 2: absolute, 1-based
    assert not np.array_equal(dp.rle_decode("1 2 2 2 4 1", 4, 3, relative=False), mask)  # the two forms differ


# ---- converters ----

def test_mimic_cxr(tmp_path):
    root = tmp_path / "mimic"
    meta = [("d1", "10000001", "50000001", "PA"), ("d2", "10000001", "50000001", "LATERAL"),
            ("d3", "10000001", "50000002", "AP"), ("d4", "11000002", "50000003", "PA"),
            ("d5", "11000002", "50000003", "PA")]  # d5: image missing
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id",
              "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"],
              [(d, p, s, "CHEST (PA AND LAT)", v, 8, 6, 21800101, 1) for d, p, s, v in meta], gz=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [("d1", "50000001", "10000001", "train"), ("d2", "50000001", "10000001", "train"),
               ("d3", "50000002", "10000001", "train"), ("d4", "50000003", "11000002", "validate"),
               ("d5", "50000003", "11000002", "validate")], gz=True)
    lab = {k: "" for k in dp.CHEXPERT_14}
    r1 = dict(lab, **{"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""})
    r2 = dict(lab, **{"No Finding": "1.0", "Pneumothorax": "0.0"})
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + dp.CHEXPERT_14,
              [["10000001", "50000001"] + [r1[k] for k in dp.CHEXPERT_14],
               ["11000002", "50000003"] + [r2[k] for k in dp.CHEXPERT_14]], gz=True)
    for d, p, s, _ in meta[:4]:
        png(root / "files" / f"p{p[:2]}" / f"p{p}" / f"s{s}" / f"{d}.jpg")
    rp = root / "files" / "p10" / "p10000001" / "s50000001.txt"
    rp.write_text(MIMIC_REPORT)
    rows, summary, out = convert("mimic_cxr", root, tmp_path)
    assert summary["written"] == 4 and summary["skipped_missing"] == 1
    by = {Path(r["image"]).stem: r for r in rows}
    assert (out.parent / by["d1"]["image"]).exists()
    assert by["d1"]["split"] == "train" and by["d4"]["split"] == "valid"
    assert by["d2"]["view"] == "LATERAL" and by["d3"]["view"] == "AP"
    assert by["d1"][LP + "Cardiomegaly"] == "1" and by["d1"][LP + "Edema"] == "-1"
    assert by["d1"][LP + "Atelectasis"] == "" and by["d4"][LP + "Pneumothorax"] == "0"
    assert by["d3"][LP + "Cardiomegaly"] == ""  # study without a labeler row: all blank
    assert by["d1"]["impression"] == "No acute cardiopulmonary process."
    assert by["d2"]["findings"].startswith("Heart size is normal.")
    assert by["d4"]["findings"] == "" and by["d1"]["study_id"] == "50000001"


CHEX_HEAD = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + dp.CHEXPERT_14


def chex_row(path, fl="Frontal", appa="AP", **labels):
    lab = {k: "" for k in dp.CHEXPERT_14}
    lab.update({k.replace("_", " "): v for k, v in labels.items()})
    return [path, "Female", 60, fl, appa] + [lab[k] for k in dp.CHEXPERT_14]


def test_chexpert_and_5x200(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    train = []
    for p in range(1, 21):
        for s, fl in ((1, "Frontal"), (1, "Lateral"), (2, "Frontal")):
            path = f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/view{1 if fl == 'Frontal' else 2}_{fl.lower()}.jpg"
            train.append(chex_row(path, fl, "PA" if fl == "Frontal" else "", Cardiomegaly="1.0" if p % 2 else "-1.0",
                                  Edema="0.0" if p % 3 else ""))
            png(tmp_path / path)
    valid = [chex_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", Pleural_Effusion="1.0")]
    png(tmp_path / valid[0][0])
    write_csv(root / "train.csv", CHEX_HEAD, train)
    write_csv(root / "valid.csv", CHEX_HEAD, valid)
    # the 5x200 file names two training images: one is excluded from chexpert's training rows
    p5 = [chex_row(train[0][0], Cardiomegaly="1.0", Atelectasis="0.0", Consolidation="0.0", Edema="0.0",
                   Pleural_Effusion="0.0"),
          chex_row(train[3][0], Edema="1.0", Atelectasis="0.0", Cardiomegaly="0.0", Consolidation="0.0")]
    write_csv(root / "chexpert_5x200.csv", CHEX_HEAD + ["Report Impression"], [r + ["1. Cardiomegaly."] for r in p5])

    rows, summary, _ = convert("chexpert", root, tmp_path)
    assert summary["written"] == 60 - 2 + 1 and summary["skipped_missing"] == 0  # 2 training images are in 5x200
    assert_patient_disjoint(rows)
    assert {r["split"] for r in rows} == {"train", "valid", "test"}
    assert [r["split"] for r in rows if "patient64541" in r["image"]] == ["test"]
    assert len({r["patient_id"] for r in rows if r["split"] == "valid"}) == 4  # 20% of the 20 training patients
    by = {r["image"].split("CheXpert-v1.0-small/")[-1]: r for r in rows}
    r = by["train/patient00001/study1/view2_lateral.jpg"]
    assert r["view"] == "LATERAL" and r[LP + "Cardiomegaly"] == "1" and r[LP + "Edema"] == "0"
    assert r[LP + "Atelectasis"] == "" and r["study_id"] == "patient00001/study1" and r["patient_id"] == "patient00001"
    assert by["train/patient00002/study2/view1_frontal.jpg"][LP + "Cardiomegaly"] == "-1"
    assert by["train/patient00003/study1/view1_frontal.jpg"][LP + "Edema"] == ""
    assert "train/patient00001/study1/view1_frontal.jpg" not in by  # in 5x200: left out of training

    rows5, _, _ = convert("chexpert5x200", root, tmp_path)
    assert len(rows5) == 2 and {r["split"] for r in rows5} == {"test"}
    assert [r[LP + "Cardiomegaly"] for r in rows5] == ["1", "0"] and [r[LP + "Edema"] for r in rows5] == ["0", "1"]
    assert rows5[0]["impression"] == "1. Cardiomegaly."


def test_nih(tmp_path):
    root = tmp_path / "nih"
    entries, trainval, test = [], [], []
    for p in range(1, 13):
        for k in range(2):
            name = f"{p:08d}_{k:03d}.png"
            lab = ["No Finding", "Effusion|Atelectasis", "Hernia"][(p + k) % 3]
            entries.append([name, lab, k, p, 50, "M", "PA" if k == 0 else "AP", 2500, 2048, 0.14, 0.14])
            (test if p > 10 else trainval).append(name)
            png(root / "images_001" / "images" / name)
    entries.append(["00000099_000.png", "Mass", 0, 99, 50, "M", "PA", 2500, 2048, 0.14, 0.14])  # image missing
    trainval.append("00000099_000.png")
    write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"],
              entries)
    (root / "train_val_list.txt").write_text("\n".join(trainval) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    write_csv(root / "BBox_List_2017.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""],
              [["00000011_000.png", "Effusion", 10.5, 20, 30, 40, "", "", ""]])
    rows, summary, _ = convert("nih", root, tmp_path)
    assert summary["written"] == 24 and summary["skipped_missing"] == 1
    assert_patient_disjoint(rows)
    by = {Path(r["image"]).name: r for r in rows}
    r = by["00000002_001.png"]  # (2+1)%3 = 0 -> No Finding
    assert all(r[LP + k] == "0" for k in dp.NIH_14) and r["view"] == "AP"
    r = by["00000001_000.png"]
    assert r[LP + "Effusion"] == "1" and r[LP + "Atelectasis"] == "1" and r[LP + "Mass"] == "0"
    assert by["00000011_000.png"]["split"] == "test" and json.loads(by["00000011_000.png"]["bbox"]) == \
        [["Effusion", 10.5, 20.0, 30.0, 40.0]]
    assert {r["split"] for r in rows if int(r["patient_id"]) <= 10} == {"train", "valid"}
    # 80/20 by patient over train_val_list's patients (99 included: its image is missing, the split is made first)
    expect = dp.common.split_by_patient([str(p) for p in range(1, 11)] + ["99"], (0.8, 0.2, 0.0), seed=0)
    assert all(r["split"] == expect[r["patient_id"]] for r in rows if int(r["patient_id"]) <= 10)


def test_vindr_union_rule(tmp_path):
    root = tmp_path / "vindr"
    boxes = [("img1", "R1", "Nodule/Mass", 1, 2, 3, 4), ("img1", "R2", "No finding", "", "", "", ""),
             ("img1", "R3", "Cardiomegaly", 1, 1, 5, 5), ("img2", "R1", "No finding", "", "", "", ""),
             ("img2", "R2", "No finding", "", "", "", ""), ("img3", "R4", "Nodule/Mass", 0, 0, 2, 2)]
    for i in range(4, 14):
        boxes.append((f"img{i}", "R1", "No finding", "", "", "", ""))
    head = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    write_csv(root / "annotations" / "annotations_train.csv", head, [b for b in boxes if b[0] != "img3"])
    write_csv(root / "annotations" / "annotations_test.csv", head, [b for b in boxes if b[0] == "img3"])
    write_csv(root / "annotations" / "image_labels_train.csv", ["image_id", "rad_ID", "Nodule/Mass", "Cardiomegaly",
              "COPD", "No finding"], [("img2", "R3", 0, 0, 1, 0)])  # a global label only in image_labels
    for b in boxes:
        dicom(root / ("test" if b[0] == "img3" else "train") / f"{b[0]}.dicom")
    rows, summary, _ = convert("vindr_cxr", root, tmp_path)
    by = {r["study_id"]: r for r in rows}
    assert len(rows) == 13
    assert by["img1"][LP + "Nodule/Mass"] == "1" and by["img1"][LP + "Cardiomegaly"] == "1"
    assert by["img1"][LP + "No finding"] == "0"  # one reader's box outweighs another's "No finding"
    assert by["img2"][LP + "COPD"] == "1" and by["img2"][LP + "No finding"] == "0"
    assert by["img4"][LP + "No finding"] == "1" and by["img4"][LP + "Nodule/Mass"] == "0"
    assert by["img3"]["split"] == "test" and by["img3"][LP + "COPD"] == "0"
    assert {by[f"img{i}"]["split"] for i in (1, 2, *range(4, 14))} == {"train", "valid"}


def test_rsna_pneumonia_several_rows_per_patient(tmp_path):
    root = tmp_path / "rsna"
    rows = [("a", 10, 20, 30, 40, 1), ("a", 50, 60, 70, 80, 1), ("b", "", "", "", "", 0), ("c", 1, 2, 3, 4, 1)]
    rows += [(f"n{i}", "", "", "", "", 0) for i in range(17)]
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    for r in rows:
        if r[0] != "c":
            dicom(root / "stage_2_train_images" / f"{r[0]}.dcm")
    out, summary, _ = convert("rsna_pneumonia", root, tmp_path)
    assert summary["written"] == 19 and summary["skipped_missing"] == 1
    by = {r["patient_id"]: r for r in out}
    assert by["a"][LP + "Pneumonia"] == "1" and by["b"][LP + "Pneumonia"] == "0"
    assert len(json.loads(by["a"]["bbox"])) == 2
    expect = dp.common.split_by_patient([r[0] for r in rows], (0.7, 0.15, 0.15), seed=0)  # "c" included
    assert Counter(expect.values()) == {"train": 14, "valid": 3, "test": 3}
    assert all(r["split"] == expect[r["patient_id"]] for r in out)


def test_siim_masks_and_resize(tmp_path):
    root = tmp_path / "siim"
    expected = np.zeros((4, 3), np.uint8)
    expected[1:3, 0:2] = 255
    expected[3, 2] = 255
    # two rows for img_a (two regions, OR-ed), "-1" for img_b; header with the original leading space
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"],
              [("img_a", " 1 2 2 2"), ("img_a", " 11 1"), ("img_b", " -1"), ("img_c", " -1")])
    dicom(root / "dicom-images-train" / "1.2.3" / "1.2.3.4" / "img_a.dcm", h=4, w=3, patient_id="pat-a")
    dicom(root / "dicom-images-train" / "1.2.5" / "1.2.5.4" / "img_b.dcm", h=4, w=3, photometric="MONOCHROME1",
          patient_id="pat-b")
    rows, summary, out = convert("siim", root, tmp_path)
    assert summary["written"] == 2 and summary["skipped_missing"] == 1
    by = {r["study_id"]: r for r in rows}
    assert by["img_a"]["patient_id"] == "pat-a" and by["img_a"][LP + "Pneumothorax"] == "1"
    assert by["img_b"][LP + "Pneumothorax"] == "0" and by["img_b"]["mask"] == ""
    m = np.asarray(Image.open(out.parent / by["img_a"]["mask"]))
    assert np.array_equal(m, expected)

    # --resize: 8-bit PNG copies through common.load_image (DICOM, MONOCHROME1 inverted), masks resized too
    dicom(root / "dicom-images-train" / "9" / "9" / "img_c.dcm", h=40, w=30, patient_id="pat-c")
    rows, summary, out = convert("siim", root, tmp_path, "--resize=15", "--workers=2")  # through the process pool
    by = {r["study_id"]: r for r in rows}
    img_c = out.parent / by["img_c"]["image"]
    assert img_c.suffix == ".png" and Image.open(img_c).size == (15, 20) and Image.open(img_c).mode == "L"
    b = np.asarray(Image.open(out.parent / by["img_b"]["image"]))  # 4x3: never upscaled
    assert b.shape == (4, 3) and b[0, 0] == 255 and b[-1, -1] == 0  # MONOCHROME1: the smallest value is white
    assert np.array_equal(np.asarray(Image.open(out.parent / by["img_a"]["mask"])), expected)
    t0 = os.path.getmtime(img_c)
    convert("siim", root, tmp_path, "--resize=15")  # written once: a rerun keeps the copies
    assert os.path.getmtime(img_c) == t0


def test_openi_xml(tmp_path):
    root = tmp_path / "openi"
    xml = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><meta type="rr"/><uId id="{uid}"/><pmcId id="1"/>
<MedlineCitation Owner="Indiana University" Status="supplied"><Article PubModel="Electronic">
<Abstract><AbstractText Label="COMPARISON">None.</AbstractText><AbstractText Label="INDICATION">Cough</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText><AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH>{mesh}</MeSH>
{images}</eCitation>"""
    def img(i):
        return f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray</caption><url>/x/{i}.jpg</url></parentImage>\n'
    (root / "ecgen-radiology").mkdir(parents=True)
    (root / "ecgen-radiology" / "1.xml").write_text(xml.format(
        uid="CXR1", findings="The heart is normal.\n  Lungs clear.", impression="Normal chest",
        mesh="<major>normal</major>", images=img("CXR1_1_IM-0001-3001") + img("CXR1_1_IM-0001-4001")))
    (root / "ecgen-radiology" / "2.xml").write_text(xml.format(
        uid="CXR2", findings="", impression="Cardiomegaly. Left basilar opacity.",
        mesh="<major>Cardiomegaly/mild</major><major>Opacity/lung/base/left</major><minor>x</minor>",
        images=img("CXR2_1_IM-0652-1001") + img("CXR2_1_IM-0652-2001")))
    for i in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_1_IM-0652-1001"):
        png(root / "NLMCXR_png" / f"{i}.png")
    rows, summary, _ = convert("openi", root, tmp_path)
    assert summary["written"] == 3 and summary["skipped_missing"] == 1
    by = {Path(r["image"]).stem: r for r in rows}
    r = by["CXR1_1_IM-0001-4001"]
    assert r["findings"] == "The heart is normal. Lungs clear." and r["impression"] == "Normal chest"
    assert r["study_id"] == "CXR1" and r["split"] == "test" and r[LP + "No Finding"] == "1" and r[LP + "Opacity"] == "0"
    r = by["CXR2_1_IM-0652-1001"]
    assert r[LP + "Cardiomegaly"] == "1" and r[LP + "Opacity"] == "1" and r[LP + "No Finding"] == "0"
    assert r["findings"] == "" and r["report"] == "IMPRESSION: Cardiomegaly. Left basilar opacity."


def test_cxr_lt_frontal_folds(tmp_path):
    root = tmp_path / "mimic"
    classes = ["Atelectasis", "Azygos Lobe", "Tortuous Aorta"]
    rows, meta = [], []
    for p in range(20):
        pid, sid = f"1{p:07d}", f"5{p:07d}"
        for d, v in ((f"d{p}a", "PA"), (f"d{p}b", "LATERAL")):
            rows.append([d, pid, sid, f"files/p{pid[:2]}/p{pid}/s{sid}/{d}.jpg", p % 2, int(p == 3), 0])
            meta.append([d, pid, sid, v])
            png(root / "files" / f"p{pid[:2]}" / f"p{pid}" / f"s{sid}" / f"{d}.jpg")
    write_csv(root / "train_labeled.csv", ["dicom_id", "subject_id", "study_id", "fpath"] + classes, rows)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta)
    out, _, _ = convert("cxr_lt", root, tmp_path)
    assert len(out) == 20 and all(r["view"] == "PA" for r in out)
    assert sum(r["split"] == "test" for r in out) == 4 and {r["split"] for r in out} == {"train", "test"}
    assert sorted(Counter(r["fold"] for r in out if r["split"] == "train").values()) == [3, 3, 3, 3, 4]
    assert all(r["fold"] == "" for r in out if r["split"] == "test")
    by = {Path(r["image"]).stem: r for r in out}
    assert by["d3a"][LP + "Azygos Lobe"] == "1" and by["d3a"][LP + "Atelectasis"] == "1"
    assert by["d4a"][LP + "Atelectasis"] == "0"


def test_grazpedwri_boneage_covidx_edema_chd(tmp_path):
    # GRAZPEDWRI-DX: dataset.csv + 16-bit PNG + YOLO box -> mask
    g = tmp_path / "graz"
    write_csv(g / "dataset.csv", ["filestem", "patient_id", "gender", "age", "laterality", "projection",
              "fracture_visible", "metal"], [("0001_a", "0001", "M", 10, "L", 1, 1, ""),
                                             ("0002_b", "0002", "F", 9, "R", 2, "", "")])
    png(g / "images_part1" / "0001_a.png", h=10, w=20, mode="I;16")
    png(g / "images_part1" / "0002_b.png", h=10, w=20)
    (g / "folder_structure" / "yolov5" / "labels").mkdir(parents=True)
    (g / "folder_structure" / "yolov5" / "labels" / "0001_a.txt").write_text("3 0.5 0.5 0.5 0.4\n8 0.1 0.1 0.1 0.1\n")
    rows, _, out = convert("grazpedwri", g, tmp_path)
    by = {r["study_id"]: r for r in rows}
    assert by["0001_a"][LP + "Fracture"] == "1" and by["0002_b"][LP + "Fracture"] == "0"
    assert by["0001_a"]["body_part"] == "wrist" and by["0002_b"]["view"] == "LATERAL"
    m = np.asarray(Image.open(out.parent / by["0001_a"]["mask"]))
    exp = np.zeros((10, 20), np.uint8)
    exp[3:7, 5:15] = 255  # cx 0.5, w 0.5 of 20 -> x 5..15; cy 0.5, h 0.4 of 10 -> y 3..7; class 8 ignored
    assert np.array_equal(m, exp)

    b = tmp_path / "boneage"
    write_csv(b / "boneage-training-dataset.csv", ["id", "boneage", "male"],
              [(1377 + i, 100 + i, "True" if i % 2 else "False") for i in range(10)])
    for i in range(10):
        png(b / "boneage-training-dataset" / f"{1377 + i}.png")
    rows, _, _ = convert("boneage", b, tmp_path)
    by = {r["study_id"]: r for r in rows}
    assert by["1380"]["target"] == "103" and by["1380"]["body_part"] == "hand" and by["1380"]["sex"] == "M"

    c = tmp_path / "covidx"
    (c / "train").mkdir(parents=True)
    lines = {"train": [], "val": [], "test": []}
    for i in range(20):
        part = ["train", "val", "test"][i % 3]
        lines[part].append(f"p{i // 2} img{i}.png {'positive' if i % 4 == 0 else 'negative'} bimcv")
        png(c / part / f"img{i}.png")
    for part, ls in lines.items():
        (c / f"{part}.txt").write_text("\n".join(ls) + "\n")
    rows, _, _ = convert("covidx", c, tmp_path)
    assert len(rows) == 20
    assert_patient_disjoint(rows)
    assert Counter(r["split"] for r in rows) == {"train": 14, "valid": 4, "test": 2}  # 70/20/10 of 10 patients
    assert {r["study_id"].split("/")[1]: r[LP + "COVID-19"] for r in rows}["img8.png"] == "1"

    e = tmp_path / "edema"
    write_csv(e / "edema_severity.csv", ["subject_id", "study_id", "dicom_id", "edema_severity"],
              [(f"1{i:07d}", f"5{i:07d}", f"e{i}", i % 4) for i in range(10)])
    for i in range(10):
        png(e / "files" / "p10" / f"p1{i:07d}" / f"s5{i:07d}" / f"e{i}.jpg")
    rows, _, _ = convert("mimic_edema", e, tmp_path)
    assert [r["target"] for r in sorted(rows, key=lambda r: r["study_id"])] == [str(i % 4) for i in range(10)]
    assert Counter(r["split"] for r in rows) == {"train": 6, "valid": 2, "test": 2}

    h = tmp_path / "chd"
    for cls in ("ASD", "Normal", "VSD"):
        for i in range(3):
            png(h / cls / f"{cls}_{i}.png")
    rows, _, _ = convert("chd_cxr", h, tmp_path)
    assert len(rows) == 9 and set(k for k in rows[0] if k.startswith(LP)) == {LP + "ASD", LP + "VSD"}
    assert {(r["study_id"].split("/")[0], r[LP + "ASD"], r[LP + "VSD"]) for r in rows} == \
        {("ASD", "1", "0"), ("Normal", "0", "0"), ("VSD", "0", "1")}


def test_bad_input_names_file_column_dataset(tmp_path):
    root = tmp_path / "rsna"
    root.mkdir()
    with pytest.raises(dp.DataPrepError, match=r"rsna_pneumonia.*stage_2_train_labels\.csv"):
        convert("rsna_pneumonia", root, tmp_path)
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height"], [("a", 1, 2, 3, 4)])
    with pytest.raises(dp.DataPrepError, match=r"rsna_pneumonia.*stage_2_train_labels\.csv.*'Target'"):
        convert("rsna_pneumonia", root, tmp_path)


# ---- text steps ----

def test_rule_splitter_and_parser():
    report = ("HISTORY: Fall from bike. Right hip: No fracture of the femoral head. Joint space preserved. "
              "Left knee: Small joint effusion. The patella is normal. No acute osseous abnormality.")
    got = dp.split_report_by_rules(report, ["hip", "knee"])
    assert got["hip"] == "No fracture of the femoral head. Joint space preserved."
    assert got["knee"] == "Small joint effusion. The patella is normal. No acute osseous abnormality."
    ans = "Hip: No fracture of the femoral head.\n**Knee**: none"
    assert dp.parse_bodypart_answer(ans, ["hip", "knee"]) == {"hip": "No fracture of the femoral head.", "knee": ""}
    assert dp.parse_bodypart_answer("Hip: fine.", ["hip", "knee"]) is None  # knee missing -> fallback


WORDS = ("the of and a is no to in with hip knee chest lung heart fracture normal clear effusion define give me only "
         "single paragraph short definition disease what are distinguishing radiographic signs compared other "
         "similar conditions : . , answer report").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>"), len(vocab)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    tok, v = tiny_tokenizer()
    d = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=v, n_positions=512, n_embd=16, n_layer=1, n_head=2, bos_token_id=2,
                               eos_token_id=3, pad_token_id=0)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    import torch
    from transformers import MarianConfig, MarianMTModel
    torch.manual_seed(0)
    tok, v = tiny_tokenizer()
    d = tmp_path_factory.mktemp("tiny_marian")
    MarianMTModel(MarianConfig(vocab_size=v, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                               max_position_embeddings=128, pad_token_id=0, eos_token_id=3, bos_token_id=2,
                               decoder_start_token_id=0)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def text_csv(tmp_path):
    p = tmp_path / "pexr.csv"
    rep = "Right hip: no fracture. Left knee: small effusion."
    write_csv(p, dp.BASE_COLUMNS, [
        ("a1.png", "s1", "p1", "train", "AP", "hip", "", "", rep), ("a2.png", "s1", "p1", "train", "AP", "knee", "", "", rep),
        ("b1.png", "s2", "p2", "train", "PA", "chest", "The lung is clear.", "No disease.", ""),
        ("c1.png", "s3", "p3", "train", "AP", "hip", "", "", "Hip: normal. Knee: normal."),
        ("c2.png", "s3", "p3", "train", "AP", "knee", "", "", "Hip: normal. Knee: normal.")])
    return p


def test_extract_bodyparts_with_tiny_lm_falls_back(tmp_path, tiny_lm):
    p = text_csv(tmp_path)
    stats = dp.main(["extract_bodyparts", f"--csv={p}", f"--model={tiny_lm}", "--max_new_tokens=4"])
    rows = read_out(p)
    assert stats["fallback_unparsed"] == 2 and stats["rules"] == 2 and stats["single"] == 1  # random LM: unparsable
    assert [r["excerpt"] for r in rows] == ["no fracture.", "small effusion.",
                                            "FINDINGS: The lung is clear. IMPRESSION: No disease.", "normal.", "normal."]
    assert dp.main(["extract_bodyparts", f"--csv={p}", f"--model={tiny_lm}"])["skipped_done"] == 3  # resume


def test_extract_bodyparts_parsed_answer_and_resume(tmp_path):
    p = text_csv(tmp_path)
    calls = []

    def fake_generate(prompts):
        calls.append(prompts)
        assert "hip, knee" in prompts[0] and "Right hip: no fracture." in prompts[0]
        return ["hip: No fracture.\nknee: Small effusion.", "garbled"]
    stats = dp.extract_bodyparts(str(p), fake_generate, batch_size=8)
    assert stats["llm"] == 1 and stats["fallback_unparsed"] == 1 and len(calls) == 1 and len(calls[0]) == 2
    rows = read_out(p)
    assert [(r["excerpt"], r["excerpt_source"]) for r in rows[:2]] == [("No fracture.", "llm"), ("Small effusion.", "llm")]
    rows[3]["excerpt_source"] = ""  # "interrupted" before s3 was saved: only s3 is asked again
    dp.common.write_csv_atomic(p, rows, list(rows[0].keys()))
    calls.clear()
    stats = dp.extract_bodyparts(str(p), lambda ps: calls.append(ps) or ["hip: a\nknee: b"] * len(ps))
    assert stats["skipped_done"] == 2 and len(calls[0]) == 1 and read_out(p)[3]["excerpt"] == "a"
    assert dp.extract_bodyparts(str(p), None)["skipped_done"] == 3  # nothing left to do


def test_knowledge_tiny_lm_and_resume(tmp_path, tiny_lm):
    out = tmp_path / "knowledge.json"
    out.write_text(json.dumps({"Edema": {"definition": "kept", "appearance": "kept too"}}))
    dp.main(["knowledge", "--findings=Edema,Pleural_Effusion,Cardiomegaly", f"--model={tiny_lm}", f"--out={out}",
             "--max_new_tokens=6"])
    k = json.loads(out.read_text())
    assert k["Edema"] == {"definition": "kept", "appearance": "kept too"}
    for n, v in k.items():
        assert set(v) == {"definition", "appearance"} and all(isinstance(x, str) and x for x in v.values())
    prompts = []
    dp.build_knowledge(["Edema", "Pleural_Effusion", "Atelectasis"],
                       lambda ps: prompts.extend(ps) or ["Definition: A collapse." if p.startswith("Define") else
                                                         "Radiographic characteristics: Volume loss." for p in ps], str(out))
    done = set(k)
    assert ("Pleural_Effusion" in done) == all("Pleural Effusion" not in p for p in prompts)
    assert dp.DEFINITION_PROMPT.format(name="Atelectasis") in prompts
    assert dp.APPEARANCE_PROMPT.format(name="Atelectasis") in prompts
    assert json.loads(out.read_text())["Atelectasis"] == {"definition": "A collapse.", "appearance": "Volume loss."}


def test_backtranslate_tiny_marian_and_resume(tmp_path, tiny_marian):
    p = text_csv(tmp_path)
    stats = dp.main(["backtranslate", f"--csv={p}", f"--en_it={tiny_marian}", f"--it_en={tiny_marian}",
                     "--max_new_tokens=5"])
    rows = read_out(p)
    assert stats["rows_done"] == 1 and stats["sentences"] == 2
    assert rows[2]["findings_bt"] and rows[2]["impression_bt"] and rows[0]["findings_bt"] == ""
    seen = []
    st = dp.backtranslate(str(p), lambda t: seen.extend(t) or t, lambda t: t)
    assert st["rows_skipped_done"] == 5 and seen == []
    rows[2]["impression_bt"] = ""
    dp.common.write_csv_atomic(p, rows, list(rows[0].keys()))
    dp.backtranslate(str(p), lambda t: [s.upper() for s in t], lambda t: [s + "!" for s in t])
    rows = read_out(p)
    assert rows[2]["impression_bt"] == "NO DISEASE.!" and rows[2]["findings_bt"] != "THE LUNG IS CLEAR.!"


def test_offline_model_fails_fast_with_message(tmp_path):
    p = text_csv(tmp_path)
    with pytest.raises(dp.DataPrepError, match=r"--model.*local_files_only=True"):
        dp.main(["knowledge", "--findings=Edema", f"--model={tmp_path / 'no-such-model'}", f"--out={tmp_path / 'k.json'}"])
    with pytest.raises(dp.DataPrepError, match=r"--en_it"):
        dp.main(["backtranslate", f"--csv={p}", "--en_it=nobody/no-such-model-xyz", "--it_en=x"])


# ---- --decode_device: batched JPEG decoding on a device, then the CPU pass ----

def _fake_decode_jpeg(calls):
    """Stands in for torchvision.io.decode_jpeg(list, mode=GRAY, device=...) where torchvision cannot import:
    the same contract (a list of 1-D uint8 byte tensors in, [1, H, W] uint8 tensors out, and one bad file
    fails the whole call), decoded with PIL. Records the batch sizes it was called with."""
    import io

    import torch

    def decode(datas, device):
        calls.append(len(datas))
        out = []
        for d in datas:
            try:
                with Image.open(io.BytesIO(d.numpy().tobytes())) as im:
                    im.load()
                    if im.format != "JPEG":
                        raise ValueError(f"not a JPEG but {im.format}")
                    out.append(torch.from_numpy(np.array(im.convert("L")))[None].to(device))
            except Exception as e:
                raise RuntimeError(f"decode_jpeg: {e}") from e
        return out
    return decode


def test_shrink_is_an_area_filter():
    import cv2
    import torch
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (60, 90), dtype=np.uint8)
    # integer factor 3: exactly the mean of each 3x3 block (computed here with numpy), rounded
    block = a.reshape(20, 3, 30, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.array_equal(dp.shrink(torch.from_numpy(a)[None], 20), np.round(block).astype(np.uint8))
    # a non-integer factor on image-like (smooth) content: within a grey level of OpenCV's INTER_AREA, the
    # CPU path's filter. (torch's area windows are whole pixels, OpenCV weights the partial edge pixels, so
    # on white noise the two differ by ~10 levels; radiographs are not white noise.)
    smooth = cv2.GaussianBlur(a, (0, 0), 4)
    got = dp.shrink(torch.from_numpy(smooth)[None], 25).astype(np.float64)
    ref = cv2.resize(smooth, (38, 25), interpolation=cv2.INTER_AREA)  # 90 * 25/60 = 37.5 -> 38 columns
    assert got.shape == ref.shape == (25, 38)
    assert np.abs(got - ref).mean() < 1.0
    small = rng.integers(0, 256, (10, 12), dtype=np.uint8)  # never upscaled
    assert np.array_equal(dp.shrink(torch.from_numpy(small)[None], 20), small)


def test_resize_copies_on_device_matches_cpu_path(tmp_path, capsys):
    import cv2
    rng = np.random.default_rng(1)
    root = tmp_path / "root"
    root.mkdir()
    films = []
    for i in range(5):  # smooth content, like a radiograph; sizes differ (the batch is ragged)
        h, w = 90 + 10 * i, 120
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(root / f"f{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        films.append(root / f"f{i}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")  # fails the batched call
    png(root / "p.png", h=64, w=64)  # not a JPEG: never given to the device decoder
    paths = films[:3] + [root / "broken.jpg", root / "p.png"] + films[3:]

    def rows():
        return [{"image": str(p)} for p in paths]

    cpu_rows, dev_rows = rows(), rows()
    cpu_err = dp.resize_copies(cpu_rows, root, tmp_path / "cpu", 32, "png", 1)
    calls = []
    dev_err = dp.resize_copies(dev_rows, root, tmp_path / "dev", 32, "png", 1, decode_device="cpu",
                               decode=_fake_decode_jpeg(calls))
    # one batched call of the 6 JPEGs, which the broken file fails, then one call per file to find it
    assert calls == [6] + [1] * 6
    assert "decoded and resized 5 JPEGs on cpu" in capsys.readouterr().out  # the 5 good films: not the CPU pass
    # the broken file is reported by the CPU pass, by name, exactly as without --decode_device
    assert [bool(e) for e in dev_err] == [bool(e) for e in cpu_err] == [False] * 3 + [True] + [False] * 3
    assert "broken.jpg" in dev_err[3] and "broken.jpg" in cpu_err[3]
    for a, b in zip(cpu_rows, dev_rows):
        if a["image"].endswith("broken.jpg"):
            continue
        assert Path(b["image"]).is_relative_to(tmp_path / "dev")
        x, y = (np.asarray(Image.open(r["image"]), dtype=np.float64) for r in (a, b))
        assert x.shape == y.shape and min(x.shape) == 32
        assert np.abs(x - y).mean() < 1.0, a["image"]  # area filter on the device vs cv2.INTER_AREA
    assert not list((tmp_path / "dev").rglob("*.tmp*"))  # atomic writes


def test_decode_device_flag_errors(tmp_path):
    import torch
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(dp.DataPrepError, match="only applies to --resize"):
        dp.main(["covidx", f"--root={root}", f"--out={tmp_path / 'o.csv'}", "--decode_device=cuda"])
    if not torch.cuda.is_available():
        with pytest.raises(dp.DataPrepError, match="--decode_device=cuda: no such device"):
            dp.main(["covidx", f"--root={root}", f"--out={tmp_path / 'o.csv'}", "--resize=64",
                     "--decode_device=cuda"])


def test_bench_decode(tmp_path, capsys):
    rows = dp.main(["bench_decode", "--n=3", "--synthetic=80x64", "--size=32", "--workers=1"])
    out = capsys.readouterr().out
    assert [r["decoder"] for r in rows] == ["original JPEG, PIL, 1 processes", "resized 32 PNG copy, PIL, 1 processes"]
    assert all(r["images_per_s"] > 0 for r in rows) and "images/s" in out and "MiB each" in out
    calls = []
    paths = dp.synthetic_jpegs(tmp_path, 4, 48, 40)
    rows = dp.bench_decode(paths, 16, [1], decode_device="cpu", batch_size=2, decode=_fake_decode_jpeg(calls))
    assert rows[-1]["decoder"] == "original JPEG, decode_jpeg on cpu, batch 2" and rows[-1]["images_per_s"] > 0
    assert calls == [2, 2, 2]  # start-up batch, then the two timed batches
    with pytest.raises(dp.DataPrepError, match="--workers"):
        dp.main(["bench_decode", "--workers=one"])
