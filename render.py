"""render.py: how evaluate.py shows its results: the printed block of each task, the markdown table of
the checkpoints side by side, and the figures beside it (matplotlib, headless, one PNG each, named in the
markdown): ROC curves per label with the checkpoints overlaid, the metrics with their 95% CIs, PedCLIP's
gate (body part -> expert) and D-MLM's sigma^2 of an image and its report. The plots are functions of
arrays."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import common


# ---- the printed blocks and the markdown table ----


def fmt(v, ci=None, p=None, digits: int = 4) -> str:
    """0.8123 (0.7901-0.8345), p=0.002; MAE-sized numbers with 2 decimals."""
    if v is None:
        return "undefined"
    d = digits if abs(v) < 10 else 2
    s = f"{v:.{d}f}" + (f" ({ci[0]:.{d}f}-{ci[1]:.{d}f})" if ci else "")
    return s + (f", p={p:.3f}" if p is not None else "")


def result_block(r: dict) -> str:
    """A task's result, printed: its metrics with CIs, per label where there are labels, and how."""
    lines = [f"== {r['task']} | {r['paper']} {r['ckpt']} | {r['data']} split {r['split']}: {r['n_images']} "
             f"images, views {r['views']} | labels: {r['labels']}"]
    for k, v in r["metrics"].items():
        std = r.get("seed_std", {}).get(k)
        lines.append(f"  {k:<16} {fmt(v, r['ci'].get(k))}"
                     + (f"   std over seeds {std:.4f}" if std is not None else ""))
    for n, d in r.get("per_label", {}).items():
        lines.append(f"    {n[:28]:<28} AUC {fmt(d['auc'])}  F1 {fmt(d['f1'])}  ACC {fmt(d['acc'])}  "
                     f"(threshold {d['threshold']:.3f}; {d['n_pos']} pos / {d['n_neg']} neg)")
    lines += [f"  95% CIs: {r['bootstrap']} resamples of the patients within label strata, "
              f"{r['bootstrap_skipped']} skipped (a label with one class in them)"] if r["ci"] else []
    lines += [f"  chosen on the valid split: {r['chosen']}"] if r.get("chosen") else []
    return "\n".join(lines + [f"  note: {r['note']}"])


def heads_of(results: dict) -> list[str]:
    """A column name per checkpoint: its paper, or its path when two share a paper."""
    papers = [next(iter(r.values()))["paper"] for r in results.values()]
    return papers if len(set(papers)) == len(papers) else list(results)


def markdown_table(results: dict, cfg, pngs=()) -> str:
    """One row per (task, metric), one column per checkpoint: value (95% CI), p against the first column;
    then the figures."""
    ckpts, heads = list(results), heads_of(results)
    policy = next((r["labels"] for r in results[ckpts[0]].values() if r["labels"] != "not used"), None)
    lines = [f"{cfg.data}, split {cfg.split}" + (f"; labels: {policy}" if policy else "")
             + f"; 95% CIs: {cfg.bootstrap} bootstrap resamples of the patients"
             + (f"; p: paired bootstrap against {heads[0]}" if len(ckpts) > 1 else "") + ".", "",
             "| task (views) | metric | " + " | ".join(heads) + " |", "| --- | --- |" + " --- |" * len(ckpts)]
    for task, r in results[ckpts[0]].items():
        for k in r["metrics"]:
            cells = [fmt(results[c][task]["metrics"].get(k), results[c][task]["ci"].get(k),
                         results[c][task].get("p_vs_first", {}).get(k), 3) for c in ckpts]
            lines.append(f"| {task} ({r['views']}) | {k} | " + " | ".join(cells) + " |")
    if heads != ckpts:
        lines += ["", "Checkpoints: " + ", ".join(f"{h} = {c}" for h, c in zip(heads, ckpts)) + "."]
    return "\n".join(lines + [""] + [f for f in pngs if f]) + "\n"


# ---- figures ----


def figure(path, draw, size, grid=(1, 1)):
    """A matplotlib figure of `grid` panels, size (w, h) inches, drawn by draw(fig, axes), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, figsize=size, squeeze=False)
    draw(fig, axes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roc_figure(path, curves: dict[str, list[tuple[str, np.ndarray, np.ndarray]]]):
    """curves {label: [(checkpoint, y [n] 1 / 0 / nan, score [n])]} -> a ROC panel per label, the checkpoints
    overlaid (scikit-learn's roc_curve)."""
    from sklearn.metrics import roc_curve

    cols = min(5, len(curves))
    rows = -(-len(curves) // cols)

    def draw(fig, axes):
        for ax, (label, runs) in zip(axes.flat, curves.items()):
            for name, y, s in runs:
                m = np.isin(y, (0, 1))
                if 0 < y[m].sum() < m.sum():
                    ax.plot(*roc_curve(y[m], s[m])[:2], lw=1.2, label=name)
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
            ax.set(xlim=(0, 1), ylim=(0, 1), title=label[:28])
        for ax in list(axes.flat)[len(curves):]:
            ax.axis("off")
        axes[0, 0].legend(fontsize=7, loc="lower right")
        fig.supxlabel("false positive rate")
        fig.supylabel("true positive rate")
    figure(path, draw, (3 * cols, 3 * rows), (rows, cols))


def comparison_figure(path, rows: list[tuple[str, list[tuple[str, float | None, list | None]]]]):
    """rows [(task metric, [(checkpoint, value, [lo, hi] or None)])] -> a line per metric, each checkpoint a
    point with its 95% CI."""
    names = list(dict.fromkeys(n for _, cells in rows for n, _, _ in cells))

    def draw(fig, axes):
        ax = axes[0, 0]
        for k, name in enumerate(names):
            pts = [(i + (k - (len(names) - 1) / 2) * 0.8 / len(names), v, ci or (v, v))
                   for i, (_, cells) in enumerate(rows) for n, v, ci in cells if n == name and v is not None]
            if pts:
                y, v, ci = (np.array(a, dtype=np.float64) for a in zip(*pts))
                ax.errorbar(v, y, xerr=np.abs(ci.T - v), fmt="o", ms=4, capsize=2, label=name)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", color="0.9")
        ax.legend(fontsize=8)
        ax.set_xlabel("value (95% CI)")
    figure(path, draw, (7, 0.3 * len(rows) * len(names) ** 0.5 + 1.2))


def gate_figure(path, counts: np.ndarray, parts: list[str], experts: list[str], layers: list[int]):
    """counts [MoBE layers, body parts, experts]: how often each expert has the largest gate weight, per body
    part (PedCLIP's gate) -> a row-normalised heat map per layer."""
    def draw(fig, axes):
        for ax, c, layer in zip(axes[0], counts, layers):
            ax.imshow(c / np.maximum(c.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(experts)), experts, rotation=90, fontsize=7)
            ax.set_yticks(range(len(parts)), parts, fontsize=8)
            ax.set(xlabel="expert of the largest gate weight", ylabel="body part",
                   title=f"MoBE, layer {layer}")
    figure(path, draw, (0.3 * len(experts) * len(counts) + 2, 0.3 * len(parts) + 2), (1, len(counts)))


def sigma_figure(path, image: np.ndarray, patch_var: np.ndarray, tokens: list[str], token_var: np.ndarray):
    """D-MLM's uncertainty: an image [H, W], its per-patch sigma^2 [g, g] and its report's tokens coloured by
    their sigma^2 (each the mean over D)."""
    def draw(fig, axes):
        import matplotlib.pyplot as plt

        (a, b, t), v = axes[0], np.asarray(token_var, dtype=np.float64)
        a.imshow(image, cmap="gray")
        fig.colorbar(b.imshow(patch_var, cmap="magma"), ax=b, fraction=0.046)
        for ax, title in zip(axes[0], ("image", "patch sigma^2", "report tokens by sigma^2")):
            ax.set_title(title)
            ax.axis("off")
        norm, x, y = plt.Normalize(v.min(), max(v.max(), v.min() + 1e-12)), 0.0, 0.95
        for tok, var in zip(tokens, v):
            x, y = (0.0, y - 0.07) if x + 0.018 * (len(tok) + 1) > 1 else (x, y)
            t.text(x, y, tok, fontsize=8, va="top", transform=t.transAxes,
                   bbox=dict(facecolor=plt.cm.magma(norm(var)), alpha=0.5, lw=0, pad=1))
            x += 0.018 * (len(tok) + 1)
    figure(path, draw, (10, 4), (1, 3))


def figures(results: dict, stem: Path) -> list[str]:
    """evaluate.py's results {checkpoint: {task: result}} -> the zero-shot ROC curves (every checkpoint
    overlaid) and the metrics on the [0, 1] scale with their CIs, as PNGs beside the markdown at `stem` -> the
    markdown lines naming them."""
    heads, curves, out, first = heads_of(results), {}, [], next(iter(results.values()))
    for h, rt in zip(heads, results.values()):
        names, Y, S = rt["zeroshot"]["_roc"] if "zeroshot" in rt else ([], None, None)
        for j, n in enumerate(names):
            curves.setdefault(n, []).append((h, Y[:, j], S[:, j]))
    if curves:
        roc_figure(f"{stem}_roc.png", curves)
        out.append(f"![zero-shot ROC curves per label]({stem.name}_roc.png)")
    rows = [(f"{t} {k}", [(h, rt[t]["metrics"].get(k), rt[t]["ci"].get(k))
                          for h, rt in zip(heads, results.values())])
            for t, r in first.items() for k in r["metrics"]]
    rows = [r for r in rows if all(v is None or 0 <= v <= 1 for _, v, _ in r[1])]  # AUC, R@K, Dice: one axis
    if rows:
        comparison_figure(f"{stem}_compare.png", rows)
        out.append(f"![the metrics with their 95% CIs]({stem.name}_compare.png)")
    return out


@torch.no_grad()
def paper_figure(ev, path: Path) -> str:
    """The figure of the paper's new module for the checkpoint of an evaluate.Evaluator -> a markdown line:
    PedCLIP's gate (body part -> expert) on the evaluation split; D-MLM's sigma^2 of a test image and its
    report (through model.patch_variances(images) -> [B, N] and model.token_variances(texts) -> (tokens,
    sigma^2 per token), each the mean over D)."""
    m, rows = ev.model, ev.rows(ev.cfg.split, "all")
    if ev.paper == "pedclip":
        if "body_part" not in ev.columns:
            return "gate figure skipped: the CSV has no body_part column"
        # PedCLIP.encode(images) -> (tokens, [gate logits [B, E] per MoBE layer]): the top expert per layer
        top, ok = ev.images(rows, lambda x: torch.stack([g.argmax(-1) for g in m.encode(x)[1]], 1))
        part = [(r.get("body_part") or "").strip() or "?" for r, k in zip(rows, ok) if k]
        names = sorted(set(part))
        counts = np.zeros((top.shape[1], len(names), len(m.body_parts)))
        part_index = np.array([names.index(p) for p in part])[:, None]
        np.add.at(counts, (np.arange(top.shape[1])[None, :], part_index, top[ok].astype(int)), 1)
        gate_figure(path, counts, names, list(m.body_parts), list(m.moe_layers))
        return f"![PedCLIP's gate: body part -> expert]({path.name})"
    if ev.paper == "dmlm":
        text = {id(r): " ".join(((r.get("findings") or "").strip() or (r.get("impression") or "").strip()
                                 or (r.get("report") or "").strip()).split()) for r in rows}
        r = next((r for r in rows if text[id(r)]), None)
        if r is None:
            return "sigma^2 figure skipped: no report text in the evaluation split"
        img = common.load_image(r["_path"])
        pv = m.patch_variances(m.image_transform(False)(img)[None].to(ev.device))[0].float().cpu().numpy()
        tokens, var = m.token_variances([text[id(r)]])
        g = math.isqrt(len(pv))
        sigma_figure(path, common.resize(img, m.cfg.image_size), pv[:g * g].reshape(g, g), tokens[0],
                     np.asarray(var[0], dtype=np.float64))
        return f"![D-MLM's sigma^2 of {Path(r['_path']).name}]({path.name})"
    return ""
