"""PNG and JSON reports for calibration (per-layer accuracy, gate score histograms)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aligner_runtime.errors import AlignerError, atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_calibration_report(report_dir, pack, gate_projections, harmful_split, harmless_split) -> Path:
    """Writes ``calibration.png`` and ``calibration.json`` into ``report_dir`` (created if missing)."""
    report_dir = Path(report_dir)
    if not report_dir.parent.is_dir():
        raise AlignerError(f"report directory's parent does not exist: {report_dir.parent}")
    report_dir.mkdir(exist_ok=True)
    plt = _pyplot()
    per_layer = pack.meta["per_layer"]
    rec = pack.meta["recommended"]
    g = rec["gate_layer"]
    layers = [s["layer"] for s in per_layer]

    fig, (ax_acc, ax_hist) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_acc.plot(layers, [s["target_val_accuracy"] for s in per_layer], "o-", label="target (gate) accuracy")
    if pack.meta["mode"] == "cross-model":
        ax_acc.plot(layers, [s["aligned_val_accuracy"] for s in per_layer], "s--", label="aligned model accuracy")
    ax_acc.plot(layers, [s["val_tpr"] for s in per_layer], ":", color="tab:green", label="target TPR (fpr bias)")
    ax_acc.plot(layers, [s["val_fpr"] for s in per_layer], ":", color="tab:red", label="target FPR (fpr bias)")
    steer = rec["steer_layers"]
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
    ax_hist.axvline(-stats["bias_paper"], color="k", ls="--", label="threshold, paper bias")
    ax_hist.axvline(-stats["bias_fpr"], color="tab:purple", ls="-", label=f"threshold, FPR<={pack.meta['max_fpr']}")
    ax_hist.set_xlabel(f"projection on the target SRV at layer {g}")
    ax_hist.set_ylabel("prompts")
    ax_hist.set_title(f"Gate scores at layer {g} (score = projection + bias)")
    ax_hist.legend(fontsize=8)
    fig.tight_layout()
    png = report_dir / "calibration.png"
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    with atomic_path(report_dir / "calibration.json", suffix=".json") as tmp:
        tmp.write_text(json.dumps({k: pack.meta[k] for k in ("mode", "recommended", "per_layer", "prompts")},
                                  indent=2))
    return png
