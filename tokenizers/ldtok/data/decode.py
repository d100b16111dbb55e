"""Image decoding: any cell of an `Image(decode=False)` column (bytes, path, PIL image) to an upright 8-bit RGB image.

`decode_image` reads the bytes (local or fsspec paths), applies the EXIF orientation and `to_rgb`, which converts
every PIL mode the way a viewer shows it (alpha on white, 16-bit and float greyscale scaled, CMYK through its ICC
profile).
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger("ldtok.data")

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")

def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would show it.

    Transparent pixels are composited on white (RGBA, LA, P or L/RGB with a transparency entry). High bit depth
    greyscale is scaled by its value range, not clipped as PIL's `convert` does (a 16-bit image would come out white):
    `I;16*` by 65535; `I` by 65535 when its values fit in 16 bits, else by its min..max; `F` by 1 when its values lie in
    [0, 1], else by its min..max. CMYK with an embedded ICC profile is converted through it.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
            lo, hi = 0.0, 65535.0
        elif image.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
        scaled = (values - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8)).convert("RGB")  # (H, W) -> L
    if image.mode == "CMYK" and image.info.get("icc_profile"):
        try:
            from PIL import ImageCms  # needs Pillow built with littlecms

            source = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception as err:  # ImportError (Pillow without littlecms), ImageCms.PyCMSError (broken profile), ...
            logger.debug("ICC conversion failed (%s); using PIL's naive CMYK conversion", err, exc_info=True)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, *, min_side: int | None = None) -> Image.Image:
    """Decode an image cell (`{"bytes", "path"}` dict, bytes, path or PIL image) to an upright RGB PIL image.

    Args:
        value: the raw cell of an `Image(decode=False)` column (or an already decoded PIL image).
        min_side (`int`, *optional*): JPEGs may be decoded at a reduced scale (DCT scaling, fast for big photos) as
            long as their shorter side stays at least `min_side`.

    Raises whatever PIL raises on an undecodable file (callers catch it).
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = value, None
        elif isinstance(value, (str, os.PathLike)):
            data, path = None, os.fspath(value)
        else:
            raise TypeError(f"unsupported image cell of type {type(value).__name__}")
        if data is None:
            if path is None:
                raise ValueError("image cell has neither bytes nor path")
            if "://" in path:  # remote or chained (zip://...::hf://...) path of a streamed dataset
                import fsspec

                with fsspec.open(path, "rb") as f:
                    data = f.read()
            else:
                with open(path, "rb") as f:
                    data = f.read()
        image = Image.open(io.BytesIO(data))
        if min_side is not None and image.format == "JPEG":
            W, H = image.size
            scale = min_side / max(min(W, H), 1)
            image.draft(image.mode, (int(np.ceil(W * scale)), int(np.ceil(H * scale))))
        image.load()  # decode now, inside the caller's try: PIL opens lazily
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: camera photos are stored rotated
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)
