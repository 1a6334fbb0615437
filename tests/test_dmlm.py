"""Tests for dmlm.py, each against an independent reference: the Gaussian KL (Eq. 3) against
torch.distributions, its variance optimum against the closed form worked out by hand, W2 (Eq. 4) against the
general Gaussian formula with matrix square roots (scipy) and against float64, the heads and pooling against
numpy, the Spearman against numpy ranks, Eq. (2)'s conditioning, noise-free targets, masking, structured
reports, torchvision's ViT and nn.MultiheadAttention; then short runs (the loss falls by a fifth, held-out
pairs match above chance, the checkpoint rebuilds the model, exact resume with the EMA teacher, 2 processes =
1 process)."""
import contextlib
import copy
import fnmatch
import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.distributions import Independent, Normal, kl_divergence

import common
import dmlm
import phantoms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOW = dmlm.load_knowledge(os.path.join(ROOT, "knowledge", "phantom_chexpert.json"))


@pytest.fixture(autouse=True)
def one_thread():  # these tensors are tiny: a second OpenMP thread only waits (and main() sets threads)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand_gauss(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), \
        torch.rand(*shape, generator=g, dtype=torch.float64) * 2 + 0.05


def diag_normal(mu, var):
    return Independent(Normal(mu, var.sqrt()), 1)


def tiny_model(**kw):
    cfg = dmlm.Config(**{"image_size": 32, "vit_width": 32, "vit_depth": 1, "embed_dim": 16, "max_tokens": 24,
                         **kw})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *map(str, range(95))]
    torch.manual_seed(0)
    return dmlm.build(cfg, common.tokenizer_from_vocab(vocab), KNOW)


def tiny_batch(b=3, n=16, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, L), generator=g)
    am = torch.ones_like(ids)
    am[0, -3:] = 0  # one padded report
    tmask = torch.rand(b, L, generator=g) < 0.3
    tmask[:, 1] = True
    return (torch.randn(b, 3, 32, 32, generator=g), ids, am, ids.masked_fill(tmask, 4), tmask,
            torch.rand(b, n, generator=g) < 0.3)


# ---- Eq. (1): Gaussian heads ----

def test_gaussian_head_unit_mean_and_softplus_variance_over_d():
    torch.manual_seed(0)
    head = dmlm.GaussianHead(8, 6)
    h = torch.randn(4, 5, 8)
    mu, var = head(h)
    assert mu.shape == var.shape == (4, 5, 6) and mu.dtype == var.dtype == torch.float32
    w, b, wv, bv = (p.detach().double().numpy() for p in (head.mu.weight, head.mu.bias, head.var.weight,
                                                           head.var.bias))
    m = h.double().numpy() @ w.T + b
    np.testing.assert_allclose(mu.detach().numpy(), m / np.linalg.norm(m, axis=-1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(var.detach().numpy(), (np.log1p(np.exp(h.double().numpy() @ wv.T + bv)) + 1e-4) / 6,
                               rtol=1e-5)
    with torch.no_grad():
        head.var.bias.fill_(-60.0)  # far negative: sigma^2 stops at the floor
    assert torch.allclose(head(h)[1], torch.full((4, 5, 6), 1e-4 / 6), rtol=1e-5)


def test_gaussian_heads_compute_in_float32_under_bf16_autocast():
    """A nearly converged prediction (the target's head, its weights moved by 1e-3): under CPU bf16 autocast
    the Eq. (3) KL keeps 1e-3 relative precision against float64; the same heads in bf16 miss it by > 3%."""
    torch.manual_seed(0)
    pred, target = dmlm.GaussianHead(64, 32).requires_grad_(False), dmlm.GaussianHead(64, 32).requires_grad_(False)
    for p, q in zip(pred.parameters(), target.parameters()):
        p.copy_(q + 1e-3 * torch.randn_like(q))
    h = torch.randn(256, 64)

    def f64(m):  # the head in float64
        mu, v = F.linear(h.double(), m.mu.weight.double(), m.mu.bias.double()), \
            F.linear(h.double(), m.var.weight.double(), m.var.bias.double())
        return F.normalize(mu, dim=-1), (F.softplus(v) + 1e-4) / 32
    ref = dmlm.gaussian_kl(*f64(pred), *f64(target)).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = dmlm.gaussian_kl(*pred(h), *target(h)).mean()
        lo = [(F.normalize(m.mu(h).float(), dim=-1), (F.softplus(m.var(h)).float() + 1e-4) / 32)
              for m in (pred, target)]  # what the heads give without their float32 block
    assert pred(h)[0].dtype == torch.float32
    assert abs(float(ours) / float(ref) - 1) < 1e-3
    assert abs(float(dmlm.gaussian_kl(*lo[0], *lo[1]).mean()) / float(ref) - 1) > 0.03


# ---- Eq. (3): KL of diagonal Gaussians and the D-MLM loss ----

def test_gaussian_kl_matches_torch_distributions():
    (mu_p, var_p), (mu_q, var_q) = rand_gauss(3, 7, 16, seed=1), rand_gauss(3, 7, 16, seed=2)
    ours = dmlm.gaussian_kl(mu_p, var_p, mu_q, var_q)  # KL(p || q), the direction of Eq. (3)
    assert torch.allclose(ours, kl_divergence(diag_normal(mu_p, var_p), diag_normal(mu_q, var_q)), rtol=1e-10)
    assert not torch.allclose(ours, kl_divergence(diag_normal(mu_q, var_q), diag_normal(mu_p, var_p)))


def test_dmlm_loss_averages_kl_over_masked_positions_only():
    B, L, N, D = 2, 5, 4, 3
    pt, tt, pi, ti = (rand_gauss(B, k, D, seed=s) for k, s in ((L, 3), (L, 4), (N, 5), (N, 6)))
    tmask = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    pmask = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    def kl(p, t, b, i):
        return float(kl_divergence(diag_normal(p[0][b, i], p[1][b, i]), diag_normal(t[0][b, i], t[1][b, i])))
    sides = ((pt, tt, tmask), (pi, ti, pmask))
    pairs = [[kl(p, t, b, i) for p, t, m in sides for i in m[b].nonzero().flatten()] for b in range(B)]
    ref = np.mean([np.mean(kls) for kls in pairs]) / D  # the mean over pairs of each pair's mean KL per dim
    assert float(dmlm.dmlm_loss(pt, tt, tmask, pi, ti, pmask, prior=0.0)) == pytest.approx(ref, rel=1e-10)
    pt[0][0, 0] += 5.0  # an unmasked prediction does not count
    pt[1][0, 2] = float("inf")
    assert float(dmlm.dmlm_loss(pt, tt, tmask, pi, ti, pmask, prior=0.0)) == pytest.approx(ref, rel=1e-10)
    # the prior on the targets' variance: + 0.3 KL(N(0, sigma^2) || N(0, 1/D)) at the same positions
    def prior(t, b, i):
        zero, unit = torch.zeros(D, dtype=torch.float64), torch.full((D,), 1 / D, dtype=torch.float64)
        return float(kl_divergence(diag_normal(zero, t[1][b, i]), diag_normal(zero, unit)))
    pairs = [[kl(p, t, b, i) + 0.3 * prior(t, b, i) for p, t, m in sides for i in m[b].nonzero().flatten()]
             for b in range(B)]
    ref = np.mean([np.mean(kls) for kls in pairs]) / D
    assert float(dmlm.dmlm_loss(pt, tt, tmask, pi, ti, pmask, prior=0.3)) == pytest.approx(ref, rel=1e-10)


def test_dmlm_loss_variance_optimum_is_the_closed_form_and_needs_the_prior():
    """Free variances of prediction and target, fixed means with errors e per dimension: minimising Eq. (3)
    with the prior gives v^ = v = (1 + sqrt(1 + 4 D e / prior)) / (2 D) (worked out by hand: d/dv of
    e / 2v + prior / 2 (D v - 1 - log D v) = 0); larger error, larger sigma^2. Without the prior the
    target's variance grows as long as the steps go on (the KL -> 0)."""
    D, prior = 4, 0.1
    e = torch.tensor([[0.0, 0.001, 0.01, 0.1], [0.2, 0.05, 0.003, 0.0]], dtype=torch.float64)  # [2 positions, D]
    mu_t = torch.zeros(1, 2, D, dtype=torch.float64)
    mu_p = mu_t + e.sqrt()[None]
    mask = torch.ones(1, 2, dtype=torch.bool)
    none = (torch.zeros(1, 0, D, dtype=torch.float64),) * 2

    def fit(prior, steps):
        log_vp, log_vt = (torch.full((1, 2, D), -1.0, dtype=torch.float64, requires_grad=True) for _ in range(2))
        opt = torch.optim.Adam([log_vp, log_vt], lr=0.1)
        for _ in range(steps):
            loss = dmlm.dmlm_loss((mu_p, log_vp.exp()), (mu_t, log_vt.exp()), mask, none, none,
                                  torch.zeros(1, 0, dtype=torch.bool), prior)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return log_vp.exp().detach()[0], log_vt.exp().detach()[0]
    vp, vt = fit(prior, 400)
    best = (1 + torch.sqrt(1 + 4 * D * e / prior)) / (2 * D)
    assert torch.allclose(vt, best, rtol=1e-4) and torch.allclose(vp, best, rtol=1e-4)
    grow = [fit(0.0, n)[1].mean() for n in (100, 200, 400)]
    assert grow[0] * 1.3 < grow[1] and grow[1] * 1.3 < grow[2]


def test_harder_positions_get_the_larger_sigma2():
    """A toy of Eq. (2)-(3) with the model's heads: a position's context says whether it is hard; its token is
    one direction plus noise (std 0.02 easy, 0.5 hard). The prediction head sees the context, the target head
    the token; the target's mean is the token (no gradient), its variance learns. After 200 steps of
    dmlm_loss the hard positions' sigma^2, predicted and target, are > 2x the easy ones' (the optimum: ~3x),
    and the prior keeps D sigma^2 near 1 (no inflation)."""
    torch.manual_seed(0)
    D = 8
    direction = F.normalize(torch.randn(D), dim=0)
    pred, target = dmlm.GaussianHead(2, D), dmlm.GaussianHead(D + 2, D)
    opt = torch.optim.Adam([*pred.parameters(), *target.parameters()], lr=5e-2)
    mask, none = torch.ones(1, 256, dtype=torch.bool), (torch.zeros(1, 0, D),) * 2

    def batch():
        hard = torch.rand(256) < 0.5
        context = torch.stack([hard.float(), 1 - hard.float()], -1)
        token = F.normalize(direction + torch.randn(256, D) * torch.where(hard, 0.5, 0.02)[:, None], dim=-1)
        return hard, context, token, target(torch.cat([token, context], -1))[1]
    for _ in range(200):
        hard, context, token, var = batch()
        loss = dmlm.dmlm_loss(tuple(t[None] for t in pred(context)), (token[None], var[None]), mask, none, none,
                              mask[:, :0], prior=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard, context, token, var = batch()
        for v in (pred(context)[1].mean(-1), var.mean(-1)):
            assert v[hard].mean() > 2 * v[~hard].mean()
            assert 0.8 < D * v.mean() < 5


# ---- Eq. (4): 2-Wasserstein distance and alignment ----

def w2_general(mu1, cov1, mu2, cov2):
    """W2^2 of Gaussians with full covariances: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)."""
    r2 = scipy.linalg.sqrtm(cov2)
    cross = np.real(scipy.linalg.sqrtm(r2 @ cov1 @ r2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * cross))


def test_w2_matches_the_general_gaussian_formula():
    (mu1, var1), (mu2, var2) = rand_gauss(6, 8, seed=7), rand_gauss(4, 8, seed=8)
    ref = np.array([[w2_general(mu1[i].numpy(), np.diag(var1[i].numpy()), mu2[j].numpy(),
                                np.diag(var2[j].numpy())) for j in range(4)] for i in range(6)])
    assert np.allclose(dmlm.w2_squared(mu1[:4], var1[:4], mu2, var2).numpy(), np.diag(ref[:4]), rtol=1e-7)
    assert np.allclose(dmlm.w2_squared_pairwise(mu1, var1, mu2, var2).numpy(), ref, rtol=1e-5)


def test_w2_pairwise_keeps_1e3_relative_precision_in_float32_and_bf16():
    """sigmas = 0.8 + small differences at D = 768 (||sigma||^2 ~ 490, W2^2 ~ 0.6): the reference in float64
    from the same (rounded) inputs; also under CPU bf16 autocast. The expanded square fails it in bf16."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = (F.normalize(torch.randn(n, 768, generator=g), dim=-1) for n in (8, 6))
    mu2[:3] = F.normalize(mu1[:3] + 0.01 * torch.randn(3, 768, generator=g), dim=-1)  # near pairs: small W2
    s1, s2 = 0.8 + 0.02 * torch.randn(8, 768, generator=g), 0.8 + 0.02 * torch.randn(6, 768, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in (mu1, s1 ** 2, mu2, s2 ** 2)]
        m1, v1, m2, v2 = (t.double() for t in args)
        ref = dmlm.w2_squared(m1[:, None], v1[:, None], m2[None], v2[None])  # float64, by broadcasting
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                ours = dmlm.w2_squared_pairwise(*args)
            assert ours.dtype == torch.float32
            assert ((ours.double() - ref).abs() / ref).max() < 1e-3, (dtype, autocast)
    a, b = torch.cat([mu1, s1], -1), torch.cat([mu2, s2], -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a matmul-based expansion gives under bf16
        expanded = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None] - 2 * a @ b.T
    ref = ((a.double()[:, None] - b.double()[None]) ** 2).sum(-1)
    assert ((expanded.double() - ref).abs() / ref).max() > 1e-2


def test_align_contrastive_is_infonce_with_minus_w2_logits():
    image, text = rand_gauss(5, 4, seed=9), rand_gauss(5, 4, seed=10)
    ours = dmlm.align_contrastive_loss(image, text, torch.tensor(3.0, dtype=torch.float64))
    ref = 0.0
    for a, b in ((image, text), (text, image)):
        for k in range(5):
            logits = torch.tensor([-1.5 * w2_general(a[0][k].numpy(), np.diag(a[1][k].numpy()),
                                                     b[0][j].numpy(), np.diag(b[1][j].numpy()))
                                   for j in range(5)])
            ref += 0.5 * float(-torch.log_softmax(logits, 0)[k]) / 5
    assert float(ours) == pytest.approx(ref, rel=1e-5)
    assert float(dmlm.align_pairs_loss(image, text)) == pytest.approx(float(np.mean([w2_general(
        text[0][k].numpy(), np.diag(text[1][k].numpy()), image[0][k].numpy(), np.diag(image[1][k].numpy()))
        for k in range(5)])), rel=1e-7)
    assert float(dmlm.total_loss(torch.tensor(2.0), torch.tensor(1.0), 0.2)) == pytest.approx(0.4 + 0.8)


def test_align_pairs_collapses_contrastive_separates():
    """Free Gaussians of 8 images and 8 reports: Eq. (4) alone pulls every pair together, matched or not; the
    contrastive reading keeps the unmatched ones apart."""
    def run(kind):
        torch.manual_seed(0)
        mi, mt, ai, at = (nn.Parameter(torch.randn(8, 6)) for _ in range(4))
        opt = torch.optim.Adam([mi, mt, ai, at], lr=0.05)
        for _ in range(150):
            img, txt = (F.normalize(mi, dim=-1), F.softplus(ai)), (F.normalize(mt, dim=-1), F.softplus(at))
            loss = dmlm.align_pairs_loss(img, txt) if kind == "pairs" else \
                dmlm.align_contrastive_loss(img, txt, torch.tensor(10.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        d = dmlm.w2_squared_pairwise(*img, *txt).detach()
        return d.diag().mean().item(), d[~torch.eye(8, dtype=torch.bool)].mean().item()

    (m_pair, _), (m_con, u_con) = run("pairs"), run("contrastive")
    assert m_pair < 0.05 and m_con < 0.5 * u_con and u_con > 1.0


def test_pooled_gaussians_mean_of_eq1_gaussians_or_max_over_patch_features():
    """Eq. (4)'s inputs (numpy reference): --pool=mean (the paper preset), the mean of the patches' / real
    tokens' Eq. (1) Gaussians, mu re-normalised; --pool=max (the demo), the image head on the channel-wise max
    of its patch features (not the class token). The report's Gaussian is the same in both."""
    presets = {p: common.parse_config(dmlm.Config, dmlm.PRESETS, [f"--preset={p}"]).pool for p in ("paper", "demo")}
    assert presets == {"paper": "mean", "demo": "max"}
    hv, ht = torch.randn(3, 17, 32), torch.randn(3, 12, 32)
    am = torch.ones(3, 12, dtype=torch.long)
    am[0, -3:] = 0

    def head(m, feat):  # float64 [..., C] -> (unit mu, (softplus + 1e-4) / D)
        w, b, wv, bv = (p.detach().double().numpy() for p in (m.mu.weight, m.mu.bias, m.var.weight, m.var.bias))
        mu = feat @ w.T + b
        return mu / np.linalg.norm(mu, axis=-1, keepdims=True), (np.log1p(np.exp(feat @ wv.T + bv)) + 1e-4) / 16

    def mean(mu, var):
        return mu.mean(0) / np.linalg.norm(mu.mean(0)), var.mean(0)
    for pool in ("mean", "max"):
        model = tiny_model(pool=pool)
        hvn, htn = hv.double().numpy(), ht.double().numpy()
        want_image = [head(model.image_gauss, hvn[b, 1:].max(0)) if pool == "max" else
                      mean(*head(model.image_gauss, hvn[b, 1:])) for b in range(3)]
        want_text = [mean(*head(model.text_gauss, htn[b, :int(am[b].sum())])) for b in range(3)]
        got_image = model.pooled_image(hv)
        got_text = dmlm.mean_gaussian(*model.text_gauss(ht), am)
        for got, want in ((got_image, want_image), (got_text, want_text)):
            for k in (0, 1):
                np.testing.assert_allclose(got[k].detach().numpy(), np.stack([w[k] for w in want]), rtol=1e-4,
                                           atol=1e-6)
        hv2 = hv.clone()
        hv2[:, 0] += 10.0  # the class token is not pooled
        assert torch.equal(model.pooled_image(hv2)[0], model.pooled_image(hv)[0])


def head_variance(m, feat):  # numpy: an Eq. (1) head's sigma^2, mean over D, of features [..., C]
    w, b = m.var.weight.detach().double().numpy(), m.var.bias.detach().double().numpy()
    return ((np.log1p(np.exp(feat.detach().double().numpy() @ w.T + b)) + 1e-4) / w.shape[0]).mean(-1)


def test_patch_and_token_variances_for_the_sigma2_figure():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 32, 32)
    pv = model.patch_variances(x)
    assert pv.shape == (2, 16) and pv.dtype == torch.float32
    np.testing.assert_allclose(pv.detach().numpy(), head_variance(model.image_gauss, model.image_tokens(x)),
                               rtol=1e-5)
    tokens, var = model.token_variances(["12 13 14", "15"])
    assert tokens == [["[CLS]", "12", "13", "14", "[SEP]"], ["[CLS]", "15", "[SEP]"]]
    assert [v.shape for v in var] == [(5,), (3,)]
    ids = torch.tensor([[2, 17, 18, 19, 3]])  # the first text's ids, by the vocabulary of tiny_model
    hidden = model.text(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    np.testing.assert_allclose(var[0], head_variance(model.text_gauss, hidden), rtol=1e-5)
    np.testing.assert_allclose(var[1], model.token_variances(["15"])[1][0], rtol=1e-5)  # padding left out


def test_sigma2_error_spearman_over_the_masked_positions(phantom_csv):
    """evaluate() against ranks computed with numpy (Spearman's rho = Pearson's r of the ranks) over the masked
    tokens and patches of the test split, drawn again here from the same row seeds; and per modality."""
    model = tiny_model(max_tokens=48)
    table = common.XrayCSV(phantom_csv, "test")
    got = dmlm.evaluate(model, table, "cpu")
    ds = dmlm.PairDataset(table, model.cfg, model.knowledge, train=False)
    batch = dmlm.collate([ds[i, i] for i in range(len(table))], model.tokenizer, model.cfg.max_tokens, 0.3)
    var, err = {"text": [], "image": []}, {"text": [], "image": []}
    with torch.no_grad():
        out = model(*(batch[k] for k in ("image", "input_ids", "attention_mask", "masked_ids", "patch_mask")))
    for k, m in (("text", batch["text_mask"]), ("image", batch["patch_mask"])):
        for b, i in m.nonzero().tolist():
            var[k].append(float(out["pred_" + k][1][b, i].mean()))
            err[k].append(float(((out["pred_" + k][0][b, i] - out["target_" + k][0][b, i]) ** 2).sum()))

    def rho(a, b):
        ra, rb = (np.argsort(np.argsort(v)).astype(float) for v in (a, b))
        return np.corrcoef(ra, rb)[0, 1]
    for k in ("text", "image"):
        assert got["sigma2_error_spearman_" + k] == pytest.approx(rho(var[k], err[k]), abs=1e-6)
    assert got["sigma2_error_spearman"] == pytest.approx(rho(var["text"] + var["image"], err["text"] + err["image"]),
                                                         abs=1e-6)
    assert got["zeroshot_auc_macro"] == common.zeroshot_eval(model, table, "cpu")["zeroshot_auc_macro"]


# ---- Eq. (2), the targets, and the ViT ----

def test_eq2_masked_token_prediction_ignores_image_masking():
    """p(h_i | I, T\\i): a masked token's prediction sees the FULL image, so masking image patches leaves it
    as it is (and masking text tokens leaves the patch predictions as they are)."""
    model = tiny_model()
    x, ids, am, mids, tmask, pmask = tiny_batch()
    out = model(x, ids, am, mids, pmask)
    other_patches = model(x, ids, am, mids, ~pmask)
    assert torch.allclose(out["pred_text"][0], other_patches["pred_text"][0], atol=1e-6)
    assert not torch.allclose(out["pred_image"][0], other_patches["pred_image"][0], atol=1e-3)
    other_tokens = model(x, ids, am, ids.masked_fill(~tmask & (am == 1), 4), pmask)
    assert torch.allclose(out["pred_image"][0], other_tokens["pred_image"][0], atol=1e-6)
    assert not torch.allclose(out["pred_text"][0], other_tokens["pred_text"][0], atol=1e-3)


def test_targets_are_made_without_dropout():
    """With dropout active (p = 0.5 everywhere) in training mode, the masked pass changes from call to call,
    but the Eq. (3) targets, from the unmasked pass or from the EMA teacher, do not."""
    model = tiny_model(target="ema")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    teacher = copy.deepcopy(model).requires_grad_(False)  # what train() makes for --target=ema
    model.train(), teacher.train()
    batch = tiny_batch()
    a, b = model(*batch[:4], batch[5]), model(*batch[:4], batch[5])
    assert not torch.equal(a["pred_text"][0], b["pred_text"][0])  # dropout is on in the masked pass
    for k in ("target_image", "target_text", "image", "text"):
        assert all(torch.equal(u, v) for u, v in zip(a[k], b[k])), k
    assert model.visual.training and model.text.training  # unmasked() restored the modes
    ta, tb = teacher.targets(*batch[:3]), teacher.targets(*batch[:3])
    assert all(torch.equal(u, v) for k in ta for u, v in zip(ta[k], tb[k]))
    assert torch.allclose(ta["target_text"][0], a["target_text"][0], atol=1e-5)  # a fresh copy: the same
    with torch.no_grad():
        teacher.text_gauss.mu.bias.add_(0.5)
        teacher.image_gauss.mu.bias.add_(0.5)
    c = model(*batch[:4], batch[5], teacher)  # --target=ema: the teacher's means, the model's own variances
    for k in ("target_text", "target_image"):
        assert torch.equal(c[k][0], teacher.targets(*batch[:3])[k][0]) and not torch.equal(c[k][0], a[k][0])
        assert torch.equal(c[k][1], a[k][1])
        # the targets' means carry no gradient, their variances do (that is how sigma^2 learns, dmlm_loss)
        assert not a[k][0].requires_grad and not c[k][0].requires_grad and c[k][1].requires_grad
    with torch.no_grad():
        old = teacher.text_gauss.mu.weight.clone()
        model.text_gauss.mu.weight.add_(1.0)
        dmlm.ema_update(teacher, model)
    assert torch.allclose(teacher.text_gauss.mu.weight, 0.996 * old + 0.004 * model.text_gauss.mu.weight)


def test_param_groups_decay_only_weight_matrices():
    model = tiny_model()
    groups = dmlm.param_groups(model, dmlm.Config(lr=3e-4, encoder_lr=1e-5, weight_decay=0.05))
    name = {id(p): n for n, p in model.named_parameters()}
    where = {name[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(where) == len(name)
    for n in ("visual.class_token", "visual.encoder.pos_embedding"):
        assert where[n] == (1e-5, 0.0), n
    for n in ("mask_token", "modality", "logit_scale", "fusion_ln.weight", "pred_text.mu.bias"):
        assert where[n] == (3e-4, 0.0), n
    assert where["visual.conv_proj.weight"] == (1e-5, 0.05)
    assert where["text.encoder.layer.0.attention.self.query.weight"] == (1e-5, 0.05)
    assert where["fusion.0.self_attention.in_proj_weight"] == (3e-4, 0.05)
    assert where["text.encoder.layer.0.attention.self.query.bias"] == (1e-5, 0.0)


def test_vit_equals_torchvisions_and_attention_matches_mha():
    import torchvision

    cfg = dmlm.Config(image_size=32, patch_size=16, vit_width=24, vit_depth=2, vit_heads=2)
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=24, mlp_dim=96)
    tv.eval()
    ours = dmlm.ViT(cfg).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("heads.")})
    x = torch.randn(2, 3, 32, 32)
    p = tv._process_input(x)
    ref = tv.encoder(torch.cat([tv.class_token.expand(2, -1, -1), p], 1))
    assert torch.allclose(ours(x), ref, atol=1e-5)
    att, mha = dmlm.SelfAttention(24, 3), nn.MultiheadAttention(24, 3, batch_first=True)
    mha.load_state_dict(att.state_dict())
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    x, ctx = torch.randn(2, 9, 24), torch.randn(2, 5, 24)
    ref = mha(x, x, x, key_padding_mask=~keep, need_weights=False)[0]
    assert torch.allclose(att(x, keep=keep), ref, atol=1e-5)
    keep = torch.cat([keep, torch.tensor([[True] * 5, [True, True, False, True, False]])], 1)
    kv = torch.cat([x, ctx], 1)  # the fusion's queries attend to themselves and to the other modality
    ref = mha(x, kv, kv, key_padding_mask=~keep, need_weights=False)[0]
    assert torch.allclose(att(x, ctx, keep), ref, atol=1e-5)


def test_masked_patches_are_replaced_by_the_mask_token():
    torch.manual_seed(0)
    vit = dmlm.ViT(dmlm.Config(image_size=16, patch_size=8, vit_width=8, vit_depth=1, vit_heads=2))
    tok, x = torch.randn(1, 1, 8), torch.randn(2, 3, 16, 16)
    pm = torch.tensor([[True, False, False, False], [False] * 4])
    a = vit(x, pm, tok)
    x2 = x.clone()
    x2[0, :, :8, :8] = 123.0  # only the masked patch of image 0 changes
    assert torch.allclose(vit(x2, pm, tok), a, atol=1e-6) and not torch.allclose(vit(x2), vit(x), atol=1e-3)


# ---- masking (Sec. 2.2) ----

def test_text_mask_ratio_and_special_tokens():
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 3, 0, 0], [2, 10, 11, 12, 3] + [0] * 9])
    att = (ids != 0).long()
    m = dmlm.text_token_mask(ids, att, [2, 3, 0], 0.3, [0, 1])
    assert m.sum(1).tolist() == [3, 1]  # round(0.3 * 10), and at least one of 3
    assert not m[(ids == 2) | (ids == 3) | (att == 0)].any()
    hits = sum(dmlm.text_token_mask(ids[:1], att[:1], [2, 3, 0], 0.3, [s])[0].float() for s in range(400))
    assert torch.allclose(hits[1:11] / 400, torch.full((10,), 0.3), atol=0.08)  # each real token ~30%


def test_image_mask_count_and_adaptive_concentration():
    grid, text = 8, KNOW["Pleural Effusion"]["appearance"]
    prior = dmlm.region_prior(text, grid).reshape(grid, grid)
    assert prior[6].sum() > 0 and prior[:4].sum() == 0  # costophrenic angle / lung base: the lower rows only
    inside, frac = dmlm.region_prior(text, grid) > 0.5, {}
    for mode in ("adaptive", "random"):
        rng = np.random.default_rng(0)
        masks = np.stack([dmlm.image_patch_mask(text, grid, 0.3, mode, rng) for _ in range(500)])
        assert (masks.sum(1) == round(0.3 * grid * grid)).all()
        frac[mode] = masks[:, inside].sum() / masks.sum()
    assert frac["random"] == pytest.approx(inside.mean(), abs=0.03)  # uniform: the region's share of the area
    assert frac["adaptive"] > 1.8 * inside.mean()
    assert dmlm.region_prior("a finding with no anatomical words", grid).sum() == 0


def test_region_map_covers_where_the_phantoms_draw_each_finding(phantom_csv):
    """The knowledge file's Appearance, through REGION_MAP, points at the pixels the phantoms' masks mark."""
    table = common.XrayCSV(phantom_csv)
    codes = {n: i + 1 for i, n in enumerate(phantoms.PHANTOM_FINDINGS)}
    checked = 0
    for name in ("Pleural Effusion", "Pneumothorax", "Consolidation", "Cardiomegaly"):
        region = dmlm.region_prior(KNOW[name]["appearance"], 32).reshape(32, 32) > 0.5
        inside = total = 0
        for r in table.rows:
            if r["view"] != "LATERAL" and r["_labels"][table.label_names.index(name)] == 1:
                m = common.load_image(os.path.join(os.path.dirname(phantom_csv), r["mask"])) == codes[name]
                inside, total = inside + (m & region).sum(), total + m.sum()
        checked += total > 0
        assert total == 0 or inside / total > 0.75, (name, inside / total)
    assert checked >= 3


# ---- structured reports (Sec. 2.1) ----

def test_structured_report_sections_and_no_double_negative():
    names = ["Cardiomegaly", "Edema", "Nodule", "No Finding"]
    row = {"findings": "The heart is enlarged.", "impression": "Cardiomegaly.", "report": "x"}
    rep = dmlm.structured_report(names, np.array([1, -1, 0, 0], np.float32), row, KNOW)
    assert [rep.index(s) for s in ("Definition:", "Appearance:", "Observations:", "Verdicts:")] == \
        sorted(rep.index(s) for s in ("Definition:", "Appearance:", "Observations:", "Verdicts:"))
    assert KNOW["Cardiomegaly"]["definition"] in rep and KNOW["Edema"]["appearance"] in rep
    assert KNOW["Nodule"]["definition"] not in rep
    assert rep.endswith("Verdicts: Cardiomegaly. abnormal study, cardiomegaly, possible edema, no nodule.")
    normal = dmlm.structured_report(names, np.array([0, 0, 0, 1], np.float32), {"impression": "Clear."}, KNOW)
    assert KNOW["No Finding"]["definition"] in normal and "Observations: Clear. Verdicts" in normal
    assert "Observations: The heart is enlarged. Verdicts" in rep
    assert normal.endswith("Verdicts: normal study, no cardiomegaly, no edema, no nodule.")
    assert "cardiac silhouette" in dmlm.appearance_of(rep) and "enlarged." not in dmlm.appearance_of(rep)
    pos, neg = dmlm.zeroshot_prompts("No_Finding", KNOW)
    assert not any("no no finding" in p.lower() for p in pos + neg)
    assert set(phantoms.PHANTOM_LABELS) <= set(KNOW)
    assert all(v["definition"].strip() and v["appearance"].strip() for v in KNOW.values())


# ---- the file as documentation ----

def test_equation_map_names_functions_and_tests_that_exist():
    """The docstring's map, one line per equation: every function it names is in dmlm.py and every test
    pattern matches a test here (a renamed function or test makes the map stale)."""
    doc = dmlm.__doc__
    lines = doc[doc.index("Equation -> function -> test"):doc.index("\nRun:")].splitlines()[1:]
    tests, seen = [n for n in globals() if n.startswith("test_")], []
    for line in lines:
        label, rest = re.match(r"\s+((?:Eq\. \(\d\)|Sec\. [\d.]+)\s+)?(.*)", line).groups()
        seen += [label.strip()] if label else []
        for name in filter(None, (t.strip(",") for t in rest.split())):
            if name.endswith("*"):
                assert any(fnmatch.fnmatch(t, "test_" + name) for t in tests), name
            else:
                assert functools.reduce(getattr, name.split("."), dmlm), name
    assert seen == ["Eq. (1)", "Eq. (2)", "Eq. (3)", "Eq. (4)", "Eq. (5)", "Sec. 2.1", "Sec. 2.2"]


def test_readme_departures_name_code_that_exists():
    """README's D-MLM departures table: each `name` in its "where" column is in dmlm.py."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme[readme.index("| departure", readme.index("### D-MLM")):]
    rows = table[:table.index("\n\n")].splitlines()[2:]
    assert len(rows) >= 10
    for row in rows:
        for name in re.findall(r"`([^`]+)`", row.split(" | ")[1]):
            if not name.startswith("--"):
                assert functools.reduce(getattr, re.sub(r"\[.*", "", name).split("."), dmlm), name


# ---- end to end ----

TINY = ["--vit_width=32", "--vit_depth=1", "--embed_dim=32", "--batch_size=16", "--num_workers=0",
        "--log_every=1", "--image_size=32", "--patch_size=8", "--max_tokens=48", "--threads=1"]


def _log(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_short_run_learns_loads_and_resumes_exactly_with_the_ema_teacher(phantom_csv, tmp_path):
    flags = [f"--data={phantom_csv}", "--epochs=2", "--target=ema", "--lr=3e-3", "--encoder_lr=3e-3", *TINY]
    full = dmlm.main(flags + [f"--out_dir={tmp_path / 'a'}"])
    log = _log(tmp_path / "a" / "log.jsonl")
    rows = [r for r in log if "loss" in r]
    first, last = (np.mean([r["loss"] for r in rs]) for rs in (rows[:3], rows[-3:]))
    assert full["step"] == 20 and last < 0.8 * first  # the loss falls by a fifth in 20 steps
    assert all(r["sigma2_p10"] <= r["sigma2_p50"] <= r["sigma2_p90"] for r in rows)
    assert -1 <= full["sigma2_error_spearman"] <= 1
    # the run writes what --out_dir promises, and no ckpt_best.pt (no model selection: the last weights)
    promised = re.search(r"out_dir: str = .*#(.*)", open(dmlm.__file__).read()).group(1)
    assert sorted(os.listdir(tmp_path / "a")) == sorted(re.findall(r"[\w.]+\.(?:pt|jsonl|json)", promised))
    model, cfg = dmlm.load(tmp_path / "a" / "ckpt.pt")
    assert cfg.target == "ema" and cfg.vit_width == 32
    again = common.zeroshot_eval(model, common.XrayCSV(phantom_csv, "test"), "cpu")
    assert again["zeroshot_auc_macro"] == pytest.approx(full["zeroshot_auc_macro"], abs=1e-6)
    # held-out images against their structured reports: matched pairs score above the others (AUC, sklearn)
    te = common.XrayCSV(phantom_csv, "test")
    reports = [dmlm.structured_report(te.label_names, r["_labels"], r, model.knowledge) for r in te.rows]
    with torch.no_grad():
        sim = common.embed_images(model, te, "cpu")[0] @ model.encode_text(reports).numpy().T
    other = ~np.array([[a == b for b in reports] for a in reports])
    assert roc_auc_score(np.r_[np.ones(len(sim)), np.zeros(other.sum())], np.r_[np.diag(sim), sim[other]]) > 0.6
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.encode_image(x).norm(dim=-1), torch.ones(2))
    assert model.image_tokens(x).shape == (2, 16, 32)
    dmlm.main(flags + [f"--out_dir={tmp_path / 'b'}", "--max_steps=7"])  # stops mid-epoch 0
    dmlm.main(flags + [f"--out_dir={tmp_path / 'b'}", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "ab")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=1e-6), (part, k)
    with pytest.raises(common.UserError, match="--align"):
        dmlm.main(flags + [f"--out_dir={tmp_path / 'c'}", "--align=nope"])


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(phantom_csv, tmp_path):
    """2 processes x 8 = 1 process x 16: the alignment sees the global batch (gathered with gradient)."""
    flags = [f"--data={phantom_csv}", "--epochs=1", "--max_steps=3", *TINY]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29540"]
    subprocess.run([*cmd, os.path.join(ROOT, "dmlm.py"), *flags, f"--out_dir={tmp_path / 'two'}"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=240)
    dmlm.main(flags + [f"--out_dir={tmp_path / 'one'}"])
    for a, b in zip(_log(tmp_path / "one" / "log.jsonl"), _log(tmp_path / "two" / "log.jsonl"), strict=True):
        assert a["step"] == b["step"]
        for k in ("loss", "align", "dmlm"):
            assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-5), (a["step"], k)
