"""Image sizes a tokenizer can reproduce: both sides multiples of its downsampling factor."""

from __future__ import annotations

from ..errors import LdtokError


class ImageSizeError(LdtokError, ValueError):
    """An image side that is not a multiple of the model's downsampling factor."""


def check_image_size(height: int, width: int, factor: int, *, what: str = "image size") -> None:
    """Raise `ImageSizeError` naming both numbers unless `height` and `width` are multiples of `factor`.

    A side that is not a multiple would be encoded to `floor(side / f)` latents, which decode to a smaller image than
    the one encoded (66 px on an f4 model: 16 latents, 64 px back).
    """
    if height % factor or width % factor:
        bad = height if height % factor else width
        lower, upper = bad - bad % factor, bad - bad % factor + factor
        raise ImageSizeError(f"{what} {height}x{width} is not divisible by the model's downsampling factor {factor} "
                             f"({bad} % {factor} = {bad % factor}): use a multiple of {factor}, e.g. "
                             f"{lower or upper} or {upper}")


def check_resolution(resolution: int, factor: int, *, what: str = "--resolution") -> None:
    """`check_image_size` for a square resolution, naming the flag or key it came from."""
    if resolution % factor:
        lower, upper = resolution - resolution % factor, resolution - resolution % factor + factor
        raise ImageSizeError(f"{what} {resolution} is not divisible by the model's downsampling factor {factor}: "
                             f"use a multiple of {factor}, e.g. {lower or upper} or {upper}")
