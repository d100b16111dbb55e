"""Experiment trackers through Accelerate: which ones (`train.report_to`), hyperparameters, images.

`train.report_to` takes any tracker Accelerate knows (`tensorboard`, `wandb`, `mlflow`, `comet_ml`, `aim`,
`clearml`, `dvclive`, `swanlab`, `trackio`), a comma-separated list of them, `all` (every installed one), `auto`
(TensorBoard when installed, else none) or `none`. A named tracker that is not installed is a `ConfigError`, never a
silent drop. Scalars go through `accelerator.log`; the resolved config is the trackers' hyperparameters
(`hparams`, flattened to scalars and strings); images (the reconstruction grid) go to every tracker that takes
images (`log_images`).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
from PIL import Image

from .config import ConfigError, to_dict

# Accelerate's tracker names -> the module that must be importable for it.
TRACKER_MODULES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
}


def _installed(name: str) -> bool:
    module = TRACKER_MODULES[name]
    if name == "tensorboard":  # torch's SummaryWriter works with either package
        return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    return importlib.util.find_spec(module) is not None


def resolve_report_to(value: str, *, key: str = "train.report_to") -> list[str]:
    """The tracker names `value` stands for (see the module docstring); `[]` for none.

    Raises:
        `ConfigError`: an unknown tracker name, or a named tracker that is not installed.
    """
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if _installed("tensorboard") else []
    if names == ["all"]:
        return [n for n in TRACKER_MODULES if _installed(n)]
    resolved = []
    for name in names:
        if name not in TRACKER_MODULES:
            raise ConfigError(f"{key}: unknown tracker {name!r}; choose from {', '.join(TRACKER_MODULES)}, "
                              "a comma-separated list of them, all, auto or none")
        if not _installed(name):
            raise ConfigError(f"{key}: tracker {name!r} is not installed (pip install {TRACKER_MODULES[name]})")
        if name not in resolved:
            resolved.append(name)
    return resolved


def hparams(config: Any) -> dict[str, int | float | str | bool]:
    """A config (dataclass tree or mapping) flattened to dotted keys with scalar or string values, as trackers'
    hyperparameter tables want them (`None` and lists become strings)."""
    flat: dict[str, int | float | str | bool] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}{k}.", v)
            return
        key = prefix[:-1]
        if isinstance(value, bool) or isinstance(value, int) or isinstance(value, str):
            flat[key] = value
        elif isinstance(value, float):
            flat[key] = value if math.isfinite(value) else str(value)
        else:
            flat[key] = str(value)

    visit("", config if isinstance(config, dict) else to_dict(config))
    return flat


def log_images(accelerator, name: str, image: Image.Image, step: int) -> list[str]:
    """Log one RGB image to every active tracker that takes images; returns the trackers it went to.

    Args:
        accelerator (`Accelerator`): its trackers (only the main process has any).
        name (`str`): the image's tag, e.g. `"reconstructions"`.
        image (`PIL.Image.Image`): e.g. `ldtok.images.make_grid(...)`.
        step (`int`): the optimizer step.
    """
    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    logged = []
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log({name: wandb.Image(pixels)}, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_image(pixels, key=name, step=step)
        elif hasattr(tracker, "log_images"):
            try:
                tracker.log_images({name: pixels[None]}, step=step)
            except NotImplementedError:  # a tracker without image support: scalars only
                continue
        else:
            continue
        logged.append(tracker.name)
    return logged


__all__ = ["TRACKER_MODULES", "hparams", "log_images", "resolve_report_to"]
