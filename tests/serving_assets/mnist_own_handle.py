"""A user handler that overrides `handle` itself (its own batching, an extra key, a custom explain and
describe): wrapping must keep all of it."""

import io

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class OwnHandleMnist(BaseHandler):
    def _tensor(self, row):
        payload = row.get("data") or row.get("body")
        image = Image.open(io.BytesIO(bytes(payload))).convert("L").resize((28, 28))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]

    def handle(self, data, context):
        self.context = context
        if context.get_request_header(0, "describe") == "True":
            return [{"description": "digits, own handle"}]
        if context.get_request_header(0, "explain") == "True":
            return [{"explanation": "own explain", "n": len(data)}]
        x = torch.stack([self._tensor(row) for row in data]).to(self.device)
        with torch.no_grad():
            logits = self.model(x)
        return [{"digit": int(k), "handled_by": "own handle"} for k in logits.argmax(dim=1)]
