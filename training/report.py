"""Evaluation report files: report.json, report.md (every model vs every ensemble rule, with 95% CIs) and
ROC / PR / reliability PNGs. matplotlib is imported lazily with the Agg backend and a writable MPLCONFIGDIR."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr import NOT_FOR_CLINICAL_USE
from cxr.core import ensemble as ens
from training.metrics import reliability_bins

OVERALL_COLUMNS = (
    ("auroc_mean", "AUROC (mean of labels)"), ("auprc_mean", "AUPRC (mean)"),
    ("f1_positive_mean", "F1 positive class (mean)"), ("f1_paper_mean_pos_neg", "F1 paper: mean of pos/neg F1"),
    ("hamming_loss", "Hamming loss"), ("ece", "ECE (15 bins)"),
)  # fmt: skip


def _fmt(v: float | None, ci: Sequence[float | None] | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if not ci or ci[0] is None or ci[1] is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _systems(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [(f"model {n}", m) for n, m in report["models"].items()]
    return rows + [(f"ensemble {r.upper()}", m) for r, m in report["ensembles"].items()]


def overall_table(report: dict[str, Any]) -> list[str]:
    """Markdown rows: one per model and per ensemble rule, overall metrics with CIs."""
    head = "| system | " + " | ".join(title for _, title in OVERALL_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(OVERALL_COLUMNS) + 1)]
    for name, m in _systems(report):
        cells = [_fmt(m[k], m.get("ci95", {}).get(k)) for k, _ in OVERALL_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def per_label_table(report: dict[str, Any], key: str = "auroc") -> list[str]:
    """Markdown rows: one per label, one column per system, the per-label metric ``key`` with CIs."""
    systems = _systems(report)
    lines = ["| label | n pos / n neg | " + " | ".join(n for n, _ in systems) + " |",
             "|" + "---|" * (len(systems) + 2)]  # fmt: skip
    for lab in report["labels"]:
        first = systems[0][1]["per_label"][lab]
        cells = [_fmt(m["per_label"][lab][key], m["per_label"][lab]["ci95"].get(key)) for _, m in systems]
        lines.append(f"| {lab} | {first['n_pos']} / {first['n_neg']} | " + " | ".join(cells) + " |")
    return lines


def calibration_table(report: dict[str, Any]) -> list[str]:
    """Markdown rows: pooled ECE of each model and of CTP before and after the manifest's calibration."""
    cal = report.get("calibration")
    if not cal:
        return ["(no calibration information in this report)"]
    lines = [f"Method: {cal['method']}.", ""]
    lines += ["| system | ECE plain sigmoid | ECE calibrated (served) |", "|---|---|---|"]
    for name, e in cal["ece"].items():
        lines.append(f"| {name} | {_fmt(e['before'])} | {_fmt(e['after'])} |")
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    """The whole report.md text."""
    model, data = report["model"], report["data"]
    parts = [
        f"# Evaluation of {model['name']} {model['version']}", "",
        f"**{NOT_FOR_CLINICAL_USE}** These numbers describe research models on a small public data set.", "",
        f"- Data: `{data['path']}`, part `{data['part']}`" + (f" of split `{data['split']}`" if data["split"] else "")
        + f": {report['n_images']} images.",
        f"- Labels evaluated: {len(report['labels'])}; "
        f"skipped (not in the data): {report['skipped_labels'] or 'none'}.",
        f"- Thresholds: {model['threshold_criterion']}.",
        f"- 95% CIs: percentile bootstrap over images, {report['n_boot']} replicates.",
        "- AUROC mean = unweighted mean of per-label AUROCs (labels with one class only are excluded). "
        "\"F1 paper\" = mean of the positive- and negative-class F1 (the paper's F1); \"F1 positive\" is the "
        "usual F1. PTC rules keep no probability: their AUROC / AUPRC / ECE use the vote fraction (PTC-lw) or the "
        "0/1 label set (PTC-mode).", "",
        "## Overall", "", *overall_table(report), "",
        "## Calibration", "", *calibration_table(report), "",
        "## AUROC per label", "", *per_label_table(report, "auroc"), "",
        "## Positive-class F1 per label", "", *per_label_table(report, "f1_positive"), "",
        "Figures: `roc.png`, `pr.png`, `reliability.png`.", "",
    ]  # fmt: skip
    return "\n".join(parts)


def _pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend; MPLCONFIGDIR pointed at a writable folder if it is not."""
    cfg = os.environ.get("MPLCONFIGDIR")
    if not cfg or not os.access(cfg, os.W_OK):
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="mpl-")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(kind: str, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    from sklearn.metrics import precision_recall_curve, roc_curve

    known = ~np.isnan(y)
    yk, sk = y[known], s[known]
    if len(np.unique(yk)) < 2:
        return None
    if kind == "roc":
        fpr, tpr, _ = roc_curve(yk, sk)
        return fpr, tpr
    precision, recall, _ = precision_recall_curve(yk, sk)
    return recall, precision


def plot_curves(kind: str, y: np.ndarray, scores: dict[str, np.ndarray], labels: Sequence[str], path: Path) -> Path:
    """One panel per label with one curve per system: ``kind`` "roc" or "pr"; y (N, L), scores {name: (N, L)}."""
    plt = _pyplot()
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for j, lab in enumerate(labels):
        ax = axes[j // cols][j % cols]
        for name, s in scores.items():
            c = _curves(kind, y[:, j], s[:, j])
            if c is not None:
                ax.plot(c[0], c[1], lw=1, label=name)
        ax.set_title(lab, fontsize=8)
        ax.set_xlabel("false positive rate" if kind == "roc" else "recall", fontsize=6)
        ax.set_ylabel("true positive rate" if kind == "roc" else "precision", fontsize=6)
        ax.tick_params(labelsize=6)
    for k in range(len(labels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{'ROC' if kind == 'roc' else 'Precision-recall'} per label. {NOT_FOR_CLINICAL_USE}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(y: np.ndarray, probs: dict[str, np.ndarray], path: Path) -> Path:
    """Pooled reliability diagram (all labels), one line per system with probabilities."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for name, p in probs.items():
        b = reliability_bins(y, p)
        ok = b["count"] > 0
        ax.plot(b["confidence"][ok], b["accuracy"][ok], marker="o", ms=3, lw=1, label=name)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability (15 bins). {NOT_FOR_CLINICAL_USE}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    report: dict[str, Any], y: np.ndarray, probs: np.ndarray, model_names: Sequence[str], out_dir: str | Path
) -> list[Path]:
    """Write report.json, report.md, roc.png, pr.png, reliability.png into ``out_dir`` -> their paths.
    ``y`` (N, L) evaluated targets, ``probs`` (N, M, L) per-model probabilities."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    systems = {n: probs[:, i] for i, n in enumerate(model_names)} | {"ensemble CTP": ens.ctp_mean(probs)}
    labels = report["labels"]
    return [out / "report.json", out / "report.md", plot_curves("roc", y, systems, labels, out / "roc.png"),
            plot_curves("pr", y, systems, labels, out / "pr.png"),
            plot_reliability(y, systems, out / "reliability.png")]  # fmt: skip
