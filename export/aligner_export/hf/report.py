"""PNG and JSON reports for calibration (per-layer accuracy, gate score histograms)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aligner_runtime.contract.pack import LayerStatsKey, PackKey, RecommendedKey
from aligner_runtime.errors import AlignerError, atomic_path


def _pyplot():
    # deferred: matplotlib, loaded only when a report is drawn
    import matplotlib

    matplotlib.use("Agg")  # headless: before pyplot is imported
    # deferred: matplotlib's pyplot, after the backend is chosen
    import matplotlib.pyplot as plt

    return plt


def write_calibration_report(report_dir, pack, gate_projections, harmful_split, harmless_split,
                             gate_report=None) -> Path:
    """Writes ``calibration.png`` and ``calibration.json`` into ``report_dir`` (created if missing), and for a linear
    gate ``gate.png``."""
    report_dir = Path(report_dir)
    if not report_dir.parent.is_dir():
        raise AlignerError(f"report directory's parent does not exist: {report_dir.parent}")
    report_dir.mkdir(exist_ok=True)
    plt = _pyplot()
    per_layer = pack.meta[PackKey.PER_LAYER]
    rec = pack.meta[PackKey.RECOMMENDED]
    g = rec[RecommendedKey.GATE_LAYER]
    layers = [s[LayerStatsKey.LAYER] for s in per_layer]

    fig, (ax_acc, ax_hist) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_acc.plot(layers, [s[LayerStatsKey.TARGET_VAL_ACCURACY] for s in per_layer], "o-",
                label="target (gate) accuracy")
    if pack.meta["mode"] == "cross-model":
        ax_acc.plot(layers, [s[LayerStatsKey.ALIGNED_VAL_ACCURACY] for s in per_layer], "s--",
                    label="aligned model accuracy")
    ax_acc.plot(layers, [s[LayerStatsKey.VAL_TPR] for s in per_layer], ":", color="tab:green",
                label="target TPR (fpr bias)")
    ax_acc.plot(layers, [s[LayerStatsKey.VAL_FPR] for s in per_layer], ":", color="tab:red",
                label="target FPR (fpr bias)")
    steer = rec[RecommendedKey.STEER_LAYERS]
    ax_acc.axvspan(min(steer) - 0.5, max(steer) + 0.5, color="tab:orange", alpha=0.12, label="steered layers")
    ax_acc.axvline(g, color="k", lw=0.8, ls="--", label=f"gate layer {g}")
    ax_acc.set_xlabel("decoder layer")
    ax_acc.set_ylabel("validation rate")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_title("Per-layer separation of harmful and harmless prompts (held-out validation split)")
    ax_acc.legend(fontsize=8, loc="lower right")

    proj_h, proj_b = gate_projections
    h_cal, h_val = harmful_split
    b_cal, b_val = harmless_split
    bins = np.histogram_bin_edges(np.concatenate([proj_h, proj_b]), bins=40)
    ax_hist.hist(proj_b[b_cal], bins=bins, alpha=0.5, color="tab:blue", label="harmless (calibration)")
    ax_hist.hist(proj_h[h_cal], bins=bins, alpha=0.5, color="tab:red", label="harmful (calibration)")
    ax_hist.hist(proj_b[b_val], bins=bins, histtype="step", lw=1.5, color="tab:blue", label="harmless (validation)")
    ax_hist.hist(proj_h[h_val], bins=bins, histtype="step", lw=1.5, color="tab:red", label="harmful (validation)")
    stats = per_layer[g]
    ax_hist.axvline(-stats[LayerStatsKey.bias("paper")], color="k", ls="--", label="threshold, paper bias")
    ax_hist.axvline(-stats[LayerStatsKey.bias("fpr")], color="tab:purple", ls="-",
                    label=f"threshold, FPR<={pack.meta[PackKey.MAX_FPR]}")
    ax_hist.set_xlabel(f"projection on the target SRV at layer {g}")
    ax_hist.set_ylabel("prompts")
    ax_hist.set_title(f"Gate scores at layer {g} (score = projection + bias)")
    ax_hist.legend(fontsize=8)
    fig.tight_layout()
    png = report_dir / "calibration.png"
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    if gate_report is not None:
        _gate_figure(plt, report_dir / "gate.png", gate_report)
    keys = (PackKey.MODE, PackKey.RECOMMENDED, PackKey.PER_LAYER, PackKey.PROMPTS, PackKey.GATE)
    with atomic_path(report_dir / "calibration.json", suffix=".json") as tmp:
        tmp.write_text(json.dumps({k: pack.meta[k] for k in keys if k in pack.meta}, indent=2))
    return png


def _gate_figure(plt, path: Path, report) -> None:
    """The linear gate's selection (leave-one-source-out TPR per candidate) and its held-out calibration scores."""
    fig, (ax_sel, ax_scores) = plt.subplots(1, 2, figsize=(14, 0.32 * len(report.loso) + 3.2))
    names = [r["candidate"] for r in report.loso]
    means = [r["mean_tpr"] for r in report.loso]
    worst = [r["min_tpr"] for r in report.loso]
    chosen = report.candidate.describe()
    y = np.arange(len(names))
    ax_sel.barh(y, means, color=["tab:green" if n == chosen else "tab:gray" for n in names], label="mean")
    ax_sel.plot(worst, y, "k|", markersize=12, label="worst held-out source")
    for i, value in enumerate(means):
        ax_sel.text(value + 0.005, i, f"{value:.3f}", va="center", fontsize=7)
    ax_sel.set_yticks(y, names, fontsize=7)
    ax_sel.set_xlim(min(0.5, min(worst) - 0.02), 1.05)
    ax_sel.set_xlabel("TPR on the left-out harmful source at the operating threshold")
    ax_sel.set_title("Gate selection: leave one harmful source out")
    ax_sel.legend(fontsize=8, loc="lower left")
    bins = np.linspace(min(min(v) for v in report.scores.values()), max(max(v) for v in report.scores.values()), 50)
    for key, values in sorted(report.scores.items()):
        ax_scores.hist(values, bins=bins, histtype="step", lw=1.3, label=f"{key} (n={len(values)})")
    ax_scores.axvline(0.0, color="k", ls="--", label="threshold (score 0)")
    fprs = ", ".join(f"{k[4:]} {v:.3f}" for k, v in report.heldout.items() if k.startswith("fpr_"))
    ax_scores.set_title(f"Held-out calibration negatives: gate score (FPR {fprs})", fontsize=9)
    ax_scores.set_xlabel("gate score (fires above 0)")
    ax_scores.set_ylabel("prompts")
    ax_scores.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
