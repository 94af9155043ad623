"""The one way an image becomes model input, for training batches and inference requests alike
(SPEC.md 4.4): decode, convert to RGB, resize bilinearly to size x size, scale to [0, 1],
normalise per channel. F32 [3, size, size]."""

from __future__ import annotations

import io

import torch

from ..errors import InputError, MissingExtra

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def image_tensor(data: bytes, size: int, what: str, mean: tuple[float, ...] = IMAGE_MEAN,
                 std: tuple[float, ...] = IMAGE_STD) -> torch.Tensor:
    """The normalised pixels of an image file's bytes; InputError naming `what` if unreadable."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MissingExtra("pillow", "hf") from None
    if size <= 0:
        raise InputError("images need a positive image size")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            raw = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise InputError(f"cannot read image {what}: {exc}") from None
    x = raw.reshape(size, size, 3).permute(2, 0, 1).to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s
