"""The MNIST handler for a torch.export program (.pt2): BaseHandler in TorchServe 0.12 loads only
TorchScript, eager and AOT-compiled models, so the owner loads the program here (as `.module()`, whose
hooks never fire - layerguard swaps in the unflattened program)."""

import os

import torch
from mnist_handler import MnistHandler


class MnistExportHandler(MnistHandler):
    def initialize(self, context):
        props = context.system_properties
        self.manifest = context.manifest
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu")
        path = os.path.join(props["model_dir"], self.manifest["model"]["serializedFile"])
        self.model = torch.export.load(path).module().to(self.device)
        self.initialized = True
