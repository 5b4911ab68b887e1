"""The attribution methods through captum, on any task's `Explainable`: Integrated Gradients, Grad-CAM and occlusion,
with the rows of several inputs (and all their integration steps) sharing each captum call."""

from __future__ import annotations

import numpy as np

from finetune.errors import FinetuneError

METHODS = ("integrated-gradients", "occlusion", "gradcam")
DEFAULT_STEPS = 64
ROWS_PER_CALL = 16  # inputs whose integration steps share one captum call (sorted by length: little padding)
OCCLUSION_ROWS = 16  # occluded copies per forward pass (captum's perturbations_per_eval)
WINDOWS = 8  # occlusion of images: a window of 1/8 of the side, sliding by half a window

TRUST_EXTRA = 'pip install "finetune[trust]"'


def require_captum() -> None:
    try:
        import captum  # noqa: F401
    except ImportError:
        raise FinetuneError(f"captum: not installed, and finetune explain needs it; {TRUST_EXTRA}") from None


def explainable_of(predictor):
    """The predictor's task's side of explanations."""
    from finetune.tasks import get_task

    require_captum()
    return get_task(predictor.task).explainable(predictor)


def collate(explainable, rows: list) -> tuple:
    """(attributed tensor, its baseline, the other inputs + target index + position, their names) for rows of
    (subject, target), the attributed key padded to the longest row with the explainable's pad values."""
    import torch

    subjects = [subject for subject, _ in rows]
    key = explainable.key
    names = sorted(name for name in subjects[0].row if name != key)

    def stack(tensors: list, value) -> torch.Tensor:
        length = max(t.shape[0] for t in tensors)
        out = torch.full((len(tensors), length, *tensors[0].shape[1:]), value, dtype=tensors[0].dtype)
        for i, tensor in enumerate(tensors):
            out[i, : tensor.shape[0]] = tensor
        return out

    pad = explainable.pad_values
    x = stack([s.row[key] for s in subjects], pad.get(key, 0))
    baseline = stack([s.baseline for s in subjects], pad.get(key, 0))
    extras = [stack([s.row[name] for s in subjects], pad.get(name, 0)) for name in names]
    extras.append(torch.tensor([target.index for _, target in rows]))
    extras.append(torch.tensor([target.position or 0 for _, target in rows]))
    device = explainable.predictor.device
    return x.to(device), baseline.to(device), tuple(e.to(device) for e in extras), names


def gradient_forward(explainable, names: list[str]):
    """The torch model as captum calls it: (attributed input, other inputs..., index, position) -> target scores."""
    model = explainable.model

    def forward(x, *extras):
        output = model(**{explainable.key: x, **dict(zip(names, extras[:-2]))})
        logits = output.logits if hasattr(output, "logits") else output
        return explainable.score(logits, extras[-2], extras[-1])

    return forward


def inference_forward(explainable, names: list[str]):
    """The predictor's own forward pass (torch, or an ONNX session) as captum calls it: no gradients needed."""
    import torch

    def forward(x, *extras):
        logits = explainable.predictor.forward({explainable.key: x, **dict(zip(names, extras[:-2]))})
        return explainable.score(torch.from_numpy(np.asarray(logits)).to(extras[-2].device), extras[-2], extras[-1])

    return forward


def integrated_gradients(explainable, rows: list, steps: int):
    """Integrated Gradients from the baseline to each input (Gauss-Legendre steps, captum's default): on the
    explainable's layer (word embeddings) when it names one, else on the input tensor itself."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    x, baseline, extras, names = collate(explainable, rows)
    forward = gradient_forward(explainable, names)
    if explainable.ig_layer is not None:
        method = LayerIntegratedGradients(forward, explainable.ig_layer)
    else:
        method, x, baseline = IntegratedGradients(forward), x.float(), baseline.float()
    return method.attribute(x, baselines=baseline, additional_forward_args=extras, n_steps=steps,
                            internal_batch_size=max(forward_rows(explainable, x[0]), len(rows)))


def gradcam(explainable, rows: list, steps: int):
    """Grad-CAM on the explainable's layer (the last convolutional stage), upsampled to the input's size."""
    from captum.attr import LayerAttribution, LayerGradCam

    x, _, extras, names = collate(explainable, rows)
    cam = LayerGradCam(gradient_forward(explainable, names), explainable.gradcam_layer)
    maps = cam.attribute(x.float(), additional_forward_args=extras, relu_attributions=True)
    return LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), "bilinear")


def occlusion(explainable, rows: list, steps: int):
    """The score drop when a word (its sub-tokens set to the baseline) or a window of pixels is hidden: captum's
    FeatureAblation over word groups, or Occlusion's sliding windows where there are no words. Only forward
    passes: an ONNX export takes it too."""
    from captum.attr import FeatureAblation, Occlusion

    x, baseline, extras, names = collate(explainable, rows)
    forward = inference_forward(explainable, names)
    subjects = [subject for subject, _ in rows]
    if subjects[0].unit_index is not None:
        masks = [explainable.feature_mask(s.unit_index) for s in subjects]
        mask = baseline.new_full(x.shape, int(max(m.max() for m in masks)))
        for i, m in enumerate(masks):
            mask[i, : len(m)] = m
        return FeatureAblation(forward).attribute(x, baselines=baseline, additional_forward_args=extras,
                                                  feature_mask=mask, perturbations_per_eval=OCCLUSION_ROWS)
    side = max(1, min(x.shape[-2:]) // WINDOWS)
    window = (x.shape[1], side, side)
    stride = (x.shape[1], max(1, side // 2), max(1, side // 2))
    return Occlusion(forward).attribute(x.float(), sliding_window_shapes=window, strides=stride,
                                        baselines=baseline.float(), additional_forward_args=extras,
                                        perturbations_per_eval=OCCLUSION_ROWS)


def forward_rows(explainable, row) -> int:
    """Rows per forward and backward pass (captum's internal_batch_size, steps x inputs split so): as many as the
    explainable's budget of input elements holds (128 texts of 64 tokens, 16 images of 224 px)."""
    return max(1, explainable.forward_budget // max(1, row.numel()))


RUNNERS = {"integrated-gradients": integrated_gradients, "gradcam": gradcam, "occlusion": occlusion}


def check_method(explainable, method: str | None) -> str:
    """The method to run: the asked one when it applies, else the explainable's default."""
    offered = explainable.methods()
    if method is None:
        return offered[0]
    if method not in METHODS:
        raise FinetuneError(f"--method {method}: not one of {', '.join(METHODS)}")
    if method in offered:
        return method
    if explainable.model is None:
        raise FinetuneError(f"--method {method}: an ONNX export takes occlusion only (gradients need the torch "
                            "model); explain the run or model folder instead, or use --method occlusion")
    raise FinetuneError(f"--method {method}: does not apply to this {explainable.kind} model; use "
                        f"{' or '.join(offered)}")


def attribute(explainable, subjects: list, method: str, steps: int) -> list[list[np.ndarray]]:
    """Per subject, per target: the attributions folded into its units (words, or a heatmap)."""
    import torch

    if steps < 1:
        raise FinetuneError(f"--steps: must be at least 1, got {steps}")
    rows = [(s, t) for s in subjects for t in s.targets]
    order = sorted(range(len(rows)), key=lambda i: -rows[i][0].row[explainable.key].shape[0])
    folded: list = [None] * len(rows)
    additive = method != "occlusion"  # gradients add up over a word's sub-tokens; occlusion repeats one value
    if explainable.model is not None:
        explainable.model.to(explainable.predictor.device).eval()
    start = 0
    while start < len(order):
        # fewer long inputs per call: a call's forward passes hold at least one step of every input in it
        longest = rows[order[start]][0].row[explainable.key]
        chunk = order[start:start + min(ROWS_PER_CALL, forward_rows(explainable, longest))]
        start += len(chunk)
        with torch.enable_grad():
            attributions = RUNNERS[method](explainable, [rows[i] for i in chunk], steps)
        for i, values in zip(chunk, attributions):
            folded[i] = explainable.reduce(rows[i][0], values, additive)
    grouped, position = [], 0
    for subject in subjects:
        grouped.append(folded[position:position + len(subject.targets)])
        position += len(subject.targets)
    return grouped
