"""finetune: transfer learning from a YAML recipe — a pretrained backbone, a task head, an Accelerate trainer."""

__version__ = "0.1.0"


def load(directory):
    """(model, tokenizer, spec) from a run's `model/` folder, native transformers or finetune's own format."""
    from finetune.model import load as load_model

    return load_model(directory)
