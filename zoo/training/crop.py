"""ADM's centre crop (guided-diffusion ``center_crop_arr``), which DiT, U-ViT, DiMR, fast-DiT and
REPA all use to make ImageNet training images: halve with BOX filtering while the short side is at
least twice the target (cheap antialiasing), resize the short side to the target with BICUBIC,
then cut out the centre square."""

from __future__ import annotations

import torch
from torch import Tensor

#: Past this many pixels the resized image is not made whole: only its centre square is resampled.
MAX_RESIZED_PIXELS = 1 << 24


def adm_center_crop(image, size: int):
    """A ``size``×``size`` PIL image cut from the centre of ``image`` (a PIL image) the ADM way.

    ADM resizes the whole image before it crops, which zoo does exactly (pixel for pixel) up to
    ``MAX_RESIZED_PIXELS`` (a 256:1 strip at 256): a 1×20000 strip at 256 would become
    256×5,120,000 pixels (~4 GB). Past it the same bicubic resampling is asked for the centre
    square only (PIL's ``box``): the same crop up to how PIL rounds between its two passes, pixel
    for pixel on wide strips, and on tall ones up to ~25 levels of 255 on pixel noise (under 1 on
    average; smooth content differs far less).
    """
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    width, height = (round(s * scale) for s in image.size)
    left, top = (width - size) // 2, (height - size) // 2
    if width * height > MAX_RESIZED_PIXELS:
        sx, sy = image.width / width, image.height / height
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return image.resize((size, size), resample=Image.BICUBIC, box=box)
    image = image.resize((width, height), resample=Image.BICUBIC)
    return image.crop((left, top, left + size, top + size))


#: How :func:`to_rgb` reads images, recorded with what is made from them: 1, PIL's ``convert("RGB")``;
#: 2 (2026-12-07), transparency on white, 16-bit PGMs and float TIFFs at their scale.
IMAGE_DECODING = 2

#: Float (mode ``F``) images whose values stay at or below this are read as [0, 1]: a float TIFF in [0, 1]
#: resampled with a bicubic filter overshoots 1 a little, and read as [0, 255] it was black.
FLOAT_UNIT_MAX = 2.0


def on_white(image):
    """``image`` (a PIL image with an alpha channel or a transparent palette entry) composited on white, as RGB.

    Dropping the alpha instead showed whatever colour the file keeps under its transparent pixels:
    black in most RGBA PNGs, the palette's entry (dark green in Twemoji's) in palette PNGs."""
    from PIL import Image

    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _decoded_from_16_bit(image) -> bool:
    """Whether PIL decodes ``image`` (not loaded yet) from 16-bit samples into its mode ``I``: a 16-bit
    PNG in older PIL, a binary or plain PGM/PPM with a maximum value above 255 (its decoder scales it to
    16 bits). A tile is a 4-tuple (a named one in newer PIL): (codec, extents, offset, args)."""
    for codec, _extents, _offset, args in getattr(image, "tile", None) or ():
        args = args if isinstance(args, tuple) else (args,)
        if codec in ("ppm", "ppm_plain") or (args and isinstance(args[0], str) and args[0].startswith("I;16")):
            return True
    return False


def has_alpha(image) -> bool:
    """Whether ``image`` has transparency: an alpha channel or a transparent colour (``info['transparency']``)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def to_rgb(image):
    """``image`` (a PIL image of any mode) as 8-bit RGB.

    Transparent pixels are composited on white (:func:`on_white`, as emoji32 renders its PNGs).
    16-bit grayscale (modes ``I;16*``, mode ``I`` decoded from 16-bit samples, and other ``I`` images
    holding values above 255) is scaled to 8 bits: PIL's own conversion clips it, which turns most
    such images white. Floating-point grayscale (mode ``F``, a float TIFF) whose values stay at or below
    :data:`FLOAT_UNIT_MAX` is read as [0, 1] and scaled by 255 (PIL's conversion made it black), others
    as [0, 255]; both are clipped.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        import numpy as np
        from PIL import Image

        sixteen = image.mode.startswith("I;16") or (image.mode == "I" and _decoded_from_16_bit(image))
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        transparent = image.info.get("transparency")  # a 16-bit PNG's transparent grey level
        clear = values == transparent if isinstance(transparent, int) and not isinstance(transparent, bool) else None
        if sixteen or (image.mode == "I" and values.max(initial=0) > 255):
            values = values * (255 / 65535)
        elif image.mode == "F" and values.max(initial=0) <= FLOAT_UNIT_MAX:
            values = values * 255
        if clear is not None:
            values[clear] = 255  # on white, as on_white composites the other modes
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    if has_alpha(image):
        return on_white(image)
    return image.convert("RGB")


def to_tensor(image) -> Tensor:
    """An RGB PIL image as float (3, H, W) in [-1, 1]."""
    rgb = image.convert("RGB")
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0
