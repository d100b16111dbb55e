"""What `evaluate_tokenizer` measures and draws: `EvalOptions` (the dataclass `ldtok eval`'s flags come from)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import check_choice, check_range, invalid

PERCEPTUAL_DEFAULT = ("lpips-vgg", "lpips-alex", "stlpips-vgg", "stlpips-alex")


@dataclass
class EvalOptions:
    """What `evaluate_tokenizer` measures and draws.

    Args:
        batch_size (`int`, defaults to 16): images per process per forward.
        num_workers (`int`, defaults to 0): DataLoader worker processes.
        perceptual (`list[str]`, defaults to all four LPIPS / ST-LPIPS networks): perceptual distances to compute.
        fid (`"auto"` or `"off"`, defaults to `"auto"`): `auto` computes rFID with the FID Inception when
            `find_inception_file()` finds it (or with the `feature_net` passed in); otherwise rFID is "not run".
        grid_images (`int`, defaults to 8): images in the reconstruction grid.
        interpolation_pairs (`int`, defaults to 4): image pairs in the latent interpolation picture.
        interpolation_steps (`int`, defaults to 8): interpolated latents per pair (including both ends).
        prior_samples (`int`, defaults to 16): KL models: images decoded from N(0, I) in the scaled latent space.
        collapse_threshold (`float`, defaults to 0.01): KL per channel (nats per image) below which a channel counts
            as collapsed.
        seed (`int`, defaults to 0): seed of the prior samples.
        progress (`bool`, defaults to `True`): a tqdm bar on the main process.
        latent_tools (`bool`, defaults to `True`): latent atlas (2-D latents), traversals and arithmetic pictures (KL
            models), top-down prior samples (hierarchical VAEs); see `ldtok.latent_tools`.
        anomaly_labels (`str`, *optional*): a CSV of `id,label` (1 / anomalous, 0 / normal): report the ROC-AUC of
            the per-image MSE as an anomaly score, and its histogram. Ids laid out as `normal/...` and
            `anomalous/...` (an image folder with those sub-folders) are labelled without it.
    """

    batch_size: int = 16
    num_workers: int = 0
    perceptual: list[str] = field(default_factory=lambda: list(PERCEPTUAL_DEFAULT))
    fid: Literal["auto", "off"] = "auto"
    grid_images: int = 8
    interpolation_pairs: int = 4
    interpolation_steps: int = 8
    prior_samples: int = 16
    collapse_threshold: float = 0.01
    seed: int = 0
    progress: bool = True
    latent_tools: bool = True
    anomaly_labels: str | None = None

    def __post_init__(self):
        check_range(self, "batch_size", gt=0)
        check_range(self, "num_workers", ge=0)
        unknown = [name for name in self.perceptual if name not in PERCEPTUAL_DEFAULT]
        if unknown:
            raise invalid("perceptual", f"unknown network(s) {', '.join(map(repr, unknown))} (allowed: "
                                        f"{', '.join(PERCEPTUAL_DEFAULT)}, or none)")
        check_choice(self, "fid", ("auto", "off"))
        for name in ("grid_images", "interpolation_pairs", "prior_samples", "collapse_threshold"):
            check_range(self, name, ge=0)
        check_range(self, "interpolation_steps", ge=2)
