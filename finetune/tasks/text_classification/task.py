"""The text-classification task (and sentence pairs): a text per row, one label, a label set or a number; a transformers
backbone and head, tokenised rows in length-grouped batches, a native `*ForSequenceClassification` folder."""

from __future__ import annotations

from finetune import checks
from finetune.data import where_row
from finetune.errors import FinetuneError
from finetune.tasks import Job
from finetune.tasks.batching import longest_first, train_sampler
from finetune.tasks.rows import RowTask, TableFeatures
from finetune.tasks.text_classification.inputs import parse_text_input
from finetune.tasks.text_classification.reading import TEXT_ZOO, load_text_splits, read_text_split
from finetune.tasks.text_classification.tokens import make_text_loader, tokenize_texts
from finetune.tasks.text_inputs import onnx_text_usage, read_text_inputs, text_input_limits, text_logits


class TextClassification(RowTask):
    name = "text-classification"
    problems = ("single_label", "multi_label", "regression")
    inputs = "text"
    library = "transformers"
    column_key = "text_column"  # the data.* key naming the input column (predict --column's default)
    contrastive_applies = True  # SetFit's first stage: texts (and pairs) of one class embedded alike

    def check_recipe(self, recipe, need) -> None:
        pass  # every text key applies

    def zoo_data(self) -> tuple[str, ...]:
        return tuple(TEXT_ZOO)

    def baseline_features(self, recipe):
        from sklearn.feature_extraction.text import TfidfVectorizer

        # word unigrams and bigrams with sublinear counts: the classical text classifier a network has to beat
        return TableFeatures(table_texts, TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True))

    def read(self, spec: str, recipe, key: str) -> dict:
        return read_text_split(spec, recipe, key)

    def onnx_usage(self, info: dict) -> str:
        from finetune.problems import get

        pairs = ((info.get("recipe") or {}).get("data") or {}).get("text_pair_column")
        inputs = ('[("a first text", "the text paired with it"), ("another", "pair")]  # encoded as the pair'
                  if pairs else '["a text to label", "another one"]')
        return onnx_text_usage(inputs, "", get(info["problem"]).onnx_decode)

    def teacher_outputs(self, teacher, table: dict) -> list:
        pairs = table.get("text_pair")
        texts = table["text"] if pairs is None else [{"text": a, "text_pair": b} for a, b in zip(table["text"], pairs)]
        return list(teacher.logits(texts, batch_size=64, progress=False)) if texts else []

    def owns_model_folder(self, directory) -> bool:
        from finetune.tasks.text_classification.model import is_text_folder

        return is_text_folder(directory)

    def load_model_folder(self, directory):
        from finetune.tasks.text_classification.model import load_text_model

        return load_text_model(directory)

    def read_inputs(self, items: list[str], column: str, pair_column: str | None = None) -> list:
        return read_text_inputs(items, column, pair_column)

    def parse_input(self, value, position: int):
        return parse_text_input(value, position)

    def logits(self, predictor, inputs: list, batch_size: int, show: bool):
        return text_logits(predictor, inputs, batch_size, show)

    def timing_inputs(self, raw) -> list:
        if raw.pairs is None:
            return list(raw.texts)
        return [{"text": a, "text_pair": b} for a, b in zip(raw.texts, raw.pairs)]  # predict's and pipeline's pairs

    def native_runner(self, folder, max_length: int | None):
        from finetune.tasks.text_inputs import pipeline_runner

        return pipeline_runner("text-classification", folder, truncation=True, max_length=max_length)

    def explainable(self, predictor):
        from finetune.tasks.explaining import TextExplainable

        return TextExplainable(predictor)

    def card_usage(self, recipe, reference: str, native: bool) -> str:
        from finetune.model_folder import row_usage

        return row_usage(recipe, reference, native, vision=False)

    def card_input_limits(self, recipe) -> str:
        return text_input_limits(recipe)

    def check_eval_inputs(self, raw, recipe):
        for i, text in enumerate(raw.texts):
            if not isinstance(text, str) or not text.strip():
                raise FinetuneError(
                    f"{where_row(raw, i)}: empty text in column '{recipe.data.text_column}'; "
                    "fill it or drop the row"
                )
        return raw

    def load_splits(self, recipe):
        return load_text_splits(recipe)

    def check_data(self, recipe):
        from finetune.backbones import load_text_config, load_tokenizer

        splits = self.load_splits(recipe)
        source, config = load_text_config(recipe)
        tokenizer = load_tokenizer(source, recipe.backbone.trust_remote_code)
        return checks.data_report(recipe, splits, tokenizer, checks.backbone_max_tokens(tokenizer, config))

    def job(self, recipe, accelerator) -> Job:
        from finetune.backbones import load_text_config, load_tokenizer
        from finetune.tasks.text_classification.model import build_text_model, save_model

        t = recipe.train
        splits = self.load_splits(recipe)  # bad data fails here, before any run folder is made or removed
        source, config = load_text_config(recipe)
        tokenizer = load_tokenizer(source, recipe.backbone.trust_remote_code)
        # texts longer than the backbone takes, leakage, imbalance: errors before any model is built, else warnings
        report = checks.data_report(recipe, splits, tokenizer, checks.backbone_max_tokens(tokenizer, config))
        model, tokenizer = build_text_model(recipe, splits.label_names, tokenizer)
        with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
            datasets = {
                key: tokenize_texts(table, tokenizer, recipe.data.max_length)
                for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
                if table is not None
            }
        return Job(
            splits,
            model,
            datasets,
            make_loader=lambda dataset, batch, training: make_text_loader(
                dataset, tokenizer, batch, training, t.seed,
                train_sampler(recipe, dataset, batch) if training else longest_first(dataset),
            ),
            save=lambda unwrapped, directory: save_model(unwrapped, tokenizer, directory, recipe, splits.label_names),
            warnings=report.warnings,
            add_unlabeled=lambda rows, inputs, label: with_unlabeled(rows, inputs, label, tokenizer,
                                                                     recipe.data.max_length),
        )


def with_unlabeled(rows, inputs: list, label, tokenizer, max_length: int):
    """distill.unlabeled: the tokenised training rows followed by the unlabelled texts (or pairs), each with the
    placeholder label; and those inputs' table."""
    import datasets

    pairs = [item["text_pair"] for item in inputs if isinstance(item, dict)]
    texts = [item["text"] if isinstance(item, dict) else item for item in inputs]
    table = {"text": texts, "label": [label] * len(inputs), **({"text_pair": pairs} if pairs else {})}
    return datasets.concatenate_datasets([rows, tokenize_texts(table, tokenizer, max_length)]), table


TASK = TextClassification()


def table_texts(table: dict) -> list[str]:
    """A split table's texts for a bag of words: a sentence pair as its two texts joined."""
    pairs = table.get("text_pair") or [None] * len(table["text"])
    return [text if pair is None else f"{text} {pair}" for text, pair in zip(table["text"], pairs)]
