"""Anomaly detection by reconstruction error: rank images by their per-image MSE (an autoencoder reconstructs what it
was trained on better than what it was not) and report the ROC-AUC against known labels, with the score histogram.

Labels come from a CSV file (`ldtok eval --anomaly-labels FILE`: columns `id` and `label`, label `1` / `anomalous`
or `0` / `normal`), or from a folder layout `normal/...` and `anomalous/...` (`--data-source folder`: the sample ids
are paths relative to the folder, so their first component is the class).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.stats import rankdata

FOLDERS = ("normal", "anomalous")
_TRUE = {"1", "anomalous", "anomaly", "true"}
_FALSE = {"0", "normal", "false"}


@dataclass
class AnomalyResult:
    """ROC-AUC of anomaly scores.

    Args:
        auroc (`float`): probability that a random anomalous image scores higher than a random normal one (ties
            count one half): the Mann-Whitney U statistic over `num_anomalous * num_normal`.
        num_normal (`int`), num_anomalous (`int`): the labelled images scored.
        score (`str`): which per-image value is the score (e.g. `"mse"`).
        image (`PIL.Image.Image`): the histogram of the scores of both classes.
    """

    auroc: float
    num_normal: int
    num_anomalous: int
    score: str
    image: Image.Image


def roc_auc(scores, labels) -> float:
    """ROC-AUC of `scores` (higher = more anomalous) for binary `labels` (1 = anomalous), ties by midranks."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes; got {n_pos} anomalous and {n_neg} normal images")
    ranks = rankdata(s)  # midranks: ties get their average rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def read_anomaly_labels(path: str | os.PathLike) -> dict[str, int]:
    """`id -> 1 (anomalous) or 0 (normal)` from a CSV with an `id` and a `label` column."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: an anomaly-labels CSV needs the columns id and label, got {reader.fieldnames}")
        labels = {}
        for line, row in enumerate(reader, start=2):
            value = str(row["label"]).strip().lower()
            if value not in _TRUE | _FALSE:
                raise ValueError(f"{path}:{line}: label {row['label']!r} is not 1/anomalous or 0/normal")
            labels[row["id"]] = int(value in _TRUE)
    return labels


def labels_from_folders(ids: list[str]) -> dict[str, int] | None:
    """Labels from ids `normal/...` / `anomalous/...`, when every id has that layout and both classes occur."""
    first = {sid: sid.split("/", 1)[0] for sid in ids}
    if not ids or not set(first.values()) == set(FOLDERS):
        return None
    return {sid: int(top == "anomalous") for sid, top in first.items()}


def anomaly_scores(per_image: list[dict], labels: dict[str, int], *, score: str = "mse") -> AnomalyResult:
    """The ROC-AUC of `score` over the images of `per_image` (`EvalResult.per_image`) that have a label.

    Raises `ValueError` when a labelled id was not evaluated, or a class is missing."""
    values = {row["id"]: float(row[score]) for row in per_image}
    missing = sorted(set(labels) - set(values))
    if missing:
        raise ValueError(f"{len(missing)} labelled ids were not evaluated, e.g. {missing[:3]}")
    ids = sorted(labels)
    s = np.array([values[i] for i in ids])
    y = np.array([labels[i] for i in ids])
    auroc = roc_auc(s, y)
    image = score_histogram(s[y == 0], s[y == 1], title=f"{score}: ROC-AUC {auroc:.4f}")
    return AnomalyResult(auroc=auroc, num_normal=int((y == 0).sum()), num_anomalous=int(y.sum()), score=score,
                         image=image)


def score_histogram(normal: np.ndarray, anomalous: np.ndarray, *, bins: int = 30, title: str = "",
                    width: int = 480, height: int = 240) -> Image.Image:
    """Overlaid histograms (normal blue, anomalous red) on shared bins, with the score range and counts written."""
    everything = np.concatenate([normal, anomalous])
    lo, hi = float(everything.min()), float(everything.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    counts = [np.histogram(v, bins=edges)[0] for v in (normal, anomalous)]
    top = max(1, max(int(c.max()) for c in counts))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    left, right, upper, lower = 10, width - 10, 28, height - 28
    bar = (right - left) / bins
    for c, colour in zip(counts, ((40, 90, 220, 140), (220, 40, 40, 140))):
        for k, n in enumerate(c):
            if n:
                y = lower - (lower - upper) * n / top
                draw.rectangle([left + k * bar, y, left + (k + 1) * bar - 1, lower], fill=colour)
    draw.line([left, lower, right, lower], fill="black")
    draw.text((left, 6), f"{title}   blue: normal ({len(normal)})  red: anomalous ({len(anomalous)})", fill="black")
    draw.text((left, lower + 6), f"{lo:.4g}", fill="black")
    draw.text((right - 60, lower + 6), f"{hi:.4g}", fill="black")
    draw.text((width // 2 - 40, lower + 6), f"max count {top}", fill="black")
    return image
