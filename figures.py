"""figures.py: the plots that evaluate.py writes beside its tables, as functions of arrays (matplotlib, headless,
one PNG each): ROC curves per label, checkpoints compared with their confidence intervals, PedCLIP's gate (body part
-> expert) and D-MLM's sigma^2 of an image and its report."""
from __future__ import annotations

import numpy as np


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
        fig.supxlabel("false positive rate"), fig.supylabel("true positive rate")
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
        ax.invert_yaxis(), ax.grid(axis="x", color="0.9"), ax.legend(fontsize=8)
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
            ax.set(xlabel="expert of the largest gate weight", ylabel="body part", title=f"MoBE, layer {layer}")
    figure(path, draw, (0.3 * len(experts) * len(counts) + 2, 0.3 * len(parts) + 2), (1, len(counts)))


def sigma_figure(path, image: np.ndarray, patch_var: np.ndarray, tokens: list[str], token_var: np.ndarray):
    """D-MLM's uncertainty: an image [H, W], its per-patch sigma^2 [g, g] and its report's tokens coloured by
    their sigma^2 (each the mean over D)."""
    def draw(fig, axes):
        import matplotlib.pyplot as plt

        (a, b, t), v = axes[0], np.asarray(token_var, dtype=np.float64)
        a.imshow(image, cmap="gray"), a.set_title("image")
        fig.colorbar(b.imshow(patch_var, cmap="magma"), ax=b, fraction=0.046), b.set_title("patch sigma^2")
        t.set_title("report tokens by sigma^2")
        for ax in axes[0]:
            ax.axis("off")
        norm, x, y = plt.Normalize(v.min(), max(v.max(), v.min() + 1e-12)), 0.0, 0.95
        for tok, var in zip(tokens, v):
            x, y = (0.0, y - 0.07) if x + 0.018 * (len(tok) + 1) > 1 else (x, y)
            t.text(x, y, tok, fontsize=8, va="top", transform=t.transAxes,
                   bbox=dict(facecolor=plt.cm.magma(norm(var)), alpha=0.5, lw=0, pad=1))
            x += 0.018 * (len(tok) + 1)
    figure(path, draw, (10, 4), (1, 3))
