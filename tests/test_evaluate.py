"""evaluate.py: metrics and the bootstrap against independent computations (scikit-learn, DeLong's variance,
hand-made retrieval and label cases), heads on hand-made features, and every task end to end on a short
PedCLIP run (and on the other papers' checkpoints)."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import evaluate


# ----------------------------------------------------------------------------------------------------
# metrics against scikit-learn


def test_auc_per_column_matches_sklearn_with_ties_repeats_and_left_out_rows():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (80, 3)).astype(float)
    s = np.round(rng.normal(size=(80, 3)) + y, 1)  # rounded: ties
    y[:6, 0], y[6:9, 0], y[:, 2] = -1, np.nan, 1  # -1 and blank are left out; column 2 has one class
    idx = rng.integers(0, 80, 120)  # a bootstrap-like resample with repeated rows
    got = evaluate.auc_per_column(y[idx], s[idx])
    for j in range(2):
        m = np.isin(y[idx, j], (0, 1))
        assert got[j] == pytest.approx(roc_auc_score(y[idx, j][m], s[idx, j][m]), abs=1e-12)
    assert np.isnan(got[2])
    ref = common.auc_per_label(y, s, ["a", "b", "c"])  # the training-time implementation
    assert evaluate.mean_or_none(evaluate.auc_per_column(y, s)) == pytest.approx(ref["macro"], abs=1e-12)


def test_f1_acc_and_best_threshold_match_sklearn_and_brute_force():
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (60, 2)).astype(float)
    s = rng.random((60, 2)) + 0.3 * y
    y[:5, 1] = np.nan
    T = np.array([0.6, 0.5])
    f1, acc = evaluate.f1_acc_per_column(y, s, T)
    for j in range(2):
        m = ~np.isnan(y[:, j])
        pred = (s[m, j] >= T[j]).astype(int)
        assert f1[j] == pytest.approx(f1_score(y[m, j], pred), abs=1e-12)
        assert acc[j] == pytest.approx(accuracy_score(y[m, j], pred), abs=1e-12)
    g, p = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    p[p == 3] = 2  # class 3 is never predicted
    m = evaluate.class_metrics(g, p, 4)
    assert m["acc"] == pytest.approx(accuracy_score(g, p))
    assert m["f1_macro"] == pytest.approx(f1_score(g, p, labels=range(4), average="macro", zero_division=0))
    assert m["kappa_quadratic"] == pytest.approx(cohen_kappa_score(g, p, weights="quadratic"))
    best = max(f1_score(y[:, 0], s[:, 0] >= t) for t in s[:, 0])  # every candidate threshold, by hand
    t = evaluate.best_f1_threshold(y[:, 0], s[:, 0])
    assert f1_score(y[:, 0], s[:, 0] >= t) == pytest.approx(best, abs=1e-12)
    assert evaluate.best_f1_threshold(np.zeros(5), s[:5, 0]) is None


def test_dice_matches_set_counting():
    rng = np.random.default_rng(2)
    pred, gt = rng.random((4, 9, 9)) > 0.6, rng.random((4, 9, 9)) > 0.7
    pred[3], gt[3] = False, False
    got = evaluate.dice_per_image(pred, gt)
    for i in range(3):
        P, G = {tuple(c) for c in np.argwhere(pred[i])}, {tuple(c) for c in np.argwhere(gt[i])}
        assert got[i] == pytest.approx(2 * len(P & G) / (len(P) + len(G)))
    assert np.isnan(got[3])


# ----------------------------------------------------------------------------------------------------
# item 1: label policies; item 4: the class filter; item 5: views; item 7: --rare=auto


def test_label_policies_by_hand():
    names = ["Atelectasis", "Cardiomegaly", "Pleural_Thickening", "No Finding"]
    nan = np.nan
    Y = np.array([[-1, -1, -1, 0],
                  [nan, 1, nan, 0],
                  [nan, nan, -1, 1]])
    pol = evaluate.apply_label_policy
    np.testing.assert_array_equal(pol(Y, names, "drop", "drop", False), [[nan, nan, nan, 0], [nan, 1, nan, 0],
                                                                          [nan, nan, nan, 1]])
    np.testing.assert_array_equal(pol(Y, names, "zero", "ones", False), [[1, 1, 1, 0], [0, 1, 0, 0],
                                                                          [0, 0, 1, 1]])
    np.testing.assert_array_equal(pol(Y, names, "zero", "zeros", False), [[0, 0, 0, 0], [0, 1, 0, 0],
                                                                           [0, 0, 0, 1]])
    # GLoRIA: Atelectasis U-Ones, Cardiomegaly U-Zeros, a label outside its five: left out
    np.testing.assert_array_equal(pol(Y, names, "zero", "gloria", False), [[1, 0, nan, 0], [0, 1, 0, 0],
                                                                            [0, 0, nan, 1]])
    # No Finding = 1 fills the blanks of its row only; the stated -1 stays uncertain
    np.testing.assert_array_equal(pol(Y, names, "drop", "drop", True), [[nan, nan, nan, 0], [nan, 1, nan, 0],
                                                                         [0, 0, nan, 1]])
    with pytest.raises(common.UserError):
        pol(Y[:, :3], names[:3], "drop", "drop", True)


def _rows(Y, **cols):
    return [{"_labels": np.asarray(y, np.float32), "_row": i + 2, "patient_id": f"P{i}",
             **{k: v[i] for k, v in cols.items()}} for i, y in enumerate(Y)]


def _stub(parts=None, names=(), columns=(), model=None, **cfg):
    ev = evaluate.Evaluator(evaluate.Config(bootstrap=0, **cfg), model, "stub")
    ev.parts.update(parts or {})
    ev.label_names_all, ev.columns = list(names), list(columns)
    return ev


def test_class_filter_min_positives_and_exclude_list():
    names = ["Aortic enlargement", "Other lesion", "Other diseases", "Lung cyst", "No finding"]
    Y = np.zeros((30, 5))
    Y[:12, 0] = Y[:15, 1] = Y[:20, 2] = Y[:3, 3] = 1
    Y[20:, 4] = 1
    ev = _stub(names=names, min_pos=10, exclude="other lesion,Other disease,Other diseases,No finding")
    kept, few = ev.label_names(_rows(Y))
    assert kept == ["Aortic enlargement"] and few == ["Lung cyst"]  # by hand: 12 >= 10, 3 < 10
    with pytest.raises(common.UserError, match="not label columns"):
        _stub(names=names, labels="Nope").label_names(_rows(Y))


def _write_csv(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    common.write_csv_atomic(path, rows, cols)
    return str(path)


def test_views_frontal_set_and_rare_auto(tmp_path):
    assert {"PA", "AP", "AP AXIAL"} <= evaluate.view_set("frontal")
    assert not {"", "LATERAL", "LL", "OBLIQUE"} & evaluate.view_set("frontal")
    assert evaluate.view_set("all") is None and evaluate.view_set("pa, Ap") == {"PA", "AP"}
    cfg = evaluate.Config()
    assert evaluate.views_of(cfg, "retrieval") == "frontal" and evaluate.views_of(cfg, "zeroshot") == "all"
    # a CSV: 8 training rows with views of every kind, 2 test rows; rare: < --rare_below positive images in
    # all splits
    views = ["PA", "ap", "LATERAL", "", "OBLIQUE", "AP", "PA", "PA", "PA", "PA"]
    a, b = [1, 1, 1, 0, 0, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    rows = [{"image": f"x{i}.png", "split": "train" if i < 8 else "test", "view": v, "patient_id": f"P{i}",
             "label:Big": a[i], "label:Small": b[i], "label:Blank": ""} for i, v in enumerate(views)]
    path = _write_csv(tmp_path / "v.csv", rows)
    ev = evaluate.Evaluator(evaluate.Config(data=path, rare="auto", rare_below=4), None, "stub")
    assert [r["view"] for r in ev.rows("train", "frontal")] == ["PA", "ap", "AP", "PA", "PA"]
    assert len(ev.rows("train", "all")) == 8 and len(ev.rows("train", "LATERAL")) == 1
    assert ev.rare_labels(["Big", "Small", "Blank"]) == ["Small", "Blank"]  # by hand: 4, 3 and 0 positives
    with pytest.raises(common.UserError, match="no rows with --views=CR"):
        ev.rows("train", "CR")
    path2 = _write_csv(tmp_path / "nv.csv", [{k: v for k, v in r.items() if k != "view"} for r in rows])
    with pytest.raises(common.UserError, match="no `view` column"):
        evaluate.Evaluator(evaluate.Config(data=path2), None, "stub").rows("train", "frontal")


# ----------------------------------------------------------------------------------------------------
# item 3: retrieval on a hand-made case with a duplicate report text


class TextStub:
    """encode_text by table lookup (unit vectors), for hand-made retrieval cases."""

    def __init__(self, table):
        self.table = table

    def encode_text(self, texts):
        return torch.tensor(np.stack([self.table[t] for t in texts]))


def test_retrieval_one_section_deduplicated_texts_by_hand():
    assert evaluate.retrieval_text({"findings": "F  x.", "impression": "I."}, "impression") == "I."
    assert evaluate.retrieval_text({"findings": "F  x.", "impression": ""}, "impression") == "F x."
    assert evaluate.retrieval_text({"findings": "F.", "impression": "I."}, "findings") == "F."
    assert evaluate.dedupe_texts(["A", "B", "A", "C"])[1].tolist() == [0, 1, 0, 2]
    e = np.eye(4)
    img = np.stack([e[0], 0.6 * e[0] + 0.8 * e[1], e[2], e[2]]).astype(np.float32)
    rows = _rows(np.zeros((4, 0)), study_id=["S1", "S2", "S3", "S4"], impression=["A", "A", "B", "C"])
    model = TextStub({"A": e[0], "B": e[1], "C": e[2]})
    ev = _stub({("test", "frontal"): evaluate.Part(rows, img)}, model=model)
    res, stat, qrows = evaluate.task_retrieval(ev, "frontal")
    # by hand, over the 3 distinct texts: S1 rank 1; S2 rank 2 (B 0.8 > A 0.6); S3's own B scores 0 and ties
    # with A, C scores 1: rank 3; S4 rank 1. Kept as 4 candidates, S1's copy of A would tie with it: rank 2.
    assert res["n_texts"] == 3 and len(qrows) == 4
    assert res["metrics"]["R@1"] == pytest.approx(0.5) and res["metrics"]["R@5"] == 1.0
    sim = img.astype(float) @ np.stack([e[0], e[1], e[2]]).T
    np.testing.assert_array_equal(evaluate.recall_hits(sim, np.array([0, 0, 1, 2]), (1, 2, 3)),
                                  [[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    assert stat(np.array([0, 0, 3]))["R@1"] == 1.0  # a resample of S1 twice and S4


# ----------------------------------------------------------------------------------------------------
# item 6: the bootstrap


def _auc_reps(y, s, groups, n):
    return evaluate.bootstrap(lambda i: {"auc": evaluate.auc_per_column(y[i], s[i])[0]}, groups, n)["auc"]


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (200, 2000):
        y = rng.integers(0, 2, (n, 1)).astype(float)
        s = y + rng.normal(size=(n, 1))
        point = evaluate.auc_per_column(y, s)[0]
        lo, hi = evaluate.percentile_ci(_auc_reps(y, s, np.arange(n), 300))
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(10)


def test_bootstrap_ci_width_matches_delong():
    """On a large sample the percentile interval of the AUC is close to DeLong's normal interval (variance
    from the placement values, computed here independently)."""
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(1500), np.zeros(1500)]
    s = y * 0.8 + rng.normal(size=3000)
    pos, neg = s[y == 1], s[y == 0]
    cmp = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = cmp.mean(1), cmp.mean(0)
    se = np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    lo, hi = evaluate.percentile_ci(_auc_reps(y[:, None], s[:, None], np.arange(3000), 1000))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert lo < cmp.mean() < hi


def test_bootstrap_resamples_patients_not_images():
    """60 patients x 8 images with one value per patient: the interval of the mean is that of 60 values."""
    rng = np.random.default_rng(5)
    per_patient = rng.normal(size=60)
    x, groups = np.repeat(per_patient, 8), np.repeat(np.arange(60), 8)
    rows = [{"patient_id": f"P{g:03d}", "_row": i} for i, g in enumerate(groups)]
    np.testing.assert_array_equal(evaluate.patient_groups(rows), groups)

    def stat(i):
        return {"mean": x[i].mean()}
    lo, hi = evaluate.percentile_ci(evaluate.bootstrap(stat, groups, 1000)["mean"])
    assert (hi - lo) == pytest.approx(2 * 1.96 * per_patient.std(ddof=1) / np.sqrt(60), rel=0.2)
    lo_i, hi_i = evaluate.percentile_ci(evaluate.bootstrap(stat, np.arange(480), 1000)["mean"])
    assert hi - lo > 2 * (hi_i - lo_i)  # resampling images would claim sqrt(8) times the precision


def test_paired_bootstrap_p_values():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, (400, 1)).astype(float)
    good, poor = y + 0.7 * rng.normal(size=y.shape), y + 3.0 * rng.normal(size=y.shape)
    groups = np.arange(400)

    def reps(s):
        return _auc_reps(y, s, groups, 500)
    a, b = reps(good), reps(poor)
    assert evaluate.paired_p(a, reps(good)) == 1.0  # identical models on the same resamples
    assert evaluate.paired_p(a, b) < 0.01 and evaluate.paired_p(b, a) < 0.01
    noisy = y + 0.7 * rng.normal(size=y.shape)  # another draw of an equally good model: no difference
    assert evaluate.paired_p(a, reps(noisy)) > 0.01


# ----------------------------------------------------------------------------------------------------
# heads on hand-made features (items 6, 7)


def test_probe_regression_grading_on_hand_made_features():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(7)
    n = 600
    Y = rng.integers(0, 2, (n, 2)).astype(float)
    age = rng.uniform(6, 216, n)
    grade = np.digitize(age, [60, 110, 160])
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X[:, 0] += 4 * Y[:, 0]
    X[:, 1] += 4 * Y[:, 1]
    X[:, 2] = age / 50
    rows = _rows(Y, target=[str(a) for a in age])
    tr, te = evaluate.Part(rows[:400], X[:400]), evaluate.Part(rows[400:], X[400:])
    ev = _stub({("train", "all"): tr, ("test", "all"): te}, ["A", "B"], ["target"], fractions="0.1,1",
               seeds="0,1")
    res, stat, _ = evaluate.task_probe(ev, "all")
    assert res["metrics"]["auc@100%"] > 0.97 and res["metrics"]["auc@10%"] > 0.95
    assert res["seed_std"]["auc@100%"] == 0.0 and res["n_train"] == {"10%": 40, "100%": 400}
    assert stat(np.arange(200))["auc@100%"] == pytest.approx(res["metrics"]["auc@100%"])
    res, _, _ = evaluate.task_regression(ev, "all")
    assert res["metrics"]["mae"] < 2.0  # age is linear in feature 2
    assert res["metrics"]["mae_predict_mean"] == pytest.approx(np.abs(age[400:] - age[:400].mean()).mean())
    # grading: 4 grades; every metric against scikit-learn on an independently fitted probe
    for r, g in zip(rows, grade):
        r["target"] = str(g)
    res, _, _ = evaluate.task_grading(_stub(ev.parts, ["A", "B"], ["target"], classes="0,1,2,3",
                                            probe_c=10.0), "all")
    sc = StandardScaler().fit(X[:400])
    prob = LogisticRegression(C=10.0, max_iter=2000).fit(sc.transform(X[:400]), grade[:400]) \
        .predict_proba(sc.transform(X[400:]))
    pred = prob.argmax(1)
    m = res["metrics"]
    assert m["auc_ovr_macro"] == pytest.approx(roc_auc_score(grade[400:], prob, multi_class="ovr"), abs=1e-4)
    assert m["acc"] == pytest.approx(np.mean(pred == grade[400:]), abs=0.01)
    assert m["f1_macro"] == pytest.approx(f1_score(grade[400:], pred, average="macro"), abs=0.02)
    assert m["kappa_quadratic"] == pytest.approx(cohen_kappa_score(grade[400:], pred, weights="quadratic"),
                                                 abs=0.02)
    assert m["acc"] > 0.8 and sum(map(sum, res["confusion"])) == 200


def test_finetune_schedule_and_rle_masks_as_data_prep_writes_them(tmp_path):
    lr = evaluate.warmup_cosine(total=10, warmup=2)
    assert [round(lr(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]  # warm-up, cosine to 0
    assert evaluate.Config().ft_epochs == 10 and evaluate.Config().head_lr == 3e-4  # D-MLM Sec. 3.5
    # SIIM stage 1 (train-rle.csv): pixels counted down the columns; each start relative to the last run's end
    m = np.zeros((6, 6), bool)
    m[1:4, 1] = True  # column-major pixels 7, 8, 9 (0-based)
    m[0:2, 3] = True  # pixels 18, 19
    rle = "7 3 8 2"  # 7; then 18 - (7 + 3) = 8
    from PIL import Image

    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "x.png")
    row = {"_path": str(tmp_path / "x.png"), "EncodedPixels": rle}
    np.testing.assert_array_equal(evaluate.load_mask(row, tmp_path, 6, "EncodedPixels"), m)
    assert not evaluate.load_mask({**row, "EncodedPixels": "-1"}, tmp_path, 6, "EncodedPixels").any()
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    got = evaluate.load_mask({"mask": "m.png"}, tmp_path, 6)  # a `mask` PNG next to the CSV
    np.testing.assert_array_equal(got, m)


# ----------------------------------------------------------------------------------------------------
# issue 16: user errors are one line; --help is the manual


def test_user_errors_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "U-Ones" in out and "--uncertain" in out and "--preset=vindr" in out
    for argv, msg in [([], "--ckpt"), (["--ckpt=/nope.pt"], "no checkpoint"),
                      (["--ckpt=/nope.pt", "--task=zeroshot,nope"], "--task"),
                      (["--ckpt=/nope.pt", "--uncertain=maybe"], "--uncertain"),
                      (["--ckpt=/nope.pt", "--fractions=0,1"], "--fractions")]:
        with pytest.raises(common.UserError, match=msg):
            evaluate.main(argv)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    torch.save({"paper": "other", "model": {}}, tmp_path / "other.pt")
    for name, msg in [("bad.pt", "unreadable"), ("other.pt", "not a checkpoint of")]:
        with pytest.raises(common.UserError, match=msg):
            evaluate.load_model(str(tmp_path / name), "cpu")


# ----------------------------------------------------------------------------------------------------
# end to end on short training runs


@pytest.fixture(scope="module")
def data_csv(phantom_csv, tmp_path_factory):
    """The phantom CSV with absolute paths and a 4-level `grade` column binned from the age."""
    src = Path(phantom_csv)
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["image"], r["mask"] = str(src.parent / r["image"]), str(src.parent / r["mask"])
        r["grade"] = str(int(np.digitize(float(r["target"]), [60, 150, 400])))
    return _write_csv(tmp_path_factory.mktemp("graded") / "graded.csv", rows)


TINY_PEDCLIP = ["--image_size=32", "--patch_size=8", "--vit_width=32", "--vit_depth=1", "--vit_heads=2",
                "--vit_mlp_dim=64", "--embed_dim=32", "--vocab_size=300", "--batch_size=32",
                "--teacher_epochs=0", "--num_workers=0"]
FAST = ["--num_workers=0", "--batch_size=64", "--bootstrap=200", "--seeds=0", "--fractions=0.5,1",
        "--seg_epochs=2", "--ft_epochs=1", "--ft_batch_size=32", "--threads=1"]


@pytest.fixture(scope="module")
def pedclip_runs(phantom_csv, tmp_path_factory):
    """A finished 1-epoch PedCLIP run (its metrics.json) and a 1-step one, on the 240 phantoms."""
    import pedclip

    out = tmp_path_factory.mktemp("pedclip")
    pedclip.main([f"--data={phantom_csv}", f"--out_dir={out / 'a'}", "--epochs=1"] + TINY_PEDCLIP)
    pedclip.main([f"--data={phantom_csv}", f"--out_dir={out / 'b'}", "--epochs=1", "--max_steps=1"]
                 + TINY_PEDCLIP)
    return str(out / "a" / "ckpt.pt"), str(out / "b" / "ckpt.pt")


@pytest.mark.slow
def test_zeroshot_equals_the_training_runs_metrics(pedclip_runs, phantom_csv, tmp_path):
    ck = pedclip_runs[0]
    saved = json.loads((Path(ck).parent / "metrics.json").read_text())
    r = evaluate.main([f"--ckpt={ck}", f"--data={phantom_csv}", f"--out={tmp_path}"] + FAST)[ck]["zeroshot"]
    assert r["n_images"] == saved["n_images"]
    assert r["metrics"]["auc_macro"] == pytest.approx(saved["zeroshot_auc_macro"], abs=1e-12)
    for n, a in saved["zeroshot_auc_per_label"].items():
        assert r["per_label"][n]["auc"] == (None if a is None else pytest.approx(a, abs=1e-12))
    lo, hi = r["ci"]["auc_macro"]
    assert lo <= r["metrics"]["auc_macro"] <= hi
    _check_prompts(evaluate.load_model(ck, "cpu")[0])
    prompts = {"Pleural Effusion": {"pos": ["effusion."], "neg": ["dry."]}}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    model = evaluate.load_model(ck, "cpu", str(tmp_path / "p.json"))[0]  # a data set's own prompts
    assert model.zeroshot_prompts("Pleural_Effusion") == (["effusion."], ["dry."])
    assert model.zeroshot_prompts("Edema")[0][0] == "There is edema."  # classes it does not name: the file's
    with pytest.raises(common.UserError, match="--prompts"):
        evaluate.load_model(ck, "cpu", str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_every_task_and_the_comparison_table(pedclip_runs, data_csv, tmp_path):
    a, b = pedclip_runs
    tasks = "zeroshot,zeroshot_multiclass,retrieval,probe,finetune,segmentation,regression,grading"
    res = evaluate.main([f"--ckpt={a},{b}", f"--data={data_csv}", f"--task={tasks}", f"--out={tmp_path}",
                         "--target_column=grade", "--classes=0,1,2,3", "--blank=zero"] + FAST)
    for ck in (a, b):
        for t, r in res[ck].items():
            assert r["views"] == ("frontal" if t == "retrieval" else "all")
            assert r["labels"] == ("blank=zero, uncertain=drop, no_finding=off"
                                   if t in ("zeroshot", "probe", "finetune") else "not used")
            for k, v in r["metrics"].items():  # a mean of per-image values lies within its interval
                lo, hi = r["ci"][k] or (v, v)
                assert lo <= hi and (t not in ("retrieval", "regression") or lo - 1e-9 <= v <= hi + 1e-9)
            if ck == b:
                assert all(p is None or 0 < p <= 1 for p in r["p_vs_first"].values())
    with open(data_csv, newline="") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    studies = {r["study_id"] for r in test if r["view"] in ("PA", "AP") and r["impression"] + r["findings"]}
    assert res[a]["retrieval"]["n_images"] == len(studies)  # one frontal query per study
    assert set(res[a]["grading"]["metrics"]) == {"acc", "f1_macro", "kappa_quadratic", "auc_ovr_macro"}
    assert set(res[a]["segmentation"]["metrics"]) == {"dice@50%", "dice@100%"}
    stem = tmp_path / ("eval_" + tasks.replace(",", "+"))
    md, saved = Path(f"{stem}.md").read_text(), json.loads(Path(f"{stem}.json").read_text())
    assert "blank=zero" in md and "p=" in md and "| retrieval (frontal) | R@10 |" in md
    assert saved[b]["probe"]["p_vs_first"] and "_boot" not in saved[b]["probe"]
    for argv, msg in [([f"--data={tmp_path / 'none.csv'}"], "does not exist"),
                      ([f"--data={data_csv}", "--task=regression", "--target_column=nope"], "nope"),
                      ([f"--data={data_csv}", "--labels=Nope"], "not label columns")]:
        with pytest.raises(common.UserError, match=msg):
            evaluate.main([f"--ckpt={a}"] + argv + FAST)


def test_command_line_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"--ckpt={tmp_path / 'none.pt'}"])
    with pytest.raises(SystemExit) as e:
        common.cli(evaluate.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no checkpoint" in err


# the other paper files: a short checkpoint each (their flags as their files define them)
OTHERS = {
    "cxrclip": ["--tiny_width=32", "--embed_dim=32", "--vocab_size=300"],
    "cxrcml": ["--width=32", "--layers=1", "--patch_size=8", "--n_clusters=4", "--bank_size=32",
               "--refit_every=1"],
    "dmlm": ["--patch_size=8", "--vit_width=32", "--vit_depth=1", "--vit_heads=2", "--embed_dim=32"],
}


@pytest.mark.slow
@pytest.mark.parametrize("paper", list(OTHERS))
def test_other_papers_checkpoints(paper, phantom_csv, tmp_path):
    import importlib

    mod = importlib.import_module(paper)
    mod.main([f"--data={phantom_csv}", f"--out_dir={tmp_path / 'run'}", "--image_size=32", "--batch_size=16",
              "--epochs=1", "--max_steps=2", "--num_workers=0"] + OTHERS[paper])
    ck = str(tmp_path / "run" / "ckpt.pt")
    res = evaluate.main([f"--ckpt={ck}", f"--data={phantom_csv}", f"--out={tmp_path}",
                         "--task=zeroshot,retrieval,probe,segmentation"] + FAST)[ck]
    assert res["zeroshot"]["paper"] == paper and 0 <= res["retrieval"]["metrics"]["R@10"] <= 1
    assert all(r["ci"] for r in res.values())
    _check_prompts(evaluate.load_model(ck, "cpu")[0])


def _check_prompts(model):
    """A label name goes into a prompt as words (common.label_text): "Pleural_Thickening" -> "pleural
    thickening"."""
    pos, neg = model.zeroshot_prompts("Pleural_Thickening")
    assert pos and all("_" not in p for p in pos + neg)
    assert all("pleural thickening" in p.lower() for p in pos)
