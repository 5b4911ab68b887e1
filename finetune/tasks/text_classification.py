"""Text classification (and sentence pairs): a text per row, one label, a label set or a number; a transformers
backbone and head, tokenised rows in length-grouped batches, a native `*ForSequenceClassification` folder."""

from __future__ import annotations

from finetune import checks
from finetune import data as data_module
from finetune.errors import FinetuneError
from finetune.tasks import Job


class TextClassification:
    name = "text-classification"
    problems = ("single_label", "multi_label", "regression")
    inputs = "text"
    library = "transformers"
    column_key = "text_column"  # the data.* key naming the input column (predict --column's default)
    serve_input = "text"  # what one /predict input is (finetune.serve.INPUT_PARSERS)

    def check_recipe(self, recipe, need) -> None:
        pass  # every text key applies

    def read(self, spec: str, recipe, key: str) -> dict:
        return data_module.read_split(spec, recipe, key)

    def onnx_usage(self, info: dict) -> str:
        from finetune.problems import get
        from finetune.tasks import onnx_text_usage

        pairs = ((info.get("recipe") or {}).get("data") or {}).get("text_pair_column")
        inputs = ('[("a first text", "the text paired with it"), ("another", "pair")]  # encoded as the pair'
                  if pairs else '["a text to label", "another one"]')
        return onnx_text_usage(inputs, "", get(info["problem"]).onnx_decode)

    def check_eval_inputs(self, raw, recipe):
        for i, text in enumerate(raw.texts):
            if not isinstance(text, str) or not text.strip():
                raise FinetuneError(
                    f"{data_module._where(raw, i)}: empty text in column '{recipe.data.text_column}'; "
                    "fill it or drop the row"
                )
        return raw

    def load_splits(self, recipe):
        return data_module.load_splits(recipe)

    def check_data(self, recipe):
        from finetune.backbones import load_text_config, load_tokenizer

        splits = self.load_splits(recipe)
        source, config = load_text_config(recipe)
        tokenizer = load_tokenizer(source, recipe.backbone.trust_remote_code)
        return checks.data_report(recipe, splits, tokenizer, checks.backbone_max_tokens(tokenizer, config))

    def job(self, recipe, accelerator) -> Job:
        from finetune.backbones import load_text_config, load_tokenizer
        from finetune.model import build_text_model, save_model

        t = recipe.train
        splits = self.load_splits(recipe)  # bad data fails here, before any run folder is made or removed
        source, config = load_text_config(recipe)
        tokenizer = load_tokenizer(source, recipe.backbone.trust_remote_code)
        # texts longer than the backbone takes, leakage, imbalance: errors before any model is built, else warnings
        report = checks.data_report(recipe, splits, tokenizer, checks.backbone_max_tokens(tokenizer, config))
        model, tokenizer = build_text_model(recipe, splits.label_names, tokenizer)
        with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
            datasets = {
                key: data_module.tokenize(table, tokenizer, recipe.data.max_length)
                for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
                if table is not None
            }
        return Job(
            splits,
            model,
            datasets,
            make_loader=lambda dataset, batch, training: data_module.make_loader(
                dataset, tokenizer, batch, training, t.seed,
                train_sampler(recipe, dataset, batch) if training else longest_first(dataset),
            ),
            save=lambda unwrapped, directory: save_model(unwrapped, tokenizer, directory, recipe, splits.label_names),
            warnings=report.warnings,
        )


def longest_first(dataset) -> list[int]:
    """Evaluation order for text: rows sorted by length, so each batch pads to little more than its own rows
    (metrics do not depend on the order; features computed this way are put back in row order)."""
    from finetune.sampling import token_lengths

    lengths = token_lengths(dataset)
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def train_sampler(recipe, dataset, batch_size: int):
    """The training order when it is not a plain shuffle: length-grouped batches or class-balanced draws."""
    from finetune import sampling, transfer

    t = recipe.train
    if t.group_by_length:
        return sampling.LengthGroupedSampler(sampling.token_lengths(dataset), batch_size, t.seed)
    if t.sampler == "balanced":
        return sampling.ClassBalancedSampler(transfer.labels_of(dataset), t.seed)
    return None


TASK = TextClassification()
