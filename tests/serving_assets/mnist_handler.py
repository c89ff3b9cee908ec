"""An ordinary user handler for the MNIST demo model, as a model owner would write it (no layerguard).

BaseHandler-based, so it needs neither torchvision nor captum: PNG/JPEG bytes -> grayscale 28x28 float
tensor in [0, 1]; logits -> {"class", "probability", "probabilities"} per request.
"""

import io

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class MnistHandler(BaseHandler):
    def preprocess(self, data):
        images = []
        for row in data:
            payload = row.get("data") or row.get("body")
            if isinstance(payload, str):
                payload = payload.encode()
            image = Image.open(io.BytesIO(payload)).convert("L")
            if image.size != (28, 28):
                image = image.resize((28, 28))
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None])
        return torch.stack(images).to(self.device)

    def postprocess(self, data):
        probs = torch.softmax(data.float(), dim=1)
        top = probs.argmax(dim=1)
        return [
            {"class": int(k), "probability": round(float(p[k]), 6),
             "probabilities": [round(v, 6) for v in p.tolist()]}
            for k, p in zip(top, probs)
        ]
