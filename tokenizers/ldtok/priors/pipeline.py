"""`LatentPriorPipeline`: the exported latent diffusion prior as a diffusers `DiffusionPipeline` (UNet + scheduler +
the KL tokenizer's `AutoencoderKL`), and `save_prior_pipeline`, which writes it.

An exported prior is a diffusers pipeline directory::

    model_index.json   _class_name LatentPriorPipeline, the components, scaling_factor / shift_factor
    unet/              UNet2DModel on normalized latents (C, h, w)
    scheduler/         the sampling scheduler (any diffusers scheduler)
    vae/               the tokenizer (an AutoencoderKL): a copy, so moving or deleting the tokenizer changes nothing
    pipeline.py        a two-line shim that imports this class, for DiffusionPipeline.from_pretrained
    README.md          model card

Load and sample (ldtok installed)::

    import torch
    from ldtok.priors.pipeline import LatentPriorPipeline

    pipe = LatentPriorPipeline.from_pretrained("runs/prior/final")
    images = pipe(batch_size=8, num_inference_steps=50, generator=torch.manual_seed(0)).images  # 8 PIL images

diffusers resolves a `model_index.json`'s `_class_name` only among its own classes, so a class that lives in another
package loads through `DiffusionPipeline` only as custom code, which diffusers runs only when asked to (there is no
registry of outside pipeline classes). The directory's `pipeline.py` does nothing but import this class::

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("runs/prior/final", custom_pipeline="pipeline", trust_remote_code=True)

diffusers 0.42 fetches `pipeline.py` from a Hub repository holding the directory the same way (not tested
here: no network). Swap the sampler as with any pipeline:
`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.

Latent scaling: the prior is trained on `(z - shift_factor) * scaling_factor` (`ldtok.shards` readers, one scalar
each, from the shards' statistics; `shift_factor` 0 under the SD convention); the pipeline decodes
`latents / scaling_factor + shift_factor`, with the values stored in `model_index.json` (not the VAE config's, which
may hold another, e.g. diffusers' default 0.18215).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..errors import LdtokError, disk_full_error
from ..model_card import CARD_NAME
from ..models.loading import checkpoint_model_dir, tokenizer_sha256

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SHIM_NAME = "pipeline.py"  # `custom_pipeline="pipeline"` finds it next to model_index.json
# No relative import, no `from diffusers`: diffusers copies this file into its module cache and imports it there.
SHIM = ('"""Loads ldtok\'s LatentPriorPipeline for DiffusionPipeline.from_pretrained(DIR, custom_pipeline="pipeline",\n'
        'trust_remote_code=True); the class itself lives in ldtok (pip install ldtok)."""\n\n'
        "from ldtok.priors.pipeline import LatentPriorPipeline\n\n"
        '__all__ = ["LatentPriorPipeline"]\n')


class PriorPipelineError(LdtokError, ValueError):
    """Components that do not fit together (latent channels, scaling), or a tokenizer that is not an AutoencoderKL."""


def latent_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    """`(C, h, w)` of the latents `unet` models (`sample_size` is an int or `(h, w)`)."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)


def check_components(unet: UNet2DModel, vae: AutoencoderKL, scaling_factor: float) -> None:
    """Raise `PriorPipelineError` when `unet`'s latents are not `vae`'s or the scale cannot be inverted."""
    C, _, _ = latent_shape(unet)
    if unet.config.out_channels != C:
        raise PriorPipelineError(f"the UNet takes {C} channels but predicts {unet.config.out_channels}: a prior "
                                 "predicts noise (or v) of the latents' shape")
    if vae.config.latent_channels != C:
        raise PriorPipelineError(f"the UNet models {C}-channel latents, the VAE's are {vae.config.latent_channels}-"
                                 "channel: the prior was trained on another tokenizer's latents")
    if not (isinstance(scaling_factor, (int, float)) and math.isfinite(scaling_factor) and scaling_factor > 0):
        raise PriorPipelineError(f"scaling_factor must be a positive number, got {scaling_factor!r}")


class LatentPriorPipeline(DiffusionPipeline):
    """Unconditional (or class-conditional) image generation by a diffusion prior over a KL tokenizer's latents.

    Args:
        unet (`UNet2DModel`): predicts the noise (or v) of normalized latents `(B, C, h, w)`; class-conditional when
            its config has `num_class_embeds`.
        scheduler (`SchedulerMixin`): any diffusers scheduler configured like the training one (e.g. `DDPMScheduler`,
            `DDIMScheduler.from_config(...)`).
        vae (`AutoencoderKL`): the tokenizer whose latents the prior models; decodes `(B, C, h, w)` to images in
            [-1, 1].
        scaling_factor (`float`, *optional*): the prior's latents are `(z - shift_factor) * scaling_factor`; defaults
            to the VAE config's `scaling_factor`.
        shift_factor (`float`, *optional*): defaults to the VAE config's `shift_factor`, or 0 when it has none.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, vae: AutoencoderKL,
                 scaling_factor: float | None = None, shift_factor: float | None = None):
        super().__init__()
        scaling_factor = float(vae.config.scaling_factor if scaling_factor is None else scaling_factor)
        if shift_factor is None:
            shift_factor = getattr(vae.config, "shift_factor", None) or 0.0
        check_components(unet, vae, scaling_factor)
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(scaling_factor=scaling_factor, shift_factor=float(shift_factor))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=factor, do_normalize=True)

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """The prior's normalized latents back in the VAE's latent space: `latents / scaling_factor + shift`."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    def _class_labels(self, class_labels, batch_size: int, device) -> Tensor | None:
        num_classes = self.unet.config.num_class_embeds
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but this prior's UNet is unconditional (no num_class_embeds)")
            return None
        if class_labels is None:  # as the trainer's samples.png: classes in turn
            return torch.arange(batch_size, device=device) % num_classes
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if labels.numel() != batch_size or not bool(((labels >= 0) & (labels < num_classes)).all()):
            raise ValueError(f"class_labels: need {batch_size} labels in [0, {num_classes}), got {labels.tolist()}")
        return labels

    def _step_kwargs(self, generator) -> dict:
        """`generator` for the schedulers whose `step` draws noise (DDPM, ancestral samplers); the others take none."""
        return {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: list[int] | Tensor | None = None,
        latents: Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample `batch_size` images.

        Args:
            batch_size (`int`, defaults to 1): images to generate.
            num_inference_steps (`int`, defaults to 50): denoising steps (`scheduler.set_timesteps`).
            generator (`torch.Generator` or a list of one per image, *optional*): makes sampling reproducible.
            output_type (`str`, defaults to `"pil"`): `"pil"` (list of PIL images), `"np"` (`(B, H, W, C)` float
                array in [0, 1]), `"pt"` (`(B, C, H, W)` tensor in [0, 1]) or `"latent"` (the sampled normalized
                latents `(B, C, h, w)`, not decoded).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` instead of a tuple.
            class_labels (`list[int]` or `Tensor`, *optional*): one class per image for a class-conditional UNet;
                defaults to `0, 1, 2, ...` modulo the number of classes. An unconditional UNet takes none.
            latents (`Tensor`, *optional*): the initial noise `(B, C, h, w)`; drawn with `generator` when not given.

        Returns:
            `ImagePipelineOutput` with `.images`, or `(images,)` when `return_dict` is `False`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if batch_size < 1 or num_inference_steps < 1:
            raise ValueError(f"batch_size and num_inference_steps must be >= 1, got {batch_size}, "
                             f"{num_inference_steps}")
        device, dtype = self._execution_device, self.unet.dtype
        shape = (batch_size, *latent_shape(self.unet))  # (B, C, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        labels = self._class_labels(class_labels, batch_size, device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.unet(model_input, t, class_labels=labels).sample
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
        if output_type == "latent":
            images = latents
        else:
            z = self.unscale_latents(latents.to(self.vae.dtype))  # back to the VAE's latent space
            images = self.image_processor.postprocess(self.vae.decode(z).sample, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def load_tokenizer_vae(tokenizer_dir: str | os.PathLike) -> AutoencoderKL:
    """The `AutoencoderKL` saved at `tokenizer_dir` (an ldtok KL export such as `runs/NAME/final`, or a training
    checkpoint with a `diffusers/` export), or a one-line `PriorPipelineError` saying why not."""
    path = checkpoint_model_dir(Path(tokenizer_dir))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PriorPipelineError(f"{tokenizer_dir}: no config.json; give the KL tokenizer's directory "
                                 "(e.g. runs/NAME/final)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (ValueError, AttributeError) as e:
        raise PriorPipelineError(f"{config_file}: not a JSON object ({e})") from None
    if class_name != "AutoencoderKL":
        raise PriorPipelineError(f"{path} holds a {class_name!r}, not an AutoencoderKL: a latent diffusion prior "
                                 "decodes with a KL tokenizer")
    return AutoencoderKL.from_pretrained(path).eval()


def render_prior_card(pipe: LatentPriorPipeline, *, tokenizer_sha: str | None = None, step: int | None = None,
                      shards: str | None = None) -> str:
    """The pipeline directory's `README.md`: Hub front matter, components, latent scaling and how to load it."""
    C, h, w = latent_shape(pipe.unet)
    u, s, v = pipe.unet.config, pipe.scheduler.config, pipe.vae.config
    front = {"library_name": "diffusers", "license": "apache-2.0", "pipeline_tag": "unconditional-image-generation",
             "tags": ["ldtok", "latent-diffusion", "diffusers:LatentPriorPipeline"]}
    conditional = f", {u.num_class_embeds} classes" if u.num_class_embeds else ""
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", "# ldtok latent diffusion prior", "",
             "A diffusion model over the latents of a KL tokenizer, trained with [ldtok](https://github.com/ldtok/"
             "ldtok) and exported as a diffusers pipeline (`LatentPriorPipeline`).", "", "## Components", "",
             f"- `unet`: `UNet2DModel` on `{C}x{h}x{w}` latents, channels `{list(u.block_out_channels)}`"
             f"{conditional}",
             f"- `scheduler`: `{type(pipe.scheduler).__name__}`, {s.get('num_train_timesteps')} training timesteps, "
             f"`prediction_type` `{s.get('prediction_type', 'epsilon')}`",
             f"- `vae`: the tokenizer (`AutoencoderKL`, {v.latent_channels} latent channels, downsampling "
             f"{pipe.image_processor.config.vae_scale_factor})"
             + (f", weights sha256 `{tokenizer_sha}`" if tokenizer_sha else ""), ""]
    if step is not None or shards:
        lines += ["## Training", ""] + ([f"- optimizer steps: {step}"] if step is not None else []) + (
            [f"- latent shards: `{Path(shards).name}`"] if shards else []) + [""]
    lines += ["## Latent scaling", "",
              f"Trained on `(z - {pipe.config.shift_factor}) * {pipe.config.scaling_factor}` (`shift_factor`, "
              "`scaling_factor` in `model_index.json`); samples are decoded as `latents / scaling_factor + "
              "shift_factor`.", "", "## Usage", "", "```python", "import torch",
              "from ldtok.priors.pipeline import LatentPriorPipeline", "",
              'pipe = LatentPriorPipeline.from_pretrained(".")',
              "images = pipe(batch_size=4, num_inference_steps=50, generator=torch.manual_seed(0)).images", "```", "",
              *([f"Class-conditional: pass `class_labels` (one per image, in [0, {u.num_class_embeds})).", ""]
                if u.num_class_embeds else []),
              "Or through diffusers' `DiffusionPipeline` (ldtok must be installed: `pipeline.py` only imports the "
              "class from it):", "",
              "```python", "from diffusers import DiffusionPipeline", "",
              'pipe = DiffusionPipeline.from_pretrained(".", custom_pipeline="pipeline", trust_remote_code=True)',
              "```", ""]
    return "\n".join(lines)


def save_prior_pipeline(out_dir: str | os.PathLike, *, unet: UNet2DModel, scheduler: SchedulerMixin,
                        tokenizer_dir: str | os.PathLike, scaling_factor: float, shift_factor: float | None = None,
                        step: int | None = None, shards: str | os.PathLike | None = None) -> Path:
    """Write the prior as a `LatentPriorPipeline` directory at `out_dir` (see the module docstring), atomically.

    The pipeline is saved to `.NAME.tmp-PID` beside `out_dir`, with the shim `pipeline.py` and a model card, and
    renamed into place once complete; an existing `out_dir` is replaced only then. A failure removes the temporary
    directory and leaves `out_dir` as it was (a full disk is a one-line `DiskFullError`).
    Whatever else an existing `out_dir` held goes with it: write other files into it (samples, `prior.json`) after.

    Args:
        out_dir (`str` or `os.PathLike`): the pipeline directory to write (e.g. `output_dir/final`).
        unet (`UNet2DModel`): the trained (EMA) UNet, unwrapped.
        scheduler (`SchedulerMixin`): the scheduler the pipeline samples with by default.
        tokenizer_dir (`str` or `os.PathLike`): the KL tokenizer the shards were encoded with; its `AutoencoderKL`
            is copied into `vae/`.
        scaling_factor (`float`), shift_factor (`float`, *optional*): the normalization the training latents had,
            `(z - shift_factor) * scaling_factor` (the shard reader's values; `shift_factor` `None` means 0).
        step (`int`, *optional*), shards (*optional*): recorded in the model card.

    Returns:
        `Path`: `out_dir`.
    """
    out_dir = Path(out_dir)
    vae = load_tokenizer_vae(tokenizer_dir)
    shift_factor = 0.0 if shift_factor is None else float(shift_factor)
    check_components(unet, vae, scaling_factor)
    # the copy's own config states the scaling the prior was trained with, as the pipeline's does (the SD convention
    # writes no shift); the weights and so the tokenizer's identity (`tokenizer_sha256`) are unchanged
    vae.register_to_config(scaling_factor=float(scaling_factor), shift_factor=shift_factor or None)
    pipe = LatentPriorPipeline(unet=unet, scheduler=scheduler, vae=vae, scaling_factor=scaling_factor,
                               shift_factor=shift_factor)
    card = render_prior_card(pipe, tokenizer_sha=tokenizer_sha256(tokenizer_dir), step=step,
                             shards=None if shards is None else str(shards))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}") if out_dir.exists() else None
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / SHIM_NAME).write_text(SHIM)
        (tmp / CARD_NAME).write_text(card)
        if old is not None:
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # the previous export stays in place
        full = disk_full_error(e, out_dir) if isinstance(e, OSError) else None
        if full is not None:
            raise full from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


__all__ = ["LatentPriorPipeline", "PriorPipelineError", "check_components", "latent_shape", "load_tokenizer_vae",
           "render_prior_card", "save_prior_pipeline"]
