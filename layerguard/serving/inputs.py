"""Bad input: what the client gets, one request at a time (a 4xx with a JSON reason, never a dead worker).

Also the pixel cap: an image whose header declares more pixels than the cap is refused before any pixel is
decoded. Its default follows the model's calibrated input size, so a 28x28 model does not spend seconds
decoding 25-megapixel photos (docs/reliability.md measures it).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["FORM_TYPES", "default_max_pixels", "image_bombs_are_errors", "input_failure", "limit_image_pixels",
           "request_content_type", "why"]

BYTES_TYPES = (bytes, bytearray, memoryview)
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
MIN_DEFAULT_PIXELS = 1 << 20  # 1 MP: any model accepts a 1024x1024 photo of what it classifies
MAX_DEFAULT_PIXELS = 25_000_000  # a 24 MP camera photo; one decoded RGBA image stays near 100 MB
INPUT_AREA_FACTOR = 64  # 8x the model's input side: room for photos, far from a decompression bomb


def default_max_pixels(input_shape: Sequence[int] | None) -> int:
    """64x the calibrated input area (C, H, W), kept within [1 MP, 25 MP]; 25 MP when it is unknown."""
    if not input_shape or len(input_shape) < 2:
        return MAX_DEFAULT_PIXELS
    area = int(input_shape[-1]) * int(input_shape[-2])
    return int(min(MAX_DEFAULT_PIXELS, max(MIN_DEFAULT_PIXELS, INPUT_AREA_FACTOR * area)))


def limit_image_pixels(max_pixels: int) -> None:
    """Cap what Pillow opens in this worker (the worker serves one model)."""
    try:
        from PIL import Image
    except ImportError:  # the inner handler decodes without Pillow: nothing to cap here
        return
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


@contextlib.contextmanager
def image_bombs_are_errors() -> Iterator[None]:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; inside this block the warning is an error,
    so the cap is exact. (TorchServe calls a worker's handler from one thread, so this is safe.)"""
    try:
        from PIL import Image
    except ImportError:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def input_failure(row: Any, exc: BaseException, content_type: str | None, max_pixels: int
                  ) -> tuple[int, str, str, str]:
    """(status, phrase, error, reason) for a request the inner preprocess could not read: 413 for an image
    over the pixel cap, 415 for a body that TorchServe decoded as a form, JSON or text (no image bytes reached
    the handler), 400 for anything else (empty, not an image, truncated). The reason quotes the exception."""
    if _is_image_bomb(exc):
        return (413, "Payload Too Large", "image too large",
                f"{why(exc).rstrip('. ')}. This model accepts images of at most {max_pixels} pixels "
                "(handler.layerguard.max_image_pixels in model-config.yaml).")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in FORM_TYPES:
        return (415, "Unsupported Media Type", "unsupported media type",
                f"the body was sent with Content-Type {kind} (curl's default for --data-binary and -d), so "
                "TorchServe decoded it as a form and no image bytes reached the model. Send the file with "
                "Content-Type application/octet-stream or image/png (curl -H 'Content-Type: "
                "application/octet-stream' --data-binary @image.png, or curl -T image.png).")
    if isinstance(row, dict) and row and not any(isinstance(v, BYTES_TYPES) for v in row.values()):
        decoded = ", ".join(sorted({type(v).__name__ for v in row.values()}))
        return (415, "Unsupported Media Type", "unsupported media type",
                f"the body was sent as {content_type or 'a non-binary type'} and reached the model's handler "
                f"decoded ({decoded}), which it could not read ({why(exc)}). Send the image file itself, with "
                "Content-Type image/png, image/jpeg or application/octet-stream.")
    if isinstance(row, dict) and row and all(isinstance(v, BYTES_TYPES) and not len(v) for v in row.values()):
        return 400, "Bad Request", "invalid input", "empty request body: send the image file as the body"
    return 400, "Bad Request", "invalid input", why(exc)


def _is_image_bomb(exc: BaseException | None) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    seen = 0
    while exc is not None and seen < 8:  # the inner handler may wrap Pillow's error in its own
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def request_content_type(context: Any, i: int) -> str | None:
    """The Content-Type TorchServe recorded for request i (request header or body parameter)."""
    try:
        props = context.request_processor[i].get_request_properties()
    except (AttributeError, IndexError, TypeError):
        return None
    for key, value in props.items():
        if str(key).lower() == "content-type" and isinstance(value, str):
            return value
    for value in props.values():
        if isinstance(value, dict) and isinstance(value.get("content-type"), str):
            return value["content-type"]
    return None


def why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
