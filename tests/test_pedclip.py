"""Tests for pedclip.py: MoBE (Eq. 1-2) against per-expert references, teacher forcing, the gate's gradient path,
the lambda schedule, InfoNCE (Eq. 3-4) and l_G against independent computations, torchvision-compatible weights,
body-part mapping, and a short end-to-end run whose loss falls. CPU, tiny sizes."""
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import pedclip  # noqa: E402
from pedclip import MoBE, ViT  # noqa: E402


def expert_module(m: MoBE, e: int) -> nn.Sequential:
    """Expert e of a MoBE as an ordinary nn.Linear-GELU-nn.Linear module (the looped reference)."""
    C, H = m.w1.shape[1], m.w1.shape[2]
    seq = nn.Sequential(nn.Linear(C, H), nn.GELU(), nn.Linear(H, C)).double()
    with torch.no_grad():
        seq[0].weight.copy_(m.w1[e].t())
        seq[0].bias.copy_(m.b1[e])
        seq[2].weight.copy_(m.w2[e].t())
        seq[2].bias.copy_(m.b2[e])
    return seq


def random_mobe(C=16, H=24, E=5, seed=0, topk=0):
    torch.manual_seed(seed)
    m = MoBE(C, H, E, topk=topk)
    with torch.no_grad():  # make the experts and the gate clearly different from each other
        for p in (m.b1, m.b2):
            p.normal_(std=0.5)
        m.gate.weight.normal_(std=0.2)
    return m


# ---- MoBE, Eq. (1)-(2) ----

def test_mobe_soft_output_is_gate_weighted_sum_of_experts():
    m = random_mobe()
    x = torch.randn(4, 7, 16)
    out, logits = m(x)
    # Eq. (1) computed independently in float64: s = exp(v W_G) / sum exp(v W_G), v = the [IMG] token (index 0)
    v = x[:, 0].double()
    a = v @ m.gate.weight.t().double()
    s = torch.exp(a) / torch.exp(a).sum(-1, keepdim=True)
    ref = sum(s[:, e, None, None] * expert_module(m, e)(x.double()) for e in range(5))  # Eq. (2), one expert at a time
    assert torch.allclose(logits.double(), a, atol=1e-5)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert (s.max(-1).values < 0.99).all()  # a genuinely soft mixture, so the test can fail


def test_teacher_forced_output_is_the_chosen_expert():
    m = random_mobe()
    x = torch.randn(6, 5, 16)
    idx = torch.tensor([3, 0, 3, 4, 1, 3])
    out, logits = m(x, expert_index=idx)
    ref = torch.stack([expert_module(m, int(e))(x[b].double()) for b, e in enumerate(idx)])
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert logits.shape == (6, 5)  # the gate is still computed (it is trained by l_G)
    other = torch.stack([expert_module(m, (int(e) + 1) % 5)(x[b].double()) for b, e in enumerate(idx)])
    assert not torch.allclose(out.double(), other, atol=1e-3)


def test_batched_experts_match_looped_reference_with_gradients():
    """The stacked-weight soft phase and the grouped routing equal a Python loop over E modules, to 1e-5,
    in the output and in the gradients of every weight."""
    E, C, H = 6, 32, 48
    for mode in ("soft", "teacher", "top2"):
        m = random_mobe(C, H, E, seed=1, topk=2 if mode == "top2" else 0)
        x = torch.randn(8, 11, C, requires_grad=True)
        idx = torch.randint(0, E, (8,))
        out, logits = m(x, expert_index=idx if mode == "teacher" else None)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        gx = x.grad.clone()

        # reference: E separate modules and an explicit loop over experts
        x2 = x.detach().clone().requires_grad_(True)
        mods = [expert_module(m, e).float() for e in range(E)]
        W_G = m.gate.weight.detach().clone().requires_grad_(True)
        s = F.softmax(x2[:, 0] @ W_G.t(), -1)
        if mode == "soft":
            w = s
        elif mode == "teacher":
            w = F.one_hot(idx, E).float()
        else:
            top = s.topk(2, -1)
            w = torch.zeros_like(s).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        ref = sum(w[:, e, None, None] * mods[e](x2) for e in range(E))
        (ref * g).sum().backward()
        assert torch.allclose(out, ref, atol=1e-5), mode
        assert torch.allclose(gx, x2.grad, atol=1e-5), mode
        for e in range(E):
            assert torch.allclose(got["w1"][e], mods[e][0].weight.grad.t(), atol=1e-5), (mode, e)
            assert torch.allclose(got["b1"][e], mods[e][0].bias.grad, atol=1e-5), (mode, e)
            assert torch.allclose(got["w2"][e], mods[e][2].weight.grad.t(), atol=1e-5), (mode, e)
            assert torch.allclose(got["b2"][e], mods[e][2].bias.grad, atol=1e-5), (mode, e)
        if mode == "teacher":
            assert "gate.weight" not in got  # the output does not depend on the gate in teacher forcing
        else:
            assert torch.allclose(got["gate.weight"], W_G.grad, atol=1e-5), mode


def test_topk_keeps_k_experts_and_equals_dense_when_one_expert_dominates():
    m = random_mobe(topk=1)
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[2, :] = 50.0  # expert 2 gets s ~ 1 for every input with a positive [IMG] sum
    x[:, 0] = x[:, 0].abs() + 0.1
    out_top1, _ = m(x)
    m.topk = 0
    out_dense, _ = m(x)
    ref = expert_module(m, 2)(x.double())
    assert torch.allclose(out_top1.double(), ref, atol=1e-5)
    assert torch.allclose(out_dense, out_top1, atol=1e-5)


# ---- the ViT: torchvision's parameter names, attention, pretrained MLPs copied into the experts ----

def test_vit_parameter_names_are_torchvisions():
    vit = ViT(image_size=32, patch_size=16, dim=24, depth=2, heads=2, mlp_dim=48)
    keys = set(vit.state_dict())
    expected = {"class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding", "encoder.ln.weight",
                "encoder.ln.bias"}
    for i in range(2):
        p = f"encoder.layers.encoder_layer_{i}."
        expected |= {p + n for n in ("ln_1.weight", "ln_1.bias", "self_attention.in_proj_weight",
                                     "self_attention.in_proj_bias", "self_attention.out_proj.weight",
                                     "self_attention.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.0.weight",
                                     "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")}
    assert keys == expected  # torchvision vit_b_16's state dict minus heads.head.*, at a smaller size
    assert vit.state_dict()["encoder.pos_embedding"].shape == (1, 5, 24)


def test_self_attention_equals_nn_multiheadattention():
    torch.manual_seed(0)
    att = pedclip.SelfAttention(24, 3)
    ref = nn.MultiheadAttention(24, 3, batch_first=True)
    ref.load_state_dict(att.state_dict())  # same parameter names, so the state dict loads as it is
    x = torch.randn(2, 9, 24)
    assert torch.allclose(att(x), ref(x, x, x, need_weights=False)[0], atol=1e-5)


def test_pretrained_mlp_is_copied_into_every_expert():
    torch.manual_seed(0)
    plain = ViT(image_size=32, patch_size=8, dim=24, depth=3, heads=2, mlp_dim=40)
    tv_state = dict(plain.state_dict())
    tv_state["heads.head.weight"], tv_state["heads.head.bias"] = torch.randn(10, 24), torch.randn(10)
    moe = ViT(image_size=32, patch_size=8, dim=24, depth=3, heads=2, mlp_dim=40, moe_layers=(1, 2), n_experts=4)
    moe.load_state_dict(pedclip.vit_state_from_torchvision(tv_state, moe))
    mlp = plain.encoder.layers.encoder_layer_2.mlp
    mobe = moe.encoder.layers.encoder_layer_2.mlp
    for e in range(4):
        assert torch.equal(mobe.w1[e], mlp[0].weight.t()) and torch.equal(mobe.b2[e], mlp[3].bias)
    x = torch.randn(2, 3, 32, 32)
    ref, _ = plain(x)
    soft, gl = moe(x)  # identical experts: any convex gate mixture gives the pretrained MLP
    forced, _ = moe(x, expert_index=torch.tensor([3, 1]))
    assert len(gl) == 2 and torch.allclose(soft, ref, atol=1e-5) and torch.allclose(forced, ref, atol=1e-5)


def test_parse_moe_layers():
    assert pedclip.parse_moe_layers("8,9,10,11", 12) == [8, 9, 10, 11]
    assert pedclip.parse_moe_layers("-4,-3,-2,-1", 12) == [8, 9, 10, 11]
    assert pedclip.parse_moe_layers("none", 12) == []
    with pytest.raises(ValueError, match="12"):
        pedclip.parse_moe_layers("12", 12)


# ---- losses, Eq. (3)-(4) and l_G ----

def test_infonce_against_independent_computation():
    rng = np.random.default_rng(0)
    M, D, tau = 6, 5, 0.1
    img = F.normalize(torch.tensor(rng.normal(size=(M, D))), dim=-1)
    txt = F.normalize(torch.tensor(rng.normal(size=(M, D))), dim=-1)
    l_v2t, l_t2v = pedclip.infonce_losses(img, txt, torch.tensor(math.log(1 / tau)))
    a, b = img.numpy(), txt.numpy()

    def cos(u, v):
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    v2t = np.mean([-math.log(math.exp(cos(a[i], b[i]) / tau) / sum(math.exp(cos(a[i], b[j]) / tau) for j in range(M)))
                   for i in range(M)])  # Eq. (3)
    t2v = np.mean([-math.log(math.exp(cos(b[i], a[i]) / tau) / sum(math.exp(cos(b[i], a[j]) / tau) for j in range(M)))
                   for i in range(M)])  # Eq. (4)
    assert abs(l_v2t.item() - v2t) < 1e-5 and abs(l_t2v.item() - t2v) < 1e-5
    assert abs(v2t - t2v) > 1e-3  # the two directions differ, so swapping them would be caught


def test_gate_loss_is_ce_summed_over_layers_and_total_loss():
    torch.manual_seed(0)
    logits = [torch.randn(5, 4), torch.randn(5, 4)]
    y = torch.tensor([0, 3, 1, 1, 2])
    ref = -sum(torch.distributions.Categorical(logits=l).log_prob(y).mean() for l in logits)
    lg = pedclip.gate_loss(logits, y)
    assert torch.allclose(lg, ref, atol=1e-6)
    assert torch.allclose(pedclip.total_loss(torch.tensor(2.0), torch.tensor(4.0), lg, 0.5), 3.0 + 0.5 * ref)


def test_lambda_and_teacher_forcing_schedule_at_epoch_boundaries():
    cfg = pedclip.Config(epochs=50, teacher_epochs=10, lambda_start=1.0, lambda_end=0.0)
    assert [pedclip.teacher_forcing(e, cfg) for e in (0, 9, 10, 49)] == [True, True, False, False]
    assert pedclip.lambda_at(0, cfg) == 1.0 and pedclip.lambda_at(9, cfg) == 1.0
    assert pedclip.lambda_at(10, cfg) == 1.0 and pedclip.lambda_at(49, cfg) == 0.0
    np.testing.assert_allclose([pedclip.lambda_at(e, cfg) for e in range(10, 50)], np.linspace(1, 0, 40), atol=1e-12)
    cfg2 = pedclip.Config(epochs=10, teacher_epochs=2, lambda_end=0.2)
    assert pedclip.lambda_at(1, cfg2) == 1.0 and abs(pedclip.lambda_at(9, cfg2) - 0.2) < 1e-12
    assert abs(pedclip.lambda_at(5, cfg2) - (1 - 0.8 * 3 / 7)) < 1e-12


# ---- the gate's gradient path in teacher forcing ----

@pytest.fixture(scope="module")
def tiny_model():
    cfg = pedclip.Config(image_size=32, patch_size=8, vit_width=32, vit_depth=3, vit_heads=2, vit_mlp_dim=48,
                         moe_layers="-2,-1", tiny_width=32, tiny_layers=1, embed_dim=16)
    tok = common.train_wordpiece(["there is a fracture of the distal radius.", "no effusion.", "normal chest."] * 4,
                                 vocab_size=80)
    torch.manual_seed(0)
    return pedclip.build(cfg, tok)


def test_gate_gets_gradient_only_from_gate_loss_in_teacher_forcing(tiny_model):
    m = tiny_model
    x = torch.randn(4, 3, 32, 32)
    t = m.tokenize(["there is a fracture.", "no effusion.", "normal chest.", "fracture of the radius."])
    xb = torch.tensor([0, 1, 2, 0])
    gates = [l.mlp.gate.weight for l in m.visual.encoder.layers if isinstance(l.mlp, pedclip.MoBE)]
    assert len(gates) == 2

    def grads(loss):
        m.zero_grad(set_to_none=True)
        loss.backward()
        return [g.grad for g in gates]

    v, u, gl = m(x, t["input_ids"], t["attention_mask"], expert_index=xb)  # teacher forcing
    assert all(g is None or not g.abs().any() for g in grads(sum(pedclip.infonce_losses(v, u, m.logit_scale))))
    v, u, gl = m(x, t["input_ids"], t["attention_mask"], expert_index=xb)
    assert all(g is not None and g.abs().sum() > 0 for g in grads(pedclip.gate_loss(gl, xb)))
    v, u, gl = m(x, t["input_ids"], t["attention_mask"])  # soft phase: s weights the experts, InfoNCE reaches W_G
    assert all(g is not None and g.abs().sum() > 0 for g in grads(sum(pedclip.infonce_losses(v, u, m.logit_scale))))


def test_model_interface(tiny_model):
    m = tiny_model.eval()
    x = torch.randn(3, 3, 32, 32)
    z = m.encode_image(x)
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert m.encode_text(["no effusion."]).shape == (1, 16)
    assert m.image_tokens(x).shape == (3, 16, 32)
    pos, neg = m.zeroshot_prompts("No Finding")
    assert not any("no no" in p.lower() for p in pos + neg)
    img = (np.random.default_rng(0).random((50, 40)) * 255).astype(np.uint8)
    assert m.image_transform(False)(img).shape == (3, 32, 32)


# ---- body parts ----

def test_body_part_mapping():
    assert len(pedclip.BODY_PARTS) == 23 and len(set(pedclip.BODY_PARTS)) == 23
    assert set(pedclip.BODY_PART_SYNONYMS.values()) <= set(pedclip.BODY_PARTS)
    assert set(common.PHANTOM_BODY_PARTS) <= set(pedclip.BODY_PARTS)
    parts = pedclip.BODY_PARTS
    assert pedclip.body_part_index("Chest", parts) == parts.index("chest")
    assert pedclip.body_part_index("C-Spine", parts) == parts.index("cervical_spine")
    assert pedclip.body_part_index("finger", parts) == parts.index("hand")
    with pytest.raises(ValueError, match="spleen"):
        pedclip.body_part_index("spleen", parts)
    cfg = pedclip.Config(body_parts="pexr23", unknown_body_part="other")
    p2 = pedclip.body_part_list(cfg)
    assert len(p2) == 24 and pedclip.body_part_index("spleen", p2, "other") == 23


def test_unknown_body_part_in_csv_is_an_error_naming_it(tmp_path):
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "split", "body_part", "report"])
        w.writerow(["a.png", "train", "knee", "no effusion."])
        w.writerow(["b.png", "train", "Spleen", "normal."])
    table = common.XrayCSV(tmp_path / "d.csv", split="train")
    cfg = pedclip.Config()
    with pytest.raises(ValueError, match=r"'Spleen'.*row 3"):
        pedclip.TripletDataset(table, pedclip.body_part_list(cfg), cfg)


def test_text_sample_section_draws_one_section_and_augment_off_is_the_eval_transform(tmp_path):
    import PIL.Image

    PIL.Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(tmp_path / "a.png")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "split", "body_part", "findings", "impression", "report"])
        w.writerow(["a.png", "train", "knee", "No fracture. Joint effusion.", "Joint effusion.",
                    "No fracture. Joint effusion. Joint effusion."])
        w.writerow(["a.png", "train", "hip", "No fracture.", "", "No fracture."])
    table = common.XrayCSV(tmp_path / "d.csv", split="train")
    parts = pedclip.body_part_list(pedclip.Config())
    full = pedclip.TripletDataset(table, parts, pedclip.Config(text_sample="full"))
    sec = pedclip.TripletDataset(table, parts, pedclip.Config(text_sample="section", augment=False))
    drawn = {sec[(0, seed)]["text"] for seed in range(40)}
    assert drawn == {"No fracture. Joint effusion.", "Joint effusion."}  # one whole section per draw, both drawn
    assert {sec[(1, seed)]["text"] for seed in range(10)} == {"No fracture."}  # only one non-empty section
    assert full[(0, 3)]["text"] == "No fracture. Joint effusion. Joint effusion."  # the paper: the whole excerpt
    evald = pedclip.TripletDataset(table, parts, pedclip.Config(text_sample="section"), train=False)
    assert evald[(0, 3)]["text"] == "No fracture. Joint effusion. Joint effusion."  # never sampled outside training
    img = common.load_image(tmp_path / "a.png")
    torch.testing.assert_close(sec[(0, 5)]["image"], pedclip.ImageTransform(64, False)(img))  # no augmentation
    assert not torch.equal(full[(0, 5)]["image"], sec[(0, 5)]["image"])  # the default augments
    with pytest.raises(SystemExit, match="--text_sample=sentence"):
        pedclip.main(["--text_sample=sentence", f"--data={tmp_path / 'd.csv'}", f"--out_dir={tmp_path / 'o'}"])


# ---- end to end: a short run on a small phantom set; the loss falls, metrics and the checkpoint load ----

@pytest.fixture(scope="module")
def small_phantoms(tmp_path_factory):
    return common.make_phantoms(240, seed=3, out_dir=tmp_path_factory.mktemp("ph"), size=64, progress=False)


TINY = ["--vit_width=32", "--vit_mlp_dim=64", "--tiny_width=32", "--tiny_layers=1", "--vocab_size=400",
        "--embed_dim=32", "--batch_size=32", "--lr=2e-3", "--warmup_epochs=0.5", "--log_every=1"]


def test_short_run_loss_falls_and_checkpoint_loads(small_phantoms, tmp_path):
    out = tmp_path / "run"
    metrics = pedclip.main([f"--data={small_phantoms}", f"--out_dir={out}", "--epochs=6", "--teacher_epochs=2"] + TINY)
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 30  # 166 training images // 32 = 5 steps x 6 epochs

    def mean(key, sl):
        return float(np.mean([r[key] for r in rows[sl]]))
    contrastive = [0.5 * (r["v2t"] + r["t2v"]) for r in rows]
    assert np.mean(contrastive[-5:]) < np.mean(contrastive[:5]) - 0.1, contrastive
    assert mean("gate", slice(-5, None)) < mean("gate", slice(0, 5)) - 0.5
    assert mean("loss", slice(-5, None)) < mean("loss", slice(0, 5)) - 0.5
    assert [r["teacher_forcing"] for r in rows[::5]] == [True, True, False, False, False, False]
    np.testing.assert_allclose([r["lambda"] for r in rows[::5]], [1, 1, 1, 2 / 3, 1 / 3, 0], atol=1e-9)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["zeroshot_auc_macro"] == metrics["zeroshot_auc_macro"]
    assert saved["gate_accuracy"] > 0.5  # 6 body parts: chance is about 1/6
    model, cfg = pedclip.load(out / "ckpt.pt")
    assert cfg.vit_width == 32 and model.body_parts == list(common.PHANTOM_BODY_PARTS)
    again = pedclip.zeroshot_eval(model, common.XrayCSV(small_phantoms, split="test"), "cpu")
    assert abs(again["zeroshot_auc_macro"] - metrics["zeroshot_auc_macro"]) < 1e-6


def test_resume_is_exact(small_phantoms, tmp_path):
    """Stopping after 7 steps (mid-epoch, in the soft phase) and resuming gives the uninterrupted run's weights."""
    common_args = [f"--data={small_phantoms}", "--epochs=3", "--teacher_epochs=1"] + TINY
    pedclip.main(common_args + [f"--out_dir={tmp_path / 'a'}"])
    pedclip.main(common_args + [f"--out_dir={tmp_path / 'b'}", "--max_steps=7"])
    pedclip.main(common_args + [f"--out_dir={tmp_path / 'b'}", "--resume"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp_infonce_worker(rank, world, init_file, img, txt, log_scale, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = img.shape[0] // world
    x = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    y = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    s = log_scale.clone().requires_grad_(True)
    l_v2t, l_t2v = pedclip.infonce_losses(x, y, s)
    (0.5 * (l_v2t + l_t2v)).backward()
    torch.save({"loss": (0.5 * (l_v2t + l_t2v)).item(), "gx": x.grad, "gy": y.grad, "gs": s.grad},
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_infonce_two_gloo_processes_equal_one_process(tmp_path):
    """2 processes x 4 pairs = 1 process x 8 pairs: the loss averaged over ranks, and the gradients DDP would
    apply (each rank's feature gradient / world, the averaged temperature gradient), match the single process."""
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 6), dim=-1), F.normalize(torch.randn(8, 6), dim=-1)
    log_scale = torch.tensor(math.log(1 / 0.07))
    torch.multiprocessing.spawn(_ddp_infonce_worker, args=(2, str(tmp_path / "init"), img, txt, log_scale,
                                                           str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"{k}.pt") for k in range(2)]
    x, y, s = img.clone().requires_grad_(True), txt.clone().requires_grad_(True), log_scale.clone().requires_grad_(True)
    l_v2t, l_t2v = pedclip.infonce_losses(x, y, s)
    loss = 0.5 * (l_v2t + l_t2v)
    loss.backward()
    assert abs((r[0]["loss"] + r[1]["loss"]) / 2 - loss.item()) < 1e-5
    assert torch.allclose(torch.cat([r[0]["gx"], r[1]["gx"]]) / 2, x.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r[0]["gy"], r[1]["gy"]]) / 2, y.grad, atol=1e-6)
    assert torch.allclose((r[0]["gs"] + r[1]["gs"]) / 2, s.grad, atol=1e-6)
