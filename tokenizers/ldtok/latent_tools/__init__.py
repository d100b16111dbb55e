"""Tools to look inside a latent space, and anomaly detection by reconstruction error (`ldtok eval` runs them; each
is also a plain function):

- `latent_atlas`: 2-D latents decoded over a grid of the prior's quantiles (the MNIST manifold figure);
- `latent_traversals`: one channel at a time moved around an encoded image, channels ranked by KL;
- `latent_arithmetic`: `z_a - z_b + z_c` decoded (group means when labels exist);
- `anomaly_scores` / `roc_auc`: ROC-AUC of the per-image reconstruction error against normal / anomalous labels.

`add_latent_tools(result, model, dataset, ...)` adds what applies to an `EvalResult`: the pictures `latent_atlas`,
`latent_traversals`, `latent_arithmetic`, `prior_samples` (hierarchical VAEs, sampled top-down) and
`anomaly_scores`, and the metric `val/anomaly_auroc`.
"""

from __future__ import annotations

import torch

from .anomaly import AnomalyResult, anomaly_scores, labels_from_folders, read_anomaly_labels, roc_auc
from .arithmetic import latent_arithmetic
from .atlas import latent_atlas
from .common import LatentPicture, has_posterior, latent_shape
from .traversal import latent_traversals

TOOL_IMAGES = 64  # images encoded for the pictures (the arithmetic's group means use them all)


def _first_items(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    from ..evaluation import first_items

    items = first_items(dataset, n)
    if not items:
        return torch.empty(0), None
    labels = torch.tensor([it["label"] for it in items]) if "label" in items[0] else None
    return torch.stack([it["pixel_values"] for it in items]), labels


@torch.no_grad()
def latent_pictures(model, dataset, *, device, autocast, kl_per_channel=None, seed: int = 0,
                    prior_samples: int = 16) -> dict[str, LatentPicture]:
    """The latent-space pictures that apply to `model`, from the first `TOOL_IMAGES` images of `dataset`."""
    pictures: dict[str, LatentPicture] = {}
    x, labels = _first_items(dataset, TOOL_IMAGES)
    if x.numel() == 0:
        return pictures
    x = x.to(device)
    with autocast():
        if has_posterior(model):
            if latent_shape(model, x).numel() == 2:
                pictures["latent_atlas"] = latent_atlas(model, x)
            pictures["latent_traversals"] = latent_traversals(model, x, kl_per_channel=kl_per_channel)
            if x.shape[0] >= 3 and (labels is None or len(set(labels.tolist())) >= 3):
                pictures["latent_arithmetic"] = latent_arithmetic(model, x, labels=labels)
        elif hasattr(model, "sample_prior") and prior_samples > 0:
            from ..images import make_grid

            samples = model.sample_prior(prior_samples, generator=torch.Generator().manual_seed(seed))
            samples = samples.float().clamp(-1, 1).cpu()
            per_row = min(8, prior_samples)
            rows = [samples[i : i + per_row] for i in range(0, len(samples) - per_row + 1, per_row)]
            pictures["prior_samples"] = LatentPicture(
                image=make_grid(rows), latents=torch.empty(0),
                caption=f"{len(rows) * per_row} samples drawn top-down from the prior (z_top ~ N(0, I), "
                        f"z_bottom ~ p(z_bottom | z_top)), seed {seed}, decoded")
    return pictures


def add_latent_tools(result, model, dataset, *, options, device, autocast, main: bool) -> None:
    """Add the latent pictures (main process) and the anomaly ROC-AUC (every process) to `result` in place.

    `options` is the `EvalOptions`: `latent_tools` turns the pictures on, `anomaly_labels` (a CSV path) gives the
    labels; without it, ids laid out as `normal/...` / `anomalous/...` give them.
    """
    from ..evaluation import Metric, Picture

    if main and options.latent_tools:
        found = latent_pictures(model, dataset, device=device, autocast=autocast,
                                kl_per_channel=result.kl_per_channel, seed=options.seed,
                                prior_samples=options.prior_samples)
        result.pictures.update({name: Picture(p.image, p.caption) for name, p in found.items()})
    ids = [row["id"] for row in result.per_image]
    if options.anomaly_labels is not None:
        labels, where = read_anomaly_labels(options.anomaly_labels), f"labels from {options.anomaly_labels}"
    else:
        labels, where = labels_from_folders(ids), "labels from the normal/ and anomalous/ folders"
    if labels is None:
        return
    found = anomaly_scores(result.per_image, labels)
    result.metrics.append(Metric(
        "val/anomaly_auroc", found.auroc, "anomaly ROC-AUC",
        f"per-image MSE as the anomaly score (higher = anomalous); {found.num_anomalous} anomalous vs "
        f"{found.num_normal} normal images; {where}"))
    if main:
        result.pictures["anomaly_scores"] = Picture(
            found.image, f"histogram of per-image MSE, normal (blue) vs anomalous (red); ROC-AUC {found.auroc:.4f}")


__all__ = [
    "AnomalyResult", "LatentPicture", "add_latent_tools", "anomaly_scores", "labels_from_folders", "latent_arithmetic",
    "latent_atlas", "latent_pictures", "latent_traversals", "read_anomaly_labels", "roc_auc",
]
