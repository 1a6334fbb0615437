"""cxrclip.py: Eq. (1) and (2), ICL/TCL composition, study sampling, DDP equality, resume, end-to-end."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import cxrclip
from conftest import ROOT

TINY = ["--image_size=32", "--tiny_width=32", "--embed_dim=32", "--vocab_size=400", "--num_workers=0",
        "--eval_batch_size=64", "--log_every=1"]


def _ref_clip_loss(u, v, tau):
    """Eq. (1) written out term by term in float64 with explicit sums (independent of cxrclip.clip_loss)."""
    u, v = u.double().numpy(), v.double().numpy()
    n = len(u)
    total = 0.0
    for i in range(n):
        total += np.log(np.exp(v[i] @ u[i] / tau) / sum(np.exp(u[i] @ v[j] / tau) for j in range(n)))
        total += np.log(np.exp(u[i] @ v[i] / tau) / sum(np.exp(v[i] @ u[j] / tau) for j in range(n)))
    return -total / (2 * n)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_eq1_against_explicit_sums():
    u, v = _unit(6, 8, 0), _unit(6, 8, 1)
    tau = 0.07
    got = cxrclip.clip_loss(u, v, torch.tensor(1 / tau)).item()
    assert abs(got - _ref_clip_loss(u, v, tau)) < 1e-5
    # perfectly aligned, well-separated pairs give a loss near 0; the loss is symmetric in its arguments
    e = torch.eye(6, 8)
    assert cxrclip.clip_loss(e, e, torch.tensor(100.0)).item() < 1e-3
    assert abs(cxrclip.clip_loss(v, u, torch.tensor(1 / tau)).item() - got) < 1e-6


def test_mvs_icl_tcl_composition():
    u1, u2, v1, v2 = (_unit(5, 8, s) for s in range(4))
    tau = 0.1
    s = torch.tensor(1 / tau)
    mvs = (_ref_clip_loss(u1, v1, tau) + _ref_clip_loss(u2, v1, tau) + _ref_clip_loss(u1, v2, tau)
           + _ref_clip_loss(u2, v2, tau)) / 4  # Eq. (2)
    icl, tcl = _ref_clip_loss(v1, v2, tau), _ref_clip_loss(u1, u2, tau)
    total, parts = cxrclip.cxrclip_loss(u1, u2, v1, v2, s, lambda_icl=1.0, lambda_tcl=0.5)
    assert abs(parts["mvs"].item() - mvs) < 1e-5
    assert abs(parts["icl"].item() - icl) < 1e-5 and abs(parts["tcl"].item() - tcl) < 1e-5
    assert abs(total.item() - (mvs + 1.0 * icl + 0.5 * tcl)) < 1e-5
    total2, _ = cxrclip.cxrclip_loss(u1, u2, v1, v2, s, lambda_icl=0.0, lambda_tcl=0.0)
    assert abs(total2.item() - mvs) < 1e-5


def test_prompts_handle_negative_class_names():
    pos, neg = cxrclip.zeroshot_prompts("No Finding")
    assert not any("no no" in p.lower() or "no finding" in p.lower() for p in pos + neg)
    pos, neg = cxrclip.zeroshot_prompts("Pleural Effusion")
    assert any("pleural effusion" in p.lower() for p in pos) and all(p.lower().startswith(("no", "there is no")) for p in neg)
    rng = np.random.default_rng(0)
    lab = np.array([1, 0, -1, np.nan, 0], np.float32)
    names = ["Edema", "Nodule", "Fracture", "Mass", "Cardiomegaly"]
    t = cxrclip.label_prompt_text(names, lab, rng, n_neg=1)
    assert "edema" in t.lower() and "fracture" in t.lower() and "mass" not in t.lower()


def test_sentence_shuffle_really_shuffles():
    rng = np.random.default_rng(0)
    t = "A b. C d. E f."
    for _ in range(5):
        s = cxrclip.sentence_shuffle(t, rng)
        assert s != t and set(x.strip(". ") for x in s.split(".")) == {"A b", "C d", "E f", ""}


def test_study_sampling_two_views_and_texts(phantom_csv):
    cfg = cxrclip.Config(image_size=32)
    tr = common.XrayCSV(phantom_csv, split="train")
    ds = cxrclip.StudyDataset(tr, cfg, train=True)
    item = ds[(0, 123)]
    assert item["x1"].shape == (3, 32, 32) and item["x2"].shape == (3, 32, 32)
    assert not torch.equal(item["x1"], item["x2"])
    again = ds[(0, 123)]
    assert torch.equal(item["x1"], again["x1"]) and item["t1"] == again["t1"]  # a function of (index, seed)
    # t^1 is one of the study's report sections; t^2 is the other one or a sentence-shuffled copy (same sentences)
    secs = tr.texts(tr.studies[0][0])
    assert item["t1"] in secs
    sents = lambda s: sorted(x.strip() for x in s.split(".") if x.strip())  # noqa: E731
    assert any(sents(item["t2"]) == sents(s) for s in secs)
    # distinct views: the two images come from two different rows with different views
    chosen = []
    orig = common.load_image
    try:
        common.load_image = lambda p: (chosen.append(p), orig(p))[1]
        ds[(0, 7)]
    finally:
        common.load_image = orig
    views = {tr.rows[i]["_path"]: tr.rows[i]["view"] for i in tr.studies[0]}
    assert len(chosen) == 2 and views[chosen[0]] != views[chosen[1]]


def test_bad_image_is_replaced_and_counted(phantom_csv, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(os.path.dirname(phantom_csv), d)
    tr = common.XrayCSV(d / "phantoms.csv", split="train")
    victim = tr.rows[tr.studies[0][0]]["_path"]
    with open(victim, "wb") as f:
        f.write(b"\x89PNG truncated")
    ds = cxrclip.StudyDataset(tr, cxrclip.Config(image_size=32), train=True)
    item = ds[(0, 1)]
    assert item["bad"] and item["bad"][0][0] == "unreadable image" and "S0" in item["bad"][0][1]
    assert item["x1"].shape == (3, 32, 32)


def test_label_only_studies_become_prompts(phantom_csv):
    cfg = cxrclip.Config(image_size=32, text_source="labels")
    tr = common.XrayCSV(phantom_csv, split="train")
    item = cxrclip.StudyDataset(tr, cfg)[(3, 5)]
    assert item["t1"] != tr.texts(tr.studies[3][0])[0]
    vocab = set(" ".join(cxrclip.all_prompt_texts(tr.label_names)).lower().replace(".", " ").split())
    assert set(item["t1"].lower().replace(".", " ").split()) <= vocab


# ---- DDP: 2 gloo processes x B/2 == 1 process x B (loss and every gradient) ----

def _ddp_worker(rank, world, init_file, out_dir, csv_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _one_step(rank, world, out_dir, csv_path, ddp=True)
    dist.destroy_process_group()


def _one_step(rank, world, out_dir, csv_path, ddp):
    torch.manual_seed(0)
    cfg = cxrclip.Config(image_size=32, tiny_width=32, embed_dim=32, vocab_size=300)
    tr = common.XrayCSV(csv_path, split="train")
    model = cxrclip.build(cfg, None, tr).double()
    ds = cxrclip.StudyDataset(tr, cfg, train=True)
    items = [ds[(i, i)] for i in range(8)]
    b = 8 // world
    mine = cxrclip.Collate(model.tokenize)(items[rank * b:(rank + 1) * b])
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    v, u1, u2 = net(torch.cat([mine["x1"], mine["x2"]]).double(), mine["t1"], mine["t2"])
    loss, _ = cxrclip.cxrclip_loss(u1, u2, v[:b], v[b:], model.scale(), 1.0, 0.5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/ddp{rank}_{world}.pt")


def test_two_process_ddp_equals_one_process(tmp_path, phantom_csv):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), phantom_csv), nprocs=2)
    _one_step(0, 1, str(tmp_path), phantom_csv, ddp=False)
    one = torch.load(tmp_path / "ddp0_1.pt")
    r0, r1 = torch.load(tmp_path / "ddp0_2.pt"), torch.load(tmp_path / "ddp1_2.pt")
    assert abs(((r0["loss"] + r1["loss"]) / 2 - one["loss"]).item()) < 1e-5
    assert set(one["grads"]) == set(r0["grads"])
    for n, g in one["grads"].items():
        assert torch.allclose(r0["grads"][n], g, atol=1e-5, rtol=1e-4), n  # DDP averaged: same on both ranks
        assert torch.allclose(r1["grads"][n], g, atol=1e-5, rtol=1e-4), n


# ---- training: loss falls, exact resume, fail-fast paper preset ----

def _run(args, tmp_path):
    return cxrclip.main(args)


def _weights(path):
    return common.load_checkpoint(path)["model"]


def test_end_to_end_loss_falls(tmp_path, phantom_csv):
    out = tmp_path / "run"
    m = cxrclip.main([f"--data={phantom_csv}", f"--out_dir={out}", "--epochs=12", "--batch_size=16",
                      "--lr=2e-3", *TINY])
    rows = [json.loads(l) for l in open(out / "log.jsonl") if '"loss"' in l]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.3, (first, last)
    assert 0.0 <= m["zeroshot_auc_macro"] <= 1.0
    assert json.load(open(out / "metrics.json"))["zeroshot_auc_macro"] == m["zeroshot_auc_macro"]
    # the checkpoint alone rebuilds the model (config + tokenizer vocabulary are inside)
    model, cfg = cxrclip.load(str(out / "ckpt.pt"))
    assert cfg.image_size == 32 and model.encode_text(["no edema"]).shape == (1, 32)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, phantom_csv):
    common_args = [f"--data={phantom_csv}", "--epochs=3", "--batch_size=16", "--lr=1e-3", "--ckpt_every=2", *TINY]
    a, b = tmp_path / "a", tmp_path / "b"
    cxrclip.main([*common_args, f"--out_dir={a}"])
    r = cxrclip.main([*common_args, f"--out_dir={b}", "--max_steps=5"])  # stops mid-epoch
    assert r["stopped"] and r["step"] == 5
    with pytest.raises(SystemExit):  # a new run must not clobber it
        cxrclip.main([*common_args, f"--out_dir={b}"])
    cxrclip.main([*common_args, f"--out_dir={b}", "--resume"])
    wa, wb = _weights(a / "ckpt.pt"), _weights(b / "ckpt.pt")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in open(p)]  # noqa: E731
    assert strip(a / "log.jsonl") == strip(b / "log.jsonl")


def test_paper_preset_offline_fails_fast_with_a_clear_message(tmp_path, phantom_csv):
    t0 = time.time()
    p = subprocess.run([sys.executable, "cxrclip.py", "--preset=paper", f"--data={phantom_csv}", "--image_encoder=tiny",
                        f"--out_dir={tmp_path}", "--num_workers=0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0
    assert "emilyalsentzer/Bio_ClinicalBERT" in p.stderr and "--pretrained=false" in p.stderr
    assert time.time() - t0 < 60


def test_torchrun_two_processes(tmp_path, phantom_csv):
    out = tmp_path / "ddp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                        "cxrclip.py", f"--data={phantom_csv}", f"--out_dir={out}", "--epochs=2", "--batch_size=16",
                        *TINY], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout and (out / "metrics.json").exists()
