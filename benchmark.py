"""
benchmark.py: the speed of each paper's training step, measured from outside the paper files.

    python benchmark.py cxrclip --preset=paper                      # samples/s, step time, memory, FLOPs, MFU
    python benchmark.py dmlm --preset=paper --batch_size=4 --device=cpu
    torchrun --nproc_per_node=8 benchmark.py pedclip --preset=paper  # --batch_size is global, as in training
    python benchmark.py pedclip --preset=paper --vit_only           # PedCLIP's ViT step alone, dense vs MoBE

The paper's model from random weights (nothing is downloaded) at the preset's per-process batch, on random
tensors: no data, no data loading. Every flag is the paper file's own (its Config and presets). A step is
train()'s without gradient clipping: forward under the same autocast, the paper's loss, backward, AdamW.
FLOPs are counted by torch's FlopCounterMode on the eager model; MFU is against the GPU's dense bf16 peak.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import importlib
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def count_flops(fn) -> int:
    """FLOPs of one call of fn() (forward and backward, when fn does both)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def run(step, samples_per_step: int, device: str, steps: int = 10, flops_per_step: int = 0,
        label: str = "") -> dict:
    """Time step() `steps` times after 3 warm-up calls; print and return the figures."""
    cuda, times = device.startswith("cuda"), []
    for i in range(3 + steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize() if cuda else None
        times += [time.perf_counter() - t0] if i >= 3 else []
    t, name = float(np.mean(times)), torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in name), None)
    # peak memory: the GPU's allocations, or the CPU process's largest resident set (Linux gives KiB)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(0).ru_maxrss / 2**20
    res = {"label": label, "device": name, "samples_per_s": samples_per_step / t, "step_ms": 1e3 * t,
           "step_ms_p90": 1e3 * float(np.percentile(times, 90)), "peak_mem_gib": mem,
           "gflops_per_sample": flops_per_step / samples_per_step / 1e9,
           "tflops_per_s": flops_per_step / t / 1e12, "mfu": flops_per_step / t / peak if peak else None}
    common.print0(f"benchmark {label} on {name}: {res['samples_per_s']:.1f} samples/s | step "
                  f"{res['step_ms']:.1f} ms (p90 {res['step_ms_p90']:.1f}) | peak memory {mem:.2f} GiB | "
                  f"{res['gflops_per_sample']:.4g} GFLOP/sample, {res['tflops_per_s']:.4g} TFLOP/s"
                  + (f", MFU {res['mfu']:.1%}" if peak else ""))
    return res


def optimiser_step(loss, scaler, opt):
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def wrap(model, cfg, world: int):  # as train() wraps it
    net = torch.compile(model) if cfg.compile else model
    return nn.parallel.DistributedDataParallel(net) if world > 1 else net


def pedclip(m, cfg, vit_only: bool = False) -> dict:
    """The plain ViT, MoBE teacher-forced and MoBE soft (Eq. 2 runs every expert), and their ratios: the whole
    step, the ViT step alone (phi_v's forward and backward: no BERT, no optimiser) and AdamW's step alone.
    vit_only (--vit_only): the ViT step alone, dense and teacher-forced."""
    rank, world, device, ctx, scaler = m.setup(cfg)
    b, out = cfg.batch_size // world, {}
    tok = common.tokenizer_from_vocab(SPECIALS + [str(i) for i in range(995)])
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size, device=device)
    ids = torch.randint(5, 1000, (b, cfg.max_tokens), device=device)
    xb = torch.randint(0, len(m.body_part_list(cfg)), (b,), device=device)
    phases = (("dense", "none", False), ("teacher", cfg.moe_layers, True), ("soft", cfg.moe_layers, False))
    for phase, moe_layers, teacher in phases[:2] if vit_only else phases:
        model = opt = vit_step = step = v = t = gl = None  # free the last phase's model, optimiser, gradients
        gc.collect()
        torch.manual_seed(0)
        model = m.build(dataclasses.replace(cfg, moe_layers=moe_layers, pretrained=False), tok).to(device)
        opt = torch.optim.AdamW(m.param_groups(model, 0.1), lr=1e-5, fused=device != "cpu")

        def vit_step(model=model, teacher=teacher):  # phi_v alone: [IMG] and the gate's l_G, backward
            with ctx:
                tokens, gl = model.encode(x, xb if teacher else None)
            (tokens[:, 0].float().square().mean() + m.gate_loss(gl, xb)).backward()
            model.zero_grad(set_to_none=True)

        if phase != "soft":
            flops = count_flops(vit_step)
            label = f"pedclip {cfg.preset} ViT step {phase}"
            out[f"vit_{phase}"] = run(vit_step, b, device, 10, flops, label)
        if vit_only:
            continue

        def step(net=wrap(model, cfg, world), model=model, opt=opt, teacher=teacher):
            with ctx:
                v, t, gl = net(x, ids, torch.ones_like(ids), expert_index=xb if teacher else None)
            l_v2t, l_t2v = m.infonce_losses(v.float(), t.float(), model.logit_scale.exp())
            optimiser_step(m.total_loss(l_v2t, l_t2v, m.gate_loss(gl, xb), 1.0), scaler, opt)
        flops = count_flops(lambda: step(net=model))  # on the eager model, this process's share
        out[phase] = run(step, b, device, 10, flops, f"pedclip {cfg.preset} {phase}")
        if phase != "soft":  # AdamW alone, over every parameter (one more step's gradients stay in place)
            with ctx:
                v, t, gl = model(x, ids, torch.ones_like(ids), expert_index=xb if teacher else None)
            l_v2t, l_t2v = m.infonce_losses(v.float(), t.float(), model.logit_scale.exp())
            m.total_loss(l_v2t, l_t2v, m.gate_loss(gl, xb), 1.0).backward()
            n = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
            label = f"pedclip {cfg.preset} AdamW {phase} ({n})"
            out[f"adamw_{phase}"] = run(opt.step, b, device, 10, 0, label)
    out["vit_teacher_vs_dense_time"] = out["vit_teacher"]["step_ms"] / out["vit_dense"]["step_ms"]
    common.print0(f"ViT step alone, teacher-forced / dense time {out['vit_teacher_vs_dense_time']:.2f}")
    if not vit_only:
        out["teacher_vs_dense_time"] = out["teacher"]["step_ms"] / out["dense"]["step_ms"]
        out["soft_vs_dense_flop_rate"] = out["soft"]["tflops_per_s"] / out["dense"]["tflops_per_s"]
        extra = {k: out[f"{k}teacher"]["step_ms"] - out[f"{k}dense"]["step_ms"]
                 for k in ("", "vit_", "adamw_")}
        common.print0(f"whole step, teacher-forced / dense time {out['teacher_vs_dense_time']:.2f}; "
                      f"soft / dense achieved FLOP/s {out['soft_vs_dense_flop_rate']:.2f}; of the "
                      f"{extra['']:.0f} ms that MoBE adds to the step, {extra['vit_']:.0f} ms are the ViT's "
                      f"and {extra['adamw_']:.0f} ms AdamW's")
    return out


def cxrclip(m, cfg) -> dict:
    """Two images and two texts per study through both encoders, L = MVS + ICL + TCL."""
    rank, world, device, ctx, scaler = m.setup(cfg)
    b, n = cfg.batch_size // world, cfg.vocab_size if cfg.text_encoder == "tiny" else 28996  # ClinicalBERT's
    tok = common.tokenizer_from_vocab(SPECIALS + [f"w{i}" for i in range(n - 5)])
    model = m.build(dataclasses.replace(cfg, pretrained=False), tok).to(device)
    opt = torch.optim.AdamW(m.param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device != "cpu")
    x = torch.randn(2 * b, 3, cfg.image_size, cfg.image_size, device=device)
    t1, t2 = ({"input_ids": torch.randint(5, n, (b, cfg.max_tokens), device=device),
               "attention_mask": torch.ones(b, cfg.max_tokens, dtype=torch.long, device=device)}
              for _ in range(2))

    def step(net=wrap(model, cfg, world)):
        with ctx:
            v1, v2, u1, u2 = (e.float() for e in net(x, t1, t2))
        loss = m.cxrclip_loss(v1, v2, u1, u2, model.logit_scale.exp(), cfg.lambda_icl, cfg.lambda_tcl)[0]
        optimiser_step(loss, scaler, opt)
    flops = count_flops(lambda: step(net=model))
    return run(step, 2 * b, device, 10, flops, f"cxrclip {cfg.preset} {cfg.image_encoder} + "
               f"{cfg.text_encoder.split('/')[-1]}, {cfg.image_size} px, {2 * b} pairs")


def cxrcml(m, cfg) -> dict:
    """L_c alone (CheXzero + meta-labels, the baseline of Table 4), then L_c + L_m with a fitted mixture; a
    fit of the mixture to a full bank; and their step-time ratio, the fit amortised."""
    rank, world, device, ctx, scaler = m.setup(cfg)
    b, out, n = cfg.batch_size // world, {}, 49408 if cfg.clip == "ViT-B/32" else m.VOCAB_SIZE  # CLIP's
    tok = common.tokenizer_from_vocab(SPECIALS + [str(i) for i in range(n - 5)])
    model = m.build(dataclasses.replace(cfg, init="random"), tok).to(device)
    opt = torch.optim.AdamW(m.param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device != "cpu")
    x, ids = torch.randn(b, 3, cfg.image_size, cfg.image_size, device=device), torch.randint(5, n, (b, 24))
    ids[:, -1] = tok.sep_token_id  # the end-of-text token CLIP pools at
    ids, dim = ids.to(device), model.clip.config.projection_dim
    bank = F.normalize(torch.randn(cfg.bank_size, dim, device=device), dim=-1)
    mixture = m.StudentTMixture(cfg.n_clusters, cfg.dof, cfg.em_iters, cfg.n_init)
    m.refit(mixture, bank, 0, cfg)
    net = wrap(model, cfg, world)
    for phase in ("clip", "cml"):
        def step(net=net, cml=phase == "cml"):
            with ctx:
                v, u = net(x, ids, torch.ones_like(ids))
            v, u = v.float(), u.float()
            v_all, scale = common.all_gather_with_grad(v), model.logit_scale.exp()
            if cml:  # Eq. (4): L_c + L_m, as cxrcml.train computes it
                loss = sum(m.cml_loss(v, u, v_all, scale, mixture, cfg.margin))
            else:
                loss = m.clip_loss(u, v, common.all_gather_with_grad(u), v_all, scale)
            optimiser_step(loss, scaler, opt)
        flops = count_flops(lambda: step(net=model))
        out[phase] = run(step, b, device, 10, flops, f"cxrcml {cfg.preset} {phase}")

    def fit():
        return m.refit(mixture, bank, 1, cfg)
    label = f"cxrcml mixture fit, K={cfg.n_clusters}"
    out["refit"] = run(fit, cfg.bank_size, device, 3, count_flops(fit), label)
    out["cml_vs_clip"] = (out["cml"]["step_ms"] + out["refit"]["step_ms"] / cfg.refit_every) / \
        out["clip"]["step_ms"]
    common.print0(f"CXR-CML / CLIP step time, refit every {cfg.refit_every} steps: {out['cml_vs_clip']:.3f} "
                  f"(Table 4 of the paper: 1.24, with a GMM fitted to each batch)")
    return out


def dmlm(m, cfg) -> dict:
    """Both encoders unmasked and masked, the two fusion passes of Eq. (2), Eq. (3)-(5) and AdamW."""
    rank, world, device, ctx, scaler = m.setup(cfg)
    cfg.pretrained, b, g = False, cfg.batch_size // world, torch.Generator().manual_seed(0)
    n_vocab = m.VOCAB_SIZE if cfg.text_encoder == "tiny" else 28996  # ClinicalBERT's (bert-base-cased)
    tok = common.tokenizer_from_vocab(SPECIALS + [f"w{i}" for i in range(n_vocab - 5)])
    model = m.build(cfg, tok, {}).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.target == "ema" else None
    n = (cfg.image_size // cfg.patch_size) ** 2
    ids = torch.randint(5, n_vocab, (b, cfg.max_tokens), generator=g)  # every report at --max_tokens
    text_mask = torch.rand(ids.shape, generator=g).argsort(1) < round(cfg.mask_ratio * cfg.max_tokens)
    patch_mask = torch.rand(b, n, generator=g).argsort(1) < round(cfg.mask_ratio * n)
    batch = (torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g), ids, torch.ones_like(ids),
             ids.masked_fill(text_mask, tok.mask_token_id), text_mask, patch_mask)
    x, ids, am, masked_ids, text_mask, patch_mask = (t.to(device) for t in batch)
    opt = torch.optim.AdamW(m.param_groups(model, cfg), lr=cfg.lr, fused=device != "cpu")
    net = torch.compile(model) if cfg.compile else model
    net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=cfg.align == "pairs") \
        if world > 1 else net

    def step(net=net):
        with ctx:
            out = net(x, ids, am, masked_ids, patch_mask, ema)
        l_dmlm = m.dmlm_loss(out["pred_text"], out["target_text"], text_mask, out["pred_image"],
                             out["target_image"], patch_mask)
        l_align = m.align_contrastive_loss(out["image"], out["text"], model.logit_scale.exp()) \
            if cfg.align == "contrastive" else m.align_pairs_loss(out["image"], out["text"])
        optimiser_step(m.total_loss(l_dmlm, l_align, cfg.lam), scaler, opt)
        m.ema_update(ema, model) if ema is not None else None
    flops = count_flops(lambda: step(net=model))
    return run(step, b, device, 10, flops, f"dmlm {cfg.preset} target={cfg.target}")


PAPERS = {"pedclip": pedclip, "cxrclip": cxrclip, "cxrcml": cxrcml, "dmlm": dmlm}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip() + f"\n\nusage: benchmark.py {{{' | '.join(PAPERS)}}} [--key=value ...]; "
              f"`python benchmark.py <paper> --help` lists the paper file's flags")
        return {}
    if not argv or argv[0] not in PAPERS:
        raise common.UserError(f"usage: benchmark.py {{{' | '.join(PAPERS)}}} [--key=value ...] (the paper "
                               f"file's flags; got {' '.join(argv[:1]) or 'no paper'})")
    m, vit_only = importlib.import_module(argv[0]), "--vit_only" in argv
    if vit_only and argv[0] != "pedclip":
        raise common.UserError("--vit_only times PedCLIP's ViT step alone: benchmark.py pedclip --vit_only")
    cfg = common.parse_config(m.Config, m.PRESETS, [a for a in argv[1:] if a != "--vit_only"])
    out = pedclip(m, cfg, vit_only) if vit_only else PAPERS[argv[0]](m, cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    common.cli(main)
