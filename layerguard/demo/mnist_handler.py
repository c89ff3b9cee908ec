"""The demo model's own TorchServe handler: an ordinary BaseHandler for 28x28 grayscale digit images.

This is what a user would already have before layerguard: PNG/JPEG bytes in, {"class", "label",
"probability"} out. It imports neither torchvision nor captum, so it runs with torchserve alone.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

__all__ = ["MnistHandler"]


class MnistHandler(BaseHandler):
    image_size = (28, 28)

    def preprocess(self, data: list[dict]) -> torch.Tensor:
        """Each request's image -> [1, 28, 28] float in [0, 1]; raises ValueError on anything else."""
        tensors = []
        for row in data:
            payload = row.get("data") or row.get("body")
            if isinstance(payload, (bytearray, memoryview)):
                payload = bytes(payload)
            if not isinstance(payload, bytes) or not payload:
                raise ValueError("expected an image file in the request body")
            image = Image.open(io.BytesIO(payload))
            image.load()
            image = image.convert("L")
            if image.size != self.image_size:
                image = image.resize(self.image_size, Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
            tensors.append(torch.from_numpy(array)[None])
        return torch.stack(tensors).to(self.device)

    def postprocess(self, data: torch.Tensor) -> list[dict]:
        probs = torch.softmax(data, dim=1)
        top, cls = probs.max(dim=1)
        return [{"class": int(c), "label": str(int(c)), "probability": float(p)} for c, p in zip(cls, top)]
