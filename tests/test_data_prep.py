"""Tests of data_prep.py: tiny fixtures written in each release's published layout (its file names and
headers), converted and checked row by row against hand-made expectations; the text steps with tiny random
transformers models and stand-in generators."""
import csv
import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common
import data_prep as dp

LP = dp.LP
ROOT = Path(__file__).resolve().parents[1]


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


def dicom(path, h=8, w=6, photometric="MONOCHROME2", patient_id="P", view=None):
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
    if view is not None:
        ds.ViewPosition = view
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
    rows = read_out(out)
    assert {r["dataset"] for r in rows} == {name}  # every row names the subcommand that wrote it
    return rows, summary, out


def assert_patient_disjoint(rows):
    seen = {}
    for r in rows:
        assert seen.setdefault(r["patient_id"], r["split"]) == r["split"], f"{r['patient_id']} in 2 splits"


def mimic_jpg(root, subject, study, dicom_id):
    return png(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg")


MIMIC_META_HEAD = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                   "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}


def mimic_release(root, images):
    """MIMIC-CXR-JPG's metadata and split files for [(dicom_id, subject, study, view, split)]."""
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META_HEAD,
              [(d, p, s, "CHEST (PA AND LAT)", v, 8, 6, 21800101, 1.0, "CHEST (PA AND LAT)", CODE.get(v, ""),
                "Erect") for d, p, s, v, _ in images], gz=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [(d, s, p, sp) for d, p, s, _, sp in images], gz=True)


# ---- MIMIC report sections (issue: sections under other headers came out empty) ----

MIMIC_REPORT = "\n".join([  # as published: lines open with a space, paragraphs end in " \n"
    "                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", "",
    " INDICATION:  ___F with cough.  Note: prior films.", "", " FINDINGS:", " ",
    " Heart size is normal.  No focal consolidation,", " pleural effusion or pneumothorax.", " ",
    " IMPRESSION:", " ", " No acute cardiopulmonary process.", ""])


def test_parse_report_sections_header_variants():
    s = dp.parse_report_sections(MIMIC_REPORT)
    assert s["findings"] == "Heart size is normal. No focal consolidation, pleural effusion or pneumothorax."
    assert s["impression"] == "No acute cardiopulmonary process."
    assert s["indication"] == "___F with cough. Note: prior films."  # "Note:" is not a header
    both = " FINAL REPORT\n INDICATION:  Dyspnea.\n \n FINDINGS AND IMPRESSION:\n \n Mild pulmonary edema.\n"
    assert dp.parse_report_sections(both) == {"indication": "Dyspnea.", "impression": "Mild pulmonary edema."}
    slash = " FINDINGS/IMPRESSION:  No pneumothorax.\n"
    assert dp.parse_report_sections(slash) == {"impression": "No pneumothorax."}
    views = " CHEST, PA AND LATERAL:\n \n Lungs are clear.\n \n CONCLUSION:  Normal chest.\n"
    assert dp.parse_report_sections(views) == {"findings": "Lungs are clear.", "impression": "Normal chest."}
    bare = "                                 FINAL REPORT\n PA and lateral views of the chest.\n \n" \
           " The lungs are clear.  No effusion.\n"
    assert dp.parse_report_sections(bare) == {"impression": "The lungs are clear. No effusion."}
    tail = " FINAL REPORT\n COMPARISON:  None.\n \n Lungs are clear without consolidation.\n"
    assert dp.parse_report_sections(tail) == {"comparison": "None.",
                                              "impression": "Lungs are clear without consolidation."}


# ---- masks ----

def test_rle_decode_against_hand_made_mask():
    # 4 x 3 image, pixels numbered column by column: (1,0)=1 (2,0)=2 (1,1)=5 (2,1)=6 (3,2)=11
    mask = np.zeros((4, 3), np.uint8)
    mask[1:3, 0:2] = 255
    mask[3, 2] = 255
    assert np.array_equal(dp.rle_decode("1 2 2 2 4 1", 4, 3, relative=True), mask)  # stage 1: offsets
    assert np.array_equal(dp.rle_decode("2 2 6 2 12 1", 4, 3, relative=False), mask)  # stage 2: absolute
    assert not np.array_equal(dp.rle_decode("1 2 2 2 4 1", 4, 3, relative=False), mask)  # the forms differ
    for empty in ("", "-1", " -1"):
        assert not dp.rle_decode(empty, 4, 3).any()


# ---- converters ----

def mimic_cxr_release(tmp_path):
    """MIMIC-CXR-JPG (images, metadata, split, labels) and MIMIC-CXR's reports in a folder of their own: the 5
    images of the hand-checked studies below, plus 100 one-image studies, each with its report; s50000003's
    report is missing (1 of 103 studies) and so is image d5."""
    root = tmp_path / "mimic"
    images = [("d1", "10000001", "50000001", "PA", "train"),
              ("d2", "10000001", "50000001", "LATERAL", "train"),
              ("d3", "10000001", "50000002", "AP", "train"),
              ("d4", "11000002", "50000003", "PA", "validate"),
              ("d5", "11000002", "50000003", "PA", "validate")]  # d5: image missing
    images += [(f"x{k}", f"12{k:06d}", f"51{k:06d}", "PA", "train") for k in range(100)]
    mimic_release(root, images)
    lab = {k: "" for k in dp.CHEXPERT_14}
    r1 = dict(lab, **{"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""})
    r2 = dict(lab, **{"No Finding": "1.0", "Pneumothorax": "0.0"})
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + dp.CHEXPERT_14,
              [["10000001", "50000001"] + [r1[k] for k in dp.CHEXPERT_14],
               ["11000002", "50000003"] + [r2[k] for k in dp.CHEXPERT_14]], gz=True)
    reports = tmp_path / "mimic-cxr-reports"  # the reports come from MIMIC-CXR, not -JPG: --reports

    def report(p, s, text):
        (reports / "files" / f"p{p[:2]}" / f"p{p}").mkdir(parents=True, exist_ok=True)
        (reports / "files" / f"p{p[:2]}" / f"p{p}" / f"s{s}.txt").write_text(text)
    for d, p, s, _, _ in images:
        if d != "d5":
            mimic_jpg(root, p, s, d)
        if d.startswith("x"):
            report(p, s, " FINAL REPORT\n IMPRESSION:  No acute process.\n")
    report("10000001", "50000001", MIMIC_REPORT)
    report("10000001", "50000002", " FINAL REPORT\n FINDINGS AND IMPRESSION:  Stable cardiomegaly.\n")
    return root, reports


def test_mimic_cxr(tmp_path, capsys):
    root, reports = mimic_cxr_release(tmp_path)
    rows, summary, out = convert("mimic_cxr", root, tmp_path, f"--reports={reports}")
    assert summary["written"] == 104 and summary["skipped_missing"] == 1
    printed = capsys.readouterr().out  # a few missing reports are counted and named, not silent
    assert "without a report file: 1 " in printed and "p11000002/s50000003.txt" in printed
    by = {Path(r["image"]).stem: r for r in rows}
    assert (out.parent / by["d1"]["image"]).exists()
    assert by["d1"]["split"] == "train" and by["d4"]["split"] == "valid"
    assert by["d2"]["view"] == "LATERAL" and by["d3"]["view"] == "AP"
    assert by["d1"][LP + "Cardiomegaly"] == "1" and by["d1"][LP + "Edema"] == "-1"
    assert by["d1"][LP + "Atelectasis"] == "" and by["d4"][LP + "Pneumothorax"] == "0"
    assert by["d3"][LP + "Cardiomegaly"] == ""  # study without a labeler row: all blank
    assert by["d1"]["impression"] == "No acute cardiopulmonary process."
    assert by["d2"]["findings"].startswith("Heart size is normal.")
    assert by["d3"]["impression"] == "Stable cardiomegaly." and by["d3"]["findings"] == ""
    assert by["d3"]["report"] == "IMPRESSION: Stable cardiomegaly."
    assert by["d4"]["findings"] == "" and by["d1"]["study_id"] == "50000001"
    assert by["x7"]["impression"] == "No acute process."
    rows, _, _ = convert("mimic_cxr", root, tmp_path, f"--reports={reports / 'files'}")  # the folder below
    assert sum(bool(r["impression"]) for r in rows) == 103  # all but d4, whose study has no report


def test_mimic_cxr_without_its_reports_is_an_error(tmp_path):
    root, reports = mimic_cxr_release(tmp_path)
    with pytest.raises(common.UserError, match=r"103 of 103 studies have no report .*--reports=.*"
                                               r"without --reports they are looked for under --root"):
        convert("mimic_cxr", root, tmp_path)  # the flag forgotten: MIMIC-CXR-JPG has no reports
    with pytest.raises(common.UserError, match=r"103 of 103 .*the first: .*other/files/p10/p10000001/"
                                               r"s50000001\.txt"):
        convert("mimic_cxr", root, tmp_path, f"--reports={tmp_path / 'other'}")
    (reports / "files" / "p12" / "p12000000" / "s51000000.txt").unlink()  # 2 of 103: past 1%
    with pytest.raises(common.UserError, match=r"2 of 103 studies have no report .*s50000003\.txt, .*"
                                               r"s51000000\.txt"):
        convert("mimic_cxr", root, tmp_path, f"--reports={reports}")
    assert not (tmp_path / "out" / "mimic_cxr.csv").exists()  # nothing written


CHEX_HEAD = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + dp.CHEXPERT_14


def chex_row(path, fl="Frontal", appa="AP", **labels):
    lab = {k: "" for k in dp.CHEXPERT_14}
    lab.update({k.replace("_", " "): v for k, v in labels.items()})
    return [path, "Female", 60, fl, appa] + [lab[k] for k in dp.CHEXPERT_14]


def chexpert_release(tmp_path, with_5x200=True):
    root = tmp_path / "CheXpert-v1.0-small"
    train = []
    for p in range(1, 21):
        for s, fl in ((1, "Frontal"), (1, "Lateral"), (2, "Frontal")):
            path = (f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/"
                    f"view{1 if fl == 'Frontal' else 2}_{fl.lower()}.jpg")
            train.append(chex_row(path, fl, "PA" if fl == "Frontal" else "",
                                  Cardiomegaly="1.0" if p % 2 else "-1.0", Edema="0.0" if p % 3 else ""))
            png(tmp_path / path)
    valid = [chex_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
                      Pleural_Effusion="1.0")]
    png(tmp_path / valid[0][0])
    write_csv(root / "train.csv", CHEX_HEAD, train)
    write_csv(root / "valid.csv", CHEX_HEAD, valid)
    if with_5x200:  # GLoRIA's file names the full-size archive; two of its images are patients 1 and 2's
        p5 = [chex_row(train[0][0].replace("-small", ""), Cardiomegaly="1.0", Atelectasis="0.0",
                       Consolidation="0.0", Edema="0.0", Pleural_Effusion="0.0"),
              chex_row(train[3][0].replace("-small", ""), Edema="1.0", Atelectasis="0.0", Cardiomegaly="0.0",
                       Consolidation="0.0")]
        write_csv(root / "chexpert_5x200.csv", CHEX_HEAD + ["Report Impression"],
                  [r + ["1. Cardiomegaly."] for r in p5])
    return root


def test_chexpert_5x200_patients_left_out_and_split_schemes(tmp_path, capsys):
    root = chexpert_release(tmp_path)
    rows, summary, _ = convert("chexpert", root, tmp_path)
    assert summary["written"] == 60 - 6 + 1  # every image of patients 1 and 2, not only the two 5x200 images
    assert not [r for r in rows if r["patient_id"] in ("patient00001", "patient00002")]
    assert_patient_disjoint(rows)
    assert [r["split"] for r in rows if "patient64541" in r["image"]] == ["test"]
    assert len({r["patient_id"] for r in rows if r["split"] == "valid"}) == 4  # 20% of the 18 patients left
    by = {r["image"].split("CheXpert-v1.0-small/")[-1]: r for r in rows}
    r = by["train/patient00003/study1/view2_lateral.jpg"]
    assert r["view"] == "LATERAL" and r[LP + "Cardiomegaly"] == "1" and r[LP + "Edema"] == ""
    assert r[LP + "Atelectasis"] == "" and r["study_id"] == "patient00003/study1"
    assert by["train/patient00004/study2/view1_frontal.jpg"][LP + "Cardiomegaly"] == "-1"
    assert by["train/patient00004/study2/view1_frontal.jpg"][LP + "Edema"] == "0"

    rows, _, _ = convert("chexpert", root, tmp_path, "--split=cxrclip")  # all of train.csv, official valid
    assert Counter(r["split"] for r in rows) == {"train": 54, "valid": 1}

    rows5, _, _ = convert("chexpert5x200", root, tmp_path)
    assert len(rows5) == 2 and {r["split"] for r in rows5} == {"test"}
    assert [r[LP + "Cardiomegaly"] for r in rows5] == ["1", "0"]
    assert [r[LP + "Edema"] for r in rows5] == ["0", "1"]
    assert rows5[0]["impression"] == "1. Cardiomegaly."

    capsys.readouterr()
    other = tmp_path / "no5x200"
    rows, _, _ = convert("chexpert", chexpert_release(other, with_5x200=False), tmp_path)
    assert len(rows) == 61 and "no chexpert_5x200.csv" in capsys.readouterr().out  # said, not silent


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
    entries.append(["00000099_000.png", "Mass", 0, 99, 50, "M", "PA", 2500, 2048, 0.14, 0.14])  # no image
    trainval.append("00000099_000.png")
    write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
              "Patient Age", "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"], entries)
    (root / "train_val_list.txt").write_text("\n".join(trainval) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    bbox_head = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]  # as published
    write_csv(root / "BBox_List_2017.csv", bbox_head,
              [["00000011_000.png", "Effusion", 10.5, 20, 30, 40, "", "", ""]])
    rows, summary, _ = convert("nih", root, tmp_path)
    assert summary["written"] == 24 and summary["skipped_missing"] == 1
    assert_patient_disjoint(rows)
    by = {Path(r["image"]).name: r for r in rows}
    r = by["00000002_001.png"]  # (2+1)%3 = 0 -> No Finding
    assert all(r[LP + k] == "0" for k in dp.NIH_14) and r["view"] == "AP"
    r = by["00000001_000.png"]
    assert r[LP + "Effusion"] == "1" and r[LP + "Atelectasis"] == "1" and r[LP + "Mass"] == "0"
    assert by["00000011_000.png"]["split"] == "test"
    assert "bbox" not in rows[0]  # BBox_List_2017.csv is there, and no reader of the CSV uses its boxes
    # 80/20 by patient over train_val_list's patients (99 too: the split comes before the missing image)
    expect = common.split_by_patient([str(p) for p in range(1, 11)] + ["99"], (0.8, 0.2, 0.0), seed=0)
    assert all(r["split"] == expect[r["patient_id"]] for r in rows if int(r["patient_id"]) <= 10)


# VinDr-CXR 1.0.0's image-level labels, in the order of its image_labels_train.csv (22 local, 6 global)
VINDR_CXR = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
             "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
             "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
             "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
             "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]


def test_vindr_cxr_reader_union_and_one_other_diseases_column(tmp_path):
    root = tmp_path / "vindr-cxr" / "1.0.0"

    def lab(image_id, *pos, reader=None):
        return [image_id] + ([reader] if reader else []) + [int(c in pos) for c in VINDR_CXR]

    train = [lab("img1", "Nodule/Mass", reader="R1"), lab("img1", "No finding", reader="R2"),
             lab("img1", "Cardiomegaly", reader="R3"), lab("img2", "No finding", reader="R1"),
             lab("img2", "COPD", reader="R2"), lab("img5", "Other diseases", reader="R8")]
    train += [lab(f"img{i}", "No finding", reader=f"R{j}") for i in (4, *range(6, 14)) for j in (1, 2, 3)]
    write_csv(root / "annotations" / "image_labels_train.csv", ["image_id", "rad_id"] + VINDR_CXR, train)
    test_head = ["image_id"] + [c if c != "Other diseases" else "Other disease" for c in VINDR_CXR]
    write_csv(root / "annotations" / "image_labels_test.csv", test_head, [lab("img3", "Other diseases")])
    write_csv(root / "annotations" / "annotations_train.csv", ["image_id", "rad_id", "class_name", "x_min",
              "y_min", "x_max", "y_max"], [("img1", "R1", "Nodule/Mass", 1, 2, 3, 4)])
    for i in range(1, 14):
        dicom(root / ("test" if i == 3 else "train") / f"img{i}.dicom")
    rows, _, out = convert("vindr_cxr", root, tmp_path)
    by = {r["study_id"]: r for r in rows}
    assert len(rows) == 13
    assert by["img1"][LP + "Nodule/Mass"] == "1" and by["img1"][LP + "Cardiomegaly"] == "1"
    assert by["img1"][LP + "No finding"] == "0"  # one reader's finding outweighs another's "No finding"
    assert by["img2"][LP + "COPD"] == "1" and by["img2"][LP + "No finding"] == "0"
    assert by["img4"][LP + "No finding"] == "1" and by["img4"][LP + "Nodule/Mass"] == "0"
    header = next(csv.reader(open(out)))
    assert LP + "Other disease" not in header and header.count(LP + "Other diseases") == 1
    assert by["img3"][LP + "Other diseases"] == "1" and by["img5"][LP + "Other diseases"] == "1"
    assert by["img3"]["split"] == "test" and by["img3"][LP + "COPD"] == "0"
    assert {by[f"img{i}"]["split"] for i in (1, 2, *range(4, 14))} == {"train", "valid"}
    assert sorted(c[len(LP):] for c in header if c.startswith(LP)) == sorted(VINDR_CXR)


VINDR_PCXR = [  # the image-level diseases of image_labels_*.csv, spelt as published
              "No finding", "Bronchitis", "Brocho-pneumonia", "Other disease", "Bronchiolitis",
              "Situs inversus", "Pneumonia", "Pleuro-pneumonia", "Diagphramatic hernia", "Tuberculosis",
              "Congenital emphysema", "CPAM", "Hyaline membrane disease", "Mediastinal tumor", "Lung tumor"]


def test_vindr_pcxr_image_level_labels_only(tmp_path):
    root = tmp_path / "vindr-pcxr" / "1.0.0"
    for part, ids in (("train", range(5)), ("test", range(5, 7))):
        write_csv(root / f"image_labels_{part}.csv", ["image_id", "rad_ID"] + VINDR_PCXR,
                  [[f"p{i}", "R1"] + [int(c == ("Bronchiolitis" if i % 2 else "No finding"))
                                      for c in VINDR_PCXR] for i in ids])
        write_csv(root / f"annotations_{part}.csv", ["image_id", "rad_id", "class_name", "x_min", "y_min",
                  "x_max", "y_max"], [(f"p{i}", "R1", "Reticulonodular opacity", 1, 1, 3, 3) for i in ids])
        for i in ids:
            dicom(root / part / f"p{i}.dicom")
    rows, _, out = convert("vindr_pcxr", root, tmp_path)
    header = next(csv.reader(open(out)))
    assert sorted(c[len(LP):] for c in header if c.startswith(LP)) == sorted(VINDR_PCXR)  # no box class
    by = {r["study_id"]: r for r in rows}
    assert by["p1"][LP + "Bronchiolitis"] == "1" and by["p1"][LP + "No finding"] == "0"
    assert by["p6"]["split"] == "test" and by["p0"][LP + "No finding"] == "1"


def test_rsna_pneumonia_boxes_become_masks(tmp_path):
    root = tmp_path / "rsna"
    rows = [("a", "1.0", "2.0", "2.0", "3.0", 1), ("a", "3.0", "6.0", "3.0", "2.0", 1),
            ("b", "", "", "", "", 0), ("c", 1, 2, 3, 4, 1)]
    rows += [(f"n{i}", "", "", "", "", 0) for i in range(17)]
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    for r in rows:
        if r[0] != "c":
            dicom(root / "stage_2_train_images" / f"{r[0]}.dcm", h=8, w=6)
    out, summary, csv_path = convert("rsna_pneumonia", root, tmp_path)
    assert summary["written"] == 19 and summary["skipped_missing"] == 1
    by = {r["patient_id"]: r for r in out}
    assert by["a"][LP + "Pneumonia"] == "1" and by["b"][LP + "Pneumonia"] == "0"
    expected = np.zeros((8, 6), np.uint8)  # box 1: x 1..3, y 2..5; box 2: x 3..6, y 6..8
    expected[2:5, 1:3] = 255
    expected[6:8, 3:6] = 255
    assert np.array_equal(np.asarray(Image.open(csv_path.parent / by["a"]["mask"])), expected)
    assert by["b"]["mask"] == ""  # no pneumonia: an empty mask, as SIIM's negatives
    expect = common.split_by_patient([r[0] for r in rows], (0.7, 0.15, 0.15), seed=0)  # "c" included
    assert Counter(expect.values()) == {"train": 14, "valid": 3, "test": 3}
    assert all(r["split"] == expect[r["patient_id"]] for r in out)


def test_siim_relative_rle_masks(tmp_path):
    root = tmp_path / "siim"
    expected = np.zeros((4, 3), np.uint8)
    expected[1:3, 0:2] = 255
    expected[3, 2] = 255
    # two rows for img_a (two regions, OR-ed), "-1" for img_b; the header with its published leading space
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"],
              [("img_a", " 1 2 2 2"), ("img_a", " 11 1"), ("img_b", " -1"), ("img_c", " -1")])
    dicom(root / "dicom-images-train" / "1.2.3" / "1.2.3.4" / "img_a.dcm", h=4, w=3, patient_id="pat-a")
    dicom(root / "dicom-images-train" / "1.2.5" / "1.2.5.4" / "img_b.dcm", h=4, w=3,
          photometric="MONOCHROME1", patient_id="pat-b")
    rows, summary, out = convert("siim", root, tmp_path)
    assert summary["written"] == 2 and summary["skipped_missing"] == 1
    by = {r["study_id"]: r for r in rows}
    assert by["img_a"]["patient_id"] == "pat-a" and by["img_a"][LP + "Pneumothorax"] == "1"
    assert by["img_b"][LP + "Pneumothorax"] == "0" and by["img_b"]["mask"] == ""
    assert np.array_equal(np.asarray(Image.open(out.parent / by["img_a"]["mask"])), expected)


def test_siim_prefers_the_stage_2_labels_and_says_so(tmp_path, capsys):
    root = tmp_path / "siim"
    # both stages' files, as a full download has them: stage 1 (relative RLE) marks img_a's pixel 0 only,
    # stage 2 (absolute, 1-based) the pixels 6-7 of img_a and a region of img_b
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], [("img_a", " 0 1"), ("img_b", " -1")])
    write_csv(root / "stage_2_train.csv", ["ImageId", "EncodedPixels"], [("img_a", "7 2"), ("img_b", "1 3")])
    dicom(root / "dicom-images-train" / "1.2.3" / "1.2.3.4" / "img_a.dcm", h=4, w=3, patient_id="pat-a")
    dicom(root / "dicom-images-test" / "1.2.5" / "1.2.5.4" / "img_b.dcm", h=4, w=3, patient_id="pat-b")
    rows, _, out = convert("siim", root, tmp_path)
    assert "stage_2_train.csv (stage 2" in capsys.readouterr().out
    by = {r["study_id"]: r for r in rows}
    assert by["img_b"][LP + "Pneumothorax"] == "1"
    expected = np.zeros((4, 3), np.uint8)
    expected[2:4, 1] = 255  # pixels 7 and 8 counted from 1, column by column: (2, 1) and (3, 1)
    assert np.array_equal(np.asarray(Image.open(out.parent / by["img_a"]["mask"])), expected)


def test_a_wrong_root_finds_no_image_and_stops(tmp_path):
    root = tmp_path / "nih-labels-only"  # the label files downloaded, the image archives unpacked elsewhere
    write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
              "View Position"], [(f"0000000{p}_000.png", "Hernia", 0, p, "PA") for p in range(1, 5)])
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000002_000.png\n00000003_000.png\n")
    (root / "test_list.txt").write_text("00000004_000.png\n")
    with pytest.raises(common.UserError, match=r"nih: no image found .*none of 4 checked; the first: .*"
                                               r"nih-labels-only/images/00000001_000\.png.*images_0XX/images"):
        convert("nih", root, tmp_path)
    mimic = tmp_path / "mimic-csvs"  # MIMIC-CXR-JPG's tables without its files/ folder
    mimic_release(mimic, [("d1", "10000001", "50000001", "PA", "train")])
    write_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + dp.CHEXPERT_14, [], gz=True)
    with pytest.raises(common.UserError, match=r"mimic_cxr: no image found .*p10000001/s50000001/d1\.jpg\)"
                                               r": expected --root=mimic-cxr-jpg/2\.x\.x holding files/pXX"):
        convert("mimic_cxr", mimic, tmp_path, f"--reports={tmp_path}")
    siim = tmp_path / "siim"
    write_csv(siim / "stage_2_train.csv", ["ImageId", "EncodedPixels"], [("img_a", "-1")])
    with pytest.raises(common.UserError, match=r"siim: .*the first: img_a \(searched below --root\)"):
        convert("siim", siim, tmp_path)
    assert not (tmp_path / "out").exists()  # nothing written


def test_out_defaults_to_data_subcommand_csv(tmp_path, monkeypatch, capsys):
    for cls in ("ASD", "Normal"):
        for i in range(3):
            png(tmp_path / "chd" / cls / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    dp.main(["chd_cxr", "--root=chd", "--workers=1"])
    rows = read_out(tmp_path / "data" / "chd_cxr.csv")  # the name evaluate.py's presets read
    assert len(rows) == 6 and (tmp_path / "data" / rows[0]["image"]).exists()
    with pytest.raises(SystemExit):
        dp.main(["cxr_lt", "--help"])
    assert "(default: data/cxr_lt.csv" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:  # --labels is evaluate.py's flag; the release folder is --label_root
        dp.main(["cxr_lt", "--root=x", "--labels=y"])
    assert e.value.code == 2


@pytest.mark.slow  # a process pool of 2 workers
def test_resize_copies_in_a_process_pool(tmp_path):
    """--resize: 8-bit PNG copies through common.load_image (DICOM, MONOCHROME1 inverted), masks too."""
    root = tmp_path / "siim"
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], [("img_b", " 5 2"), ("img_c", " -1")])
    dicom(root / "dicom-images-train" / "1" / "1" / "img_b.dcm", h=4, w=3, photometric="MONOCHROME1")
    dicom(root / "dicom-images-train" / "9" / "9" / "img_c.dcm", h=40, w=30)
    rows, summary, out = convert("siim", root, tmp_path, "--resize=15", "--workers=2")
    by = {r["study_id"]: r for r in rows}
    img_c = out.parent / by["img_c"]["image"]
    assert img_c.suffix == ".png" and Image.open(img_c).size == (15, 20) and Image.open(img_c).mode == "L"
    b = np.asarray(Image.open(out.parent / by["img_b"]["image"]))  # 4x3: never upscaled
    assert b.shape == (4, 3) and b[0, 0] == 255 and b[-1, -1] == 0  # MONOCHROME1: the smallest value is white
    mask = np.zeros((4, 3), np.uint8)
    mask[1:3, 1] = 255  # pixels 6, 7 (relative start 5), column by column
    assert np.array_equal(np.asarray(Image.open(out.parent / by["img_b"]["mask"])), mask)
    t0 = os.path.getmtime(img_c)
    convert("siim", root, tmp_path, "--resize=15")  # written once: a rerun keeps the copies
    assert os.path.getmtime(img_c) == t0 and not list(out.parent.rglob("*.tmp.png"))


def test_openi_xml_and_view_from_the_dicoms(tmp_path):
    root = tmp_path / "openi"
    xml = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><meta type="rr"/><uId id="{uid}"/><pmcId id="1"/>
<MedlineCitation Owner="Indiana University" Status="supplied"><Article PubModel="Electronic">
<Abstract><AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH>{mesh}</MeSH>
{images}</eCitation>"""

    def img(i):
        return (f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray</caption><url>/x/{i}.jpg</url>'
                f'</parentImage>\n')
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
    dicom(root / "NLMCXR_dcm" / "1" / "1_IM-0001-3001.dcm", view="PA")  # NLMCXR_dcm.tgz: <study>/<image>.dcm
    dicom(root / "NLMCXR_dcm" / "1" / "1_IM-0001-4001.dcm", view="LL")
    dicom(root / "NLMCXR_dcm" / "2" / "2_IM-0652-1001.dcm")  # no ViewPosition in its header
    rows, summary, _ = convert("openi", root, tmp_path)
    assert summary["written"] == 3 and summary["skipped_missing"] == 1
    by = {Path(r["image"]).stem: r for r in rows}
    assert [by[i]["view"] for i in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_1_IM-0652-1001")] == \
        ["PA", "LATERAL", "UNKNOWN"]
    r = by["CXR1_1_IM-0001-4001"]
    assert r["findings"] == "The heart is normal. Lungs clear." and r["impression"] == "Normal chest"
    assert r["study_id"] == "CXR1" and r["split"] == "test" and r[LP + "No Finding"] == "1"
    assert r[LP + "Opacity"] == "0"
    r = by["CXR2_1_IM-0652-1001"]
    assert r[LP + "Cardiomegaly"] == "1" and r[LP + "Opacity"] == "1" and r[LP + "No Finding"] == "0"
    assert r["findings"] == "" and r["report"] == "IMPRESSION: Cardiomegaly. Left basilar opacity."


# CXR-LT 2024's task-1 classes, as in the header of train_labeled.csv
CXR_LT_2024 = ["Adenopathy", "Atelectasis", "Azygos Lobe", "Calcification of the Aorta", "Cardiomegaly",
               "Clavicle Fracture", "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum",
               "Fibrosis", "Fissure", "Fracture", "Granuloma", "Hernia", "Hydropneumothorax", "Infarction",
               "Infiltration", "Kyphosis", "Lobar Atelectasis", "Lung Lesion", "Lung Opacity", "Mass",
               "Nodule", "Normal", "Pleural Effusion", "Pleural Other", "Pleural Thickening",
               "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum", "Pneumothorax", "Pulmonary Embolism",
               "Pulmonary Hypertension", "Rib Fracture", "Round(ed) Atelectasis", "Subcutaneous Emphysema",
               "Support Devices", "Tortuous Aorta", "Tuberculosis"]


def test_cxr_lt_2024_official_file_and_mimic_split(tmp_path):
    root, labels = tmp_path / "mimic-cxr-jpg" / "2.1.0", tmp_path / "physionet.org" / "files"
    rows, images = [], []
    for p in range(20):
        pid, sid = f"1{p:07d}", f"5{p:07d}"
        split = "test" if p < 3 else "validate" if p == 3 else "train"
        for d, v in ((f"d{p}a", "PA"), (f"d{p}b", "LATERAL"), (f"d{p}c", "AP")):
            fpath = f"files/p{pid[:2]}/p{pid}/s{sid}/{d}.jpg"
            view = "" if v == "AP" else v  # an AP image known by its ViewCodeSequence only
            if v != "AP" or p == 5:
                rows.append([d, pid, sid, view, CODE[v], fpath] + [int(c == "Normal") if p % 2 else
                                                                   int(c in ("Azygos Lobe", "Atelectasis"))
                                                                   for c in CXR_LT_2024])
                images.append((d, pid, sid, v, split))
                mimic_jpg(root, pid, sid, d)
    release = labels / "cxr-lt-iccv-workshop-cvamd" / "2.0.0" / "cxr-lt-2024"
    write_csv(release / "train_labeled.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition",
              "ViewCodeSequence_CodeMeaning", "fpath"] + CXR_LT_2024, rows)
    mimic_release(root, images)
    out, _, path = convert("cxr_lt", root, tmp_path, f"--label_root={labels}")  # the paper's split, by default
    header = next(csv.reader(open(path)))
    assert [c[len(LP):] for c in header if c.startswith(LP)] == sorted(CXR_LT_2024, key=str.lower)
    assert len(out) == 21 and {r["view"] for r in out} == {"PA", "AP"}  # frontal only; d5c by its code
    assert_patient_disjoint(out)
    # CXR-CML Sec. 3: a random 80:20 by patient over all 20 patients, MIMIC's test patients among them
    expect = common.split_by_patient([f"1{p:07d}" for p in range(20)], (0.8, 0.0, 0.2), seed=0)
    assert {r["patient_id"]: r["split"] for r in out} == expect and Counter(expect.values())["test"] == 4
    assert {r["split"] for r in out} == {"train", "test"} and {r["mimic_split"] for r in out} == \
        {"train", "valid", "test"}
    assert "fold" not in out[0]  # cxrcml.py --fold=k draws the five runs' folds itself
    by = {Path(r["image"]).stem: r for r in out}
    assert by["d4a"][LP + "Azygos Lobe"] == "1" and by["d4a"][LP + "Normal"] == "0"
    assert by["d3a"][LP + "Normal"] == "1"

    out, _, _ = convert("cxr_lt", root, tmp_path, f"--label_root={release}/train_labeled.csv", "--split=mimic")
    test_patients = {r["patient_id"] for r in out if r["split"] == "test"}
    assert test_patients == {f"1{p:07d}" for p in range(3)}  # exactly MIMIC's test patients, all others train
    assert {r["split"] for r in out} == {"train", "test"}


def test_mimic_edema_consensus_test_and_mimic_split(tmp_path):
    root, labels = tmp_path / "mimic-cxr-jpg", tmp_path / "physionet.org" / "files"
    release = labels / "mimic-cxr-pe-severity" / "1.0.1"
    images, regex = [], []
    for p in range(12):  # patient 0: MIMIC test; patient 1: has a consensus image
        pid = f"1{p:07d}"
        for s in range(2):
            sid = f"5{p:05d}{s}0"
            for d, v in ((f"e{p}_{s}a", "AP"), (f"e{p}_{s}b", "LATERAL")):
                images.append((d, pid, sid, v, "test" if p == 0 else "train"))
                mimic_jpg(root, pid, sid, d)
            regex.append((pid, sid, (p + s) % 4))
    mimic_release(root, images)
    head = ["subject_id", "study_id", "edema_severity"]
    write_csv(release / "regex_report_edema_severity.csv", head, regex)
    write_csv(release / "expert_report_edema_severity.csv", head, regex[:3])
    write_csv(release / "consensus_image_edema_severity.csv", ["subject_id", "study_id", "dicom_id",
              "edema_severity"], [("10000001", "50000110", "e1_1a", 3)])
    out, _, _ = convert("mimic_edema", root, tmp_path, f"--label_root={labels}")
    test = [r for r in out if r["split"] == "test"]
    assert [(Path(r["image"]).stem, r["target"], r["view"]) for r in test] == [("e1_1a", "3", "AP")]
    assert not {"10000000", "10000001"} & {r["patient_id"] for r in out if r["split"] != "test"}
    graded = {(Path(r["image"]).stem, r["target"]) for r in out if r["split"] != "test"}
    assert graded == {(f"e{p}_{s}{v}", str((p + s) % 4)) for p in range(2, 12) for s in (0, 1) for v in "ab"}
    expect = common.split_by_patient([f"1{p:07d}" for p in range(2, 12)], (0.75, 0.25, 0.0), seed=0)
    assert all(r["split"] == expect[r["patient_id"]] for r in out if r["split"] != "test")
    assert {r["mimic_split"] for r in out} == {"train"}


def test_grazpedwri_boneage_covidx_chd(tmp_path):
    # GRAZPEDWRI-DX: dataset.csv + 16-bit PNG + YOLO box -> mask
    g = tmp_path / "graz"
    write_csv(g / "dataset.csv", ["filestem", "patient_id", "gender", "age", "laterality", "projection",
              "fracture_visible", "metal"], [("0001_a", "0001", "M", 10, "L", 1, 1, ""),
                                             ("0002_b", "0002", "F", 9, "R", 2, "", "")])
    png(g / "images_part1" / "0001_a.png", h=10, w=20, mode="I;16")
    png(g / "images_part1" / "0002_b.png", h=10, w=20)
    (g / "folder_structure" / "yolov5" / "labels").mkdir(parents=True)
    (g / "folder_structure" / "yolov5" / "labels" / "0001_a.txt").write_text(
        "3 0.5 0.5 0.5 0.4\n8 0.1 0.1 0.1 0.1\n")
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
    assert by["1380"]["target"] == "103" and by["1380"]["body_part"] == "hand" and "sex" not in by["1380"]

    c = tmp_path / "covidx"
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
    assert Counter(r["split"] for r in rows) == {"train": 14, "valid": 4, "test": 2}  # 70/20/10, 10 patients
    assert {r["study_id"].split("/")[1]: r[LP + "COVID-19"] for r in rows}["img8.png"] == "1"

    h = tmp_path / "chd"
    for cls in ("ASD", "Normal", "VSD"):
        for i in range(3):
            png(h / cls / f"{cls}_{i}.png")
    rows, _, _ = convert("chd_cxr", h, tmp_path)
    assert len(rows) == 9 and set(k for k in rows[0] if k.startswith(LP)) == {LP + "ASD", LP + "VSD"}
    assert {(r["study_id"].split("/")[0], r[LP + "ASD"], r[LP + "VSD"]) for r in rows} == \
        {("ASD", "1", "0"), ("Normal", "0", "0"), ("VSD", "0", "1")}


# ---- the command line: each data set's manual, and user errors as one line with exit status 2 ----

def test_help_documents_each_data_set(capsys):
    for name in dp.CONVERTERS:
        with pytest.raises(SystemExit) as e:
            dp.main([name, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and "Reads" in text and "Split" in text and f"data/{name}.csv" in text, name
    with pytest.raises(SystemExit) as e:  # an unknown data set is argparse's usage error
        dp.main(["no_such_set", "--root=x", "--out=y.csv"])
    assert e.value.code == 2


def test_user_errors_name_file_column_dataset(tmp_path):
    root = tmp_path / "rsna"
    with pytest.raises(common.UserError, match="is not a folder"):
        convert("rsna_pneumonia", root, tmp_path)
    root.mkdir()
    with pytest.raises(common.UserError, match=r"rsna_pneumonia.*stage_2_train_labels\.csv"):
        convert("rsna_pneumonia", root, tmp_path)
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height"],
              [("a", 1, 2, 3, 4)])
    with pytest.raises(common.UserError, match=r"rsna_pneumonia.*stage_2_train_labels\.csv.*'Target'"):
        convert("rsna_pneumonia", root, tmp_path)
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
              [("a", "", "", "", "", 0)])
    with pytest.raises(common.UserError, match="--fractions"):
        convert("rsna_pneumonia", root, tmp_path, "--fractions=0.5,0.6")


@pytest.mark.slow  # a subprocess: the command as a user runs it
def test_cli_prints_one_line_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "data_prep.py", "siim", f"--root={tmp_path / 'none'}",
                        f"--out={tmp_path / 'o.csv'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("data_prep.py: error: siim: --root=") and "not a folder" in r.stderr
