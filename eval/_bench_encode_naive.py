"""The naive side of `eval/bench_encode.py`: the per-image encoding loop users write without ldtok, run as a script
(one case per process, so its peak memory is its own): diffusers `from_pretrained`, PIL + torchvision transforms,
`vae.encode(x[None])` in fp32, every latent kept in a list and `torch.save`d at the end.

    python eval/_bench_encode_naive.py --model DIR --images FOLDER --resolution 64 --out latents.pt --result r.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ldtok.atomic import write_text_atomic
from ldtok.config import check_range
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def naive_encode(*, model: str, images: str, resolution: int, out: str, sample: bool = True) -> dict:
    """The loop users write without ldtok (module docstring), in this process.

    `sample=False` keeps the posterior mean (`latent_dist.mode()`) instead of a sample: the same work, and latents a
    test can compare with what `ldtok encode` stores.

    Returns:
        `dict` with `images` (encoded), `seconds` (the loop and the save), `device` and `threads` (torch's intra-op).
    """
    import diffusers
    import torch
    from PIL import Image
    from torchvision import transforms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    class_name = json.loads((Path(model) / "config.json").read_text())["_class_name"]
    vae = getattr(diffusers, class_name).from_pretrained(model).to(device).eval()
    transform = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])  # fmt: skip
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    t0 = time.perf_counter()
    latents = []
    with torch.no_grad():
        for path in files:
            x = transform(Image.open(path).convert("RGB")).to(device)  # (3, R, R) in [-1, 1]
            if isinstance(vae, diffusers.AutoencoderKL):
                posterior = vae.encode(x[None]).latent_dist
                z = (posterior.sample() if sample else posterior.mode()) * vae.config.scaling_factor  # (1, C, h, w)
            else:
                h = vae.encode(x[None]).latents  # (1, C, h, w), before quantization
                _, _, (_, _, indices) = vae.quantize(h)
                z = indices.reshape(1, *h.shape[-2:])  # (h * w,) -> (1, h, w)
            latents.append(z.cpu())
    torch.save(torch.cat(latents), out)  # (N, C, h, w) or (N, h, w)
    return {"images": len(latents), "seconds": time.perf_counter() - t0, "device": str(device),
            "threads": torch.get_num_threads()}


@dataclass
class NaiveOptions:
    """One case of the naive loop (the command line `_bench_encode.naive_case` passes).

    Args:
        model (`str`): a diffusers `AutoencoderKL` / `VQModel` directory.
        images (`str`): image folder.
        resolution (`int`): side of the square images fed to the encoder.
        out (`str`): where `torch.save` writes the latents.
        result (`str`): JSON file for the measured images and seconds.
    """

    model: str
    images: str
    resolution: int
    out: str
    result: str

    def __post_init__(self):
        check_range(self, "resolution", gt=0)


def _naive_main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="the naive encoding loop of eval/bench_encode.py (one case)")
    args = config_from_args(NaiveOptions, add_config_arguments(parser, NaiveOptions).parse_args(argv))
    result = naive_encode(model=args.model, images=args.images, resolution=args.resolution, out=args.out)
    write_text_atomic(args.result, json.dumps(result) + "\n")


if __name__ == "__main__":
    from ldtok.errors import run_cli

    run_cli(_naive_main)
