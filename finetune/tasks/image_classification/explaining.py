"""Image classification's side of `finetune explain`: the image as the model saw it, a baseline of zeros (the mean
image, after normalisation), Grad-CAM on the backbone's last convolutional stage, heatmaps at the input size."""

from __future__ import annotations

import numpy as np

from finetune.tasks.explaining import Explainable, Subject, Target, row_target


class ImageExplainable(Explainable):
    key = "pixel_values"
    kind = "image"
    forward_budget = 16 * 3 * 224 * 224  # 16 images of 224 px per forward and backward pass

    def __init__(self, predictor):
        super().__init__(predictor)
        from finetune.model import interface_of

        self.gradcam_layer = interface_of(self.model).gradcam_layer() if self.model is not None else None

    def subjects(self, entries: list, label: str | None) -> list[Subject]:
        import torch

        from finetune.tasks.image_classification.files import load_image

        subjects = []
        for n, entry in enumerate(entries):
            pixels = self.predictor.preprocess(load_image(entry))
            logits = torch.from_numpy(np.asarray(self.predictor.forward({"pixel_values": pixels[None]})))
            target = row_target(self.predictor, logits[0], label, self.transform)
            shown = entry if isinstance(entry, str) else f"image {n + 1}"
            subjects.append(Subject(shown, entry, {"pixel_values": pixels}, torch.zeros_like(pixels), [target],
                                    picture=self.picture(pixels)))
        return subjects

    def picture(self, pixels) -> np.ndarray:
        """uint8 HxWx3 of the normalised input: what the model saw, for the overlay."""
        steps = getattr(self.predictor.preprocess, "transforms", [])
        normalise = next((step for step in steps if hasattr(step, "mean") and hasattr(step, "std")), None)
        values = pixels.detach().float().numpy().transpose(1, 2, 0)
        if normalise is not None:
            values = values * np.asarray(normalise.std) + np.asarray(normalise.mean)
        return (values.clip(0, 1) * 255).round().astype(np.uint8)

    def reduce(self, subject: Subject, attribution, additive: bool) -> np.ndarray:
        """A heatmap at the input size: channels summed (gradients) or averaged (occlusion)."""
        values = attribution.detach().float()
        values = values.sum(0) if additive else values.mean(0)
        return values.cpu().numpy()

    def describe(self, subject: Subject, explained: list[tuple[Target, np.ndarray]]) -> dict:
        target, heatmap = explained[0]
        return {"label": target.label, "score": target.score, "heatmap": np.round(heatmap, 6).tolist()}
