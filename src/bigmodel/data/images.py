"""Reading image files into uint8 arrays, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bigmodel.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def read_image(path: str | Path, channels: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image file to a (C, H, W) uint8 array.

    `channels`: 1 → grey, 3 → RGB, None → as stored (grey stays 1, anything else becomes RGB).
    `size`: (height, width) to resize to (bilinear), or None to keep it.
    """
    path = Path(path)
    try:
        return _decode(path, str(path), channels, size)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None


def decode_image(
    data: bytes, channels: int | None = None, size: tuple[int, int] | None = None, name: str = "image"
) -> np.ndarray:
    """Like `read_image`, for encoded bytes (PNG/JPEG/BMP) held in memory."""
    import io

    return _decode(io.BytesIO(data), name, channels, size)


def _decode(source: object, name: str, channels: int | None, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:  # type: ignore[arg-type]
            img.load()
            if channels is None:
                channels = 1 if img.mode in ("1", "L", "I", "I;16", "F") else 3
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and (img.height, img.width) != tuple(size):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def is_grey(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.mode in ("1", "L", "I", "I;16", "F")
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
