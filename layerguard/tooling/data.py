"""Reference data for calibration: a folder of class subfolders of images, or an .npz with images and labels.

One reader for both uses: `batches()` streams tensors through an `ImageTransform` (calibrate.py on an eager
model), `payload(i)` gives the bytes a client would send (calibrating a .mar through its own handler's
preprocess). Sources are re-iterable (calibration reads them twice) and stream, so memory does not grow
with the number of images in a folder. Every problem a user can cause (empty folder, unknown class,
unreadable image) is found by `validate()` before any pass starts, and named with its path.

References must be images the model never trained on: thresholds fitted on training images are too tight
(the model is more confident on them), and the false-positive rate served is then higher than asked for.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError", "ImageTransform", "ReferenceSource", "decode_image", "encode_png", "list_class_images",
    "load_npz", "open_reference",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

Transform = Callable[[Image.Image], torch.Tensor]


class DataError(ValueError):
    """Reference data that cannot be used; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float tensor [C, H, W] in [0, 1], optionally resized and normalised.

    For models packaged with their own TorchServe handler, calibrate through that handler instead
    (`layerguard wrap`), which sees exactly what serving sees.
    """

    channels: int = 3
    size: tuple[int, int] | None = None  # (height, width)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.size is not None and image.size != (self.size[1], self.size[0]):
            image = image.resize((self.size[1], self.size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
        if self.mean is not None and self.std is not None:
            m = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
            s = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
            tensor = (tensor - m) / s
        return tensor

    def array_to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N,H,W] / [N,H,W,C] or float [N,C,H,W] arrays through the same steps as a PIL image."""
        if images.dtype != np.uint8 and images.ndim == 4 and images.shape[1] in (1, 3):
            return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return torch.stack([self(Image.fromarray(np.asarray(img, dtype=np.uint8))) for img in images])


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes fully (lazy decoders would fail later, mid-batch) or raise DataError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"not a readable image ({exc})") from exc


def encode_png(image: np.ndarray) -> bytes:
    """One image as PNG bytes (what a client would upload): uint8 as is, floats in [0, 1] scaled by 255."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255)
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1).squeeze()  # CHW -> HWC
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class ReferenceSource:
    """A re-iterable source of labelled images: batched tensors, or one image's bytes."""

    class_names: tuple[str, ...]
    labels: np.ndarray  # [N] int64, in source order
    numeric_names: bool = False  # class names are the indices (digit folders): the model's own names win

    def __len__(self) -> int:
        return len(self.labels)

    def validate(self) -> None:
        """Raise DataError now for anything that would fail mid-calibration."""

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def payload(self, i: int) -> bytes:
        """Image i as the bytes a client would send."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where image i comes from, for error messages."""
        raise NotImplementedError


def list_class_images(root: Path, class_names: Sequence[str] | None = None
                      ) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(image path, class index) pairs under root/<class>/ and the class names in index order.

    Folders are matched to `class_names` when given; otherwise they are sorted, numerically when every
    folder name is an integer (then the names are the indices 0..max, as for digits)."""
    if not root.is_dir():
        raise DataError(f"reference folder {root} does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"reference folder {root} has no class subfolders (expected ROOT/<class>/<image>)")
    if class_names is None:
        if all(f.isdigit() for f in folders):
            class_names = [str(i) for i in range(max(int(f) for f in folders) + 1)]
        else:
            class_names = folders
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataError(
            f"class folder(s) {', '.join(unknown)} in {root} are not among the model's classes "
            f"({', '.join(class_names)}); rename or remove them"
        )
    items = [
        (path, index[name])
        for name in folders
        for path in sorted((root / name).iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DataError(f"reference folder {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items, tuple(class_names)


class ImageFolderSource(ReferenceSource):
    """root/<class>/<image>: class folders are matched to `class_names` (or sorted: numerically when
    every folder name is an integer, as in 0..9)."""

    def __init__(self, root: str | Path, transform: Transform | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.items, self.class_names = list_class_images(self.root, class_names)
        self.labels = np.array([label for _, label in self.items], dtype=np.int64)
        self.numeric_names = class_names is None and all(n.isdigit() for n in self.class_names)

    def payload(self, i: int) -> bytes:
        return self.items[i][0].read_bytes()

    def describe(self, i: int) -> str:
        return str(self.items[i][0])

    def _load(self, path: Path) -> torch.Tensor:
        try:
            return self.transform(decode_image(path.read_bytes()))
        except DataError as exc:
            raise DataError(f"{path}: {exc}; remove or replace the file") from exc

    def validate(self) -> None:
        if self.transform is None:
            return
        shapes = set()
        for path, _ in self.items:
            shapes.add(tuple(self._load(path).shape))
        if len(shapes) > 1:
            raise DataError(
                f"images in {self.root} have different sizes after preprocessing ({sorted(shapes)}); "
                "set --input-size"
            )

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.items), batch_size):
            chunk = self.items[start:start + batch_size]
            yield torch.stack([self._load(p) for p, _ in chunk]), torch.tensor([c for _, c in chunk])


class ArraySource(ReferenceSource):
    """In-memory images (uint8 NHW/NHWC, or float NCHW already preprocessed) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: ImageTransform | None = None,
                 class_names: Sequence[str] | None = None, origin: str = "array") -> None:
        if len(images) != len(labels):
            raise DataError(f"{origin}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise DataError(f"{origin}: no images")
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DataError(f"{origin}: labels must be non-negative integers")
        self.images, self.labels, self.transform = images, labels.astype(np.int64).reshape(-1), transform
        self.origin = origin
        n = int(labels.max()) + 1
        self.numeric_names = not class_names
        self.class_names = tuple(class_names) if class_names else tuple(str(i) for i in range(n))
        if labels.max() >= len(self.class_names):
            raise DataError(f"{origin}: label {labels.max()} is outside the {len(self.class_names)} classes")

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.transform is None:
            raise DataError(f"{self.origin}: no image transform given (use the model's handler, or give one)")
        for start in range(0, len(self.images), batch_size):
            x = self.transform.array_to_tensor(self.images[start:start + batch_size])
            yield x, torch.from_numpy(self.labels[start:start + batch_size])

    def payload(self, i: int) -> bytes:
        return encode_png(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"


def load_npz(path: str | Path, x_key: str = "x", y_key: str = "y"
             ) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Images, labels and (when the file has `class_names`) class names from an .npz, never unpickling."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in (x_key, y_key) if k not in npz.files]
            if missing:
                raise DataError(f"{path} has no array(s) {', '.join(missing)} (it has {', '.join(npz.files)}); "
                                "name them with --x-key/--y-key")
            names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else None
            return npz[x_key], npz[y_key], names
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc


def open_reference(path: str | Path, transform: ImageTransform | None = None,
                   class_names: Sequence[str] | None = None, x_key: str = "x", y_key: str = "y") -> ReferenceSource:
    """A folder of class subfolders, or an .npz file (its `class_names` array is used when none are given)."""
    path = Path(path)
    if path.is_dir():
        return ImageFolderSource(path, transform, class_names)
    if path.suffix == ".npz" and path.is_file():
        x, y, names = load_npz(path, x_key, y_key)
        return ArraySource(x, y, transform, class_names or names, origin=str(path))
    raise DataError(f"reference data {path} must be a folder of class sub-folders of images or an .npz with x, y")
