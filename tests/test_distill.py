"""Smaller models: backbone.layers keeps some pretrained layers (bit for bit, exported natively), and distill trains a
student on a trained teacher's soft targets (text, tags, images; unlabelled rows; LoRA; exact resume)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, call_main, one_error_line, recipe_dict, to_recipe, write_recipe
from safetensors.torch import load_file

import finetune
from finetune.errors import FinetuneError
from finetune.problems import IGNORE_INDEX, get
from finetune.train import latest_checkpoint, train

STUDENT = {"backbone.layers": 2, "train.epochs": 4}


@pytest.fixture(scope="module")
def runs(bert4, tiny_data, tmp_path_factory):
    """Runs on the tiny topic texts: a 4-layer teacher, then 2-layer students (labels alone / distilled / alpha 0)."""
    root = tmp_path_factory.mktemp("distill-runs")

    def run(name: str, **dotted) -> Path:
        train(to_recipe(recipe_dict(bert4, tiny_data, root / name, **dotted)))
        return root / name

    teacher = run("teacher", **{"train.epochs": 8})
    return {
        "teacher": teacher,
        "labels": run("labels", **STUDENT),
        "distilled": run("distilled", **STUDENT, distill={"teacher": str(teacher), "alpha": 0.9}),
        "alpha0": run("alpha0", **STUDENT, distill={"teacher": str(teacher), "alpha": 0.0}),
    }


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def texts(data: dict) -> list[str]:
    import csv

    return [row["sentence"] for key in ("validation", "test") for row in csv.DictReader(open(data[key]))]


def kl_to(teacher: Path, student: Path, inputs: list[str]) -> float:
    """KL(teacher || student) of their softmaxes, the mean over the inputs, both as finetune.load gives them."""
    t, s = (torch.from_numpy(finetune.load(run).logits(inputs)).log_softmax(-1) for run in (teacher, student))
    return float((t.exp() * (t - s)).sum(-1).mean())


# ---------------------------------------------------------------------------------------------------------------
# backbone.layers


def test_layer_selection_keeps_the_named_layers_bit_for_bit_and_exports_what_transformers_loads(bert4, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from finetune.model import interface_of
    from finetune.tasks.text_classification.model import build_text_model

    recipe = to_recipe(recipe_dict(bert4, {"train": "x", "validation": "x", "test": "x"}, tmp_path / "out"))
    model, tokenizer = build_text_model(recipe, ["a", "b", "c"])
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.bert.encoder.layer]
    kept, total = interface_of(model).keep_layers(3)
    assert (kept, total) == ([0, 2, 3], 4)  # numpy.linspace(0, 3, 3) rounded: the first and the last kept
    assert len(model.bert.encoder.layer) == 3 and model.config.num_hidden_layers == 3
    for position, index in enumerate(kept):
        after = model.bert.encoder.layer[position].state_dict()
        assert all(torch.equal(after[k], before[index][k]) for k in after)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.num_hidden_layers == 3
    batch = tokenizer(["the bread of today", "a goal and news"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)


@pytest.mark.slow  # transformers' pipeline in a fresh process: ~10 s
def test_a_layer_dropped_run_records_its_layers_and_its_folder_runs_in_pipeline_as_in_the_kit(runs, tiny_data):
    from conftest import run_without_finetune

    student = runs["labels"]
    assert metrics_of(student)["backbone_layers"] == {"kept": [0, 3], "of": 4}
    assert "kept 2 of the 4 pretrained layers: [0, 3]" in (student / "train.log").read_text()
    assert json.loads((student / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    inputs = texts(tiny_data)
    script = ("import json, sys\nfrom transformers import pipeline\n"
              "p = pipeline('text-classification', model=sys.argv[1], top_k=None)\n"
              "print(json.dumps([{d['label']: d['score'] for d in row} for row in p(json.loads(sys.argv[2]))]))")
    theirs = run_without_finetune(script, student / "model", json.dumps(inputs), cwd=student)
    ours = finetune.load(student).predict(inputs)
    for mine, row in zip(ours, theirs):
        assert {s["label"]: pytest.approx(s["score"], abs=1e-5) for s in mine["scores"]} == row


def test_timm_blocks_are_trimmed_where_timm_has_a_stack_and_refused_in_one_line_elsewhere(tmp_path):
    import timm

    from finetune.model import interface_of
    from finetune.tasks.image_classification.model import build_vision_model, save_vision_model

    raw = {"task": "image-classification", "backbone": {"name": "test_vit", "pretrained": False},
           "data": {"train": str(tmp_path), "image_size": 32}, "output": {"dir": str(tmp_path / "out")}}
    recipe = to_recipe(raw)
    model, data_config = build_vision_model(recipe, ["a", "b"])
    total = len(model.model.blocks)
    before = [b.state_dict() for b in model.model.blocks]
    kept, _ = interface_of(model).keep_layers(2)
    assert kept == [0, total - 1] and len(model.model.blocks) == 2
    assert all(torch.equal(v, before[total - 1][k]) for k, v in model.model.blocks[1].state_dict().items())
    save_vision_model(model, tmp_path / "saved", recipe, ["a", "b"], data_config)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model.eval()(pixel_values=pixels))
    cnn, _ = build_vision_model(to_recipe(raw | {"backbone": {"name": "test_efficientnet", "pretrained": False}}),
                                ["a", "b"])
    with pytest.raises(FinetuneError, match=r"^backbone.layers: timm's 'test_efficientnet' .* pick a smaller model"):
        interface_of(cnn).keep_layers(1)


# ---------------------------------------------------------------------------------------------------------------
# distill on texts


def test_a_distilled_student_ends_closer_to_its_teacher_than_one_trained_on_the_labels(runs, tiny_data):
    inputs = texts(tiny_data)
    distilled, alone = (kl_to(runs["teacher"], runs[key], inputs) for key in ("distilled", "labels"))
    assert distilled < 0.8 * alone, (distilled, alone)
    record = metrics_of(runs["distilled"])["distill"]
    assert record["teacher"] == str(runs["teacher"]) and record["teacher_outputs"] == "cached per row"
    assert record["teacher_test"] == pytest.approx(metrics_of(runs["teacher"])["test"], abs=1e-5)
    card = (runs["distilled"] / "model" / "README.md").read_text()
    assert f"Distilled from `{runs['teacher']}`" in card and "The teacher on the same test split: accuracy" in card


def test_alpha_zero_trains_exactly_as_the_labels_alone(runs):
    ours, theirs = (load_file(runs[key] / "model" / "model.safetensors") for key in ("alpha0", "labels"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert metrics_of(runs["alpha0"])["test"] == metrics_of(runs["labels"])["test"]


def test_the_soft_loss_of_a_student_that_is_its_teacher_is_zero_and_grows_with_disagreement():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    cases = {"single_label": torch.tensor([0, 1, 2, 0]), "multi_label": torch.zeros(4, 3),
             "regression": torch.zeros(4)}
    for name, labels in cases.items():
        problem = get(name)
        outputs = logits[:, :1] if name == "regression" else logits
        assert float(problem.soft_loss(outputs, outputs.clone(), labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
        assert float(problem.soft_loss(outputs, outputs.flip(0), labels, 2.0)) > 1e-3


def test_tags_take_the_kl_per_labelled_sub_token_with_the_teachers_word_rows():
    tags = get("tags")
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 0, 2, IGNORE_INDEX]])  # 3 words; pieces ignored
    words = np.random.RandomState(0).randn(3, 4).astype(np.float32)  # the teacher's rows, one per word
    targets = tags.soft_targets([words], labels)
    assert torch.equal(targets[0, [1, 3, 4]], torch.from_numpy(words))
    assert torch.isnan(targets[0, [0, 2, 5]]).all()
    student = torch.randn(1, 6, 4)
    student[0, [1, 3, 4]] = torch.from_numpy(words)
    assert float(tags.soft_loss(student, targets, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student[0, [0, 2, 5]] += 5.0  # what the ignored positions say does not count
    assert float(tags.soft_loss(student, targets, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student[0, 3] += torch.tensor([3.0, 0.0, 0.0, -3.0])
    assert float(tags.soft_loss(student, targets, labels, 2.0)) > 0.1
    # a teacher that cut the sentence short: its missing word is left out
    short = tags.soft_targets([words[:2]], labels)
    assert torch.isnan(short[0, 4]).all() and torch.equal(short[0, 3], torch.from_numpy(words[1]))


def test_unlabeled_rows_join_training_with_lora_and_their_share_is_recorded(runs, bert4, tiny_data, tmp_path):
    extra = ["the soup of today", "a team and news", "very robot story", "the cake and data", "news of the match",
             "a code story", "today rice", "the ball of a laptop"]
    (tmp_path / "unlabeled.txt").write_text("\n".join(extra) + "\n")
    out = tmp_path / "run"
    distill = {"teacher": str(runs["teacher"] / "model"), "unlabeled": str(tmp_path / "unlabeled.txt")}
    train(to_recipe(recipe_dict(bert4, tiny_data, out, **STUDENT, distill=distill, lora={"r": 4})))
    record = metrics_of(out)["distill"]
    assert record["unlabeled_rows"] == 8 and record["unlabeled_share"] == pytest.approx(8 / 24)
    log = (out / "train.log").read_text()
    assert "train 24 | validation 9 | test 9 examples" in log and "(33.3% of training)" in log
    assert (out / "adapter").is_dir() and "LoRA adapter saved" in log


def test_bad_teachers_layers_and_unlabeled_files_are_one_line_at_validate(runs, bert4, tiny_data, tmp_path, capfd):
    other = tmp_path / "other-labels"
    shutil.copytree(runs["teacher"] / "model", other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"] = {"0": "cats", "1": "dogs", "2": "fish"}
    config["label2id"] = {"cats": 0, "dogs": 1, "fish": 2}
    (other / "config.json").write_text(json.dumps(config))
    multi = tmp_path / "multi-label"
    shutil.copytree(runs["teacher"] / "model", multi)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps(config | {"problem_type": "multi_label_classification"}))
    from transformers import BertForTokenClassification

    tagger = tmp_path / "tagger"
    BertForTokenClassification.from_pretrained(bert4, num_labels=3).save_pretrained(tagger)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert4 / name, tagger)
    (tmp_path / "no-column.csv").write_text("words\nthe soup\n")
    cases = [
        ({"distill": {"teacher": str(tagger)}},
         r"^finetune: error: distill.teacher: '.*' is a token-classification model, but the recipe's task is "
         r"text-classification; give a teacher trained for the same task"),
        ({"distill": {"teacher": str(multi)}}, r"solves head.problem=multi_label, the student single_label"),
        ({"distill": {"teacher": str(other)}},
         r"^finetune: error: distill.teacher: '.*' has the labels \(cats, dogs, fish\), the training data "
         r"\(food, sports, tech\); give a teacher"),
        ({"distill": {"teacher": str(tmp_path / "nowhere")}}, r"^finetune: error: distill.teacher: .*nowhere"),
        ({"backbone.layers": 5}, r"^finetune: error: backbone.layers: 5 is not between 1 and the 4 layers of"),
        ({"backbone.layers": 0}, r"backbone.layers: must be at least 1"),
        ({"distill": {"teacher": str(runs["teacher"]), "unlabeled": str(tmp_path / "no-column.csv")}},
         r"^finetune: error: distill.unlabeled: .*sentence"),
        ({"distill": {"teacher": str(runs["teacher"]), "unlabeled": str(tmp_path / "no-such.txt")}},
         r"^finetune: error: distill.unlabeled: '.*no-such.txt' does not exist"),
    ]
    for dotted, message in cases:
        path = write_recipe(tmp_path / "recipe.yaml", recipe_dict(bert4, tiny_data, tmp_path / "out", **dotted))
        line = one_error_line(call_main(capfd, "validate", path))
        assert re.search(message, line), (message, line)


def test_resume_in_the_middle_of_distilling_equals_the_uninterrupted_run(runs, bert4, tiny_data, tmp_path):
    dotted = {**STUDENT, "backbone.dropout": 0.1, "train.batch_size": 4, "train.checkpoint_every": 3,
              "train.keep_checkpoints": 10, "distill": {"teacher": str(runs["teacher"])}}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(to_recipe(recipe_dict(bert4, tiny_data, whole, **dotted)))
    train(to_recipe(recipe_dict(bert4, tiny_data, cut, **dotted)))
    steps = sorted((cut / "checkpoints").glob("step-*"))
    for later in steps[2:]:  # killed after step 6, in the middle of epoch 2
        subprocess.run(["rm", "-rf", str(later)], check=True)
    for name in ("model", "metrics.json"):
        subprocess.run(["rm", "-rf", str(cut / name)], check=True)
    assert latest_checkpoint(cut) == steps[1]
    train(to_recipe(recipe_dict(bert4, tiny_data, cut, **dotted)), resume=True)
    assert "resumed from" in (cut / "train.log").read_text()
    ours, theirs = (load_file(run / "model" / "model.safetensors") for run in (cut, whole))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    drop = ("train",)
    assert {k: v for k, v in metrics_of(cut).items() if k not in drop} == \
        {k: v for k, v in metrics_of(whole).items() if k not in drop}


def test_a_teacher_with_its_own_tokenizer_reads_the_raw_texts_and_its_cached_outputs_are_its_own(bert4, tiny_data,
                                                                                                 tmp_path):
    from accelerate import Accelerator
    from transformers import BertConfig, BertModel, BertTokenizer

    from finetune.tasks import get_task

    # the teacher's vocabulary numbers every word differently: the student's token ids would mean nothing to it
    other = tmp_path / "other-vocab"
    words = VOCAB[:5] + VOCAB[5:][::-1]
    BertTokenizer(vocab={word: i for i, word in enumerate(words)}).save_pretrained(other)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    BertModel(config).save_pretrained(other)
    teacher = tmp_path / "teacher"
    train(to_recipe(recipe_dict(other, tiny_data, teacher, **{"train.epochs": 1})))
    recipe = to_recipe(recipe_dict(bert4, tiny_data, tmp_path / "out", distill={"teacher": str(teacher)}))
    job = get_task(recipe.task).job(recipe, Accelerator(cpu=True))
    from finetune.distill import make_distiller

    distiller = make_distiller(recipe, job, torch.device("cpu"))
    fresh = finetune.load(teacher).logits(job.splits.train["text"])
    rows = job.datasets["train"]["row"]
    assert rows == list(range(len(fresh)))
    cached = distiller.problem.soft_targets([distiller.outputs[r] for r in rows], torch.zeros(len(rows)))
    assert torch.equal(cached, torch.from_numpy(fresh))


# ---------------------------------------------------------------------------------------------------------------
# distill on tags and images


@pytest.mark.slow  # two token runs
def test_a_tagger_distils_from_a_tagger_per_token(tmp_path):
    from test_token_classification import PIECES, SPECIAL, corpus, write
    from transformers import BertConfig, BertModel, BertTokenizer

    from test_token_task import token_raw

    backbone = tmp_path / "tagger-bert"
    BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + PIECES)}).save_pretrained(backbone)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(SPECIAL + PIECES), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)
              ).save_pretrained(backbone)
    data = {key: write(tmp_path / f"{key}.conll", corpus(seed, count))
            for seed, (key, count) in enumerate((("train", 48), ("validation", 16), ("test", 16)))}
    teacher = tmp_path / "teacher"
    train(to_recipe(token_raw(backbone, data, teacher)))
    raw = token_raw(backbone, data, tmp_path / "student")
    raw["backbone"]["layers"] = 1
    raw["train"]["epochs"] = 3
    raw["distill"] = {"teacher": str(teacher), "alpha": 0.7}
    metrics = train(to_recipe(raw))
    assert metrics["distill"]["teacher_outputs"] == "cached per row"
    assert metrics["distill"]["teacher_test"]["f1"] == pytest.approx(metrics_of(teacher)["test"]["f1"], abs=1e-6)
    assert metrics["backbone_layers"] == {"kept": [0], "of": 2}
    assert metrics["test"]["f1"] > 0.5


def test_a_vit_student_distils_from_a_cnn_on_mixed_augmented_batches(tmp_path):
    from test_vision_train import CNN, save_split, vision_raw

    data = {split: save_split(tmp_path / split, count, seed)
            for seed, (split, count) in enumerate((("train", 8), ("validation", 4), ("test", 4)))}
    teacher = tmp_path / "teacher"
    train(to_recipe(vision_raw(data, teacher, **{"train.epochs": 2})))
    student = vision_raw(data, tmp_path / "student", **{
        "backbone.name": "test_vit", "backbone.layers": 2, "train.epochs": 1, "augment.mixup": 0.4,
        "augment.hflip": 0.5, "augment.scale": [0.5, 1.0], "distill": {"teacher": str(teacher)}})
    metrics = train(to_recipe(student))
    assert metrics["distill"]["teacher_outputs"] == "per batch"
    assert metrics["distill"]["teacher_test"] == pytest.approx(metrics_of(teacher)["test"], abs=1e-5)
    assert np.isfinite([e["loss"] for e in metrics["epochs"]]).all()
    assert json.loads((tmp_path / "student" / "model" / "config.json").read_text())["model_args"]["depth"] == 2
    assert CNN in (tmp_path / "teacher" / "model" / "config.json").read_text()
    # a folder of unlabelled images joins training (mixup would mix their placeholder labels in: refused)
    unlabeled = save_split(tmp_path / "unlabeled", 2, 9)
    student["distill"]["unlabeled"] = str(unlabeled)
    with pytest.raises(FinetuneError, match="distill.unlabeled: mixup and cutmix"):
        train(to_recipe(student | {"output": {"dir": str(tmp_path / "refused")}}))
    student["augment"]["mixup"] = 0.0
    student["output"]["dir"] = str(tmp_path / "with-unlabeled")
    metrics = train(to_recipe(student))
    assert metrics["distill"]["unlabeled_rows"] == 6 and metrics["distill"]["unlabeled_share"] == pytest.approx(6 / 30)
