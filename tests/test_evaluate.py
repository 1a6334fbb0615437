"""evaluate.py: metrics and the bootstrap against independent computations (scikit-learn, DeLong's variance,
hand-made retrieval, label and p-value cases), heads on hand-made features, figures on synthetic arrays, every
task end to end on short runs of the four papers, and each paper's table from a fixture in its release's
published layout (data_prep.py -> a short training run -> evaluate.py's preset)."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import evaluate
import render
from conftest import TINY_FLAGS


# ----------------------------------------------------------------------------------------------------
# metrics against scikit-learn


def test_auc_columns_and_macro_over_a_fixed_label_set():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (80, 3)).astype(float)
    s = np.round(rng.normal(size=(80, 3)) + y, 1)
    y[:6, 0], y[:, 2] = -1, 1  # -1 left out; column 2 has one class
    got = evaluate.auc_columns(y, s)
    assert got[1] == pytest.approx(roc_auc_score(y[:, 1], s[:, 1]), abs=1e-12) and np.isnan(got[2])
    assert got[0] == pytest.approx(roc_auc_score(y[6:, 0], s[6:, 0]), abs=1e-12)
    assert evaluate.macro(got) == pytest.approx((got[0] + got[1]) / 2)
    keep = np.array([True, True, False])
    assert evaluate.macro([0.2, np.nan, 0.9], keep) is None  # a kept label undefined here: no macro
    assert evaluate.macro([0.2, 0.4, np.nan], keep) == pytest.approx(0.3)
    assert evaluate.macro([np.nan]) is None and evaluate.macro([0.5, None, 0.7]) == pytest.approx(0.6)


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
# labels, the class filter, views, --rare=auto


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
    for _, views in list(ev.parts):  # no valid split unless given
        ev.parts.setdefault(("valid", views), None)
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
# retrieval on a hand-made case with a duplicate report text


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
# the bootstrap


def _auc_reps(y, s, groups, n):
    return evaluate.bootstrap(lambda i: {"auc": evaluate.auc_columns(y[i], s[i])[0]}, groups, n)["auc"]


def test_bootstrap_ci_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (200, 2000):
        y = rng.integers(0, 2, (n, 1)).astype(float)
        s = y + rng.normal(size=(n, 1))
        point = evaluate.auc_columns(y, s)[0]
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




def test_paired_p_by_hand():
    # d = a - b = [1, 2, 3, -1]: one difference <= 0, three >= 0: 2 (1 + 1) / (4 + 1) = 0.8 (one-sided: 0.4;
    # without the +1: 0.5)
    assert evaluate.paired_p(np.array([1, 2, 3, 4.0]), np.array([0, 0, 0, 5.0])) == pytest.approx(0.8)
    # nine resamples all favour a: 2 (0 + 1) / (9 + 1) = 0.2, either way round (one-sided: 0.1; no +1: 0)
    assert evaluate.paired_p(np.ones(9), np.zeros(9)) == pytest.approx(0.2)
    assert evaluate.paired_p(np.zeros(9), np.ones(9)) == pytest.approx(0.2)
    # a resample undefined for either is left out: d = [1] -> 2 (0 + 1) / 2 = 1
    assert evaluate.paired_p(np.array([1, np.nan, 3.0]), np.array([0, 0, np.nan])) == 1.0
    assert evaluate.paired_p(np.array([np.nan]), np.array([1.0])) is None


def test_a_rare_labels_interval_stays_honest():
    """One common label (AUC ~0.94) and one of a single positive patient in 100, scored below every negative
    (AUC 0 whenever it is defined): the macro is ~0.47. A resample without that patient must not average the
    common label alone (~0.94, an interval like [0.46, 0.94]): resampled within label strata, that patient is
    in every resample; resampled plainly, the resamples without it are skipped and counted. Either way the
    interval is that of half the common label's AUC."""
    rng = np.random.default_rng(11)
    n = 100
    Y = np.zeros((n, 2))
    Y[:50, 0], Y[7, 1] = 1, 1
    S = np.stack([Y[:, 0] * 2.2 + rng.normal(size=n), rng.normal(size=n)], 1)
    S[7, 1] = -10.0
    groups = np.arange(n)
    strata = evaluate.label_strata(Y, groups)
    assert strata[7] == 1 and (strata[:50][np.arange(50) != 7] == 0).all() and (strata[50:] == -1).all()
    stat = evaluate.label_stat(Y, S, np.zeros(2), np.zeros(2, bool))
    point = stat(groups)["auc_macro"]
    assert point == pytest.approx(evaluate.auc_columns(Y[:, :1], S[:, :1])[0] / 2)
    lo_a, hi_a = evaluate.percentile_ci(_auc_reps(Y, S, groups, 1000))  # the common label alone
    for st, skipped in ((strata, (0, 0)), (None, (300, 430))):  # P(patient 7 not drawn) = 0.99^100 = 0.366
        boot = evaluate.bootstrap(stat, groups, 1000, strata=st)
        lo, hi = evaluate.percentile_ci(boot["auc_macro"])
        assert lo <= point <= hi and hi - lo < 0.6 * (hi_a - lo_a)  # ~0.5: the rare label adds no spread
        assert skipped[0] <= np.isnan(boot["auc_macro"]).sum() <= skipped[1]
        assert np.isnan(boot["f1_macro"]).sum() == np.isnan(boot["auc_macro"]).sum()


class PromptStub:
    """encode_text by table lookup, zeroshot_prompts from a dict: hand-made zero-shot cases."""

    def __init__(self, table, prompts):
        self.table, self.prompts = table, prompts

    def encode_text(self, texts):
        return torch.tensor(np.stack([self.table[t] for t in texts]))

    def zeroshot_prompts(self, name):
        return self.prompts[name]


def test_multiclass_takes_the_mean_cosine_over_a_classs_prompts():
    """CXR-CLIP's evaluator averages the cosines to a class's prompts. With A's two prompts far apart, their
    normalised mean would be closer to the first image than B's prompt is, and would take it from B."""
    a1, a2, b = np.array([1.0, 0]), np.array([-0.6, 0.8]), np.array([0.8, 0.6])
    table = {"a1": a1, "a2": a2, "b": b}
    model = PromptStub(table, {"A": (["a1", "a2"], []), "B": (["b"], [])})
    img = np.array([[0.0, 1.0], a2], np.float32)  # image 0 is B's, image 1 is A's
    rows = _rows(np.array([[0, 1], [1, 0]]))
    ev = _stub({("test", "all"): evaluate.Part(rows, img)}, ["A", "B"], model=model)
    res, stat, _ = evaluate.task_zeroshot_multiclass(ev, "all")
    by_hand = [np.argmax([np.mean([e @ table[p] for p in model.prompts[c][0]]) for c in "AB"]) for e in img]
    assert by_hand == [1, 0] and res["metrics"]["acc"] == 1.0 and res["confusion"] == [[1, 0], [0, 1]]
    unit = (a1 + a2) / np.linalg.norm(a1 + a2)
    assert img[0] @ unit > img[0] @ b  # the normalised mean would have said A


def test_zeroshot_thresholds_fall_back_without_a_valid_split_and_say_so():
    e = np.eye(3)
    model = PromptStub({"p": e[0], "n": e[1]}, {"A": (["p"], ["n"])})
    rows = _rows(np.array([[1], [0], [1], [0]]))
    img = np.array([[0.9, 0.1, 0], [0.1, 0.9, 0], [0.6, 0.2, 0], [0.5, 0.6, 0]], np.float32)
    ev = _stub({("test", "all"): evaluate.Part(rows, img)}, ["A"], model=model)
    res, _, _ = evaluate.task_zeroshot(ev, "all")
    assert res["per_label"]["A"]["threshold"] == 0.0 and "no valid split" in res["note"]
    assert res["per_label"]["A"]["acc"] == 1.0  # scores 0.8, -0.8, 0.4, -0.1 against 0


# ----------------------------------------------------------------------------------------------------
# heads on hand-made features


def test_probe_regression_grading_choose_on_valid_and_match_sklearn():
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(7)
    n = 700
    Y = rng.integers(0, 2, (n, 2)).astype(float)
    age = rng.uniform(6, 216, n)
    grade = np.digitize(age, [60, 110, 160])
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X[:, 0] += 1.5 * Y[:, 0]
    X[:, 1] += 4 * Y[:, 1]
    X[:, 2] = age / 50 + 0.3 * rng.normal(size=n)
    rows = _rows(Y, target=[str(a) for a in age])
    tr, va, te = slice(0, 400), slice(400, 500), slice(500, 700)
    parts = {(s, "all"): evaluate.Part(rows[sl], X[sl]) for s, sl in (("train", tr), ("valid", va), ("test", te))}
    cands = [0.001, 0.01, 1.0]
    ev = _stub(parts, ["A", "B"], ["target"], fractions="0.1,1", seeds="0,1", probe_c="0.001,0.01,1")
    res, stat, _ = evaluate.task_probe(ev, "all")

    def sk(C, Xa, ya):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=0)).fit(Xa, ya)
    aucs = []
    for j in range(2):  # C by the best valid AUC, the first on ties; then the test AUC, all by scikit-learn
        fits = [sk(C, X[tr], Y[tr, j]) for C in cands]
        best = int(np.argmax([roc_auc_score(Y[va, j], f.predict_proba(X[va])[:, 1]) for f in fits]))
        assert res["chosen"]["100%, seed 0"][j] == cands[best]
        aucs.append(roc_auc_score(Y[te, j], fits[best].predict_proba(X[te])[:, 1]))
    assert res["metrics"]["auc@100%"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert res["seed_std"]["auc@100%"] == 0.0 and res["n_train"] == {"10%": 40, "100%": 400}
    assert stat(np.arange(200))["auc@100%"] == pytest.approx(res["metrics"]["auc@100%"])
    # regression: ridge's alpha by the valid MAE
    res, _, _ = evaluate.task_regression(ev, "all")
    alphas = np.logspace(-3, 3, 13)
    fits = [make_pipeline(StandardScaler(), Ridge(alpha=a)).fit(X[tr], age[tr]) for a in alphas]
    best = int(np.argmin([np.abs(f.predict(X[va]) - age[va]).mean() for f in fits]))
    assert res["chosen"] == pytest.approx(alphas[best])
    assert res["metrics"]["mae"] == pytest.approx(np.abs(fits[best].predict(X[te]) - age[te]).mean(), abs=1e-9)
    assert res["metrics"]["mae_predict_mean"] == pytest.approx(np.abs(age[te] - age[tr].mean()).mean())
    assert res["metrics"]["mae"] < 0.3 * res["metrics"]["mae_predict_mean"]
    # grading: 4 grades, C by the valid accuracy; every metric against scikit-learn
    for r, g in zip(rows, grade):
        r["target"] = str(g)
    res, _, _ = evaluate.task_grading(_stub(parts, ["A", "B"], ["target"], classes="0,1,2,3",
                                            probe_c="0.01,10"), "all")
    fits = [sk(C, X[tr], grade[tr]) for C in (0.01, 10.0)]
    best = int(np.argmax([(f.predict(X[va]) == grade[va]).mean() for f in fits]))
    assert res["chosen"] == (0.01, 10.0)[best]
    prob = fits[best].predict_proba(X[te])
    pred = prob.argmax(1)
    m = res["metrics"]
    assert m["auc_ovr_macro"] == pytest.approx(roc_auc_score(grade[te], prob, multi_class="ovr"), abs=1e-6)
    assert m["acc"] == pytest.approx(np.mean(pred == grade[te]))
    assert m["f1_macro"] == pytest.approx(f1_score(grade[te], pred, average="macro"))
    assert m["kappa_quadratic"] == pytest.approx(cohen_kappa_score(grade[te], pred, weights="quadratic"))
    assert m["acc"] > 0.7 and sum(map(sum, res["confusion"])) == 200


def test_linear_head_keeps_the_epoch_of_the_lowest_valid_loss():
    """CXR-CLIP's head: on noise labels with more features than the valid split can support, the valid loss
    rises after a while; the epoch kept has a lower valid BCE than the last one. A label with one class in
    training gets no score."""
    rng = np.random.default_rng(8)
    Xtr, Xva = rng.normal(size=(40, 60)), rng.normal(size=(200, 60))
    Ytr, Yva = rng.integers(0, 2, (40, 2)).astype(float), rng.integers(0, 2, (200, 2)).astype(float)
    Ytr[:, 1] = 0
    cfg = evaluate.Config(probe_epochs=60, probe_lr=0.05)
    P_best, epoch = evaluate.linear_head(Xtr, Ytr, Xva, Yva, Xva, cfg, 0, "cpu")
    P_last, last = evaluate.linear_head(Xtr, Ytr, None, None, Xva, cfg, 0, "cpu")

    def bce(P):
        p = np.clip(P[:, 0], 1e-7, 1 - 1e-7)
        return -np.mean(Yva[:, 0] * np.log(p) + (1 - Yva[:, 0]) * np.log(1 - p))
    assert last == 60 and 1 <= epoch < 60 and bce(P_best) < bce(P_last) - 0.05
    assert np.isnan(P_best[:, 1]).all() and np.isfinite(P_best[:, 0]).all()
    # separable features: the head learns them
    Xs = rng.normal(size=(300, 5))
    Ys = (Xs[:, :1] > 0).astype(float)
    P, _ = evaluate.linear_head(Xs[:200], Ys[:200], Xs[200:250], Ys[200:250], Xs[250:],
                                evaluate.Config(probe_epochs=30, probe_lr=0.05), 0, "cpu")
    assert evaluate.auc_columns(Ys[250:], P)[0] > 0.97


def test_finetune_schedule_is_warm_up_then_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = evaluate.warmup_cosine(opt, warmup=3, total=11)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [(s + 1) / 3 if s < 3 else 0.5 * (1 + np.cos(np.pi * (s - 3) / 8)) for s in range(11)]
    np.testing.assert_allclose(lrs, expect, atol=1e-6)  # D-MLM Sec. 3.5: warmed up, then cosine to 0
    assert evaluate.Config().ft_epochs == 10 and evaluate.Config().head_lr == 3e-4


def test_masks_read_one_at_a_time_only_findings_kept(tmp_path):
    from PIL import Image

    m = np.zeros((8, 8), np.uint8)
    m[2:5, 1:3] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    rows = [{"mask": "m.png"}, {"mask": ""}, {"mask": "empty.png"}, {"mask": "missing.png"}, {"mask": "m.png"}]
    ev = _stub(data=str(tmp_path / "x.csv"))
    keep, packed = evaluate.finding_masks(ev, rows, 4)
    assert keep == [0, 4] and packed.shape == (2, 2)  # 16 bits per mask
    expect = m.reshape(4, 2, 4, 2)[:, 0, :, 0] > 0  # nearest neighbours at half size: every second pixel
    np.testing.assert_array_equal(np.unpackbits(packed[0])[:16].reshape(4, 4), expect)
    np.testing.assert_array_equal(evaluate.load_mask(rows[0], tmp_path, 4), expect)


def test_presets_read_data_preps_default_names_and_pcxr_has_its_findings(tmp_path):
    import data_prep

    for name, p in evaluate.PRESETS.items():
        if "data" in p:
            stem = Path(p["data"]).stem
            assert stem in data_prep.CONVERTERS and p["data"] == f"data/{stem}.csv", name
    findings = ["Bronchitis", "Brocho-pneumonia", "Other disease", "Bronchiolitis", "Situs inversus", "Pneumonia",
                "Pleuro-pneumonia", "Diagphramatic hernia", "Tuberculosis", "Congenital emphysema", "CPAM",
                "Hyaline membrane disease", "Mediastinal tumor", "Lung tumor"]
    path = _write_csv(tmp_path / "pcxr.csv", [{"image": "x.png", "split": "test", "label:No finding": 1,
                                               **{f"label:{f}": 0 for f in findings}}])
    cfg = common.parse_config(evaluate.Config, evaluate.PRESETS, ["--preset=pedclip_pcxr", f"--data={path}"])
    ev = evaluate.Evaluator(cfg, None, "pedclip")
    assert ev.label_names(ev.rows("test", "all"))[0] == findings  # PedCLIP: 14 findings, not No finding


# ----------------------------------------------------------------------------------------------------
# figures: pure functions of arrays


def _png(path):
    from PIL import Image

    a = np.asarray(Image.open(path).convert("L"))
    assert a.std() > 5  # something is drawn
    return a.shape


def test_figures_from_synthetic_arrays(tmp_path):
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 50).astype(float)
    curves = {f"L{j}": [("a", y, y + rng.normal(size=50)), ("b", y, rng.normal(size=50))] for j in range(7)}
    render.roc_figure(tmp_path / "roc.png", curves)
    assert _png(tmp_path / "roc.png") == (2 * 3 * 110, 5 * 3 * 110)  # 7 labels: 2 rows of 5 panels
    rows = [("zeroshot auc_macro", [("a", 0.8, [0.7, 0.9]), ("b", 0.6, None)]), ("probe auc@1%", [("a", None, None)])]
    render.comparison_figure(tmp_path / "cmp.png", rows)
    render.gate_figure(tmp_path / "gate.png", rng.integers(0, 5, (1, 3, 23)), ["chest", "hand", "knee"],
                         [f"e{i}" for i in range(23)], [3])
    render.sigma_figure(tmp_path / "sigma.png", rng.integers(0, 255, (32, 32)), rng.random((4, 4)),
                          ["there", "is", "a", "small", "left", "effusion", "."], rng.random(7))
    assert _png(tmp_path / "sigma.png") == (440, 1100)
    for f in ("cmp.png", "gate.png"):
        _png(tmp_path / f)


# ----------------------------------------------------------------------------------------------------
# user errors are one line; --help is the manual


def test_user_errors_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "U-Ones" in out and "--uncertain" in out and "cxrclip_vindr" in out
    assert "vindr_cxr --root=R" in out and "data/<data set>.csv" in out  # the map of tables to commands
    for argv, msg in [([], "--ckpt"), (["--ckpt=/nope.pt"], "no checkpoint"),
                      (["--ckpt=/nope.pt", "--task=zeroshot,nope"], "--task"),
                      (["--ckpt=/nope.pt", "--uncertain=maybe"], "--uncertain"),
                      (["--ckpt=/nope.pt", "--probe=svm"], "--probe"),
                      (["--ckpt=/nope.pt", "--probe_c=0,1"], "--probe_c"),
                      (["--ckpt=/nope.pt", "--fractions=0,1"], "--fractions")]:
        with pytest.raises(common.UserError, match=msg):
            evaluate.main(argv)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    torch.save({"paper": "other", "model": {}}, tmp_path / "other.pt")
    for name, msg in [("bad.pt", "unreadable"), ("other.pt", "not a checkpoint of")]:
        with pytest.raises(common.UserError, match=msg):
            evaluate.load_model(str(tmp_path / name), "cpu")


def test_command_line_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"--ckpt={tmp_path / 'none.pt'}"])
    with pytest.raises(SystemExit) as e:
        common.cli(evaluate.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no checkpoint" in err


# ----------------------------------------------------------------------------------------------------
# end to end on short training runs of the four papers


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


FAST = ["--num_workers=0", "--batch_size=64", "--bootstrap=200", "--seeds=0", "--fractions=0.5,1",
        "--seg_epochs=2", "--ft_epochs=1", "--ft_batch_size=32", "--threads=1"]


def train(paper, data, out, *extra):
    """A short run of a paper file at its smallest -> its checkpoint (the best one where it keeps one)."""
    import importlib

    importlib.import_module(paper).main([f"--data={data}", f"--out_dir={out}", "--image_size=32",
                                         "--batch_size=32", "--epochs=1", "--num_workers=0", "--threads=1",
                                         *TINY_FLAGS[paper], *extra])
    return str(out / "ckpt_best.pt") if (out / "ckpt_best.pt").exists() else str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def runs(phantom_csv, tmp_path_factory):
    """A finished 1-epoch run of each paper file on the 240 phantoms (with its metrics.json), and a 1-step
    PedCLIP run."""
    out = tmp_path_factory.mktemp("runs")
    ck = {p: train(p, phantom_csv, out / p) for p in TINY_FLAGS}
    ck["pedclip_1step"] = train("pedclip", phantom_csv, out / "p1", "--max_steps=1")
    return ck


def _check_cis(res):
    """Every metric with a value has its 95% CI, lo <= value <= hi."""
    for t, r in res.items():
        for k, v in r["metrics"].items():
            if v is not None:
                assert r["ci"].get(k) is not None, (t, k)
                lo, hi = r["ci"][k]
                assert lo - 1e-9 <= v <= hi + 1e-9, (t, k, v, lo, hi)


@pytest.mark.slow
def test_zeroshot_equals_the_training_runs_metrics(runs, phantom_csv, tmp_path):
    ck = runs["pedclip"]
    saved = json.loads((Path(ck).parent / "metrics.json").read_text())
    r = evaluate.main([f"--ckpt={ck}", f"--data={phantom_csv}", f"--out={tmp_path}"] + FAST)[ck]["zeroshot"]
    assert r["n_images"] == saved["n_images"]
    assert r["metrics"]["auc_macro"] == pytest.approx(saved["zeroshot_auc_macro"], abs=1e-12)
    for n, a in saved["zeroshot_auc_per_label"].items():
        assert r["per_label"][n]["auc"] == (None if a is None else pytest.approx(a, abs=1e-12))
    _check_cis({"zeroshot": r})
    _check_prompts(evaluate.load_model(ck, "cpu")[0])
    prompts = {"Pleural Effusion": {"pos": ["effusion."], "neg": ["dry."]}}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    model = evaluate.load_model(ck, "cpu", str(tmp_path / "p.json"))[0]  # a data set's own prompts
    assert model.zeroshot_prompts("Pleural_Effusion") == (["effusion."], ["dry."])
    assert model.zeroshot_prompts("Edema")[0][0] == "There is edema."  # classes it does not name: the file's
    with pytest.raises(common.UserError, match="--prompts"):
        evaluate.load_model(ck, "cpu", str(tmp_path / "missing.json"))


def _probe_by_sklearn(ck, data_csv, chosen):
    """The probe's macro AUC at 100% of the training images, computed here: PedCLIP's [IMG] token before the
    projection (its own forward), scikit-learn's standardised logistic regression with the C evaluate.py
    chose on valid, roc_auc_score; blank labels negative (--blank=zero), -1 left out."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = evaluate.load_model(ck, "cpu")[0]
    table = common.XrayCSV(data_csv)
    tf = model.image_transform(False)
    X, Y = {}, {}
    for split in ("train", "test"):
        rows = [r for r in table.rows if r["split"] == split]
        with torch.no_grad():
            x = torch.stack([tf(common.load_image(r["_path"])) for r in rows])
            X[split] = model.encode(x)[0][:, 0].numpy()
        y = np.array([r["_labels"] for r in rows], dtype=np.float64)
        y[np.isnan(y)], y[y == -1] = 0, np.nan
        Y[split] = y
    aucs = []
    for j, C in enumerate(chosen):
        if C is None:
            continue
        m, mt = np.isin(Y["train"][:, j], (0, 1)), np.isin(Y["test"][:, j], (0, 1))
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=0))
        clf.fit(X["train"][m], Y["train"][m, j])
        if 0 < Y["test"][mt, j].sum() < mt.sum():
            aucs.append(roc_auc_score(Y["test"][mt, j], clf.predict_proba(X["test"][mt])[:, 1]))
    return np.mean(aucs)


@pytest.mark.slow
def test_every_task_the_comparison_table_and_figures(runs, data_csv, tmp_path):
    a, b = runs["pedclip"], runs["pedclip_1step"]
    tasks = "zeroshot,zeroshot_multiclass,retrieval,probe,finetune,segmentation,regression,grading"
    res = evaluate.main([f"--ckpt={a},{b}", f"--data={data_csv}", f"--task={tasks}", f"--out={tmp_path}",
                         "--target_column=grade", "--classes=0,1,2,3", "--blank=zero"] + FAST)
    for ck in (a, b):
        _check_cis(res[ck])
        for t, r in res[ck].items():
            assert r["views"] == ("frontal" if t == "retrieval" else "all")
            assert r["labels"] == ("blank=zero, uncertain=drop, no_finding=off"
                                   if t in ("zeroshot", "probe", "finetune") else "not used")
            if ck == b:  # a p-value for every metric both checkpoints have
                assert set(r["p_vs_first"]) == {k for k, v in r["metrics"].items() if v is not None}
                assert all(0 < p <= 1 for p in r["p_vs_first"].values())
    with open(data_csv, newline="") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    studies = {r["study_id"] for r in test if r["view"] in ("PA", "AP") and r["impression"] + r["findings"]}
    assert res[a]["retrieval"]["n_images"] == len(studies)  # one frontal query per study
    hits = [res[a]["retrieval"]["metrics"][f"R@{k}"] for k in (1, 5, 10)]
    assert hits == sorted(hits)
    assert set(res[a]["grading"]["metrics"]) == {"acc", "f1_macro", "kappa_quadratic", "auc_ovr_macro"}
    assert set(res[a]["segmentation"]["metrics"]) == {"dice@50%", "dice@100%"}
    reg = res[a]["regression"]["metrics"]
    assert reg["mae"] < reg["mae_predict_mean"]  # the embedding knows something of the age
    probe = res[a]["probe"]
    assert probe["metrics"]["auc@100%"] == pytest.approx(
        _probe_by_sklearn(a, data_csv, probe["chosen"]["100%, seed 0"]), abs=2e-3)
    stem = tmp_path / ("eval_" + tasks.replace(",", "+"))
    md, saved = Path(f"{stem}.md").read_text(), json.loads(Path(f"{stem}.json").read_text())
    assert "blank=zero" in md and "p=" in md and "| retrieval (frontal) | R@10 |" in md
    assert saved[b]["probe"]["p_vs_first"] and "_boot" not in saved[b]["probe"] and "_roc" not in saved[b]["zeroshot"]
    figures = [line.split("](")[1][:-1] for line in md.splitlines() if line.startswith("![")]
    assert {f"{stem.name}_roc.png", f"{stem.name}_compare.png", f"{stem.name}_pedclip0.png"} <= set(figures)
    for f in figures:
        _png(tmp_path / f)
    for argv, msg in [([f"--data={tmp_path / 'none.csv'}"], "does not exist"),
                      ([f"--data={data_csv}", "--task=regression", "--target_column=nope"], "nope"),
                      ([f"--data={data_csv}", "--labels=Nope"], "not label columns")]:
        with pytest.raises(common.UserError, match=msg):
            evaluate.main([f"--ckpt={a}"] + argv + FAST)


@pytest.mark.slow
@pytest.mark.parametrize("paper", ["cxrclip", "cxrcml", "dmlm"])
def test_other_papers_checkpoints(paper, runs, phantom_csv, tmp_path):
    ck = runs[paper]
    saved = json.loads((Path(ck).parent / "metrics.json").read_text())
    res = evaluate.main([f"--ckpt={ck}", f"--data={phantom_csv}", f"--out={tmp_path}",
                         "--task=zeroshot,retrieval,probe,segmentation", "--figures=false"] + FAST)[ck]
    assert res["zeroshot"]["paper"] == paper and res["zeroshot"]["n_images"] == saved["n_images"]
    assert res["zeroshot"]["metrics"]["auc_macro"] == pytest.approx(saved["zeroshot_auc_macro"], abs=1e-12)
    hits = [res["retrieval"]["metrics"][f"R@{k}"] for k in (1, 5, 10)]
    assert hits == sorted(hits) and 0 <= hits[0] and hits[-1] <= 1
    _check_cis(res)
    assert res["probe"]["note"].count("features before the projection") == 1
    model = evaluate.load_model(ck, "cpu")[0]
    _check_prompts(model)
    if paper == "dmlm":  # the sigma^2 figure, through the interface the D-MLM file provides
        ev = evaluate.Evaluator(evaluate.Config(data=phantom_csv, num_workers=0), model, "dmlm")
        assert render.paper_figure(ev, tmp_path / "s.png").endswith("(s.png)")
        _png(tmp_path / "s.png")


def _check_prompts(model):
    """A label name goes into a prompt as words (common.label_text): "Pleural_Thickening" -> "pleural
    thickening"."""
    pos, neg = model.zeroshot_prompts("Pleural_Thickening")
    assert pos and all("_" not in p for p in pos + neg)
    assert all("pleural thickening" in p.lower() for p in pos)
