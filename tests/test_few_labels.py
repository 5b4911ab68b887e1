"""Few labels: N rows per class (data.train_per_class, data.validation_per_class) and the contrastive stage (SetFit's
first): exact, seeded counts; the stage really tunes the backbone, beats chance, resumes exactly, composes with LoRA,
and is refused where it does not apply."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import FILLERS, LABELS, _rows, call_main, one_error_line, recipe_dict, to_recipe, write_csv, write_recipe
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.problems import NO_LABEL, get
from finetune.tasks import get_task

HEADER = ["sentence", "topic"]
ONE_WORD = {"food": "bread", "sports": "goal", "tech": "chip"}  # one keyword per class: 4 rows show every one
CONTRASTIVE = {
    "contrastive": {"pairs": 20, "lr": 3e-3},
    "data.train_per_class": 4,
    "train.freeze": "backbone",  # SetFit's way: the head on the tuned backbone's cached features
    "head.pooling": "mean",
    "train.epochs": 20,
    "train.lr": 3e-2,
    "train.seed": 1,
    "train.checkpoint_every": 5,
    "train.keep_checkpoints": 10,
    "train.log_with": [],
}


def one_word_rows(per_class: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(per_class):
        for label, word in ONE_WORD.items():
            words = rng.sample(FILLERS, 3)
            words.insert(rng.randrange(4), word)
            rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def few_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("few-data")
    return {"train": write_csv(root / "train.csv", HEADER, one_word_rows(20, 0)),
            "validation": write_csv(root / "validation.csv", HEADER, one_word_rows(5, 1)),
            "test": write_csv(root / "test.csv", HEADER, one_word_rows(10, 2))}


@pytest.fixture(scope="module")
def contrastive_run(tiny_bert, few_data, tmp_path_factory) -> Path:
    from finetune.train import train

    out = tmp_path_factory.mktemp("contrastive") / "run"
    train(to_recipe(recipe_dict(tiny_bert, few_data, out, **CONTRASTIVE)))
    return out


def train_only(model: Path, train: Path, out: Path, **dotted) -> dict:
    """A recipe with a training file alone (validation held out of it, no test)."""
    files = {"train": train, "validation": train, "test": train}
    return recipe_dict(model, files, out, **{"data.validation": None, "data.test": None} | dotted)


def splits_of(raw: dict):
    recipe = to_recipe(raw)
    return get_task(recipe.task).load_splits(recipe)


# ---------------------------------------------------------------------------------------------------------------
# N rows per class


def test_per_class_rows_are_exact_seeded_and_never_in_validation(tiny_bert, tmp_path):
    train = write_csv(tmp_path / "all.csv", HEADER, _rows({k: 30 for k in LABELS}, seed=5))

    def cut(seed: int):
        raw = train_only(tiny_bert, train, tmp_path / "run", **{"data.train_per_class": 5, "data.val_fraction": 0.2,
                                                               "train.seed": seed})
        return splits_of(raw)

    splits = cut(0)
    assert Counter(splits.train["label"]) == {0: 5, 1: 5, 2: 5}
    info = splits.info["splits"]
    assert info["validation"]["count"] == 18  # val_fraction of ALL 90 rows, held out before the cut
    assert not set(info["train"]["rows"]) & set(info["validation"]["rows"])
    assert splits.info["per_class"] == {"train": 5, "seed": 0}
    again, other = cut(0), cut(1)
    assert again.info["splits"]["train"]["rows"] == info["train"]["rows"]
    assert other.info["splits"]["train"]["rows"] != info["train"]["rows"]
    assert Counter(other.train["label"]) == {0: 5, 1: 5, 2: 5}


def test_a_class_short_of_n_rows_is_one_line_and_validation_takes_n_per_class(tiny_bert, tmp_path, capfd):
    data = {"train": write_csv(tmp_path / "train.csv", HEADER, _rows({"food": 10, "sports": 10, "tech": 3}, seed=5)),
            "validation": write_csv(tmp_path / "val.csv", HEADER, _rows({k: 6 for k in LABELS}, seed=6))}
    raw = recipe_dict(tiny_bert, data | {"test": data["validation"]}, tmp_path / "run",
                      **{"data.train_per_class": 5, "data.validation_per_class": 2})
    with pytest.raises(FinetuneError) as caught:
        splits_of(raw)
    assert str(caught.value) == (f"data.train_per_class: 5 rows per class asked, but class 'tech' of "
                                 f"'{data['train']}' has only 3; use data.train_per_class: 3 or less")
    line = one_error_line(call_main(capfd, "validate", write_recipe(tmp_path / "r.yaml", raw)))
    assert line.endswith(str(caught.value))
    splits = splits_of(raw | {"data": raw["data"] | {"train_per_class": 3}})
    assert Counter(splits.train["label"]) == {0: 3, 1: 3, 2: 3}
    assert Counter(splits.validation["label"]) == {0: 2, 1: 2, 2: 2}
    assert splits.warnings == []


def test_a_label_short_of_n_rows_is_an_error_for_label_sets_too(tiny_bert, multi_label_data, tmp_path):
    raw = train_only(tiny_bert, multi_label_data, tmp_path / "run", **{"head.problem": "multi_label",
                                                                      "data.train_per_class": 1000})
    with pytest.raises(FinetuneError, match=r"data.train_per_class: 1000 rows per class asked, but class '\w+' of "
                                            r".* has only \d+.*; use data.train_per_class: \d+ or less$"):
        splits_of(raw)


def test_multi_label_rows_cover_every_label_n_times_greedily(tiny_bert, multi_label_data, tmp_path):
    raw = train_only(tiny_bert, multi_label_data, tmp_path / "run", **{"head.problem": "multi_label",
                                                                      "data.train_per_class": 3,
                                                                      "data.val_fraction": 0.25})
    splits = splits_of(raw)
    per_label = torch.tensor(splits.train["label"]).sum(0)
    assert (per_label >= 3).all(), per_label
    assert len(splits.train["label"]) < 3 * 3  # rows of two labels count for both
    assert get("multi_label").row_classes("") == [NO_LABEL]  # label-free rows: a class of their own


def test_tags_keep_sentences_holding_each_entity_type(tiny_bert, tmp_path):
    from test_token_classification import corpus, write

    data = {key: write(tmp_path / f"{key}.conll", corpus(seed, 40)) for seed, key in enumerate(("train", "test"))}
    raw = {"task": "token-classification", "backbone": {"name": str(tiny_bert)},
           "data": {"train": str(data["train"]), "test": str(data["test"]), "train_per_class": 2},
           "train": {"seed": 3}, "output": {"dir": str(tmp_path / "run")}}
    splits = splits_of(raw)
    names = splits.label_names
    holding = Counter(kind for row in splits.train["label"]
                      for kind in {names[t][2:] for t in row if names[t] != "O"} or {NO_LABEL})
    assert all(holding[kind] >= 2 for kind in ("PER", "LOC")), holding
    assert len(splits.train["label"]) <= 2 * 3


def test_regression_refuses_per_class_rows_and_images_refuse_contrastive_in_one_line(
        tiny_bert, regression_data, tmp_path, capfd):
    raw = train_only(tiny_bert, regression_data, tmp_path / "run",
                     **{"head.problem": "regression", "data.train_per_class": 4})
    line = one_error_line(call_main(capfd, "validate", write_recipe(tmp_path / "r.yaml", raw)))
    assert "data.train_per_class: head.problem=regression predicts a number" in line
    images = {"task": "image-classification", "backbone": {"name": "test_vit"},
              "data": {"train": str(tmp_path)}, "contrastive": {"pairs": 20}}
    with pytest.raises(FinetuneError, match="contrastive: tunes a backbone on pairs of labelled texts; "
                                            "image-classification does not take it"):
        to_recipe(images)


# ---------------------------------------------------------------------------------------------------------------
# The contrastive stage


def mean_pooled_margin(model, tokenizer, texts: list[str], labels: list[str]) -> float:
    """Same-class minus other-class mean cosine of mean-pooled embeddings (computed here, not by the kit)."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    z = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1)
    cosines = z @ z.T
    same = torch.tensor([[a == b for b in labels] for a in labels])
    off = ~torch.eye(len(texts), dtype=torch.bool)
    return float(cosines[same & off].mean() - cosines[~same].mean())


def test_the_stage_tunes_the_backbone_and_separates_the_classes(contrastive_run, tiny_bert, few_data):
    import csv

    from transformers import AutoTokenizer, BertModel

    before = BertModel.from_pretrained(tiny_bert).eval()
    after = BertModel.from_pretrained(tiny_bert).eval()
    tuned = {k[len("backbone."):]: v for k, v in load_file(contrastive_run / "model" / "model.safetensors").items()
             if k.startswith("backbone.")}
    after.load_state_dict(tuned, strict=False)
    changed = [k for k, v in before.state_dict().items() if k in tuned and not torch.equal(v, tuned[k])]
    assert len(changed) > 10, changed
    with open(few_data["test"]) as f:
        rows = list(csv.DictReader(f))
    texts, labels = [r["sentence"] for r in rows], [r["topic"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    # on test rows the stage never saw, the classes moved apart (0.006 -> 0.08 measured)
    assert mean_pooled_margin(after, tokenizer, texts, labels) > mean_pooled_margin(before, tokenizer, texts,
                                                                                    labels) + 0.05
    metrics = json.loads((contrastive_run / "metrics.json").read_text())
    stage = metrics["train"]["contrastive"]
    assert stage["pairs"] == 12 * 20 and stage["margin_after"] > stage["margin_before"] + 0.2


def test_a_few_label_contrastive_run_beats_chance_and_says_so(contrastive_run):
    import finetune

    metrics = json.loads((contrastive_run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.6, metrics["test"]  # chance: 1/3
    split = json.loads((contrastive_run / "split.json").read_text())
    assert split["splits"]["train"]["count"] == 12 and len(split["splits"]["train"]["rows"]) == 12
    card = (contrastive_run / "model" / "README.md").read_text()
    assert "tuned contrastively" in card and "4 rows per class" in card
    predictor = finetune.load(contrastive_run)
    predicted = [r["label"] for r in predictor.predict(["the bread of news", "a goal today very", "chip and a story"])]
    assert predicted.count("food") + predicted.count("sports") + predicted.count("tech") == 3


def cut_back(out: Path, keep: str) -> None:
    """What a kill leaves: the stage's checkpoints up to `keep`, none of the head stage's, no model."""
    folder = out / "checkpoints"
    for path in folder.iterdir():
        if path.name.startswith("step-") or path.name == "best" or (
                path.name.startswith("contrastive-") and path.name > keep):
            shutil.rmtree(path)
    for name in ("model", "metrics.json"):
        shutil.rmtree(out / name, ignore_errors=True) if name == "model" else (out / name).unlink()


def test_resume_in_and_after_the_stage_equals_the_uninterrupted_run(contrastive_run, tiny_bert, few_data, tmp_path):
    from test_resume import assert_identical

    from finetune.train import train

    out = tmp_path / "run"
    recipe = recipe_dict(tiny_bert, few_data, out, **CONTRASTIVE)
    train(to_recipe(recipe))
    stage = sorted(p.name for p in (out / "checkpoints").glob("contrastive-*"))
    assert stage == ["contrastive-00000005", "contrastive-00000010", "contrastive-00000015"]
    for keep, said in (("contrastive-00000005", "resumed from"), ("contrastive-00000015", "done before the resume")):
        cut_back(out, keep)
        train(to_recipe(recipe), resume=True)
        assert f"contrastive stage: {said}" in (out / "train.log").read_text()
        assert_identical(out, contrastive_run)


def test_with_lora_the_stage_tunes_the_adapters(tiny_bert, few_data, tmp_path):
    from finetune.train import train

    out = tmp_path / "run"
    settings = CONTRASTIVE | {"train.freeze": "none", "lora": {"r": 4}, "train.epochs": 2,
                              "contrastive": {"pairs": 20, "lr": 3e-2}}  # adapters want a larger rate
    metrics = train(to_recipe(recipe_dict(tiny_bert, few_data, out, **settings)))
    (done,) = (out / "checkpoints").glob("contrastive-00000015")
    tuned = load_file(done / "weights.safetensors")
    assert tuned and all("lora_" in name for name in tuned), sorted(tuned)[:4]
    assert metrics["train"]["contrastive"]["margin_after"] > metrics["train"]["contrastive"]["margin_before"]
    assert (out / "adapter").is_dir() and (out / "model").is_dir()


def test_pairs_are_balanced_seeded_and_their_targets_are_the_label_similarity():
    from finetune.contrastive import draw_pairs

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    left, right, target = draw_pairs(labels, get("single_label"), 4, seed=0)
    assert Counter(left.tolist()) == dict.fromkeys(range(8), 4)
    same = labels[left] == labels[right]
    assert same.sum() == 16 and (torch.from_numpy(target) == same.float()).all()
    assert not (same & torch.from_numpy(left == right)).any()  # a row has others of its class: never itself
    assert (draw_pairs(labels, get("single_label"), 4, seed=0)[1] == right).all()
    assert not (draw_pairs(labels, get("single_label"), 4, seed=1)[1] == right).all()
    sets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
    similarity = get("multi_label").label_similarity(sets, sets)
    assert similarity[0, 1] == 0.5 and similarity[0, 2] == 0 and similarity[3, 4] == 1 and similarity[2, 3] == 0


def test_both_losses_prefer_embeddings_that_group_the_classes():
    from finetune.contrastive import cosine_loss, supcon_loss

    torch.manual_seed(0)
    centres = torch.randn(3, 16)
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 2, 1])  # pairs (0, 4), (1, 5), (2, 6), (3, 7): 1, 1, 1, 0
    grouped = centres[labels] + 0.1 * torch.randn(8, 16)
    scattered = torch.randn(8, 16)
    targets = (labels[:4] == labels[4:]).float()
    assert cosine_loss(grouped, targets) < cosine_loss(scattered, targets)
    similarity = get("single_label").label_similarity(labels, labels)
    assert supcon_loss(grouped, similarity) < supcon_loss(scattered, similarity)
    lonely = torch.tensor([0, 1, 2, 3])  # no row has a positive: nothing to learn, not a nan
    assert supcon_loss(torch.randn(4, 8), get("single_label").label_similarity(lonely, lonely)) == 0


def test_supcon_tunes_the_backbone_too(tiny_bert, few_data, tmp_path):
    from finetune.train import train

    settings = CONTRASTIVE | {"contrastive": {"pairs": 20, "lr": 3e-3, "loss": "supcon"}, "train.epochs": 2,
                              "train.checkpoint_every": None}
    stage = train(to_recipe(recipe_dict(tiny_bert, few_data, tmp_path / "run", **settings)))["train"]["contrastive"]
    assert stage["margin_after"] > stage["margin_before"] + 0.2, stage


@pytest.mark.slow
def test_the_tuned_model_exports_to_onnx_with_the_same_logits(contrastive_run):
    import numpy as np

    import finetune
    from finetune.onnx_export import export_onnx

    export_onnx(contrastive_run)
    folder = contrastive_run / "export" / "onnx"
    assert json.loads((folder / "export.json").read_text())["parity"]["max_abs_logit_diff"] < 1e-4
    texts = ["the bread of news", "a goal today", "chip"]
    np.testing.assert_allclose(finetune.load(folder).logits(texts), finetune.load(contrastive_run).logits(texts),
                               atol=1e-4)


@pytest.mark.parametrize("kind", ["multi_label", "pairs"])
def test_the_stage_runs_on_label_sets_and_sentence_pairs(kind, tiny_bert, few_data, multi_label_data, tmp_path):
    from finetune.train import train

    settings = CONTRASTIVE | {"train.epochs": 2, "train.checkpoint_every": None}
    if kind == "multi_label":
        data = dict.fromkeys(("train", "validation", "test"), multi_label_data)
        settings |= {"head.problem": "multi_label", "data.train_per_class": 6}
    else:
        rows = [(text, "and the news", label) for text, label in one_word_rows(20, 0)]
        data = dict.fromkeys(("train", "validation", "test"),
                             write_csv(tmp_path / "pairs.csv", ["sentence", "other", "topic"], rows))
        settings |= {"data.text_pair_column": "other"}
    stage = train(to_recipe(recipe_dict(tiny_bert, data, tmp_path / "run", **settings)))["train"]["contrastive"]
    assert stage["margin_after"] > stage["margin_before"] + 0.1, stage


@pytest.mark.slow
def test_at_four_rows_per_class_the_stage_beats_the_head_alone_over_three_seeds(tiny_bert, few_data, tmp_path):
    from finetune.train import train

    def mean_accuracy(stage: dict | None) -> float:
        scores = []
        for seed in (0, 1, 2):
            settings = CONTRASTIVE | {"contrastive": stage, "train.seed": seed, "train.checkpoint_every": None}
            out = tmp_path / f"{stage is not None}-{seed}"
            scores.append(train(to_recipe(recipe_dict(tiny_bert, few_data, out, **settings)))["test"]["accuracy"])
        return sum(scores) / len(scores)

    alone, tuned = mean_accuracy(None), mean_accuracy(CONTRASTIVE["contrastive"])
    assert tuned > alone + 0.1, (alone, tuned)  # measured: 0.46 alone, 0.62 with the stage


@pytest.mark.slow
def test_ctrl_c_in_the_stage_checkpoints_and_resumes_exactly(tiny_bert, few_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import subprocess_env
    from test_resume import assert_identical

    from finetune.train import train

    settings = CONTRASTIVE | {"contrastive": {"pairs": 100, "lr": 3e-3, "epochs": 2}, "train.checkpoint_every": None,
                              "train.epochs": 2}
    whole = tmp_path / "whole"
    train(to_recipe(recipe_dict(tiny_bert, few_data, whole, **settings)))
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, few_data, out, **settings)
    path = write_recipe(tmp_path / "recipe.yaml", raw)
    code = ("from finetune.recipe import load_recipe; from finetune.train import train; "
            f"train(load_recipe({str(path)!r}))")
    child = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    log = out / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and "contrastive stage: 1200 pairs" not in (log.read_text() if log.is_file() else ""):
        time.sleep(0.01)
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    output, _ = child.communicate(timeout=120)
    assert child.returncode != 0 and "interrupted in the contrastive stage at step" in output, output[-2000:]
    assert list((out / "checkpoints").glob("contrastive-*")) and not list((out / "checkpoints").glob("step-*"))
    train(to_recipe(raw), resume=True)
    assert "contrastive stage: resumed from" in log.read_text()
    assert_identical(out, whole)
