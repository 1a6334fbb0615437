"""Tests for dmlm.py: the Gaussian KL (Eq. 3) against torch.distributions, W2 (Eq. 4) against the general Gaussian
formula with matrix square roots (scipy), masking ratios, the adaptive region prior (masked patches concentrate
where the Appearance section points, and those regions hold the phantom's drawn findings), the collapse argument
(pairs-only W2 collapses, the contrastive reading keeps matched pairs closer than unmatched), torchvision-compatible
ViT weights, structured reports, and a short end-to-end run whose loss falls. CPU, tiny sizes."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import dmlm  # noqa: E402

KNOW = dmlm.load_knowledge(str(ROOT / "knowledge" / "phantom_chexpert.json"))


def rand_gauss(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), \
        torch.rand(*shape, generator=g, dtype=torch.float64) * 2 + 0.05


# ---- Eq. (1): Gaussian heads ----

@pytest.mark.parametrize("param", ["softplus", "exp"])
def test_gaussian_head_variance_is_positive_with_floor(param):
    torch.manual_seed(0)
    head = dmlm.GaussianHead(8, 6, param, var_floor=1e-3)
    with torch.no_grad():
        head.var.bias.fill_(-50.0)  # push the raw output far negative: σ² must stop at the floor
    mu, var = head(torch.randn(4, 5, 8))
    assert mu.shape == var.shape == (4, 5, 6)
    assert torch.all(var >= 1e-3) and torch.allclose(var, torch.full_like(var, 1e-3), atol=1e-6)
    with torch.no_grad():
        head.var.bias.fill_(0.0)
        head.var.weight.zero_()
    expected = np.log(2) if param == "softplus" else 1.0
    assert torch.allclose(head(torch.randn(2, 8))[1], torch.full((2, 6), expected + 1e-3), atol=1e-6)


# ---- Eq. (3): KL of diagonal Gaussians and the D-MLM loss ----

def test_gaussian_kl_matches_torch_distributions():
    mu_p, var_p = rand_gauss(3, 7, 16, seed=1)
    mu_q, var_q = rand_gauss(3, 7, 16, seed=2)
    ours = dmlm.gaussian_kl(mu_p, var_p, mu_q, var_q)
    ref = kl_divergence(Independent(Normal(mu_p, var_p.sqrt()), 1), Independent(Normal(mu_q, var_q.sqrt()), 1))
    assert ours.shape == (3, 7)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(dmlm.gaussian_kl(mu_p, var_p, mu_p, var_p), torch.zeros(3, 7, dtype=torch.float64), atol=1e-12)


def test_dmlm_loss_sums_kl_over_masked_positions_only():
    B, L, N, D = 2, 5, 4, 3
    pt, tt = rand_gauss(B, L, D, seed=3), rand_gauss(B, L, D, seed=4)
    pi, ti = rand_gauss(B, N, D, seed=5), rand_gauss(B, N, D, seed=6)
    tmask = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    pmask = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    ref, n = 0.0, 0
    for b in range(B):  # looped reference over masked positions with torch.distributions
        for (p, t, m) in ((pt, tt, tmask), (pi, ti, pmask)):
            for i in m[b].nonzero().flatten().tolist():
                ref += float(kl_divergence(Independent(Normal(p[0][b, i], p[1][b, i].sqrt()), 1),
                                           Independent(Normal(t[0][b, i], t[1][b, i].sqrt()), 1)))
                n += 1
    args = (*pt, *tt, tmask, *pi, *ti, pmask)
    assert abs(float(dmlm.dmlm_loss(*args, reduce="sum")) - ref / B) < 1e-9
    assert abs(float(dmlm.dmlm_loss(*args, reduce="mean")) - ref / (n * D)) < 1e-9
    # changing an UNMASKED prediction must not change the loss
    pt2 = (pt[0].clone(), pt[1])
    pt2[0][0, 0] += 5.0
    assert float(dmlm.dmlm_loss(*pt2, *tt, tmask, *pi, *ti, pmask, reduce="sum")) == pytest.approx(ref / B)


# ---- Eq. (4): 2-Wasserstein distance ----

def w2_general(mu1, cov1, mu2, cov2):
    """W2² of two Gaussians with full covariances: ||μ1-μ2||² + tr(Σ1 + Σ2 - 2 (Σ2^½ Σ1 Σ2^½)^½)."""
    r2 = scipy.linalg.sqrtm(cov2)
    cross = scipy.linalg.sqrtm(r2 @ cov1 @ r2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * np.real(cross)))


def test_w2_matches_general_gaussian_formula():
    mu1, var1 = rand_gauss(6, 8, seed=7)
    mu2, var2 = rand_gauss(6, 8, seed=8)
    ours = dmlm.w2_squared(mu1, var1, mu2, var2)
    for i in range(6):
        ref = w2_general(mu1[i].numpy(), np.diag(var1[i].numpy()), mu2[i].numpy(), np.diag(var2[i].numpy()))
        assert float(ours[i]) == pytest.approx(ref, rel=1e-7, abs=1e-9)
    pair = dmlm.w2_squared_pairwise(mu1, var1, mu2[:4], var2[:4])
    assert pair.shape == (6, 4)
    loop = torch.stack([dmlm.w2_squared(mu1[i], var1[i], mu2[j], var2[j]) for i in range(6) for j in range(4)])
    assert torch.allclose(pair.flatten(), loop, rtol=1e-9, atol=1e-9)


def test_contrastive_alignment_is_infonce_with_minus_w2_logits():
    mu_i, var_i = rand_gauss(5, 4, seed=9)
    mu_t, var_t = rand_gauss(5, 4, seed=10)
    scale = torch.tensor(3.0, dtype=torch.float64)
    ours = dmlm.align_contrastive_loss(mu_i, var_i, mu_t, var_t, scale)
    ref = 0.0
    for a, b in (((mu_i, var_i), (mu_t, var_t)), ((mu_t, var_t), (mu_i, var_i))):
        for k in range(5):
            logits = torch.tensor([-1.5 * w2_general(a[0][k].numpy(), np.diag(a[1][k].numpy()), b[0][j].numpy(),
                                                     np.diag(b[1][j].numpy())) for j in range(5)])
            ref += 0.5 * float(-torch.log_softmax(logits, 0)[k]) / 5
    assert float(ours) == pytest.approx(ref, rel=1e-7)
    assert float(dmlm.total_loss(torch.tensor(2.0), torch.tensor(1.0), 0.2)) == pytest.approx(0.2 * 2 + 0.8 * 1)


def test_collapse_pairs_only_collapses_contrastive_separates():
    """Optimise free Gaussians of 8 'images' and 8 'reports': Eq. (4) alone shrinks every distance (matched and
    unmatched) towards 0; the contrastive reading keeps unmatched pairs far and matched pairs closer."""
    def run(kind):
        torch.manual_seed(0)
        mi, mt = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8, 6))
        ai, at = nn.Parameter(torch.randn(8, 6) * 0.3), nn.Parameter(torch.randn(8, 6) * 0.3)
        opt = torch.optim.Adam([mi, mt, ai, at], lr=0.05)
        for _ in range(200):
            vi, vt = F.softplus(ai) + 1e-4, F.softplus(at) + 1e-4
            if kind == "pairs":
                loss = dmlm.align_pairs_loss(mi, vi, mt, vt)
            else:
                loss = dmlm.align_contrastive_loss(F.normalize(mi, dim=-1), vi, F.normalize(mt, dim=-1), vt,
                                                   torch.tensor(10.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            vi, vt = F.softplus(ai) + 1e-4, F.softplus(at) + 1e-4
            mi_, mt_ = (mi, mt) if kind == "pairs" else (F.normalize(mi, dim=-1), F.normalize(mt, dim=-1))
            d = dmlm.w2_squared_pairwise(mi_, vi, mt_, vt)
        off = ~torch.eye(8, dtype=torch.bool)
        return d.diag().mean().item(), d[off].mean().item(), (d.argmin(1) == torch.arange(8)).float().mean().item()

    m_pair, u_pair, _ = run("pairs")
    m_con, u_con, top1 = run("contrastive")
    assert m_pair < 1e-3  # Eq. (4) literally: matched pairs coincide ...
    assert m_con < 0.5 * u_con and top1 == 1.0  # contrastive: matched clearly closer, every image finds its report
    assert u_con > 1.0  # ... and the unmatched ones stay apart


# ---- masking (Sec. 2.2) ----

def test_text_mask_ratio_and_special_tokens():
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 3, 0, 0],
                        [2, 10, 11, 12, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    att = (ids != 0).long()
    rngs = [np.random.default_rng(s) for s in (0, 1)]
    m = dmlm.text_token_mask(ids, att, [2, 3, 0], 0.3, rngs)
    assert m.sum(1).tolist() == [3, 1]  # round(0.3 * 10) and round(0.3 * 3)
    assert not m[:, 0].any() and not m[ids == 3].any() and not m[att == 0].any()
    # over many draws each real token is masked ~30% of the time
    hits = torch.zeros(14)
    for s in range(400):
        hits += dmlm.text_token_mask(ids[:1], att[:1], [2, 3, 0], 0.3, [np.random.default_rng(s)])[0].float()
    assert torch.allclose(hits[1:11] / 400, torch.full((10,), 0.3), atol=0.08)


def test_image_mask_count_and_adaptive_concentration():
    grid, ratio = 8, 0.3
    text = KNOW["Pleural Effusion"]["appearance"]
    prior = dmlm.region_prior(text, grid).reshape(grid, grid)
    assert prior[6].sum() > 0 and prior[:4].sum() == 0  # costophrenic angle / lung base: lower rows only
    inside = dmlm.region_prior(text, grid) > 0.5
    frac = {}
    for mode in ("adaptive", "random"):
        rng = np.random.default_rng(0)
        masks = np.stack([dmlm.image_patch_mask(text, grid, ratio, mode, 4.0, rng) for _ in range(500)])
        assert (masks.sum(1) == round(ratio * grid * grid)).all()
        frac[mode] = masks[:, inside].sum() / masks.sum()
    area = inside.mean()
    assert frac["random"] == pytest.approx(area, abs=0.03)  # uniform: masked share = region's area share
    assert frac["adaptive"] > 1.8 * area  # adaptive: masked patches concentrate in the named region
    # no region word -> uniform
    assert dmlm.region_prior("a finding with no anatomical words", grid).sum() == 0


def test_region_map_covers_where_the_phantom_draws_each_finding(tmp_path):
    """The knowledge file's Appearance text, through REGION_MAP, points at the pixels common._draw_phantom fills."""
    csv_path = common.make_phantoms(500, seed=1, out_dir=tmp_path, size=64, progress=False)
    table = common.XrayCSV(csv_path)
    names = {n: i + 1 for i, n in enumerate(common.PHANTOM_FINDINGS)}
    checked = 0
    for name in ("Pleural Effusion", "Pneumothorax", "Consolidation", "Cardiomegaly", "Pneumoperitoneum"):
        region = dmlm.region_prior(KNOW[name]["appearance"], 64).reshape(64, 64) > 0.5  # pixel-level boxes
        inside, total = 0, 0
        for r in table.rows:
            if r["view"] == "LATERAL" or r["_labels"][table.label_names.index(name)] != 1:
                continue
            m = common.load_image(r["_path"].replace("images", "masks")) == names[name]
            inside, total = inside + (m & region).sum(), total + m.sum()
        if total:
            checked += 1
            assert inside / total > 0.8, (name, inside / total)
    assert checked >= 4


# ---- structured reports (Sec. 2.1) ----

def test_structured_report_sections_and_no_double_negative():
    names = ["Cardiomegaly", "Edema", "Nodule", "No Finding"]
    rep = dmlm.structured_report(names, np.array([1, -1, 0, 0], np.float32), "The heart is enlarged.", KNOW)
    assert rep.index("Definition:") < rep.index("Appearance:") < rep.index("Observations:") < rep.index("Verdicts:")
    assert KNOW["Cardiomegaly"]["definition"] in rep and KNOW["Edema"]["appearance"] in rep
    assert KNOW["Nodule"]["definition"] not in rep
    assert "abnormal study, cardiomegaly, possible edema, no nodule." in rep and "no no finding" not in rep
    normal = dmlm.structured_report(names, np.array([0, 0, 0, 1], np.float32), "Clear.", KNOW)
    assert KNOW["No Finding"]["definition"] in normal and "Verdicts: normal study" in normal
    assert "cardiac silhouette" in dmlm.appearance_of(rep) and "enlarged." not in dmlm.appearance_of(rep)
    pos, neg = dmlm.zeroshot_prompts("No Finding", KNOW)
    assert not any("no no finding" in p.lower() for p in pos + neg)


def test_knowledge_file_covers_phantom_and_chexpert_findings():
    chexpert = {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"}
    assert set(common.PHANTOM_LABELS) | chexpert <= set(KNOW)
    assert all(v["definition"].strip() and v["appearance"].strip() for v in KNOW.values())


# ---- ViT with torchvision's parameter names ----

def test_vit_parameter_names_are_torchvisions_and_attention_matches_mha():
    vit = dmlm.ViT(image_size=32, patch=16, dim=24, layers=2, heads=2)
    expected = {"class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding", "encoder.ln.weight",
                "encoder.ln.bias"}
    for i in range(2):
        p = f"encoder.layers.encoder_layer_{i}."
        expected |= {p + n for n in ("ln_1.weight", "ln_1.bias", "self_attention.in_proj_weight",
                                     "self_attention.in_proj_bias", "self_attention.out_proj.weight",
                                     "self_attention.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.0.weight",
                                     "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")}
    assert set(vit.state_dict()) == expected  # torchvision vit_b_16's state dict minus heads.*, at a small size
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5, 24)
    torch.manual_seed(0)
    att, ref = dmlm.SelfAttention(24, 3), nn.MultiheadAttention(24, 3, batch_first=True)
    ref.load_state_dict(att.state_dict())
    x = torch.randn(2, 9, 24)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 6:] = False
    ours = att(x, keep)
    theirs = ref(x, x, x, key_padding_mask=~keep, need_weights=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_masked_patches_are_replaced_by_the_mask_token():
    torch.manual_seed(0)
    vit = dmlm.ViT(image_size=16, patch=8, dim=8, layers=1, heads=2)
    tok = torch.randn(1, 1, 8)
    x = torch.randn(2, 3, 16, 16)
    pm = torch.tensor([[True, False, False, False], [False] * 4])
    a, b = vit(x, pm, tok), vit(x.clone().index_fill_(0, torch.tensor([0]), 0.0), pm, tok)
    assert not torch.allclose(a[0], b[0])  # image 0 still has visible patches
    x2 = x.clone()
    x2[0, :, :8, :8] = 123.0  # change only the masked patch of image 0: output unchanged
    assert torch.allclose(vit(x2, pm, tok), a, atol=1e-6)


# ---- end to end ----

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return common.make_phantoms(240, seed=3, out_dir=tmp_path_factory.mktemp("ph"), size=64, progress=False)


TINY = ["--vit_width=32", "--vit_layers=1", "--vit_heads=2", "--bert_width=32", "--bert_layers=1",
        "--embed_dim=32", "--fusion_width=32", "--fusion_heads=2", "--vocab_size=400", "--max_tokens=64",
        "--batch_size=32", "--num_workers=0", "--log_every=1", "--lr=2e-3", "--encoder_lr=2e-3",
        "--warmup_epochs=0.5", "--threads=1"]


def test_short_run_loss_falls_and_matched_pairs_are_closer(phantoms, tmp_path):
    out = tmp_path / "run"
    metrics = dmlm.main([f"--data={phantoms}", f"--out_dir={out}", "--epochs=6", *TINY])
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.3, (first, last)
    assert rows[-1]["dmlm"] < rows[0]["dmlm"] and rows[-1]["align"] < rows[0]["align"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["zeroshot_auc_macro"] == metrics["zeroshot_auc_macro"]
    # the checkpoint rebuilds the model alone; matched image/report pairs end closer than unmatched (W2)
    model, cfg = dmlm.load(out / "ckpt.pt")
    assert cfg.vit_width == 32 and cfg.align == "contrastive"
    table = common.XrayCSV(phantoms, split="train")
    ds = dmlm.PairDataset(table, cfg, model.knowledge, train=False)
    idx = list(range(0, len(table), 3))[:48]
    with torch.no_grad():
        x = torch.stack([ds[(i, 0)]["x"] for i in idx])
        mi, vi = model.image_gaussian(x)
        mt, vt = model.text_gaussian([ds.reports[i] for i in idx])
        d = dmlm.w2_squared_pairwise(F.normalize(mi, dim=-1), vi, F.normalize(mt, dim=-1), vt)
    same = torch.tensor([[ds.reports[i] == ds.reports[j] for j in idx] for i in idx])
    assert d[same].mean() < d[~same].mean()
    # interface used by evaluate.py
    e = model.encode_image(x[:4])
    assert e.shape == (4, 32) and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(model.encode_text(["Verdicts: normal study."]).norm(dim=-1), torch.ones(1), atol=1e-5)
    assert (model.image_uncertainty(x[:4]) > 0).all() and model.image_tokens(x[:2]).shape[:2] == (2, 64)
    again = dmlm.zeroshot_eval(model, common.XrayCSV(phantoms, split="test"), "cpu")
    assert abs(again["zeroshot_auc_macro"] - metrics["zeroshot_auc_macro"]) < 1e-6


def test_resume_is_exact_with_ema_target(phantoms, tmp_path):
    flags = [f"--data={phantoms}", "--epochs=2", "--target=ema", "--align=pairs", "--image_mask=random", *TINY]
    full = dmlm.main(flags + [f"--out_dir={tmp_path / 'a'}", "--max_steps=6"])
    dmlm.main(flags + [f"--out_dir={tmp_path / 'b'}", "--max_steps=4"])
    dmlm.main(flags + [f"--out_dir={tmp_path / 'b'}", "--max_steps=6", "--resume"])
    a, b = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False), torch.load(tmp_path / "b" / "ckpt.pt",
                                                                                    weights_only=False)
    assert full["step"] == 6 and a["step"] == b["step"] == 6 and a["ema"] is not None
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    for k in a["ema"]:
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6), k


def test_two_gloo_processes_match_one_process(phantoms, tmp_path):
    """torchrun with 2 CPU processes x 16 = 1 process x 32: the alignment loss sees the global batch (all-gathered
    with gradient), so the logged losses agree step by step."""
    import os
    import subprocess

    flags = [f"--data={phantoms}", "--epochs=1", "--max_steps=3", "--kl_reduce=sum", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(ROOT / "dmlm.py"), *flags, f"--out_dir={tmp_path / 'two'}"], check=True, env=env,
                   capture_output=True, timeout=240)
    dmlm.main(flags + [f"--out_dir={tmp_path / 'one'}"])
    rows = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(rows("one"), rows("two"), strict=True):
        assert a["step"] == b["step"]
        for k in ("loss", "align", "dmlm"):
            assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-5), (a["step"], k)
