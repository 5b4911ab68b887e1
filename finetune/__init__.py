"""finetune: transfer learning from a YAML recipe — a pretrained backbone, a task head, an Accelerate trainer."""

__version__ = "0.1.0"


def load(source, device=None):
    """A trained model ready to use, from a run folder, its `model/` folder or a hub model id (owner/name).

    `finetune.load(path).predict(["a text"])` gives label names and scores (a number for regression), batched; the
    object also unpacks as `model, preprocess, spec` (the eval-mode module, the tokenizer or timm eval transform, and
    the labels and problem) for use in your own loop.
    """
    from finetune.loading import load_predictor

    return load_predictor(source, device=device)
