"""images: folders, files, hub sets and the zoo as image splits; bad images; timm transforms; loaders; mixup."""

import gzip
import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finetune.errors import FinetuneError
from finetune.recipe import from_dict
from finetune.tasks.image_classification import files, transforms
from finetune.tasks.image_classification import reading as image_reading
from finetune.tasks.image_classification.files import load_image
from finetune.tasks.image_classification.loaders import ImageDataset, collate_images, make_image_loader
from finetune.tasks.image_classification.reading import load_image_splits
from finetune.tasks.image_classification.transforms import build_mixup, build_transforms

DATA_CONFIG = {  # the shape of timm.data.resolve_model_data_config(model), at a test-sized input
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
AUGMENT_OFF = {"scale": [1.0, 1.0], "hflip": 0.0, "auto_augment": None, "random_erasing": 0.0}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' caches (csv/parquet loading) out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets-cache")


def make_recipe(data: dict, problem="single_label", seed=42, augment=None, **train):
    raw = {
        "task": "image-classification",
        "backbone": {"name": "efficientnet-lite0"},
        "head": {"problem": problem},
        "data": {key: str(v) if isinstance(v, Path) else v for key, v in data.items()},
        "train": {"seed": seed, **train},
    }
    if augment is not None:
        raw["augment"] = augment
    return from_dict(raw)


def pixels(seed: int, size=(20, 16)) -> np.ndarray:
    """Noise, so that any crop, flip or erase changes the tensor."""
    return np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def save_image(path: Path, mode="RGB", seed=0, size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(pixels(seed, size))
    if mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
    else:
        image = rgb.convert(mode)
    image.save(path)
    return path


def image_folder(root: Path, counts: dict[str, int], ext=".png", seed=0) -> Path:
    for c, (label, count) in enumerate(counts.items()):
        for i in range(count):
            save_image(root / label / f"{i:03d}{ext}", seed=seed + 100 * c + i)
    return root


def error_of(recipe) -> str:
    with pytest.raises(FinetuneError) as caught:
        load_image_splits(recipe)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Folders, files, hub sets.


def test_folder_reads_classes_converts_every_mode_to_rgb_and_ignores_other_files(tmp_path):
    train = tmp_path / "train"
    modes = {"gray.png": "L", "alpha.png": "RGBA", "palette.png": "P", "photo.jpg": "RGB", "gray.jpg": "L"}
    for label in ("dog", "cat"):
        for name, mode in modes.items():
            save_image(train / label / name, mode, seed=len(name))
    (train / "cat" / "notes.txt").write_text("not an image")
    (train / "cat" / ".DS_Store").write_bytes(b"\0\1junk")
    (train / "README.md").write_text("a file next to the class folders")
    validation = image_folder(tmp_path / "validation", {"cat": 2, "dog": 2})

    splits = load_image_splits(make_recipe({"train": train, "validation": validation}))

    assert splits.label_names == ["cat", "dog"]
    assert len(splits.train["image"]) == 10 and len(splits.validation["image"]) == 4 and splits.test is None
    assert splits.train["row"][:5] == [f"cat/{name}" for name in sorted(modes)]
    assert splits.train["label"] == [0] * 5 + [1] * 5
    assert all(isinstance(entry, str) for entry in splits.train["image"])  # paths: decoded lazily
    assert splits.info["splits"]["train"] == {"source": str(train), "count": 10, "rows": splits.train["row"]}
    for entry in splits.train["image"]:
        assert load_image(entry).mode == "RGB"
    gray = load_image(str(train / "cat" / "gray.png"))
    r, g, b = np.asarray(gray).transpose(2, 0, 1)
    assert (r == g).all() and (g == b).all()
    assert np.array_equal(np.asarray(gray)[..., 0], np.asarray(Image.open(train / "cat" / "gray.png")))


def test_a_folder_of_split_folders_gives_its_splits(tmp_path):
    image_folder(tmp_path / "train", {"a": 3, "b": 3})
    image_folder(tmp_path / "val", {"a": 1, "b": 1})
    image_folder(tmp_path / "test", {"a": 2, "b": 1})
    splits = load_image_splits(make_recipe({"train": tmp_path}))
    counts = {key: value["count"] for key, value in splits.info["splits"].items()}
    assert counts == {"train": 6, "validation": 2, "test": 3}
    assert splits.info["validation_held_out_from_train"] is False


def test_held_out_validation_is_stratified_seeded_and_max_samples_caps(tmp_path):
    train = image_folder(tmp_path / "train", {"a": 10, "b": 10})
    splits = load_image_splits(make_recipe({"train": train}))
    assert splits.info["validation_held_out_from_train"] is True
    assert sorted(splits.validation["label"]) == [0, 1]  # 10% of 20, one of each class
    assert not set(splits.train["row"]) & set(splits.validation["row"])
    again = load_image_splits(make_recipe({"train": train}))
    assert again.validation["row"] == splits.validation["row"]
    capped = load_image_splits(make_recipe({"train": train, "max_samples": 3}))
    assert len(capped.train["image"]) == 3 and capped.label_names == ["a", "b"]


def test_csv_paths_resolve_against_the_csv_folder(tmp_path, monkeypatch):
    root = tmp_path / "data"
    rows = []
    for i, label in enumerate(["cat", "dog"] * 3):
        save_image(root / "pictures" / f"{i}.png", seed=i)
        rows.append((f"pictures/{i}.png", label))
    rows.append((str(save_image(tmp_path / "elsewhere" / "abs.png", seed=9)), "dog"))  # an absolute path stays
    pd.DataFrame(rows, columns=["file", "animal"]).to_csv(root / "train.csv", index=False)
    monkeypatch.chdir(tmp_path)  # not the csv's folder

    recipe = make_recipe(
        {"train": root / "train.csv", "validation": root / "train.csv", "image_column": "file",
         "label_column": "animal"}
    )
    splits = load_image_splits(recipe)
    assert splits.train["image"][0] == str(root / "pictures" / "0.png")
    assert splits.train["image"][-1] == str(tmp_path / "elsewhere" / "abs.png")
    assert splits.train["label"] == [0, 1, 0, 1, 0, 1, 1]
    assert load_image(splits.train["image"][3]).size == (20, 16)


def test_csv_missing_image_file_names_the_line(tmp_path):
    frame = pd.DataFrame([("a.png", "x"), ("gone.png", "y")], columns=["image", "label"])
    frame.to_csv(tmp_path / "t.csv", index=False)
    save_image(tmp_path / "a.png")
    message = error_of(make_recipe({"train": tmp_path / "t.csv", "validation": tmp_path / "t.csv"}))
    assert "line 3" in message and str(tmp_path / "gone.png") in message and "no such file" in message


def test_parquet_with_image_bytes(tmp_path):
    def png(seed):
        buffer = io.BytesIO()
        Image.fromarray(pixels(seed)).save(buffer, format="PNG")
        return buffer.getvalue()

    frame = pd.DataFrame({"image": [png(i) for i in range(4)], "label": ["x", "y", "x", "y"]})
    frame.to_parquet(tmp_path / "train.parquet")
    file = tmp_path / "train.parquet"
    splits = load_image_splits(make_recipe({"train": file, "validation": file}))
    assert all(isinstance(entry, bytes) for entry in splits.train["image"])
    assert np.array_equal(np.asarray(load_image(splits.train["image"][2])), pixels(2))


def test_multi_label_csv_and_regression_labels_collate_as_floats(tmp_path):
    for i in range(4):
        save_image(tmp_path / f"{i}.png", seed=i)
    pd.DataFrame(
        {"image": [f"{i}.png" for i in range(4)], "label": ["a|b", "a", "b", ""], "score": [1.0, 2.0, 3.0, 4.0]}
    ).to_csv(tmp_path / "t.csv", index=False)
    data = {"train": tmp_path / "t.csv", "validation": tmp_path / "t.csv"}
    multi = load_image_splits(make_recipe(data, problem="multi_label"))
    assert multi.label_names == ["a", "b"] and multi.train["label"][0] == [1.0, 1.0]
    transform = build_transforms(DATA_CONFIG, make_recipe(data, problem="multi_label"), training=False)
    batch = collate_images([ImageDataset(multi.train, transform)[i] for i in range(4)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4, 2)

    regression = load_image_splits(make_recipe({**data, "label_column": "score"}, problem="regression"))
    batch = collate_images([ImageDataset(regression.train, transform)[i] for i in range(2)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (2,)


def test_a_regression_recipe_on_a_class_folder_is_refused(tmp_path):
    train = image_folder(tmp_path / "train", {"a": 2, "b": 2})
    assert "head.problem=regression" in error_of(make_recipe({"train": train}, problem="regression"))


def test_hub_style_data_set_with_image_and_class_label_features(tmp_path):
    import datasets

    encoded = [{"bytes": save_image(tmp_path / f"{i}.png", seed=i).read_bytes(), "path": None} for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])})
    table = datasets.Dataset.from_dict({"image": encoded, "label": [0, 1] * 3}, features=features)
    (tmp_path / "set" / "data").mkdir(parents=True)
    table.to_parquet(str(tmp_path / "set" / "data" / "train-00000-of-00001.parquet"))  # as the hub stores sets

    splits = load_image_splits(make_recipe({"train": f"hub:{tmp_path / 'set'}"}))
    assert splits.label_names == ["ant", "bee"]
    assert len(splits.train["image"]) + len(splits.validation["image"]) == 6
    assert load_image(splits.train["image"][0]).size == (20, 16)


def test_unseen_validation_label_names_the_file_and_label(tmp_path):
    train = image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    validation = image_folder(tmp_path / "validation", {"cat": 1, "bird": 1})
    message = error_of(make_recipe({"train": train, "validation": validation}))
    assert "label 'bird' in data.validation" in message and "bird/000.png" in message


def test_a_folder_without_class_subfolders(tmp_path):
    save_image(tmp_path / "loose" / "a.png")
    assert "one subfolder per class" in error_of(make_recipe({"train": tmp_path / "loose"}))


# ---------------------------------------------------------------------------------------------------------------
# Bad images.


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels(5, (64, 64))).save(buffer, format="JPEG")
    return buffer.getvalue()[:-400]


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels(6, (64, 64))).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD_IMAGES = {
    "corrupt.png": (b"\x89PNG\r\n\x1a\n this is not really a png", "not a readable image"),
    "empty.png": (b"", "empty (0 bytes)"),
    "cut.jpg": (_truncated_jpeg(), "not a readable image"),
    "cut.png": (_truncated_png(), "not a readable image"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_bad_image_is_an_error_naming_the_file(tmp_path, name):
    train = image_folder(tmp_path / "train", {"a": 3, "b": 3})
    (train / "b" / name).write_bytes(BAD_IMAGES[name][0])
    message = error_of(make_recipe({"train": train, "validation": train}))
    assert str(train / "b" / name) in message and BAD_IMAGES[name][1] in message
    assert "data.skip_bad_images=true" in message


@pytest.fixture
def folder_with_bad_images(tmp_path):
    train = image_folder(tmp_path / "train", {"a": 5, "b": 5})
    for name, (content, _) in BAD_IMAGES.items():
        (train / "b" / name).write_bytes(content)
    validation = image_folder(tmp_path / "validation", {"a": 1, "b": 1})
    (validation / "a" / "empty.png").write_bytes(b"")
    return {"train": train, "validation": validation, "skip_bad_images": True}


def test_skip_bad_images_skips_and_counts_them(folder_with_bad_images):
    with pytest.warns(UserWarning, match="skipped 5 unreadable"):
        splits = load_image_splits(make_recipe(folder_with_bad_images))
    assert len(splits.train["image"]) == 10 and len(splits.validation["image"]) == 2
    skipped = splits.info["splits"]["train"]["skipped"]
    assert len(skipped) == 4 and all(str(folder_with_bad_images["train"] / "b") in s for s in skipped)
    assert len(splits.info["splits"]["validation"]["skipped"]) == 1
    assert not any(name in row for row in splits.train["row"] for name in BAD_IMAGES)


def test_loader_with_workers_on_the_skip_path(folder_with_bad_images):
    with pytest.warns(UserWarning):
        splits = load_image_splits(make_recipe(folder_with_bad_images))
    transform = build_transforms(DATA_CONFIG, make_recipe(folder_with_bad_images), training=True)
    loader = make_image_loader(ImageDataset(splits.train, transform), batch_size=4, shuffle=True, seed=0, num_workers=2)
    batches = list(loader)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    assert all(b["labels"].dtype == torch.long for b in batches)
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == [0] * 5 + [1] * 5


def test_an_image_broken_after_the_check_is_one_clean_error_from_a_worker(tmp_path):
    train = image_folder(tmp_path / "train", {"a": 2, "b": 2})
    recipe = make_recipe({"train": train, "validation": train})
    splits = load_image_splits(recipe)
    (train / "b" / "001.png").write_bytes(b"broken later")
    dataset = ImageDataset(splits.train, build_transforms(DATA_CONFIG, recipe, training=False))
    with pytest.raises(FinetuneError) as caught:
        list(make_image_loader(dataset, batch_size=4, shuffle=False, seed=0, num_workers=1))
    message = str(caught.value)
    assert message.startswith(f"image '{train / 'b' / '001.png'}' cannot be read any more")
    assert "\n" not in message and "Traceback" not in message


def test_num_workers_null_means_up_to_four(tmp_path):
    import os

    loader = make_image_loader([], batch_size=2, shuffle=False, seed=0, num_workers=None)
    assert loader.num_workers == min(4, os.cpu_count())
    assert not make_image_loader([], batch_size=2, shuffle=False, seed=0, num_workers=0).persistent_workers


def test_a_cpu_run_whose_threads_take_every_core_reads_its_images_in_process(monkeypatch):
    import os

    from accelerate import Accelerator

    from finetune.tasks.image_classification.task import loader_workers

    accelerator = Accelerator(cpu=True)
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        workers, notes = loader_workers(make_recipe({"train": "x"}), accelerator)
        assert workers == 0 and "read in the training process" in notes[0]
        assert loader_workers(make_recipe({"train": "x", "num_workers": 3}), accelerator) == (3, [])
        if cores > 1:  # a core left free: workers get it
            torch.set_num_threads(cores - 1)
            assert loader_workers(make_recipe({"train": "x"}), accelerator) == (min(4, cores), [])
    finally:
        torch.set_num_threads(threads)


def test_decoded_images_stay_in_memory_and_training_sees_the_same_crops(tmp_path):
    from finetune.tasks.image_classification.loaders import DecodedImages

    root = image_folder(tmp_path / "jpegs", {"a": 3, "b": 3}, ext=".jpg")
    recipe = make_recipe({"train": root}, augment={"scale": [0.3, 1.0], "hflip": 0.5}, **{"epochs": 1})
    table = load_image_splits(recipe).train
    transform = build_transforms({"input_size": (3, 12, 12), "interpolation": "bilinear", "mean": (0.5,) * 3,
                                  "std": (0.5,) * 3, "crop_pct": 1.0, "crop_mode": "center"}, recipe, training=True)
    decoded = DecodedImages(budget_bytes=2**20)
    kept, plain = ImageDataset(table, transform, 8, decoded), ImageDataset(table, transform, 8)
    def items(dataset, seed: int) -> list:
        random.seed(seed)  # timm's crops and flips draw from `random`, its erasing from torch
        torch.manual_seed(seed)
        return [dataset[i]["pixel_values"] for i in range(len(dataset))]

    for epoch in range(2):  # the same random crops either way, epoch after epoch
        first, again = items(kept, epoch), items(plain, epoch)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(decoded.images) == len(table["image"]) and decoded.used > 0
    assert not all(torch.equal(a, b) for a, b in zip(items(kept, 0), items(kept, 1)))  # new crops each epoch
    for path in table["image"]:  # nothing reads the files any more
        Path(path).unlink()
    assert kept[0]["pixel_values"].shape == (3, 12, 12)
    full = DecodedImages(budget_bytes=0)  # over the budget: decoded each time, nothing kept
    ImageDataset(table, transform, 8, full)
    assert not full.images


# ---------------------------------------------------------------------------------------------------------------
# The zoo.


@pytest.fixture(scope="module")
def digits():
    return load_image_splits(make_recipe({"train": "digits"}, seed=1))


def test_digits_has_1797_images_in_ten_labels_and_no_overlap(digits):
    assert digits.label_names == [str(d) for d in range(10)]
    rows = {key: digits.info["splits"][key]["rows"] for key in ("train", "validation", "test")}
    assert sum(len(r) for r in rows.values()) == 1797
    assert len(set().union(*rows.values())) == 1797  # no image in two splits
    assert {len(rows["validation"]), len(rows["test"])} == {180}
    image = digits.train["image"][0]
    assert image.shape == (8, 8) and image.dtype == np.uint8
    assert max(entry.max() for entry in digits.train["image"]) == 255
    assert load_image(image).mode == "RGB"


def test_digits_split_is_fixed_and_independent_of_train_seed(digits):
    other = load_image_splits(make_recipe({"train": "digits"}, seed=7))
    for key in ("train", "validation", "test"):
        assert other.info["splits"][key]["rows"] == digits.info["splits"][key]["rows"]
    assert other.info["validation_held_out_from_train"] is False


def test_fashion_mnist_from_the_debian_package():
    recipe = make_recipe({"train": "fashion-mnist"})
    if image_reading.FASHION_MNIST_DIR.is_dir():
        splits = load_image_splits(recipe)
        counts = {key: value["count"] for key, value in splits.info["splits"].items()}
        assert counts["train"] + counts["validation"] == 60_000 and counts["test"] == 10_000
        assert len(splits.label_names) == 10 and splits.test["image"][0].shape == (28, 28)
    else:
        assert "apt-get install dataset-fashion-mnist" in error_of(recipe)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_the_packages_idx_files(tmp_path, monkeypatch):
    rng = np.random.RandomState(0)
    train_images, test_images = rng.randint(0, 256, (48, 28, 28)), rng.randint(0, 256, (10, 28, 28))
    for (images_file, labels_file), array, count in zip(
        image_reading.FASHION_MNIST_FILES.values(), (train_images, test_images), (48, 10)
    ):
        _write_idx(tmp_path / images_file, array)
        _write_idx(tmp_path / labels_file, np.arange(count) % 10)
    monkeypatch.setattr(image_reading, "FASHION_MNIST_DIR", tmp_path)
    splits = load_image_splits(make_recipe({"train": "fashion-mnist"}))
    counts = {key: value["count"] for key, value in splits.info["splits"].items()}
    assert counts == {"train": 44, "validation": 4, "test": 10}
    assert splits.label_names[0] == "Ankle boot" and "T-shirt/top" in splits.label_names
    assert np.array_equal(splits.test["image"][3], test_images[3])
    assert splits.label_names[splits.test["label"][3]] == "Dress"  # label number 3

    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01garbage"))
    image_reading._fashion_mnist_arrays.cache_clear()
    assert "not an IDX file" in error_of(make_recipe({"train": "fashion-mnist"}))


# ---------------------------------------------------------------------------------------------------------------
# Transforms.


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(pixels(3, (48, 40)))


def test_eval_transform_is_deterministic_and_follows_input_size(photo):
    transform = build_transforms(DATA_CONFIG, make_recipe({"train": "digits"}), training=False)
    first = transform(photo)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, transform(photo))
    assert -1.0 <= first.min() and first.max() <= 1.0  # mean = std = 0.5


def test_image_size_overrides_the_data_config(photo):
    recipe = make_recipe({"train": "digits", "image_size": 24})
    for training in (False, True):
        assert build_transforms(DATA_CONFIG, recipe, training)(photo).shape == (3, 24, 24)


def test_data_config_from_a_real_timm_model(photo):
    import timm
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(timm.create_model("test_vit", pretrained=False))
    size = config["input_size"][1:]
    assert build_transforms(config, make_recipe({"train": "digits"}), training=False)(photo).shape[1:] == size


def test_training_without_augmentation_is_deterministic(photo):
    transform = build_transforms(DATA_CONFIG, make_recipe({"train": "digits"}, augment=AUGMENT_OFF), training=True)
    torch.manual_seed(0)
    first = transform(photo)
    assert first.shape == (3, 32, 32)
    assert all(torch.equal(first, transform(photo)) for _ in range(5))


@pytest.mark.parametrize(
    "augment",
    [
        {},  # the defaults: random-resized crop over [0.08, 1] and flips
        {**AUGMENT_OFF, "auto_augment": "trivialaugment"},
        {**AUGMENT_OFF, "auto_augment": "rand-m9-mstd0.5-inc1"},
        {**AUGMENT_OFF, "random_erasing": 1.0},
        {**AUGMENT_OFF, "hflip": 1.0},
    ],
)
def test_training_with_augmentation_differs(photo, augment):
    transform = build_transforms(DATA_CONFIG, make_recipe({"train": "digits"}, augment=augment), training=True)
    plain = build_transforms(DATA_CONFIG, make_recipe({"train": "digits"}, augment=AUGMENT_OFF), training=True)
    eval_view = plain(photo)
    views = [transform(photo) for _ in range(6)]
    assert all(view.shape == (3, 32, 32) for view in views)
    assert any(not torch.equal(view, eval_view) for view in views)
    if augment.get("hflip") != 1.0:
        assert any(not torch.equal(view, views[0]) for view in views[1:])


def test_trivialaugment_is_spelled_as_timms_randaugment_and_bad_policies_are_named():
    assert transforms.auto_augment_policy("trivialaugment") == "rand-n1-m10-mstd101-inc1-p1"
    recipe = make_recipe({"train": "digits"}, augment={"auto_augment": "trivialaugment"})
    assert "RandAugment" in repr(build_transforms(DATA_CONFIG, recipe, training=True))
    bad = make_recipe({"train": "digits"}, augment={"auto_augment": "bogus-policy"})
    with pytest.raises(FinetuneError, match="augment.auto_augment: 'bogus-policy'"):
        build_transforms(DATA_CONFIG, bad, training=True)


# ---------------------------------------------------------------------------------------------------------------
# Mixup.


def test_no_mixup_by_default():
    assert build_mixup(make_recipe({"train": "digits"}), num_classes=10) is None


@pytest.mark.parametrize("alphas", [{"mixup": 0.8}, {"cutmix": 1.0}, {"mixup": 0.8, "cutmix": 1.0}])
def test_mixup_targets_are_soft_and_sum_to_one(alphas):
    recipe = make_recipe({"train": "digits"}, augment=alphas, label_smoothing=0.1, batch_size=8)
    mixup = build_mixup(recipe, num_classes=5)
    np.random.seed(0)
    x, labels = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mixed, targets = mixup(x.clone(), labels)
    assert mixed.shape == x.shape and not torch.equal(mixed, x)
    assert targets.shape == (8, 5) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert ((targets > 0).sum(dim=1) >= 2).all()  # every row mixes (smoothing puts mass on every class)
    assert (targets.max(dim=1).values < 1).all()


def test_mixup_needs_single_label_and_an_even_batch():
    with pytest.raises(FinetuneError, match="head.problem=single_label"):
        build_mixup(make_recipe({"train": "digits"}, problem="multi_label", augment={"mixup": 0.2}), 10)
    with pytest.raises(FinetuneError, match="must be even"):
        build_mixup(make_recipe({"train": "digits"}, augment={"cutmix": 1.0}, batch_size=7), 10)


@pytest.mark.parametrize("policy", ["rand-m10-mstd0-inc1", "rand-m0-mstd0", "v0"])
def test_posterize_at_extreme_magnitudes_does_not_crash_pillow(photo, policy):
    # timm asks for 0 bits at these magnitudes; Pillow >= 12 raises on that, once in a few hundred training images
    recipe = make_recipe({"train": "digits"}, augment={**AUGMENT_OFF, "auto_augment": policy})
    transform = build_transforms(DATA_CONFIG, recipe, training=True)
    steps = transform.transforms
    ops = [op for step in steps for op in [*getattr(step, "ops", []), *sum(getattr(step, "policy", []), [])]]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize, [op.name for op in ops]
    image = photo.convert("RGB")
    for op in posterize:
        op.prob = 1.0
        out = op(image)
        assert len(set(np.asarray(out).reshape(-1).tolist())) <= len(set(np.asarray(image).reshape(-1).tolist()))


def test_training_decodes_a_large_jpeg_at_a_reduced_scale_that_still_covers_its_smallest_crop(tmp_path):
    smooth = np.linspace(0, 255, 800, dtype=np.float32)[None, :, None] * np.ones((600, 1, 3), np.float32)
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth.astype(np.uint8)).save(path, quality=95)
    recipe = make_recipe({"train": tmp_path, "image_size": 96}, augment={"scale": [0.6, 1.0]})
    config = {"input_size": (3, 224, 224)}
    side = transforms.draft_side(config, recipe)
    assert side == 144  # the smallest crop (60% of the area, aspect 4/3) of a 144-pixel side is 96 pixels tall
    assert files.load_image(str(path)).size == (800, 600)
    reduced = files.load_image(str(path), side)
    assert reduced.size == (200, 150)  # libjpeg's 1/4 scale; 1/8 (100 x 75) would be under 144
    whole = np.asarray(files.load_image(str(path)).resize(reduced.size, Image.BILINEAR), dtype=np.float32)
    assert np.abs(np.asarray(reduced, dtype=np.float32) - whole).mean() < 3  # the same picture, decoded smaller
    png = save_image(tmp_path / "photo.png", size=(800, 600))
    assert files.load_image(str(png), side).size == (800, 600)  # only JPEG decodes at a scale
    assert transforms.draft_side(config, make_recipe({"train": tmp_path}, augment={"scale": [1.0, 1.0]})) == 224
