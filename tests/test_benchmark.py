"""--benchmark in every paper file (tiny sizes, a few steps, every field printed); --compile gives the eager loss."""
import importlib
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

PAPERS = ["cxrclip", "pedclip", "cxrcml", "dmlm"]
FIELDS = ["samples/s", "step", "p50", "p90", "peak memory", "GFLOP/sample", "TFLOP/s", "MFU"]


@pytest.mark.parametrize("paper", PAPERS)
def test_benchmark_mode_prints_every_field(paper):
    if not (ROOT / f"{paper}.py").exists():
        pytest.skip(f"{paper}.py not in this checkout")
    p = subprocess.run([sys.executable, f"{paper}.py", "--benchmark", "--benchmark_steps=2", "--batch_size=8",
                        "--image_size=32", "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("benchmark")]
    assert line, p.stdout[-2000:]
    for f in FIELDS:
        assert f in "\n".join(line), (f, line)


def test_benchmark_flops_match_an_independent_count():
    """FlopCounterMode's count of one tiny-CNN forward equals the conv/linear MACs counted by hand, x2."""
    import common
    import cxrclip

    m = cxrclip.TinyCNN(32)
    x = torch.randn(2, 3, 32, 32)
    macs, h = 0, 32
    for mod in m.body:
        if isinstance(mod, torch.nn.Conv2d):
            h = (h + 2 * mod.padding[0] - mod.kernel_size[0]) // mod.stride[0] + 1
            macs += h * h * mod.out_channels * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
    assert common.count_flops(lambda: m.tokens(x)) == 2 * 2 * macs


@pytest.mark.slow
def test_compile_gives_the_eager_loss(phantom_csv):
    """torch.compile (inductor on CPU) vs eager on one fixed batch: same loss to 1e-4 (float32 re-association)."""
    import common
    import cxrclip

    torch.manual_seed(0)
    cfg = cxrclip.Config(image_size=32, tiny_width=32, embed_dim=32, vocab_size=300)
    tr = common.XrayCSV(phantom_csv, split="train")
    model = cxrclip.build(cfg, None, tr).eval()
    ds = cxrclip.StudyDataset(tr, cfg, train=False)
    batch = cxrclip.Collate(model.tokenize)([ds[(i, i)] for i in range(8)])

    def loss_of(m):
        v, u1, u2 = m(torch.cat([batch["x1"], batch["x2"]]), batch["t1"], batch["t2"])
        return cxrclip.cxrclip_loss(u1, u2, v[:8], v[8:], model.scale(), 1.0, 0.5)[0].item()

    eager = loss_of(model)
    compiled = loss_of(torch.compile(model))
    assert abs(eager - compiled) < 1e-4, (eager, compiled)


# --compile for the other three files: eager and torch.compile (inductor on CPU) give the same training loss on one
# fixed batch of synthetic tensors, to 1e-4 (float32 sums re-associated by the fused kernels). Each uses the file's
# own objective: a change in how the compiled graph runs a layer would show here.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]


def _eager_and_compiled(model, loss_of):
    model.eval()  # no dropout; the same weights go through both
    eager = loss_of(model)
    compiled = loss_of(torch.compile(model))
    return eager, compiled


@pytest.mark.slow
def test_compile_gives_the_eager_loss_pedclip():
    import common
    import pedclip

    torch.manual_seed(0)
    model = pedclip.build(pedclip.Config(image_size=32, stem="conv"), common.tokenizer_from_vocab(VOCAB))
    g = torch.Generator().manual_seed(1)
    x, ids = torch.randn(8, 3, 32, 32, generator=g), torch.randint(5, 64, (8, 16), generator=g)
    xb = torch.arange(8) % len(model.body_parts)
    for teacher in (True, False):  # both phases: routed experts, and the dense soft mixture of Eq. (2)
        def loss_of(m):
            v, t, gl = m(x, ids, torch.ones_like(ids), xb if teacher else None)
            return pedclip.total_loss(*pedclip.infonce_losses(v, t, model.logit_scale), pedclip.gate_loss(gl, xb),
                                      1.0).item()
        eager, compiled = _eager_and_compiled(model, loss_of)
        assert abs(eager - compiled) < 1e-4, (teacher, eager, compiled)


@pytest.mark.slow
def test_compile_gives_the_eager_loss_cxrcml():
    import common
    import cxrcml

    torch.manual_seed(0)
    model = cxrcml.build(cxrcml.Config(image_size=32, stem="conv"), common.tokenizer_from_vocab(VOCAB))
    g = torch.Generator().manual_seed(1)
    x, ids = torch.randn(8, 3, 32, 32, generator=g), torch.randint(5, 63, (8, 12), generator=g)
    ids[:, -1] = 3  # CLIP pools at the end-of-text token ([SEP] here)
    t = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pseudo = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # cluster pseudo-labels for the triplet term

    def loss_of(m):
        v, u = m(x, t)
        l_c = cxrcml.clip_loss(u, v, model.scale())
        return cxrcml.cxrcml_loss(l_c, cxrcml.triplet_loss(v, pseudo, 0.2)[0]).item()

    eager, compiled = _eager_and_compiled(model, loss_of)
    assert abs(eager - compiled) < 1e-4, (eager, compiled)


@pytest.mark.slow
def test_compile_gives_the_eager_loss_dmlm():
    import numpy as np

    import common
    import dmlm

    torch.manual_seed(0)
    cfg = dmlm.Config(**{**dmlm.PRESETS["demo"], "image_size": 32, "stem": "hmlp", "max_tokens": 16})
    tok = common.tokenizer_from_vocab(VOCAB)
    model = dmlm.build(cfg, tok, None, {})
    g = torch.Generator().manual_seed(1)
    x, ids = torch.randn(8, 3, 32, 32, generator=g), torch.randint(5, 64, (8, 16), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    am = torch.ones_like(ids)
    tmask = dmlm.text_token_mask(ids, am, [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id], 0.3,
                                 [np.random.default_rng(i) for i in range(8)])
    rng = np.random.default_rng(0)
    pmask = torch.from_numpy(np.stack([dmlm.image_patch_mask("", 4, 0.3, "random", 0.0, rng) for _ in range(8)]))
    mids = ids.masked_fill(tmask, tok.mask_token_id)

    def loss_of(m):
        out = m(x, ids, am, mids, pmask)
        targets = ((out["img_mu"].detach(), out["img_var"].detach()), (out["txt_mu"].detach(), out["txt_var"].detach()))
        return dmlm.dmlm_objective(out, targets, tmask, pmask, cfg, model.scale())[0].item()

    eager, compiled = _eager_and_compiled(model, loss_of)
    assert abs(eager - compiled) < 1e-4, (eager, compiled)


@pytest.mark.parametrize("paper", PAPERS)
def test_benchmark_data_times_the_input_pipeline_per_worker_count(paper, phantom_csv, capsys):
    mod = importlib.import_module(paper)
    res = mod.main([f"--data={phantom_csv}", "--benchmark=data", "--benchmark_workers=0,1", "--batch_size=16",
                    "--image_size=32", "--device=cpu"])
    rows = res["data"]
    assert [r["workers"] for r in rows] == [0, 1] and all(r["images_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "data pipeline: 0 workers ->" in out and "data pipeline: 1 workers ->" in out
    with pytest.raises(SystemExit, match="--benchmark_workers=two"):
        mod.main([f"--data={phantom_csv}", "--benchmark=data", "--benchmark_workers=two", "--device=cpu"])


def test_benchmark_data_csv_picks_the_data_set(monkeypatch, tmp_path):
    """--data given: used as is; the demo default: its 64 px phantoms; none (paper presets): 512 px phantoms."""
    import common

    made = []
    monkeypatch.setattr(common, "ensure_phantoms", lambda p, n, seed, size: made.append((str(p), n, size)) or p)
    demo = str(tmp_path / "phantoms" / "phantoms.csv")
    assert common.benchmark_data_csv("mine.csv", demo, 3000) == "mine.csv" and made == []
    assert common.benchmark_data_csv(demo, demo, 3000) == demo and made == [(demo, 3000, 64)]
    p512 = str(tmp_path / "phantoms_512" / "phantoms.csv")
    assert common.benchmark_data_csv("", demo, 3000) == p512 and made[-1] == (p512, 1000, 512)
