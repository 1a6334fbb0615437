"""cxrclip.py: Eq. (1) against explicit sums and open_clip's form, Eq. (2) / ICL / TCL / L on images first, the
sentence splitter on report text, the two texts of a study against the official sampling, label prompts
(CheXpert- and ChestX-ray14-style by data set, the official JSON's meaning, validation prompts), the transforms
against torchvision; end to end: the loss falls, the best checkpoint is evaluated, a resumed run equals an
uninterrupted one, 2 processes equal 1."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import cxrclip
from conftest import ROOT

TINY = ["--image_size=32", "--tiny_width=32", "--embed_dim=32", "--vocab_size=400", "--num_workers=0",
        "--log_every=1", "--batch_size=8", "--lr=1e-3"]


# ---- losses: Eq. (1), Eq. (2), ICL, TCL, L ----

def _explicit_clip_loss(u, v, tau):
    """Eq. (1) term by term in float64, with explicit sums over the batch."""
    u, v = u.double().numpy(), v.double().numpy()
    n, total = len(u), 0.0
    for i in range(n):
        total += np.log(np.exp(v[i] @ u[i] / tau) / sum(np.exp(u[i] @ v[j] / tau) for j in range(n)))
        total += np.log(np.exp(u[i] @ v[i] / tau) / sum(np.exp(v[i] @ u[j] / tau) for j in range(n)))
    return -total / (2 * n)


def _open_clip_loss(u, v, scale):
    """open_clip's ClipLoss: one logit matrix and its transpose, cross-entropy both ways, averaged."""
    logits_per_image = scale * v @ u.T
    labels = torch.arange(len(u))
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_loss_eq1():
    u, v, tau = _unit(6, 8, 0), _unit(6, 8, 1), 0.07
    got = cxrclip.clip_loss(u, v, torch.tensor(1 / tau)).item()
    assert abs(got - _explicit_clip_loss(u, v, tau)) < 1e-5
    assert abs(got - _open_clip_loss(u, v, 1 / tau).item()) < 1e-5
    e = torch.eye(6, 8)  # aligned, well separated pairs: near 0; random pairs at 1/tau = 1: near log(6)
    assert cxrclip.clip_loss(e, e, torch.tensor(100.0)).item() < 1e-3
    assert abs(cxrclip.clip_loss(u, v, torch.tensor(1.0)).item() - np.log(6)) < 0.5


def test_mvs_icl_tcl_and_total():
    v1, v2, u1, u2 = (_unit(5, 8, s) for s in range(4))  # images v, texts u (Sec. 3.2)
    tau = 0.1
    ref = _explicit_clip_loss
    mvs = (ref(u1, v1, tau) + ref(u2, v1, tau) + ref(u1, v2, tau) + ref(u2, v2, tau)) / 4  # Eq. (2)
    icl, tcl = ref(v1, v2, tau), ref(u1, u2, tau)  # ICL on the images, TCL on the texts
    total, parts = cxrclip.cxrclip_loss(v1, v2, u1, u2, torch.tensor(1 / tau), 1.0, 0.5)
    assert abs(cxrclip.mvs_loss(v1, v2, u1, u2, 10.0).item() - mvs) < 1e-5
    assert abs(parts["mvs"].item() - mvs) < 1e-5
    assert abs(cxrclip.icl_loss(v1, v2, 10.0).item() - icl) < 1e-5 and abs(parts["icl"].item() - icl) < 1e-5
    assert abs(cxrclip.tcl_loss(u1, u2, 10.0).item() - tcl) < 1e-5 and abs(parts["tcl"].item() - tcl) < 1e-5
    assert abs(total.item() - (mvs + 1.0 * icl + 0.5 * tcl)) < 1e-5


def test_forward_returns_images_then_texts():
    cfg = cxrclip.Config(image_size=32, tiny_width=32, embed_dim=16, max_tokens=16)
    tok = common.train_wordpiece(["there is effusion.", "no nodule is seen.", "heart size is normal."], 60)
    torch.manual_seed(0)
    model = cxrclip.build(cfg, tok).eval()
    x, t1, t2 = torch.randn(4, 3, 32, 32), ["there is effusion.", "no nodule."], ["heart size is normal.", "no."]
    v1, v2, u1, u2 = model(x, *(cxrclip.tokenize(t, tok, 16) for t in (t1, t2)))
    for got, want in ((v1, model.encode_image(x[:2])), (v2, model.encode_image(x[2:])), (u1, model.encode_text(t1)),
                      (u2, model.encode_text(t2))):
        assert torch.allclose(got, want, atol=1e-6)


# ---- A_t: sentences of report text ----

REPORTS = [  # (MIMIC-style text, its sentences written out by hand)
    ("PA and lateral views of the chest were obtained. There is a 1.5 cm nodular opacity in the right\n"
     "upper lobe, not significantly changed since ___. No pleural effusion or pneumothorax.",
     ["PA and lateral views of the chest were obtained.",
      "There is a 1.5 cm nodular opacity in the right upper lobe, not significantly changed since ___.",
      "No pleural effusion or pneumothorax."]),
    ("Findings were communicated to Dr. ___ by telephone at 9:15 a.m. on ___, approx. 10 minutes after "
     "discovery. Recommend follow-up chest CT, e.g. in 3 months. Discussed with Dr. ___. No change.",
     ["Findings were communicated to Dr. ___ by telephone at 9:15 a.m. on ___, approx. 10 minutes after "
      "discovery.", "Recommend follow-up chest CT, e.g. in 3 months.", "Discussed with Dr. ___.",
      "No change."]),
    ("1. Interval increase in moderate left pleural effusion. 2. Mild pulmonary vascular congestion vs. "
     "early edema.\n3. No pneumothorax.",
     ["1. Interval increase in moderate left pleural effusion.",
      "2. Mild pulmonary vascular congestion vs. early edema.", "3. No pneumothorax."]),
    ("IMPRESSION: 1) Small right apical pneumothorax 2) Chest tube in place 3) Stable cardiomediastinal "
     "silhouette",
     ["IMPRESSION: 1) Small right apical pneumothorax", "2) Chest tube in place",
      "3) Stable cardiomediastinal silhouette"]),
    ("ETT terminates 4.5 cm above the carina. The nodule is seen on image 3. Is there free air? None seen.",
     ["ETT terminates 4.5 cm above the carina.", "The nodule is seen on image 3.", "Is there free air?",
      "None seen."]),
    ("no mass. there is nodule. possible effusion.", ["no mass.", "there is nodule.", "possible effusion."]),
    ("", []),
]


@pytest.mark.parametrize("text,expected", REPORTS)
def test_split_sentences_on_report_text(text, expected):
    assert common.split_sentences(text) == expected


def test_split_sentences_shuffle_moves_whole_sentences():
    text, sents = REPORTS[1]
    for seed in range(5):
        out = cxrclip.sentence_shuffle(text, np.random.default_rng(seed))
        assert sorted(common.split_sentences(out)) == sorted(sents) and common.split_sentences(out) != sents
    assert cxrclip.sentence_shuffle("One sentence only.", np.random.default_rng(0)) == "One sentence only."


def _table(tmp_path, rows, labels=()):
    """An XrayCSV of `rows` (dicts of column values, one study each); images are never read here."""
    cols = ["image", "study_id", "split", "dataset", "findings", "impression", "report", "findings_bt",
            "impression_bt"] + [f"label:{c}" for c in labels]
    full = [{**{c: "" for c in cols}, "image": f"{i}.png", "study_id": f"S{i}", "split": "train", **r}
            for i, r in enumerate(rows)]
    common.write_csv_atomic(tmp_path / "t.csv", full, cols)
    return common.XrayCSV(tmp_path / "t.csv", "train")


def _texts(table, train=True, seeds=range(1), bank=None, **cfg):
    ds = cxrclip.StudyDataset(table, cxrclip.Config(**cfg), train, bank)
    return [ds.texts(i, table.studies[i][0], np.random.default_rng(s)) for s in seeds
            for i in range(len(table.studies))]


def test_two_sections_both_used_and_each_back_translated_with_p_half(tmp_path):
    """t^1, t^2: findings and impression in random order (Sec. 3.1, 3.3), each back-translated with p = 0.5 (the
    official code): the 8 pairs of one of {F, F_bt} and one of {I, I_bt} come 1/8 each, never one section twice.
    One section: t^2 = A_t(t^1)."""
    f, i = "Heart is normal. Lungs are clear.", "No acute disease. Stable."
    table = _table(tmp_path, [dict(findings=f, impression=i, findings_bt="FBT.", impression_bt="IBT.")])
    pairs = _texts(table, seeds=range(4000))
    kinds = {f: 0, "FBT.": 1, i: 2, "IBT.": 3}
    counts = np.zeros((4, 4))
    for t1, t2 in pairs:
        counts[kinds[t1], kinds[t2]] += 1
    want = np.kron([[0, 1], [1, 0]], np.ones((2, 2))) / 8  # rows t^1, columns t^2: F, F_bt, I, I_bt
    assert np.abs(counts / len(pairs) - want).max() < 0.02, counts
    # without back-translations the sentence shuffle is A_t; validation: findings, impression, fixed
    table = _table(tmp_path, [dict(findings=f, impression=i), dict(report=f)])
    for (a1, a2), (b1, b2) in zip(*[iter(_texts(table, seeds=range(400)))] * 2):
        assert {a1, a2} <= {f, i, "Lungs are clear. Heart is normal.", "Stable. No acute disease."}
        assert (b1, b2) == (f, "Lungs are clear. Heart is normal.")
    assert _texts(table, train=False, seeds=range(3)) == [[f, i], [f, f]] * 3
    table = _table(tmp_path, [dict(findings=f, findings_bt="FBT.")])
    assert _texts(table, seeds=range(5)) == [[f, "FBT."]] * 5


# ---- T = Concat({p ~ P(y)}): label prompts ----

CLASSES = ("Atelectasis", "Cardiomegaly", "Edema", "Fracture", "Mass", "Nodule", "Pneumonia", "Hernia")
SIGN = {"pos": "+", "neg": "-", "unc": "?"}
BANK = {c: {v: [f"{c[0]}{sign}."] for v, sign in SIGN.items()} for c in CLASSES}  # "A+.", "A-.", "A?.", ...


def _said(text):
    return sorted(text.split())


def test_label_prompts_state_every_labelled_class_chexpert_style():
    names = list(BANK)
    bank = {common.label_text(c): d for c, d in BANK.items()}
    y = np.array([1, 0, 0, -1, 0, np.nan, 0, 0], np.float32)  # 5 explicit negatives, one blank
    for seed in range(5):
        text = cxrclip.label_prompt_text(names, y, np.random.default_rng(seed), -1, bank)
        assert _said(text) == sorted(["A+.", "C-.", "E-.", "F?.", "M-.", "P-.", "H-."])
    assert cxrclip.label_prompt_text(names, np.full(8, np.nan, np.float32), np.random.default_rng(0)) == ""


def test_label_prompts_sample_negatives_chestxray14_style():
    names, bank = list(BANK), {common.label_text(c): d for c, d in BANK.items()}
    y = np.array([0, 1, 0, 0, 0, 0, 0, 0], np.float32)  # 1 / 0 only: 0 means "not found"
    seen = set()
    for seed in range(20):
        said = _said(cxrclip.label_prompt_text(names, y, np.random.default_rng(seed), 3, bank))
        negs = [s for s in said if s.endswith("-.")]
        assert "C+." in said and len(said) == 4 and len(set(negs)) == 3 and "C-." not in negs
        seen |= set(negs)
    assert len(seen) == 7  # every negative class gets drawn
    assert len(_said(cxrclip.label_prompt_text(names, y, np.random.default_rng(0), -1, bank))) == 8


def test_chestxray14_negatives_capped_by_data_set_not_by_label_values(tmp_path):
    """NIH rows (dataset "nih") state their positives and 3 sampled negatives even with blanks in another data
    set's columns; a CheXpert row whose labels are all 0 / 1 states every one of them (Sec. 4.1; the official
    code's num_negs is set per data set)."""
    labels = ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Hernia", "Edema", "No Finding")
    bank = {common.label_text(c): {v: [f"{k}{s}."] for v, s in SIGN.items()} for k, c in enumerate(labels)}
    nih = {f"label:{c}": "1" if c == "Atelectasis" else "0" for c in labels[:7]}  # "No Finding" blank
    chexpert = {f"label:{c}": "1" if c == "Cardiomegaly" else "0" for c in labels}
    table = _table(tmp_path, [dict(dataset="nih", **nih), dict(dataset="chexpert", **chexpert)], labels)
    drawn = set()
    for nih_texts, chexpert_texts in zip(*[iter(_texts(table, seeds=range(30), bank=bank))] * 2):
        for t in nih_texts:
            said = _said(t)
            assert "0+." in said and len(said) == 4 and all(s.endswith("-.") for s in said if s != "0+.")
            drawn |= set(said)
        for t in chexpert_texts:
            assert _said(t) == sorted(["0-.", "1+.", "2-.", "3-.", "4-.", "5-.", "6-.", "7-."])
    assert drawn == {"0+.", "1-.", "2-.", "3-.", "4-.", "5-.", "6-."}  # every negative class gets drawn


def test_validation_prompts_as_the_official_code(tmp_path):
    """Validation texts of an image-label study: the first sentence of each positive class, no negative or
    uncertain one, "No Finding" when nothing is positive; the same at every draw."""
    labels = ("Atelectasis", "Cardiomegaly", "Mass", "No Finding")
    rows = [{"label:Atelectasis": "1", "label:Cardiomegaly": "0", "label:Mass": "1", "label:No Finding": "0"},
            {"label:Atelectasis": "-1", "label:Cardiomegaly": "0", "label:Mass": "0"}]
    table = _table(tmp_path, rows, labels)
    bank = {"atelectasis": {"pos": ["Atelectasis.", "Collapse."]}, "mass": {"pos": ["A mass.", "Mass seen."]},
            "no finding": {"pos": ["The lungs are clear.", "Clear."], "neg": [], "unc": []}}
    assert _texts(table, train=False, seeds=range(4), bank=bank) == [
        ["Atelectasis. A mass."] * 2, ["The lungs are clear."] * 2] * 4
    assert _texts(table, train=False)[1] == ["No acute abnormality."] * 2  # ours: NORMAL["pos"][0]


def test_label_studies_are_one_set_drawn_once(tmp_path):
    """--label_prompt_frac: exactly that share of the training studies gives prompt texts, the same studies in
    every epoch and worker, another set with another seed; none in validation."""
    table = _table(tmp_path, [{"findings": f"Report {i}.", "label:Mass": "1"} for i in range(41)], ["Mass"])
    bank = {"mass": {"pos": ["MASS."]}}

    def prompted(seed, train=True):
        return {i for i, (t1, _) in enumerate(_texts(table, train, range(1), bank, label_prompt_frac=0.3, seed=seed))
                if t1 == "MASS."}
    assert len(prompted(0)) == round(0.3 * 41) and prompted(0) == prompted(0)
    assert prompted(1) != prompted(0) and len(prompted(1)) == 12 and prompted(0, train=False) == set()


def test_prompt_files_in_the_official_layout(tmp_path):
    p = tmp_path / "train_prompts_all.json"
    p.write_text(json.dumps({"Pleural Effusion": {"pos": ["effusion is seen.", ""], "neg": ["no effusion."],
                                                 "unc": ["possible effusion."]},
                             "Pleural_Thickening": {"pos": ["thickened pleura."],
                                                    "neg": ["no thickened pleura."]}}))
    bank = cxrclip.read_prompts(str(p))
    assert cxrclip.class_prompts("Pleural Effusion", "pos", bank) == ["effusion is seen."]  # blanks dropped
    assert cxrclip.class_prompts("Pleural Thickening", "neg", bank) == ["no thickened pleura."]
    assert "Possible pleural thickening." in cxrclip.class_prompts("Pleural_Thickening", "unc", bank)  # ours
    assert cxrclip.class_prompts("Effusion", "pos", bank) == ["effusion is seen."]  # ChestX-ray14's name
    # "No Finding" has only positive sentences there ("" otherwise): a value that is not stated, not ours
    p.write_text(json.dumps({"No Finding": {"pos": ["the lungs are clear."], "neg": [""], "unc": [""]},
                             "Cardiomegaly": {"pos": ["the heart is enlarged."], "neg": ["normal heart size."]}}))
    bank = cxrclip.read_prompts(str(p))
    names = ["No Finding", "Cardiomegaly"]
    for y, said in (([0, 1], "the heart is enlarged."), ([-1, 0], "normal heart size."),
                    ([1, 0], "the lungs are clear. normal heart size.")):
        for seed in range(4):
            text = cxrclip.label_prompt_text(names, np.array(y, np.float32), np.random.default_rng(seed), -1, bank)
            assert sorted(common.split_sentences(text)) == sorted(common.split_sentences(said))
    pos, neg = cxrclip.CXRCLIP.zeroshot_prompts("No Finding")  # a negation as a name: no "no no finding"
    assert not any("no finding" in s.lower() for s in pos + neg) and len(pos) == len(neg) == 3
    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(common.UserError, match="prompt file"):
            cxrclip.read_prompts(str(bad))


# ---- images ----

def test_eval_transform_is_torchvisions_resize_and_centre_crop():
    from torchvision.transforms.v2 import functional as TF

    yy, xx = np.mgrid[0:300, 0:200]
    img = (128 + 60 * np.sin(xx / 25) + 40 * np.cos(yy / 30)).astype(np.uint8)  # portrait, smooth
    ref = TF.center_crop(TF.resize(torch.from_numpy(img)[None], 64, antialias=True), 64)[0].numpy()
    got = cxrclip.transform(img, size=64, train=False)
    assert got.shape == (3, 64, 64)
    assert (got - common.to_tensor(ref)).abs().max() < 3 / 255 / 0.225  # within 3 grey levels
    x = cxrclip.transform(img, np.random.default_rng(1), size=64, train=True)
    assert x.shape == (3, 64, 64)
    assert torch.equal(x, cxrclip.transform(img, np.random.default_rng(1), size=64, train=True))  # the rng's


def test_train_transform_never_pads_a_non_square_image():
    """RandomResizedCrop(scale=(0.8, 1.1)) as torchvision: a box that does not fit is drawn again, so a flat
    grey 448 x 538 image stays grey (a padded crop brings black bands in, near 0 after un-normalising)."""
    img = np.full((448, 538), 200, np.uint8)
    for seed in range(30):
        x = cxrclip.transform(img, np.random.default_rng(seed), size=64, train=True)
        grey = x * torch.tensor(common.IMAGENET_STD).view(3, 1, 1) + torch.tensor(common.IMAGENET_MEAN).view(3, 1, 1)
        assert grey.min() > 0.5, seed  # CLAHE and jitter keep a flat image near 200 / 255


# ---- end to end ----

def test_paper_preset_runs_the_whole_schedule():
    """Sec. 4.2's "early stopped by validation loss" as the official trainer does it: all 15 epochs, so that the
    cosine schedule reaches 0, and the epoch of the lowest validation loss kept (ckpt_best.pt); no patience."""
    cfg = common.parse_config(cxrclip.Config, cxrclip.PRESETS, ["--preset=paper", "--data=x.csv"])
    assert cfg.epochs == 15 and cfg.patience == 0
    lr = cxrclip.warmup_cosine(15 * 100, 100)
    assert lr(0) == pytest.approx(0.01) and lr(99) == 1.0 and lr(15 * 100 - 1) < 1e-5  # warm-up, cosine to 0


def _csv_with_a_bad_row(src, dst):
    """The phantom CSV with absolute image paths; one training row loses its report and its labels."""
    rows = list(csv.DictReader(open(src)))
    root = str(src).rsplit("/", 1)[0]
    for r in rows:
        r["image"] = f"{root}/{r['image']}"
    bad = next(r for r in rows if r["split"] == "train")
    bad.update({k: "" for k in bad if k in ("findings", "impression", "report") or k.startswith("label:")})
    common.write_csv_atomic(dst, rows, list(rows[0]))
    return dst


def _weights(path):
    return common.load_checkpoint(path)["model"]


@pytest.mark.slow
def test_best_checkpoint_evaluated_and_resume_gives_the_same_metrics(tmp_path, phantom_csv):
    data = _csv_with_a_bad_row(phantom_csv, tmp_path / "data.csv")
    args = [f"--data={data}", "--epochs=3", "--ckpt_every=4", "--label_prompt_frac=0.5",
            "--max_bad_frac=0.05", *TINY]
    a = cxrclip.main([*args, f"--out_dir={tmp_path / 'a'}"])
    assert a["bad_samples"] == {"empty report text": 1}  # no text and no labels: counted, no "Normal study."
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    val, steps = [r for r in log if "val_loss" in r], [r for r in log if "loss" in r]
    assert len(val) == 3 and a["best_epoch"] == int(np.argmin([r["val_loss"] for r in val]))
    # it learns: over its last epoch L is 8% below its first 5 steps and 1% below L of uniform logits, (1 + lambda_I
    # + lambda_T) ln(batch of 8) (random embeddings at 1/tau = 14.3 start above that; seeds 0-4 end 2.4-4.3% below)
    last = np.mean([r["loss"] for r in steps if r["epoch"] == 2])
    assert last < 0.92 * np.mean([r["loss"] for r in steps[:5]]) and last < 0.99 * 2.5 * np.log(8)
    assert a["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in val))
    model, cfg = cxrclip.load(tmp_path / "a" / "ckpt_best.pt")  # the evaluated weights are the best ones
    te = common.XrayCSV(data, "test")
    again = common.zeroshot_eval(model, te, "cpu")["zeroshot_auc_macro"]
    assert again == pytest.approx(a["zeroshot_auc_macro"])

    stop = cxrclip.main([*args, f"--out_dir={tmp_path / 'b'}", "--max_steps=13"])  # mid-epoch 1
    assert stop["stopped"] and stop["step"] == 13
    with pytest.raises(common.UserError, match="--resume"):  # a new run must not replace it
        cxrclip.main([*args, f"--out_dir={tmp_path / 'b'}"])
    b = cxrclip.main([*args, f"--out_dir={tmp_path / 'b'}", "--resume"])
    for k in ("zeroshot_auc_macro", "best_epoch", "best_val_loss", "step"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    for f in ("ckpt.pt", "ckpt_best.pt"):
        wa, wb = _weights(tmp_path / "a" / f), _weights(tmp_path / "b" / f)
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), f


@pytest.mark.slow
def test_two_processes_train_and_validate_as_one(tmp_path, phantom_csv):
    """torchrun x 2 (gloo, each rank half of every global batch) against 1 process: the same validation loss
    after an epoch (all-gathered losses, sharded validation; the tiny CNN has no BatchNorm)."""
    args = [f"--data={phantom_csv}", "--epochs=1", *TINY]
    one = cxrclip.main([*args, f"--out_dir={tmp_path / 'one'}"])
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29520", "cxrclip.py", *args, f"--out_dir={tmp_path / 'two'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "metrics.json"))
    assert "2 process(es)" in p.stdout
    assert two["best_val_loss"] == pytest.approx(one["best_val_loss"], abs=1e-4)
