"""Tests of cxrcml.py against independent references: the Student-t density (Eq. 2) against scipy, the
mixture (Eq. 1) against scikit-learn's GaussianMixture and adjusted Rand indices, the triplet loss (Eq. 3) and
L_c against hand computations, CheXzero's pixels against its published pipeline (PIL + torchvision) and stated
constants, the CheXzero weight mapping against OpenAI's CLIP forward written out with nn.MultiheadAttention,
the five-fold protocol on phantoms, and a short end-to-end run."""
import csv
import json
import math
import statistics
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

import common
import cxrcml


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # small tensors: one thread is fastest, and two processes of this suite share 2 cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- Eq. (2): the multivariate t log-density with diagonal Sigma ----

def test_student_t_log_density_matches_scipy_multivariate_t():
    from scipy.stats import multivariate_t

    rng = np.random.default_rng(0)
    mu, var, z = rng.normal(size=(3, 6)), rng.uniform(0.2, 3.0, size=(3, 6)), rng.normal(size=(20, 6)) * 2
    for dof in (1.0, 4.0, 30.0):
        got, maha = cxrcml.student_t_log_density(torch.tensor(z), torch.tensor(mu), torch.tensor(var), dof)
        for k in range(3):
            ref = multivariate_t(loc=mu[k], shape=np.diag(var[k]), df=dof).logpdf(z)
            np.testing.assert_allclose(got[:, k].numpy(), ref, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(maha[:, k].numpy(), (((z - mu[k]) ** 2) / var[k]).sum(1), rtol=1e-9)


def test_student_t_log_density_float32_large_dof_is_gaussian():
    """At nu = 1e8 in float32, d = 512: the Gaussian (the lnG constant is formed in float64)."""
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(1)
    mu, var = rng.normal(size=(1, 512)) * 0.05, rng.uniform(1e-3, 3e-3, size=(1, 512))
    z = mu + rng.normal(size=(5, 512)) * np.sqrt(var)
    got, _ = cxrcml.student_t_log_density(*(torch.tensor(a, dtype=torch.float32) for a in (z, mu, var)), 1e8)
    ref = multivariate_normal(mu[0], np.diag(var[0])).logpdf(z)
    np.testing.assert_allclose(got[:, 0].numpy(), ref, rtol=1e-4)


# ---- Eq. (1): the mixture and its EM ----

def _set(tm, means, variances, weights):
    tm.load_state_dict({"means": torch.tensor(means), "variances": torch.tensor(variances),
                        "weights": torch.tensor(weights), "center": torch.zeros(means.shape[1]).double()})


def test_mixture_em_at_large_dof_is_sklearn_gaussian_mixture_from_the_same_start():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    X = np.concatenate([m + rng.normal(size=(n, 4)) * rng.uniform(0.5, 1.5, size=4)
                        for m, n in zip(rng.normal(size=(3, 4)) * 6, (150, 100, 80))])
    means, variances = X[rng.choice(len(X), 3, replace=False)], np.ones((3, 4)) * X.var(0)
    weights = np.ones(3) / 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 iterations: "did not converge"
        gm = GaussianMixture(3, covariance_type="diag", max_iter=8, tol=0.0, reg_covar=1e-6, means_init=means,
                             weights_init=weights, precisions_init=1 / variances).fit(X)
    tm = cxrcml.StudentTMixture(3, dof=1e10)
    _set(tm, means, variances, weights)
    tm._em(torch.tensor(X), 8, tm.dof)
    np.testing.assert_allclose(tm.means.numpy(), gm.means_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tm.variances.numpy(), gm.covariances_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tm.weights.numpy(), gm.weights_, rtol=1e-6)
    resp, ll = tm.score(torch.tensor(X))
    np.testing.assert_allclose(ll.numpy(), gm.score_samples(X), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(resp.numpy(), gm.predict_proba(X), atol=1e-5)
    for n in (1, 2):  # what fit ranks its starts on: the likelihood under the parameters after the last M-step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = GaussianMixture(3, covariance_type="diag", max_iter=n, tol=0.0, reg_covar=1e-6, means_init=means,
                                 weights_init=weights, precisions_init=1 / variances).fit(X)
        _set(tm, means, variances, weights)
        assert abs(float(tm._em(torch.tensor(X), n, math.inf)) - gm.score(X)) < 1e-9


def test_mixture_m_step_keeps_a_component_that_gets_no_point():
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(50, 3)))
    tm = cxrcml.StudentTMixture(3, dof=4.0)
    _set(tm, rng.normal(size=(3, 3)), np.full((3, 3), 2.0), np.ones(3) / 3)
    before = tm.means[2].clone(), tm.variances[2].clone()
    resp = torch.cat([torch.tensor(rng.dirichlet([1, 1], 50)), torch.zeros(50, 1, dtype=X.dtype)], 1)
    tm._m_step(X, resp)  # the third component's responsibilities are all 0
    assert torch.equal(tm.means[2], before[0]) and torch.equal(tm.variances[2], before[1])
    ref = (resp[:, :2].T @ X / resp[:, :2].sum(0)[:, None]).numpy()  # the others: weighted means
    np.testing.assert_allclose(tm.means[:2].numpy(), ref, rtol=1e-9)
    assert float(tm.weights[2]) < 1e-12


def test_mixture_fit_on_clean_data_reaches_sklearn_likelihood():
    """Our seeding and EM (nu = 1e8: Gaussian) find scikit-learn's optimum on four clean diagonal clusters."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), [120, 100, 90, 90])
    X = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10.0]])[y] + rng.normal(size=(400, 3)) * \
        rng.uniform(0.5, 1.5, size=(4, 3))[y]
    tm = cxrcml.StudentTMixture(4, dof=1e8, em_iters=50).fit(torch.tensor(X), seed=0)
    gm = GaussianMixture(4, covariance_type="diag", n_init=3, tol=1e-10, max_iter=500, random_state=0).fit(X)
    assert abs(float(tm.score(torch.tensor(X))[1].mean()) - gm.score(X)) < 1e-4
    assert adjusted_rand_score(y, tm.predict(torch.tensor(X)).numpy()) == 1.0


def test_mixture_t_recovers_clusters_with_gross_outliers_better_than_gaussian():
    """10% gross outliers: from the same start, scikit-learn's Gaussian mixture gives a component to them and
    merges two clusters; the t-mixture (nu = 4) down-weights them and keeps the three."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    true, y = np.array([[0, 0], [6, 0], [0, 6.0]]), np.repeat([0, 1, 2], 150)
    clean = true[y] + rng.normal(size=(450, 2))
    X = np.concatenate([clean, rng.uniform(-40, 40, size=(45, 2))])
    means, variances, weights = true + rng.normal(size=(3, 2)) * 0.5, np.ones((3, 2)), np.ones(3) / 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(3, covariance_type="diag", max_iter=100, tol=0.0, means_init=means,
                             weights_init=weights, precisions_init=1 / variances).fit(X)
    tm = cxrcml.StudentTMixture(3, dof=4.0)
    _set(tm, means, variances, weights)
    tm._em(torch.tensor(X), 100, tm.dof)
    ari_t = adjusted_rand_score(y, tm.predict(torch.tensor(clean)).numpy())
    ari_g = adjusted_rand_score(y, gm.predict(clean))
    assert ari_t > 0.95 and ari_g < 0.7, (ari_t, ari_g)


def test_mixture_every_seed_finds_four_separated_clusters():
    """Greedy k-means++ and 3 starts: every one of 6 seeds finds the 4 clusters (one start, plain draws
    merged two of them for some seeds)."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 8))
    y = np.repeat(np.arange(4), [150, 100, 80, 60])
    means = 6 * means / np.linalg.norm(means, axis=1, keepdims=True)  # 6 sigma apart from the origin
    X = torch.tensor(means[y] + rng.normal(size=(390, 8)))
    for seed in range(6):
        pred = cxrcml.StudentTMixture(4, dof=4.0).fit(X, seed).predict(X)
        assert adjusted_rand_score(y, pred.numpy()) == 1.0, seed


def test_kmeans_pp_seeds_as_well_as_sklearn_greedy_kmeans_plusplus():
    """Greedy seeding (2 + ln K candidates per centre): over 40 seeds its mean potential sum D(x)^2 matches
    scikit-learn's kmeans_plusplus and is well below plain k-means++ (one candidate per centre)."""
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 400)
    X = rng.uniform(-20, 20, size=(8, 2))[y] + rng.normal(size=(400, 2)) * rng.uniform(0.5, 3, size=(8, 1))[y]

    def potential(seeds):
        return ((X[:, None] - seeds[None]) ** 2).sum(-1).min(1).sum()
    ours = np.mean([potential(cxrcml.kmeans_pp(torch.tensor(X), 8, torch.Generator().manual_seed(s)).numpy())
                    for s in range(40)])
    greedy, plain = (np.mean([potential(kmeans_plusplus(X, 8, random_state=s, n_local_trials=t)[0])
                              for s in range(40)]) for t in (None, 1))
    assert abs(ours / greedy - 1) < 0.1 and ours < 0.8 * plain, (ours, greedy, plain)


# ---- Eq. (3): the triplet loss; L_c ----

def _circle(deg):
    rad = np.radians(deg)
    return torch.tensor(np.stack([np.cos(rad), np.sin(rad)], 1))


def test_triplet_loss_batch_hard_hand_computed():
    # unit vectors at these angles: Euclidean distance 2 sin(angle / 2). Clusters {0, 20, 40} (three members),
    # {180, 240} and the singleton {100}: no anchor (no positive), but a negative of all the others
    emb, ch = _circle([0, 20, 40, 180, 240, 100]), lambda deg: 2 * math.sin(math.radians(deg) / 2)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    hinge = {0: ch(40) - ch(100) + 0.5,  # anchor: its farthest positive, its nearest negative, margin 0.5
             20: ch(20) - ch(80) + 0.5,
             40: ch(40) - ch(60) + 0.5,
             180: ch(60) - ch(80) + 0.5,
             240: ch(60) - ch(120) + 0.5}
    assert hinge[0] < -0.3 and hinge[20] < -0.4 and hinge[240] < -0.2  # these three satisfy the margin: 0
    assert abs(hinge[40] - 0.1840) < 1e-4 and abs(hinge[180] - 0.2144) < 1e-4
    loss = cxrcml.triplet_loss(emb, labels, margin=0.5)  # the mean over the 5 anchors that have a triplet
    assert abs(float(loss) - (hinge[40] + hinge[180]) / 5) < 1e-12
    e = emb.clone().requires_grad_(True)  # no triplet at all: 0, and a gradient still flows (DDP)
    loss = cxrcml.triplet_loss(e, torch.arange(6), 0.5)
    loss.backward()
    assert loss.item() == 0.0 and e.grad is not None and torch.isfinite(e.grad).all()
    assert float(cxrcml.triplet_loss(emb, None, 0.5)) == 0.0  # before the first fit


def test_clip_loss_hand_computed():
    g = torch.Generator().manual_seed(0)
    u, v = (F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    s = (u @ v.T).numpy() * 10.0

    def ce(m):  # mean over rows of -log softmax(row)[diagonal]
        return np.mean([-m[i, i] + np.log(np.exp(m[i]).sum()) for i in range(len(m))])
    assert abs(float(cxrcml.clip_loss(u, v, u, v, torch.tensor(10.0))) - 0.5 * (ce(s) + ce(s.T))) < 1e-12


def test_cml_loss_is_l_c_and_l_m_on_the_pseudo_labels_images_gathered_once(monkeypatch):
    """Eq. (4)'s terms, as train() and validation_loss take them: L_c by hand, L_m by brute force over all
    triplets on the mixture's pseudo-labels, 0 before its first fit; the caller's gathered images are used as
    they are (only the texts are gathered inside)."""
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64) + torch.tensor([4.0, 0, 0]) *
                    (torch.arange(12) % 2)[:, None], dim=-1)  # two groups of images
    u = F.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64), dim=-1)
    gathered = []
    monkeypatch.setattr(common, "all_gather_with_grad", lambda x: gathered.append(x) or x)
    tm = cxrcml.StudentTMixture(2, dof=4.0)
    s = (u @ v.T).numpy() * 10.0
    ce = [np.mean([-m[i, i] + np.log(np.exp(m[i]).sum()) for i in range(12)]) for m in (s, s.T)]
    l_c, l_m = cxrcml.cml_loss(v, u, v, torch.tensor(10.0), tm, 0.3)
    assert abs(float(l_c) - np.mean(ce)) < 1e-12 and float(l_m) == 0.0
    assert len(gathered) == 1 and gathered[0] is u
    tm.fit(v, seed=0)
    y, d = tm.predict(v).numpy(), torch.cdist(v, v).numpy()
    assert len(set(y)) == 2
    hinges = [max(0.0, max(d[a, p] for p in range(12) if p != a and y[p] == y[a]) -
                  min(d[a, n] for n in range(12) if y[n] != y[a]) + 0.3) for a in range(12)]
    l_c2, l_m = cxrcml.cml_loss(v, u, v, torch.tensor(10.0), tm, 0.3)
    assert float(l_c2) == float(l_c) and abs(float(l_m) - np.mean(hinges)) < 1e-9 and float(l_m) > 0


def _cml_step(x, y, w, state, world=1, rank=0):
    """L_c + L_m of Eq. (4) for this rank's rows of x, y [8, 5] through shared weights w -> (loss, w's grad)."""
    w = w.clone().requires_grad_(True)
    b = len(x) // world
    v, u = (F.normalize(t[rank * b:(rank + 1) * b] @ w, dim=-1) for t in (x, y))
    tm = cxrcml.StudentTMixture(2, dof=4.0)
    tm.load_state_dict(state)
    l_c, l_m = cxrcml.cml_loss(v, u, common.all_gather_with_grad(v), torch.tensor(5.0), tm, 0.5)
    (l_c + l_m).backward()
    return float((l_c + l_m).detach()), float(l_m.detach()), w.grad


def _ddp_cml_worker(rank, world, init_file, x, y, w, state, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    loss, l_m, grad = _cml_step(x, y, w, state, world, rank)
    dist.all_reduce(grad)
    torch.save({"loss": loss, "l_m": l_m, "grad": grad / world}, f"{out_dir}/r{rank}.pt")  # DDP's average
    dist.destroy_process_group()


@pytest.mark.slow
def test_cml_loss_two_gloo_processes_equal_one_process(tmp_path):
    """2 processes x 4 pairs = 1 process x 8: L_m is mined on the gathered images, the same on both ranks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64) + 3 * (torch.arange(8) % 2)[:, None]
    y, w = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    state = cxrcml.StudentTMixture(2, dof=4.0).fit(F.normalize(x @ w, dim=-1), seed=0).state_dict()
    loss, l_m, grad = _cml_step(x, y, w, state)
    assert l_m > 0
    torch.multiprocessing.spawn(_ddp_cml_worker, args=(2, str(tmp_path / "init"), x, y, w, state, str(tmp_path)),
                                nprocs=2)
    r = [torch.load(tmp_path / f"r{k}.pt") for k in range(2)]
    assert r[0]["l_m"] == pytest.approx(l_m, abs=1e-12) and r[1]["l_m"] == pytest.approx(l_m, abs=1e-12)
    assert (r[0]["loss"] + r[1]["loss"]) / 2 == pytest.approx(loss, abs=1e-12)
    torch.testing.assert_close(r[0]["grad"], grad, rtol=1e-9, atol=1e-12)


# ---- text, pixels ----

def test_meta_label_text_and_prompts():
    names = ["Adenopathy", "Pleural Effusion", "Edema", "Normal"]
    assert cxrcml.meta_label_text(names, np.array([1, 1, 0, 0.0])) == \
        "adenopathy is present, pleural effusion is present"  # the paper's example (Sec. 2)
    assert cxrcml.meta_label_text(names, np.array([0, -1, np.nan, 1])) == "normal is present"
    assert cxrcml.meta_label_text(names, np.zeros(4)) == ""
    m = cxrcml.CXRCML.__new__(cxrcml.CXRCML)
    m.class_names, m.cfg = names, cxrcml.Config(prompts="present")
    assert m.zeroshot_prompts("Edema") == (["edema is present"], ["normal is present"])
    assert m.zeroshot_prompts("Normal") == (["normal is present"], [])
    m.cfg = common.parse_config(cxrcml.Config, cxrcml.PRESETS, ["--preset=paper"])  # compared with Table 2
    assert m.zeroshot_prompts("Pleural_Effusion") == (["pleural effusion"], ["no pleural effusion"])
    assert m.zeroshot_prompts("No Finding") == (["no finding"], [])  # not CheXzero's "no No Finding"


def test_chexzero_prompts_rank_images_as_chexzero_predict():
    """rajpurkarlab/CheXzero zero_shot.py: predict takes raw cosines of the image to the "{}" and "no {}"
    prompt embeddings (no logit scale) and run_softmax_eval gives exp(pos) / (exp(pos) + exp(neg)).
    common.zeroshot_scores on chexzero_prompts must rank the images exactly as that probability does."""
    g, bank = torch.Generator().manual_seed(0), {}

    class Model:  # a text encoder: one fixed random unit vector per text
        zeroshot_prompts = staticmethod(cxrcml.chexzero_prompts)

        def encode_text(self, texts):
            return torch.stack([bank.setdefault(t, F.normalize(torch.randn(8, generator=g), dim=0)) for t in texts])
    emb = F.normalize(torch.randn(500, 8, generator=g, dtype=torch.float64), dim=-1).numpy()
    scores = common.zeroshot_scores(Model(), emb, ["Edema", "No Finding"])
    pos, neg = (emb @ bank[t].double().numpy() for t in ("edema", "no edema"))
    chexzero = np.exp(pos) / (np.exp(pos) + np.exp(neg))
    np.testing.assert_array_equal(np.argsort(scores[:, 0]), np.argsort(chexzero))
    assert 0.2 < chexzero.min() and chexzero.max() < 0.8  # raw cosines: the softmax never saturates
    np.testing.assert_array_equal(np.argsort(scores[:, 1]), np.argsort(emb @ bank["no finding"].double().numpy()))


def test_chexzero_pixels_match_the_published_pipeline_and_constants():
    """rajpurkarlab/CheXzero: PIL resize of the longer side to 320 (Lanczos), pasted centred on a black
    320 x 320 'L' image, 3 equal channels, torchvision's Normalize((101.48761,) * 3, (83.43944,) * 3) and
    Resize(224, bicubic) on the tensor."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode, Normalize, Resize

    img = np.random.default_rng(0).integers(0, 256, size=(300, 200), dtype=np.uint8)  # portrait: padded sides
    small = Image.fromarray(img).resize((int(200 * 320 / 300), 320), Image.LANCZOS)
    square = Image.new("L", (320, 320))
    square.paste(small, ((320 - small.width) // 2, 0))
    x = torch.from_numpy(np.array(square, np.float32))[None].repeat(3, 1, 1)
    x = Normalize((101.48761,) * 3, (83.43944,) * 3)(x)
    ref = Resize(224, InterpolationMode.BICUBIC, antialias=False)(x)
    got = cxrcml.pixels(img, 224, chexzero=True)
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    flat = cxrcml.pixels(np.full((300, 200), 200, np.uint8), 224, chexzero=True)
    assert abs(float(flat[1, 112, 112]) - 1.18064539) < 1e-5  # (200 - 101.48761) / 83.43944
    assert abs(float(flat[2, 112, 2]) + 1.21630263) < 1e-5  # the black padding: -101.48761 / 83.43944


# ---- CheXzero's weights (OpenAI-CLIP layout) -> CLIPModel ----

W, E, V, C = 32, 16, 20, 8  # width, embedding, vocabulary, context of a tiny OpenAI-layout CLIP


def _openai_state_dict(layers=2):
    g, sd = torch.Generator().manual_seed(0), {}

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2
    for pre in ("visual.transformer.resblocks.", "transformer.resblocks."):
        for i in range(layers):
            p = f"{pre}{i}."
            sd.update({p + "attn.in_proj_weight": r(3 * W, W), p + "attn.in_proj_bias": r(3 * W),
                       p + "attn.out_proj.weight": r(W, W), p + "attn.out_proj.bias": r(W),
                       p + "ln_1.weight": 1 + r(W), p + "ln_1.bias": r(W), p + "ln_2.weight": 1 + r(W),
                       p + "ln_2.bias": r(W), p + "mlp.c_fc.weight": r(4 * W, W),
                       p + "mlp.c_fc.bias": r(4 * W), p + "mlp.c_proj.weight": r(W, 4 * W),
                       p + "mlp.c_proj.bias": r(W)})
    sd.update({"visual.class_embedding": r(W), "visual.positional_embedding": r(17, W),
               "visual.conv1.weight": r(W, 3, 8, 8), "visual.ln_pre.weight": 1 + r(W),
               "visual.ln_pre.bias": r(W), "visual.ln_post.weight": 1 + r(W), "visual.ln_post.bias": r(W),
               "visual.proj": r(W, E), "token_embedding.weight": r(V, W), "positional_embedding": r(C, W),
               "ln_final.weight": 1 + r(W), "ln_final.bias": r(W), "text_projection": r(W, E),
               "logit_scale": torch.tensor(4.6)})
    return sd


def _blocks(sd, pre, h, mask=None):  # OpenAI's ResidualAttentionBlock: nn.MultiheadAttention, QuickGELU
    for i in range(2):
        p, mha = f"{pre}{i}.", nn.MultiheadAttention(W, 2, batch_first=True)
        keys = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
        mha.load_state_dict({k: sd[p + "attn." + k] for k in keys})
        y = F.layer_norm(h, (W,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        h = h + mha(y, y, y, attn_mask=mask, need_weights=False)[0]
        y = F.layer_norm(h, (W,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        y = F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h + F.linear(y * torch.sigmoid(1.702 * y), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return h


def test_chexzero_weights_give_openai_clip_outputs(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    sd = _openai_state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "chexzero.pt")  # nn.DataParallel's names
    kw = dict(hidden_size=W, intermediate_size=4 * W, num_hidden_layers=2, num_attention_heads=2)
    text = dict(vocab_size=V, max_position_embeddings=C, eos_token_id=V - 1, **kw)  # OpenAI's: the top id
    clip = CLIPModel(CLIPConfig(projection_dim=E, vision_config=dict(image_size=32, patch_size=8, **kw),
                                text_config=text))
    cxrcml.load_chexzero(clip, str(tmp_path / "chexzero.pt"))
    x = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 7, V - 1, 0, 0, 0, 0], [0, 3, 4, 6, 2, V - 1, 0, 0]])
    h = F.conv2d(x, sd["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    h = torch.cat([sd["visual.class_embedding"].expand(2, 1, W), h], 1) + sd["visual.positional_embedding"]
    h = _blocks(sd, "visual.transformer.resblocks.", F.layer_norm(h, (W,), sd["visual.ln_pre.weight"],
                                                                  sd["visual.ln_pre.bias"]))
    img_ref = F.layer_norm(h[:, 0], (W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) \
        @ sd["visual.proj"]
    h = _blocks(sd, "transformer.resblocks.", sd["token_embedding.weight"][ids] + sd["positional_embedding"],
                torch.full((C, C), -math.inf).triu(1))
    h = F.layer_norm(h, (W,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt_ref = h[torch.arange(2), ids.argmax(-1)] @ sd["text_projection"]  # at the end-of-text token
    with torch.no_grad():
        img = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
        txt = clip.text_projection(clip.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(img, img_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt, txt_ref, rtol=1e-4, atol=1e-5)
    del sd["visual.ln_post.weight"]
    torch.save({**sd, "visual.attnpool.c_proj.weight": torch.zeros(3)}, tmp_path / "resnet.pt")
    with pytest.raises(common.UserError, match="post_layernorm.weight.*visual.attnpool.c_proj.weight"):
        cxrcml.load_chexzero(clip, str(tmp_path / "resnet.pt"))


def test_paper_preset_without_chexzero_stops_at_once_naming_it(tmp_path):
    with pytest.raises(common.UserError, match="CheXzero.*--chexzero=.*drive.google.com.*--init=openai"):
        cxrcml.main(["--preset=paper", "--data=x.csv", f"--out_dir={tmp_path}"])


# ---- the five runs (Sec. 3): folds of the training patients, and their summary ----

def test_patient_folds_partition_the_training_patients_stratified_and_deterministic(phantom_csv):
    tr = common.XrayCSV(phantom_csv, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn: some rarest-class strata have fewer than 5 images
        fold = cxrcml.patient_folds(tr, 5, seed=0)
        again, other = cxrcml.patient_folds(tr, 5, seed=0), cxrcml.patient_folds(tr, 5, seed=1)
    patients = [r["patient_id"] for r in tr.rows]
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]  # every row in one of the 5 folds
    assert all(len({f for f, p in zip(fold, patients) if p == q}) == 1 for q in set(patients))  # never split
    pos = tr.labels() == 1

    def spread(f):  # per class: most minus fewest positive images in a fold
        return np.array([np.ptp([pos[f == k, j].sum() for k in range(5)]) for j in range(pos.shape[1])])
    dealt = [np.random.default_rng(s).permutation(len(set(patients))) % 5 for s in range(20)]
    index = {p: i for i, p in enumerate(sorted(set(patients)))}
    at_random = np.mean([spread(d[[index[p] for p in patients]]) for d in dealt], 0)  # patients dealt blindly
    for f in (fold, other):  # stratified: the positives spread more evenly than dealt blindly
        assert spread(f).sum() < 0.8 * at_random.sum(), (spread(f), at_random)
        assert np.ptp(np.bincount(f)) <= 0.25 * len(f) / 5
    np.testing.assert_array_equal(fold, again)
    assert (fold != other).any()


def test_fold_rows_five_folds_are_disjoint_and_cover_the_training_patients_for_any_seed(phantom_csv):
    """Sec. 3's five runs vary --fold (and perhaps --seed); their validation folds must not overlap."""
    tr = common.XrayCSV(phantom_csv, "train")
    patients = np.array([r["patient_id"] for r in tr.rows])
    folds = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, fold_seed in ((0, 0), (3, 0), (11, 0), (0, 5)):
            val = [cxrcml.fold_rows(tr, cxrcml.Config(seed=seed, fold_seed=fold_seed, fold=k)) for k in range(5)]
            for k, (train_rows, val_rows) in enumerate(val):
                assert sorted([*train_rows, *val_rows]) == list(range(len(tr)))
                assert not set(patients[train_rows]) & set(patients[val_rows])
            rows = [set(v.tolist()) for _, v in val]
            assert sum(map(len, rows)) == len(tr) and set().union(*rows) == set(range(len(tr)))  # disjoint, all
            assert all(rows)
            folds[seed, fold_seed] = rows
    assert folds[0, 0] == folds[3, 0] == folds[11, 0]  # --seed does not move the folds
    assert folds[0, 0] != folds[0, 5]  # --fold_seed does


@pytest.mark.filterwarnings("ignore:The least populated class")  # scikit-learn, tiny strata
def test_patient_folds_of_fewer_patients_than_folds_is_a_user_error(phantom_csv, tmp_path):
    with open(phantom_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    three = sorted({r["patient_id"] for r in rows})[:3]
    with open(tmp_path / "three.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["patient_id"] in three)
    with pytest.raises(common.UserError, match="three.csv gives no 5 patient folds"):
        cxrcml.patient_folds(common.XrayCSV(str(tmp_path / "three.csv"), "train"), 5, seed=0)


def test_summarize_gives_mean_and_sample_std(tmp_path):
    aucs = [0.71, 0.74, 0.69]
    for i, a in enumerate(aucs):
        (tmp_path / f"fold{i}").mkdir()
        (tmp_path / f"fold{i}" / "metrics.json").write_text(json.dumps(
            {"zeroshot_auc_macro": a, "zeroshot_auc_base": a - 0.01, "zeroshot_auc_rare": None}))
    out = cxrcml.main(["summarize", *(str(tmp_path / f"fold{i}") for i in range(3))])
    assert abs(out["zeroshot_auc_macro"]["mean"] - statistics.mean(aucs)) < 1e-12
    assert abs(out["zeroshot_auc_macro"]["std"] - statistics.stdev(aucs)) < 1e-12
    assert out["zeroshot_auc_rare"]["n"] == 0
    with pytest.raises(common.UserError, match="metrics.json"):
        cxrcml.main(["summarize", str(tmp_path / "fold9")])


# ---- end to end ----

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The least populated class")  # scikit-learn, tiny strata
def test_end_to_end_fold_run_trains_evaluates_and_loads(phantom_csv, tmp_path):
    out = tmp_path / "run"
    res = cxrcml.main([f"--data={phantom_csv}", f"--out_dir={out}", "--image_size=32", "--batch_size=16",
                       "--epochs=8", "--bank_size=64", "--refit_every=3", "--n_clusters=4", "--num_workers=0",
                       "--log_every=1", "--lr=1e-3", "--warmup_steps=2", "--fold=1", "--rare_below=20",
                       "--threads=1"])
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "l_c" in r]
    assert len(steps) == 8 * 8 and sum(r["l_m"] > 0 for r in steps) >= 40  # L_m on once the bank is full
    assert all(r["l_m"] == 0 for r in steps[:4])  # 64 embeddings: the bank fills at the 4th step of 16
    first, last = (np.mean([r["l_c"] for r in rows]) for rows in (steps[:8], steps[-8:]))
    assert last < 0.9 * first, (first, last)  # L_c falls by more than 10% from the first epoch to the last
    with open(phantom_csv, newline="") as f:  # rare: fewer than --rare_below positive images, all splits
        all_rows = list(csv.DictReader(f))
    names = [c[len("label:"):] for c in all_rows[0] if c.startswith("label:")]
    assert res["rare_classes"] == [n for n in names if sum(r["label:" + n] == "1" for r in all_rows) < 20]
    for group, keep in (("base", lambda n: n not in res["rare_classes"]), ("rare", lambda n: n in res["rare_classes"])):
        aucs = [a for n, a in res["zeroshot_auc_per_label"].items() if keep(n) and a is not None]
        assert res[f"zeroshot_auc_{group}"] == pytest.approx(np.mean(aucs), abs=1e-12) and len(aucs) >= 2
    model, _ = cxrcml.load(out / "ckpt.pt")  # alignment learnt: its zero-shot AUC on the images it trained on
    assert common.zeroshot_eval(model, common.XrayCSV(phantom_csv, "train"), "cpu")["zeroshot_auc_macro"] > 0.6
    import evaluate  # the demo scores its training phrase; evaluate.py --prompts=chexzero, CheXzero's pair

    assert evaluate.load_model(str(out / "ckpt.pt"), "cpu")[0].zeroshot_prompts("Edema")[0] == ["edema is present"]
    assert evaluate.load_model(str(out / "ckpt.pt"), "cpu", "chexzero")[0].zeroshot_prompts("Edema") == \
        (["edema"], ["no edema"])
    for ck in ("ckpt.pt", "ckpt_best.pt"):
        model, cfg = cxrcml.load(out / ck)
        v, t = model.encode_image(torch.randn(3, 3, 32, 32)), model.encode_text(["edema is present", ""])
        assert v.shape == (3, 64) and t.shape == (2, 64) and model.mixture.means.shape == (4, 64)
        assert model.class_names == names and cfg.fold == 1
