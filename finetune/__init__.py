"""finetune: transfer learning from a YAML recipe — a pretrained backbone, a task head, an Accelerate trainer."""

__version__ = "0.1.0"


def load(directory):
    """(model, preprocess, spec) from a run's `model/` folder: transformers, timm or finetune's own format.

    `preprocess` is the tokenizer for text and timm's eval transform for images; `spec` has the labels and problem.
    """
    from finetune.model import load as load_model

    return load_model(directory)
