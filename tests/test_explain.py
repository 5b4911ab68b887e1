"""`finetune explain`: Integrated Gradients' completeness on a tiny BERT, words that line up with the text, --label,
Grad-CAM on a hand-built image model that keys on one patch, occlusion on an ONNX export, explain.html in Chromium,
faithfulness against random words, and bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from browser import needs_chromium, open_page, wait_for
from conftest import LABELS, _rows, call_main, one_error_line, recipe_dict, to_recipe, write_csv
import test_token_task

import finetune
from finetune.explain.api import explain_inputs, explain_subjects
from finetune.tasks.explaining import TextExplainable
from finetune.train import train

# the tagger of test_token_task (its fixtures, shared here by name)
tagger_backbone, conll, token_run = test_token_task.tagger_backbone, test_token_task.conll, test_token_task.token_run
TEXTS = ["the bread today and", "a goal of news", "very robot story code"]


@pytest.fixture(scope="module")
def text_run(tiny_bert, tmp_path_factory):
    """A tiny BERT trained until the keyword decides the topic (96 rows, 8 epochs: a few seconds)."""
    root = tmp_path_factory.mktemp("explain-run")
    header = ["sentence", "topic"]
    data = {
        "train": write_csv(root / "train.csv", header, _rows({k: 32 for k in LABELS}, seed=10)),
        "validation": write_csv(root / "validation.csv", header, _rows({k: 4 for k in LABELS}, seed=11)),
        "test": write_csv(root / "test.csv", header, _rows({k: 6 for k in LABELS}, seed=12)),
    }
    train(to_recipe(recipe_dict(tiny_bert, data, root / "run", **{"train.epochs": 8, "train.lr": 3e-3})))
    assert json.loads((root / "run" / "metrics.json").read_text())["test"]["accuracy"] > 0.7  # chance is 1/3
    return root


def baseline_score(predictor, text: str, index: int) -> float:
    """The model's score for `index` on the baseline IG starts from: every word a pad token, [CLS]/[SEP] kept."""
    subject = TextExplainable(predictor).encode(text)
    batch = {key: value[None] for key, value in subject.row.items()}
    batch["input_ids"] = subject.baseline[None]
    with torch.no_grad():
        logits = predictor.model(**batch).logits
    return float(torch.softmax(logits, -1)[0, index])


def test_integrated_gradients_add_up_to_the_score_difference(text_run):
    predictor = finetune.load(text_run / "run")
    results = explain_inputs(predictor, TEXTS, steps=64)
    for text, result in zip(TEXTS, results):
        index = LABELS.index(result["label"])
        difference = result["score"] - baseline_score(predictor, text, index)
        total = sum(word["attribution"] for word in result["words"])
        assert abs(total - difference) <= 0.01 * abs(difference) + 1e-5, (text, total, difference)
    # where the model is right, the keyword carries the prediction: its word has the largest attribution
    right = [(text, r) for text, r in zip(TEXTS, results) if any(k in text.split() for k in KEYWORD_OF[r["label"]])]
    assert len(right) >= 2
    for text, result in right:
        top = max(result["words"], key=lambda word: word["attribution"])["word"]
        assert top in KEYWORD_OF[result["label"]], result


KEYWORD_OF = {"food": ["bread", "soup", "cake", "rice", "salad"], "sports": ["goal", "match", "team", "score", "ball"],
              "tech": ["chip", "code", "data", "robot", "laptop"]}


def test_words_and_offsets_line_up_with_the_text_and_the_pair(text_run):
    predictor = finetune.load(text_run / "run")
    text, pair = "Bread,  soup!? zzz", "the  GOAL"
    single, paired = explain_inputs(predictor, [text, {"text": text, "text_pair": pair}], steps=8)
    assert [w["word"] for w in single["words"]] == ["Bread", ",", "soup", "!", "?", "zzz"]
    for word in single["words"]:
        assert text[word["start"]:word["end"]] == word["word"]
    assert [w["word"] for w in paired["pair_words"]] == ["the", "GOAL"]
    for word in paired["pair_words"]:
        assert pair[word["start"]:word["end"]] == word["word"]


def test_label_changes_what_is_explained_and_an_unknown_one_is_one_line(text_run, capfd):
    runs = {}
    for label in ("food", "tech"):
        done = call_main(capfd, "explain", text_run / "run", "very robot story code", "--label", label, "--json",
                         "--steps", "16")
        assert done.returncode == 0, done.stderr
        runs[label] = json.loads(done.stdout)
    assert runs["food"]["label"] == "food" and runs["tech"]["label"] == "tech"
    robot = {label: next(w["attribution"] for w in r["words"] if w["word"] == "robot") for label, r in runs.items()}
    assert robot["tech"] > 0 > robot["food"]  # the tech keyword speaks for tech and against food
    line = one_error_line(call_main(capfd, "explain", text_run / "run", "a text", "--label", "weather"))
    assert "--label weather" in line and "food" in line


def test_bad_explain_input_is_one_line(text_run, capfd):
    assert "--data" in one_error_line(call_main(capfd, "explain", text_run / "run", "--faithfulness"))
    line = one_error_line(call_main(capfd, "explain", text_run / "run", "a text", "--method", "gradcam"))
    assert "gradcam" in line and "integrated-gradients" in line
    assert "--steps" in one_error_line(call_main(capfd, "explain", text_run / "run", "a text", "--steps", "0"))


def test_a_missing_extra_is_one_line_naming_the_pip_install(text_run, capfd, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "captum", None)  # as if captum were not installed
    line = one_error_line(call_main(capfd, "explain", text_run / "run", "a text"))
    assert 'pip install "finetune[trust]"' in line


def test_words_are_tinted_at_a_terminal_and_plain_in_a_pipe():
    from finetune.explain.render import terminal_words

    words = [{"word": "good", "attribution": 0.5}, {"word": "bad", "attribution": -0.25}]
    assert terminal_words(words, coloured=False) == "good(+0.500) bad(-0.250)"
    tinted = terminal_words(words, coloured=True)
    assert "\x1b[48;2;220;50;47m" in tinted  # the strongest word: full red
    assert "\x1b[48;2;146;197;232m" in tinted  # half as strong against: half-way to blue


def test_occlusion_is_the_score_drop_of_removing_each_word(text_run):
    predictor = finetune.load(text_run / "run")
    [result] = explain_inputs(predictor, ["the bread today and"], method="occlusion")
    index = LABELS.index(result["label"])
    explainable = TextExplainable(predictor)
    subject = explainable.encode("the bread today and")
    for n, word in enumerate(result["words"]):
        batch = {key: value[None].clone() for key, value in subject.row.items()}
        batch["input_ids"][0, subject.unit_index == n] = explainable.pad_values["input_ids"]
        dropped = float(torch.softmax(torch.from_numpy(predictor.forward(batch)), -1)[0, index])
        assert word["attribution"] == pytest.approx(result["score"] - dropped, abs=1e-5)


def test_faithfulness_integrated_gradients_beat_random_words(text_run, capfd):
    done = call_main(capfd, "explain", text_run / "run", "--data", text_run / "test.csv", "--column", "sentence",
                     "--faithfulness", "--json", "--steps", "16")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == 18 and set(report["methods"]) == {"integrated-gradients", "occlusion"}
    ig = report["methods"]["integrated-gradients"]
    assert ig["comprehensiveness"] > report["random"]["comprehensiveness"]
    assert ig["sufficiency"] < report["random"]["sufficiency"]


@pytest.mark.slow
def test_an_onnx_export_gets_occlusion_equal_to_the_torch_models(text_run, capfd):
    from finetune.onnx_export import export

    info = export(text_run / "run")
    folder = info["path"] if not str(info["path"]).endswith(".onnx") else str(info["path"]).rsplit("/", 1)[0]
    onnx = explain_inputs(finetune.load(folder), TEXTS)  # no method: occlusion, the only one without gradients
    torch_model = explain_inputs(finetune.load(text_run / "run"), TEXTS, method="occlusion")
    for a, b in zip(onnx, torch_model):
        assert a["label"] == b["label"]
        assert np.allclose([w["attribution"] for w in a["words"]], [w["attribution"] for w in b["words"]], atol=1e-4)
    line = one_error_line(call_main(capfd, "explain", folder, "a text", "--method", "integrated-gradients"))
    assert "ONNX" in line and "occlusion" in line


# ---------------------------------------------------------------------------------------------------------------
# Images: a hand-built model that looks at one patch


class PatchModel(torch.nn.Module):
    """Channel 0 sees red, channel 1 blue (1x1 convolution: its map is Grad-CAM's layer); the "yes" logit is the
    red response inside one 4x4 patch only."""

    def __init__(self, side: int = 16, patch: tuple[int, int] = (8, 4)):
        super().__init__()
        self.stage = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.stage.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]])[:, :, None, None])
            self.stage.bias.zero_()
        mask = torch.zeros(1, 1, side, side)
        mask[..., patch[0]:patch[0] + 4, patch[1]:patch[1] + 4] = 1
        self.register_buffer("mask", mask)
        self.feature_info = [{"module": "stage", "num_chs": 2, "reduction": 1}]

    def forward(self, x):
        yes = (torch.relu(self.stage(x))[:, :1] * self.mask).sum((2, 3)) / 16
        return torch.cat([-yes, yes], 1)


def patch_image() -> np.ndarray:
    """Grey, a red square where the model looks (rows 8-11, columns 4-7) and a blue one elsewhere."""
    pixels = np.full((16, 16, 3), 128, dtype=np.uint8)
    pixels[8:12, 4:8] = (250, 20, 20)
    pixels[1:5, 10:14] = (20, 20, 250)
    return pixels


def test_gradcam_peaks_on_the_patch_the_model_keys_on(tmp_path):
    from torchvision import transforms

    from finetune.explain.render import write_page
    from finetune.model import TimmClassifier
    from finetune.predictor import Predictor

    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    spec = {"task": "image-classification", "problem": "single_label", "labels": ["no", "yes"]}
    predictor = Predictor(TimmClassifier(PatchModel()), preprocess, spec, device="cpu")
    image = patch_image()
    for method in ("gradcam", "integrated-gradients", "occlusion"):
        results, subjects, _ = explain_subjects(predictor, [image], method=method, label="yes", steps=32)
        heat = np.asarray(results[0]["heatmap"])
        assert heat.shape == (16, 16) and results[0]["label"] == "yes"
        row, column = np.unravel_index(heat.argmax(), heat.shape)
        assert 7 <= row <= 12 and 3 <= column <= 8, (method, row, column)  # inside the red patch (occlusion: by it)
        assert heat[1:5, 10:14].max() < 0.5 * heat.max()  # the blue square the model ignores stays cold
    assert np.array_equal(subjects[0].picture, image)  # the overlay is drawn on what the model saw
    write_page(tmp_path, ["patch"], results, subjects, "occlusion")
    from PIL import Image

    assert Image.open(tmp_path / "image-1.png").size == (16, 16)


def test_gradcam_reads_a_vits_patch_tokens_as_a_grid_and_changes_nothing():
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from finetune.model import TimmClassifier
    from finetune.predictor import Predictor

    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=2).eval()
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        before = vit(pixels)
    transform = create_transform(**resolve_model_data_config(vit), is_training=False)
    spec = {"task": "image-classification", "problem": "single_label", "labels": ["a", "b"]}
    predictor = Predictor(TimmClassifier(vit), transform, spec, device="cpu")
    [result] = explain_inputs(predictor, [patch_image()], method="gradcam")
    heat = np.asarray(result["heatmap"])
    assert heat.shape == (160, 160) and heat.max() > 0  # the class token reads the patches through the last block
    with torch.no_grad():
        assert torch.allclose(vit(pixels), before, atol=1e-6)
    assert set(vit.state_dict()) == set(timm.create_model("test_vit", num_classes=2).state_dict())


# ---------------------------------------------------------------------------------------------------------------
# The page


@needs_chromium
def test_the_page_shows_the_words_with_their_colours(text_run, capfd, tmp_path):
    out = tmp_path / "explained"
    done = call_main(capfd, "explain", text_run / "run", "the bread today and", "a goal of news", "--output", out,
                     "--steps", "16", "--json")
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    with open_page((out / "explain.html").as_uri(), tmp_path / "profile") as page:
        wait_for(lambda: page.js("document.querySelectorAll('.words').length") == len(results), 30, "the words")
        shown = page.js("[...document.querySelectorAll('.words')].map(p => [...p.querySelectorAll('.w')].map("
                        "s => [s.textContent, getComputedStyle(s).backgroundColor]))")
    assert [[word for word, _ in words] for words in shown] == [[w["word"] for w in r["words"]] for r in results]
    for words, result in zip(shown, results):
        top = max(range(len(result["words"])), key=lambda i: abs(result["words"][i]["attribution"]))
        sign = result["words"][top]["attribution"] > 0
        assert words[top][1] == ("rgb(220, 50, 47)" if sign else "rgb(38, 139, 210)")  # the strongest: full colour
        assert all(colour != "rgba(0, 0, 0, 0)" for _, colour in words)


# ---------------------------------------------------------------------------------------------------------------
# Token classification: a word list per predicted entity


def test_each_predicted_entity_gets_its_own_explanation(token_run, capfd):
    text = "Anna Berg went to Kilimanjaro"
    done = call_main(capfd, "explain", token_run, text, "--json", "--steps", "32")
    assert done.returncode == 0, done.stderr
    entities = json.loads(done.stdout)["entities"]
    assert [(e["label"], e["word"]) for e in entities] == [("PER", "Anna Berg"), ("LOC", "Kilimanjaro")]
    for entity in entities:
        assert [w["word"] for w in entity["words"]] == text.split()
        assert all(text[w["start"]:w["end"]] == w["word"] for w in entity["words"])
    # each entity's tag is carried by its own words more than by the other entity's
    person, place = ({w["word"]: w["attribution"] for w in e["words"]} for e in entities)
    assert person["Anna"] > abs(person["Kilimanjaro"]) and place["Kilimanjaro"] > abs(place["Anna"])
    only = json.loads(call_main(capfd, "explain", token_run, text, "--json", "--label", "LOC", "--steps",
                                "8").stdout)
    assert [e["label"] for e in only["entities"]] == ["LOC"]
    assert "--label CITY" in one_error_line(call_main(capfd, "explain", token_run, text, "--label", "CITY"))
