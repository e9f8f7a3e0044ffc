"""The registered classifier as MLflow serves it anywhere (MLflow's "models from code").

MLflow copies this file into every logged model and runs it where the model is loaded, with only
mlflow, numpy and torch installed: it imports nothing of xbl. The network travels as a
`torch.export` program (no pickled xbl class), with a card that names the classes and the input
it expects. `mlflow.pyfunc.load_model("models:/<name>@champion").predict(images)` takes uint8
images (N, C, H, W) at the trained size and returns, per image, the predicted class name, its
probability and every class's probability.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class ImageClassifier(PythonModel):
    def load_context(self, context) -> None:
        self.card = json.loads(Path(context.artifacts["card"]).read_text())
        self.network = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = np.asarray(model_input)
        c, size = self.card["channels"], self.card["image_size"]
        if images.ndim != 4 or images.shape[1:] != (c, size, size):
            raise ValueError(
                f"expected uint8 images of shape (N, {c}, {size}, {size}), got {images.shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / 255.0)
        with torch.no_grad():
            probs = torch.softmax(self.network(x), dim=1).numpy()
        classes = self.card["classes"]
        table = pd.DataFrame(probs, columns=[f"p_{name}" for name in classes])
        table.insert(0, "class", [classes[i] for i in probs.argmax(axis=1)])
        table.insert(1, "probability", probs.max(axis=1))
        return table


mlflow.models.set_model(ImageClassifier())
