"""Token classification (NER, POS, chunking): what the training loop, validate, eval and predict ask of it."""

from __future__ import annotations

from finetune.data import RawSplit
from finetune.errors import FinetuneError
from finetune.tasks import Job, Task
from finetune.tasks.text_inputs import onnx_text_usage, text_input_limits, text_logits
from finetune.tasks.token_classification.alignment import make_loader, require_fast, tokenize
from finetune.tasks.token_classification.conll import (
    check_sentences,
    encode_tags,
    leakage_key,
    load_splits,
    read_split,
)
from finetune.tasks.token_classification.decoding import encode_inputs, predict
from finetune.tasks.token_classification.inputs import parse_words_input, read_token_inputs
from finetune.tasks.token_classification.report import TokenDataReport, tag_report
from finetune.tasks.token_classification.tags import labelled_sequences


class TokenClassification(Task):
    name = "token-classification"
    problems = ("tags",)
    inputs = "text"
    library = "transformers"
    column_key = "tokens_column"  # the data.* key naming the input column (predict --column's default)
    predict_example = '"Ada Lovelace met Charles Babbage in London"'

    def check_recipe(self, recipe, need) -> None:
        h = recipe.head
        need(h.type == "linear" and h.pooling == "auto",
             "head.type: token-classification tags each token with a linear head (transformers' "
             "*ForTokenClassification); set head.type=linear and head.pooling=auto")
        need(recipe.data.text_pair_column is None, "data.text_pair_column: is for text-classification pairs")
        need(recipe.distill is None or not recipe.data.label_all_tokens,  # a word's pieces would look like words
             "distill: the teacher's tags are matched to each word's first sub-token; set data.label_all_tokens=false")

    def read(self, spec: str, recipe, key: str) -> dict:
        return read_split(spec, recipe, key)

    def onnx_usage(self, info: dict) -> str:
        decode = """
for words, encoding, row in zip(inputs, batch, logits):  # a word's tag is its first sub-token's
    first = {w: i for i, w in reversed(list(enumerate(encoding.word_ids))) if w is not None}
    print([(words[w], info["labels"][int(row[i].argmax())]) for w, i in sorted(first.items())])
"""
        return onnx_text_usage('[["John", "lives", "in", "Paris"], ["Mary", "sings"]]', ", is_pretokenized=True",
                               decode)

    def check_eval_inputs(self, raw, recipe):
        split, _ = check_sentences(raw, "--data")
        return split

    def load_splits(self, recipe):
        return load_splits(recipe)

    def _tokenizer(self, recipe):
        from finetune.backbones import load_text_config, load_tokenizer

        source, config = load_text_config(recipe)
        tokenizer = load_tokenizer(source, recipe.backbone.trust_remote_code)
        require_fast(tokenizer)
        return source, config, tokenizer

    def report(self, recipe, splits, tokenizer) -> TokenDataReport:
        """Leakage of whole sentences, the tag scheme, entities per type, sentences cut at data.max_length."""
        from finetune import checks

        summaries = {}
        for key, part in splits.parts.items():
            info = splits.info["splits"][key]
            summaries[key] = checks.SplitSummary(source=info["source"], rows=info["count"],
                                                 skipped=info.get("skipped") or [])
        tags = tag_report(splits.parts, splits.label_names, tokenizer, recipe.data.max_length)
        report = TokenDataReport(summaries, tags)

        def say(warning: str) -> None:
            report.warnings.append(" ".join(warning.split()))

        for warning in splits.warnings:  # the splitting's own (an entity type short of data.train_per_class)
            say(warning)
        for key, summary in summaries.items():
            if summary.skipped:
                say(f"data.{key}: {len(summary.skipped)} empty sentence(s) dropped, first {summary.skipped[0]}; "
                    "split.json lists them")
        keys = {key: [leakage_key(words) for words in part.texts] for key, part in splits.parts.items()}
        for key in ("validation", "test"):
            if key in keys:
                summaries[key].in_train = checks.count_leakage(splits.parts, keys, key, True, say)
        for warning in tags.warnings:
            say(warning)
        return report

    def check_data(self, recipe):
        splits = self.load_splits(recipe)
        _, _, tokenizer = self._tokenizer(recipe)
        return self.report(recipe, splits, tokenizer)

    def job(self, recipe, accelerator):
        from finetune.tasks.batching import longest_first, train_sampler
        from finetune.tasks.token_classification.model import build_token_model, save_token_model

        t, d = recipe.train, recipe.data
        splits = self.load_splits(recipe)  # bad data fails here, before any run folder is made or removed
        source, config, tokenizer = self._tokenizer(recipe)
        report = self.report(recipe, splits, tokenizer)
        names = splits.label_names
        model = build_token_model(recipe, names, config, source, tokenizer)
        with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
            datasets = {
                # evaluation scores each word once, on its first sub-token, whatever training labels
                key: tokenize(table, tokenizer, d.max_length, names, d.label_all_tokens and key == "train")
                for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
                if table is not None
            }

        return Job(
            splits,
            model,
            datasets,
            make_loader=lambda dataset, batch, training: make_loader(
                dataset, tokenizer, batch, training, t.seed,
                train_sampler(recipe, dataset, batch) if training else longest_first(dataset),
            ),
            save=lambda unwrapped, directory: save_token_model(unwrapped, tokenizer, directory),
            warnings=report.warnings,
        )

    def teacher_outputs(self, teacher, table: dict) -> list:
        from finetune.tasks.token_classification.alignment import word_logits

        return word_logits(teacher, table["tokens"])

    def owns_model_folder(self, directory) -> bool:
        from finetune.tasks.token_classification.model import is_token_folder

        return is_token_folder(directory)

    def load_model_folder(self, directory):
        from finetune.tasks.token_classification.model import load_token_model

        return load_token_model(directory)

    def read_inputs(self, items: list[str], column: str, pair_column: str | None = None) -> list:
        return read_token_inputs(items, column, pair_column)

    def parse_input(self, value, position: int):
        return parse_words_input(value, position)

    def native_runner(self, folder, max_length: int | None):
        from finetune.tasks.text_inputs import pipeline_runner

        return pipeline_runner("token-classification", folder, words=True)

    def logits(self, predictor, inputs: list, batch_size: int, show: bool):
        return text_logits(predictor, inputs, batch_size, show)

    def predict(self, predictor, inputs, top_k=None, batch_size: int = 32, progress: bool | None = None):
        """Entities (word, label, start, end, score) and each word's tag, for raw texts or lists of words."""
        for i, item in enumerate(inputs):
            words = isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item)
            if not (isinstance(item, str) or words):
                raise FinetuneError(f"input {i + 1}: a token-classification model takes a text or a list of words, "
                                    f"got {type(item).__name__}")
        # the predictor's own forward pass: the torch model, or an ONNX export's onnxruntime session
        return predict(None, predictor.preprocess, list(inputs), predictor.labels, predictor.max_length,
                       batch_size=batch_size, forward=predictor.forward)

    def evaluate(self, predictor, raw: RawSplit, recipe, split: str = "test", batch_size: int = 32,
                 progress: bool | None = None, records: bool = False) -> dict:
        """`finetune eval`: the run's metrics on labelled sentences (empty ones dropped), each word scored on its
        first sub-token (as the run's own evaluation), and per sentence its words, true and predicted tags."""
        import types

        import torch

        from finetune.problems import get

        raw = self.check_eval_inputs(raw, recipe)
        names, tokenizer = predictor.labels, predictor.preprocess
        encoded = encode_tags(raw, names, "--data")
        dataset = tokenize({"tokens": raw.texts, "label": encoded}, tokenizer, predictor.max_length, names)
        batches = []
        for batch in make_loader(dataset, tokenizer, batch_size, False, 0):
            labels = batch.pop("labels")  # the predictor's forward: torch, or an ONNX export's session
            batches.append((torch.from_numpy(predictor.forward(dict(batch))), labels))
        details: dict = {}
        metrics = get("tags").score(batches, recipe.eval.metrics, types.SimpleNamespace(label_names=names),
                                    details=details)
        for value in details.values():
            value["split"] = split
        rows = self._records(raw, encoded, batches, names) if records else []
        return {"metrics": metrics, "rows": len(raw.texts), "details": details, "records": rows}

    def _records(self, raw: RawSplit, encoded: list, batches: list, names: list[str]) -> list[dict]:
        """Per sentence: its words, true and predicted tags, and whether every tag is right."""
        predicted: list[list[int]] = []
        for logits, labels in batches:
            predicted += labelled_sequences(labels.tolist(), logits.argmax(-1).tolist())[1]
        records = []
        for row, words, truth, guess in zip(raw.rows, raw.texts, encoded, predicted):
            # words past data.max_length were never seen: no predicted tag
            shown = [names[t] for t in guess] + [""] * (len(words) - len(guess))
            records.append({"row": row, "tokens": " ".join(words), "tags": " ".join(names[t] for t in truth),
                            "predicted": " ".join(shown).strip(), "correct": guess == truth})
        return records

    def batch_outputs(self, predictor, inputs: list, batch_size: int) -> list:
        return self.predict(predictor, inputs, batch_size=batch_size)  # decoded here: entities need the words

    def decode_outputs(self, predictor, outputs, top_k: int | None) -> list[dict]:
        return list(outputs)

    def explainable(self, predictor):
        from finetune.tasks.token_classification.explaining import TokenExplainable

        return TokenExplainable(predictor)

    def card_usage(self, recipe, reference: str, native: bool) -> str:
        # trained on first sub-tokens only, a word's later pieces carry no learnt tag: "first" reads the word's tag
        # where training put it ("simple" would split words into pieces of different entities)
        aggregation = "simple" if recipe.data.label_all_tokens else "first"
        return (
            "This folder is a standard transformers token-classification model; finetune is not needed:\n\n"
            "```python\nfrom transformers import pipeline\n\n"
            f'MODEL = "{reference}"\n'
            f'tag = pipeline("token-classification", model=MODEL, aggregation_strategy="{aggregation}")\n'
            'print(tag("your text here"))  # entities: entity_group, score, word, start, end\n```\n'
        )

    def card_input_limits(self, recipe) -> str:
        return text_input_limits(recipe)

    def parity_logits(self, predictor, sample: list):
        """One padded batch for torch and ONNX alike, so that the sub-token positions line up; `mask` marks the
        real sub-tokens."""
        from finetune.onnx_export import SampleLogits

        batch = encode_inputs(sample, predictor.preprocess, predictor.max_length).model_inputs()
        logits = predictor.forward(dict(batch)).view(SampleLogits)
        logits.mask = batch["attention_mask"].numpy().astype(bool)
        return logits

    def write_without(self, spec, recipe, dropped, output):
        """A CoNLL file stays CoNLL (its rows are the sentences' first lines); a table of word lists stays a table."""
        from finetune.tasks.row_files import TABLE_SUFFIXES, data_file, write_conll_without

        path = data_file(spec, "data.train")
        if path.suffix.lower() in TABLE_SUFFIXES:
            return super().write_without(spec, recipe, dropped, output)
        return write_conll_without(path, dropped, output), str(output)


TASK = TokenClassification()
