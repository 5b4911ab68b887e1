"""Image classification end to end: the CLI on an image folder, the exported timm folder without finetune, the zoo
backbone on digits, augmentation and mixup in the trainer, EMA selection, bad images, and the kit-format mlp head."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import call_main, one_error_line, run_cli, run_without_finetune, set_dotted, to_recipe, write_recipe
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune.train import latest_checkpoint, train

# Three classes a randomly initialised tiny CNN separates in a couple of epochs: which colour dominates a noisy
# image. "gray" images have equal channels, so a grayscale (mode L) file is a true member of its class.
CLASSES = ["blue", "gray", "red"]
CNN = "test_efficientnet"  # timm's own tiny test architecture: random weights, nothing downloaded
IMAGE_SIZE = 32
COUNTS = {"train": 20, "validation": 6, "test": 6}  # per class
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n this is not really a png"


def colour_image(label: str, rng: np.random.RandomState, size=(24, 20)) -> np.ndarray:
    """H x W x 3 uint8: noise, with the class's channel bright (or every channel equal for gray)."""
    height, width = size
    if label == "gray":
        level = rng.randint(60, 200, (height, width, 1))
        return np.repeat(level, 3, axis=2).astype(np.uint8)
    pixels = rng.randint(0, 90, (height, width, 3))
    pixels[..., {"red": 0, "blue": 2}[label]] = rng.randint(150, 256, (height, width))
    return pixels.astype(np.uint8)


def save_split(root: Path, per_class: int, seed: int) -> Path:
    """root/<class>/NNN.png, with one grayscale (L) image in gray and one RGBA image (varying alpha) in red."""
    rng = np.random.RandomState(seed)
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray(colour_image(label, rng))
            if label == "gray" and i == 0:
                image, name = image.convert("L"), "gray-mode-l.png"
            elif label == "red" and i == 0:
                alpha = Image.fromarray(rng.randint(0, 256, (image.height, image.width)).astype(np.uint8))
                image, name = image.convert("RGBA"), "red-mode-rgba.png"
                image.putalpha(alpha)
            else:
                name = f"{i:03d}.png"
            image.save(root / label / name)
    return root


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colour-images")
    data = {split: save_split(root / split, count, seed) for seed, (split, count) in enumerate(COUNTS.items())}
    (data["train"] / "red" / "notes.txt").write_text("not an image: the folder reader must skip it\n")
    return data


def vision_raw(data: dict[str, Path], out: Path, **dotted) -> dict:
    """A recipe dict: tiny random-init CNN, 32 px, no augmentation, fp32, seed 0; `dotted` keys override."""
    raw = {
        "task": "image-classification",
        "backbone": {"name": CNN, "pretrained": False, "dropout": 0.0},
        "head": {"type": "linear", "dropout": 0.0},
        "data": {
            "train": str(data["train"]),
            "validation": str(data["validation"]),
            "test": str(data["test"]),
            "image_size": IMAGE_SIZE,
            "num_workers": 0,
        },
        "augment": {"scale": [1.0, 1.0], "hflip": 0.0},
        "train": {
            "epochs": 3,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup": 0,
            "scheduler": "constant",
            "precision": "fp32",
            "seed": 0,
        },
        "output": {"dir": str(out)},
    }
    for key, value in dotted.items():
        set_dotted(raw, key, value)
    return raw


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def split_files(out: Path, key: str) -> tuple[list[Path], list[int]]:
    """The files of one split as split.json lists them, in order, with their class indices."""
    info = read_json(out / "split.json")
    part = info["splits"][key]
    files = [Path(part["source"]) / row for row in part["rows"]]
    return files, [info["labels"].index(row.split("/")[0]) for row in part["rows"]]


@torch.no_grad()
def logits_through(model, transform, files: list[Path]) -> torch.Tensor:
    """What a user of the loaded model computes: PIL open, RGB, the model's eval transform, one batch."""
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in files])
    return model(pixel_values=batch).float()


def without_prefix(state: dict, prefix: str = "model.") -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# ---------------------------------------------------------------------------------------------------------------
# 1. The CLI end to end on an image folder


@pytest.fixture(scope="module")
def cli_run(image_data, tmp_path_factory):
    """`python -m finetune run` with the default loader workers (data.num_workers null) and dotted overrides."""
    root = tmp_path_factory.mktemp("vision-cli")
    recipe = write_recipe(root / "colours.yaml", vision_raw(image_data, root / "unused"))
    out = root / "run"
    result = run_cli(
        "run", recipe, f"backbone.name={CNN}", "backbone.pretrained=false", f"data.image_size={IMAGE_SIZE}",
        # batches of 12 (5 per epoch, no runt batch): with 8 a batch missing a class, under BatchNorm's batch
        # statistics, can throw a random-init net's loss back up in a late epoch, and whether it does hangs on
        # float rounding, which differs between CPUs (AVX-512 vs AVX2 kernels) and thread counts
        "data.num_workers=null", "train.epochs=4", "train.batch_size=12", f"output.dir={out}",
        "eval.calibrate=null",  # the export is compared with the best checkpoint's own logits
        timeout=300,
    )
    return out, result


def test_cli_run_on_an_image_folder_writes_the_run_folder(cli_run):
    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "task: image-classification" in result.stdout  # the resolved recipe is printed
    for name in ("config.yaml", "metrics.json", "split.json", "model", "checkpoints/best/model.safetensors"):
        assert (out / name).exists(), name
    assert not [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]

    metrics = read_json(out / "metrics.json")
    for key in ("samples_per_second", "seconds", "peak_memory_mb"):
        assert isinstance(metrics["train"][key], float) and metrics["train"][key] > 0, key
    assert metrics["train"]["samples_per_second"] == pytest.approx(60 * 4 / metrics["train"]["seconds"], rel=1e-6)
    assert [entry["epoch"] for entry in metrics["epochs"]] == [1, 2, 3, 4]
    for entry in metrics["epochs"]:
        assert math.isfinite(entry["loss"]) and {"accuracy", "f1_macro", "loss"} <= set(entry["validation"])
    assert {"epoch", "accuracy", "f1_macro"} <= set(metrics["best"]) and "ema" not in metrics["best"]
    assert {"accuracy", "f1_macro", "loss"} <= set(metrics["test"])

    split = read_json(out / "split.json")
    assert split["labels"] == CLASSES
    assert {key: part["count"] for key, part in split["splits"].items()} == {"train": 60, "validation": 18, "test": 18}
    rows = split["splits"]["train"]["rows"]
    assert "gray/gray-mode-l.png" in rows and "red/red-mode-rgba.png" in rows  # every PIL mode is read
    assert not any(row.endswith("notes.txt") for row in rows)  # a non-image file in a class folder is ignored


def test_cli_run_exports_a_timm_folder_with_labels_and_image_size(cli_run):
    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in model_dir.iterdir()}
    assert not (model_dir / "finetune.json").exists()  # a linear head is timm's own classifier: no kit format
    config = read_json(model_dir / "config.json")
    assert config["architecture"] == CNN and config["num_classes"] == 3
    assert config["label_names"] == CLASSES  # the class folder names, in order
    assert config["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]  # trained size, not timm's 160
    weights = load_file(model_dir / "model.safetensors")
    assert weights["classifier.weight"].shape == (3, config["num_features"])
    card = (model_dir / "README.md").read_text()
    assert "local-dir:" in card and all(label in card for label in CLASSES)


def test_cli_run_learns_the_separable_classes(cli_run):
    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(out / "metrics.json")
    losses = [entry["loss"] for entry in metrics["epochs"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["best"]["accuracy"] >= 0.8  # chance is 1/3
    assert metrics["test"]["accuracy"] >= 0.8


# ---------------------------------------------------------------------------------------------------------------
# 2. The exported folder without finetune: timm's own loader and transform give the kit's predictions


TIMM_ONLY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["finetune"] = None  # any import of finetune now fails: the folder must stand on its own
    import timm, torch
    from PIL import Image

    model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config)
    files = json.loads(sys.argv[2])
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    print(json.dumps({
        "logits": logits.tolist(),
        "label_names": list(model.pretrained_cfg.get("label_names") or []),
        "input_size": list(config["input_size"]),
        "finetune_importable": "finetune" in sys.modules and sys.modules["finetune"] is not None,
    }))
    """
)


@torch.no_grad()
def kit_test_logits(out: Path) -> tuple[torch.Tensor, list[int]]:
    """The trainer's own evaluation path: its splits, its eval transform, the best checkpoint in build_vision_model."""
    from finetune.tasks.image_classification.loaders import ImageDataset, collate_images
    from finetune.tasks.image_classification.reading import load_image_splits
    from finetune.tasks.image_classification.transforms import build_transforms
    from finetune.tasks.image_classification.model import build_vision_model

    recipe = to_recipe(yaml.safe_load((out / "config.yaml").read_text()))
    splits = load_image_splits(recipe)
    model, data_config = build_vision_model(recipe, splits.label_names)
    model.load_state_dict(load_file(out / "checkpoints" / "best" / "model.safetensors"))
    dataset = ImageDataset(splits.test, build_transforms(data_config, recipe, training=False))
    batch = collate_images([dataset[i] for i in range(len(dataset))])
    return model.eval()(pixel_values=batch["pixel_values"]).float(), batch["labels"].tolist()


def test_export_round_trip_without_finetune_matches_the_kits_evaluation(cli_run, tmp_path):
    out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    files, truth = split_files(out, "test")
    answer = run_without_finetune(TIMM_ONLY_SCRIPT, out / "model", json.dumps([str(f) for f in files]), cwd=tmp_path)
    assert answer["label_names"] == CLASSES and answer["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert answer["finetune_importable"] is False
    timm_logits = torch.tensor(answer["logits"])

    kit_logits, kit_truth = kit_test_logits(out)
    assert kit_truth == truth  # the same images in the same order
    assert torch.equal(timm_logits.argmax(-1), kit_logits.argmax(-1))
    assert torch.allclose(timm_logits, kit_logits, atol=1e-4), (timm_logits - kit_logits).abs().max()

    metrics = read_json(out / "metrics.json")
    correct = int((timm_logits.argmax(-1) == torch.tensor(truth)).sum())
    assert correct == round(metrics["test"]["accuracy"] * len(truth))
    assert correct / len(truth) == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    loss = torch.nn.functional.cross_entropy(timm_logits, torch.tensor(truth)).item()
    assert loss == pytest.approx(metrics["test"]["loss"], abs=1e-4)  # same pixels, same weights, not just same argmax


# ---------------------------------------------------------------------------------------------------------------
# 3. The offline zoo backbone on the digits zoo set


ZOO_CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["finetune"] = None
    import timm, torch
    from PIL import Image

    model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    image = Image.new("L", (8, 8), 128).convert("RGB")
    with torch.no_grad():
        logits = model(timm.data.create_transform(**config)(image)[None])
    print(json.dumps({
        "shape": list(logits.shape), "finite": bool(torch.isfinite(logits).all()),
        "labels": list(model.pretrained_cfg["label_names"]), "input_size": list(config["input_size"]),
        "mean": list(config["mean"]), "architecture": model.default_cfg["architecture"],
    }))
    """
)


@pytest.mark.slow  # about 20 s on an idle 2-core machine, 30+ s on a busy one: the real 3.4M-parameter zoo model
def test_zoo_efficientnet_lite0_on_digits_runs_and_exports_for_timm(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "run", "vision/efficientnet-lite0-digits", "data.max_samples=64", "data.image_size=64", "train.epochs=1",
        "data.num_workers=0", f"output.dir={out}", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(out / "metrics.json")
    assert len(metrics["epochs"]) == 1 and math.isfinite(metrics["epochs"][0]["loss"])
    assert {key: part["count"] for key, part in read_json(out / "split.json")["splits"].items()} == {
        "train": 64, "validation": 64, "test": 64
    }
    answer = run_without_finetune(ZOO_CHECK_SCRIPT, out / "model", cwd=tmp_path)
    assert answer == {
        "shape": [1, 10], "finite": True, "labels": [str(d) for d in range(10)], "input_size": [3, 64, 64],
        "mean": [0.5, 0.5, 0.5], "architecture": "tf_efficientnet_lite0",
    }


# ---------------------------------------------------------------------------------------------------------------
# 4. Augmentation and mixup


def train_batches(image_data, tmp_path, num_workers: int, **augment) -> list[dict]:
    from finetune.tasks.image_classification.loaders import ImageDataset, make_image_loader
    from finetune.tasks.image_classification.reading import load_image_splits
    from finetune.tasks.image_classification.transforms import build_transforms
    from finetune.tasks.image_classification.model import build_vision_model

    raw = vision_raw(image_data, tmp_path / "unused")
    raw["augment"] = augment
    recipe = to_recipe(raw)
    splits = load_image_splits(recipe)
    _, data_config = build_vision_model(recipe, splits.label_names)
    dataset = ImageDataset(splits.train, build_transforms(data_config, recipe, training=True))
    loader = make_image_loader(dataset, 8, shuffle=True, seed=recipe.train.seed, num_workers=num_workers)
    return list(loader)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["labels"], y["labels"]) and torch.equal(x["pixel_values"], y["pixel_values"])
        for x, y in zip(a, b)
    )


def test_augmentation_off_gives_identical_train_batches(image_data, tmp_path):
    off = {"scale": [1.0, 1.0], "hflip": 0.0}
    first = train_batches(image_data, tmp_path, 0, **off)
    torch.manual_seed(123)  # the global RNGs move on between the two constructions; without augmentation no matter
    second = train_batches(image_data, tmp_path, 0, **off)
    assert [tuple(b["pixel_values"].shape) for b in first] == [(8, 3, IMAGE_SIZE, IMAGE_SIZE)] * 7 + [
        (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    ]
    assert same_batches(first, second)
    labels = torch.cat([b["labels"] for b in first]).tolist()
    assert sorted(labels) == [0] * 20 + [1] * 20 + [2] * 20 and labels != sorted(labels)  # shuffled, all there
    # the control: with the default random-resized crop and flips the same construction draws other pixels
    assert not same_batches(train_batches(image_data, tmp_path, 0), train_batches(image_data, tmp_path, 0))


def test_the_training_order_does_not_depend_on_the_number_of_workers(image_data, tmp_path):
    """The order is drawn from the loader's own generator: loaders with workers also draw their base seed from
    the generator they are given, so sharing one made the order of epochs 2+ depend on data.num_workers."""
    from finetune.tasks.image_classification.loaders import ImageDataset, make_image_loader
    from finetune.tasks.image_classification.reading import load_image_splits
    from finetune.tasks.image_classification.transforms import build_transforms
    from finetune.loop import seed_epoch as _seed_epoch

    recipe = to_recipe(vision_raw(image_data, tmp_path / "unused"))
    splits = load_image_splits(recipe)
    config = {"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "interpolation": "bilinear", "mean": (0.5,) * 3,
              "std": (0.5,) * 3, "crop_pct": 1.0}
    dataset = ImageDataset(splits.train, build_transforms(config, recipe, training=False))
    orders = {}
    for workers in (0, 2):
        loader = make_image_loader(dataset, 8, shuffle=True, seed=0, num_workers=workers)
        orders[workers] = []
        for epoch in (1, 2, 3):
            _seed_epoch(loader, 0, epoch)
            orders[workers].append(torch.cat([b["labels"] for b in loader]).tolist())
    assert orders[0] == orders[2]
    assert orders[0][0] != orders[0][1]  # and each epoch is shuffled anew


def test_augmentation_with_workers_repeats_for_the_same_seed(image_data, tmp_path):
    """make_image_loader's promise: the seeded generator seeds the workers, so augmentation repeats run to run."""
    first = train_batches(image_data, tmp_path, 2)
    torch.manual_seed(123)
    assert same_batches(first, train_batches(image_data, tmp_path, 2))


def test_mixup_and_cutmix_train_with_finite_loss(image_data, tmp_path):
    raw = vision_raw(image_data, tmp_path / "run", **{"augment.mixup": 0.2, "augment.cutmix": 1.0,
                                                     "train.epochs": 2})
    metrics = train(to_recipe(raw))
    assert all(math.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in metrics["epochs"])
    assert math.isfinite(metrics["test"]["loss"])
    assert metrics["train"]["samples"] == 2 * (60 // 8) * 8  # the odd-sized last batch is dropped under mixup
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_mixup_with_an_odd_batch_size_is_bad_input(image_data, tmp_path, capfd):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", vision_raw(image_data, out))
    line = one_error_line(call_main(capfd, "run", recipe, "augment.mixup=0.2", "train.batch_size=7"))
    assert "train.batch_size" in line and "7" in line
    assert not out.exists()  # refused before the run folder is made


# ---------------------------------------------------------------------------------------------------------------
# 5. EMA


def with_mislabelled_validation(image_data, root: Path, per_class: int = 2) -> dict[str, Path]:
    """The data with a validation folder that no model can fit: `per_class` images of each class's colour are filed
    under the next class. Its loss stays above zero and its accuracy below 1 on any CPU's kernels, so two different
    sets of weights give two different evaluations (the clean folder saturates: loss 0.0 and accuracy 1.0 for both)."""
    validation = root / "validation"
    shutil.copytree(image_data["validation"], validation)
    for label, into in zip(CLASSES, CLASSES[1:] + CLASSES[:1]):
        for path in sorted((validation / label).glob("0*.png"))[:per_class]:
            path.rename(validation / into / f"from-{label}-{path.name}")
    return {**image_data, "validation": validation}


@pytest.fixture(scope="module")
def ema_run(image_data, tmp_path_factory):
    """Selected on loss (finer than accuracy). Training is smooth (the default lr and batch), so the raw weights grow
    more confident each epoch and the average lags behind them: on the mislabelled validation images the raw weights
    are confidently wrong and the average, less sure of itself, wins (its best loss 1.10-1.24x lower over 3 seeds,
    with AVX-512 kernels and with AVX2 ones; a high lr made the winner a coin toss)."""
    root = tmp_path_factory.mktemp("ema")
    out = root / "run"
    dotted = {"train.ema": {"decay": 0.9}, "train.epochs": 5, "eval.select_best": "loss",
              "eval.calibrate": None}  # the export is compared with the kept checkpoint's weights
    data = with_mislabelled_validation(image_data, root)
    return out, train(to_recipe(vision_raw(data, out, **dotted)))


def test_ema_metrics_carry_both_evaluations_and_the_selection(ema_run):
    out, metrics = ema_run
    assert read_json(out / "metrics.json") == json.loads(json.dumps(metrics))
    for entry in metrics["epochs"]:
        assert set(entry["validation_ema"]) == set(entry["validation"])
        assert entry["validation_ema"] != entry["validation"]  # decay 0.9: the average is not the raw weights
    best = metrics["best"]
    assert isinstance(best["ema"], bool)
    chosen = metrics["epochs"][best["epoch"] - 1]["validation_ema" if best["ema"] else "validation"]
    assert best == {"epoch": best["epoch"], "ema": best["ema"], **chosen}
    candidates = [e[key]["loss"] for e in metrics["epochs"] for key in ("validation", "validation_ema")]
    assert best["loss"] == min(candidates)


def test_ema_model_folder_holds_the_selected_weights(ema_run, image_data):
    out, metrics = ema_run
    best_checkpoint = load_file(out / "checkpoints" / "best" / "model.safetensors")
    assert all(key.startswith("model.") for key in best_checkpoint)  # the TimmClassifier wrapper's names
    exported = load_file(out / "model" / "model.safetensors")
    assert_same_state(exported, without_prefix(best_checkpoint))
    assert metrics["best"]["ema"] is True  # this run's recipe and data are chosen so that the average wins (ema_run)
    # the EMA weights, not the raw ones the last epoch ended with (accelerate's state in checkpoints/last)
    raw_last = without_prefix(load_file(latest_checkpoint(out) / "model.safetensors"))
    assert sorted(raw_last) == sorted(exported)
    assert max((exported[k].float() - raw_last[k].float()).abs().max().item() for k in exported) > 1e-3
    # and they are the selected epoch's weights (raw or EMA): they reproduce its validation loss and the test metrics
    model, transform, _ = finetune.load(out / "model")
    for key, expected in (("validation", metrics["best"]), ("test", metrics["test"])):
        files, truth = split_files(out, key)
        logits = logits_through(model, transform, files)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(truth)).item()
        assert loss == pytest.approx(expected["loss"], abs=1e-4), key
        accuracy = (logits.argmax(-1) == torch.tensor(truth)).float().mean().item()
        assert accuracy == pytest.approx(expected["accuracy"], abs=1e-6), key


# ---------------------------------------------------------------------------------------------------------------
# 6. Bad images through the CLI


def copy_with_a_corrupt_png(image_data, root: Path) -> Path:
    """The training folder plus blue/corrupt.png (PNG magic, then junk) and blue/readme.txt (not an image)."""
    train = root / "train"
    shutil.copytree(image_data["train"], train)
    (train / "blue" / "corrupt.png").write_bytes(CORRUPT_PNG)
    (train / "blue" / "readme.txt").write_text("notes, not an image")
    return train


def test_a_corrupt_png_is_one_error_line_naming_the_file(image_data, tmp_path):
    train, out = copy_with_a_corrupt_png(image_data, tmp_path), tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", vision_raw({**image_data, "train": train}, out, **{"train.epochs": 1}))
    line = one_error_line(run_cli("run", recipe))
    assert str(train / "blue" / "corrupt.png") in line and "not a readable image" in line
    assert "data.skip_bad_images" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def skip_run(image_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("skip-bad-images")
    train, out = copy_with_a_corrupt_png(image_data, root), root / "run"
    recipe = write_recipe(root / "r.yaml", vision_raw({**image_data, "train": train}, out, **{"train.epochs": 1}))
    return train, out, run_cli("run", recipe, "data.skip_bad_images=true")


# slow (the default suite's time): a whole image CLI run for its fixture
@pytest.mark.slow
def test_skip_bad_images_runs_and_lists_the_skipped_file(skip_run):
    train, out, result = skip_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    train_part = read_json(out / "split.json")["splits"]["train"]
    assert train_part["count"] == 60
    assert len(train_part["skipped"]) == 1
    assert str(train / "blue" / "corrupt.png") in train_part["skipped"][0]
    assert not any(row.endswith(("corrupt.png", ".txt")) for row in train_part["rows"])  # readme.txt: ignored
    assert (out / "model" / "model.safetensors").is_file()


# slow (the default suite's time): shares that run
@pytest.mark.slow
def test_skip_bad_images_tells_the_cli_user_how_many_were_skipped(skip_run):
    _, out, result = skip_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: data.train: 1 unreadable image(s) skipped" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 7. An mlp head: the kit's own format, loaded by finetune.load


def test_mlp_head_exports_the_kit_format_and_load_reproduces_the_test_metrics(image_data, tmp_path):
    out = tmp_path / "run"
    metrics = train(to_recipe(vision_raw(image_data, out, **{"head.type": "mlp", "head.hidden": [16]})))
    model_dir = out / "model"
    assert {p.name for p in model_dir.iterdir()} == {
        "config.json", "model.safetensors", "finetune.json", "README.md", "plots", "calibration.json"
    }
    spec = read_json(model_dir / "finetune.json")
    assert spec["task"] == "image-classification" and spec["labels"] == CLASSES
    assert spec["head"]["type"] == "mlp" and spec["head"]["hidden"] == [16]
    assert read_json(model_dir / "config.json")["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert "finetune.load" in (model_dir / "README.md").read_text()

    model, transform, loaded_spec = finetune.load(model_dir)
    assert loaded_spec["labels"] == CLASSES
    files, truth = split_files(out, "test")
    logits = logits_through(model, transform, files)
    assert logits.shape == (18, 3)
    accuracy = (logits.argmax(-1) == torch.tensor(truth)).float().mean().item()
    assert accuracy == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(truth)).item()
    assert loss == pytest.approx(metrics["test"]["loss"], abs=1e-4)
    assert metrics["test"]["accuracy"] > 0.5  # chance is 1/3


# ---------------------------------------------------------------------------------------------------------------
# validate on an image recipe


def test_validate_checks_an_image_recipe_and_its_folder(image_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", vision_raw(image_data, tmp_path / "run"))
    result = run_cli("validate", recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout)["task"] == "image-classification"
    assert "train 60, validation 18, test 18" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_channels_last_run_trains_the_same_and_exports(image_data, tmp_path):
    """train.channels_last (the default for convolutions on a GPU) on this CPU: the same numbers as the default
    layout to float rounding, and an export in the default layout (safetensors refuses non-contiguous weights)."""
    # eval.calibrate null: the export is compared with the kept checkpoint's weights
    plain = train(to_recipe(vision_raw(image_data, tmp_path / "plain", **{"train.epochs": 1, "eval.calibrate": None})))
    last = train(to_recipe(vision_raw(image_data, tmp_path / "last", **{"train.epochs": 1, "eval.calibrate": None,
                                                                        "train.channels_last": True})))
    assert last["test"]["loss"] == pytest.approx(plain["test"]["loss"], abs=2e-3)  # other kernels, 7 Adam steps
    exported = load_file(tmp_path / "last" / "model" / "model.safetensors")
    assert_same_state(exported, without_prefix(load_file(tmp_path / "last" / "checkpoints" / "best"
                                                         / "model.safetensors")))  # the kept weights, bit for bit
