"""The image-classification task: an image per row (folders, tables of paths or bytes, the zoo), one label, a label
set or a number; a timm backbone and head, timm's transforms and Mixup, a native timm folder."""

from __future__ import annotations

import os
import warnings

from finetune import checks
from finetune.tasks import Job
from finetune.tasks.batching import train_sampler
from finetune.tasks.image_classification.inputs import image_logits, parse_image_input, read_image_inputs
from finetune.tasks.image_classification.reading import check_images, load_image_splits, read_image_split
from finetune.tasks.image_classification.transforms import build_mixup, build_transforms, draft_side
from finetune.tasks.rows import RowTask, TableFeatures


class ImageClassification(RowTask):
    name = "image-classification"
    problems = ("single_label", "multi_label", "regression")
    inputs = "image"
    library = "timm"
    column_key = "image_column"  # the data.* key naming the input column (predict --column's default)
    step_choice_applies = True
    predict_example = "photo.jpg"

    def check_recipe(self, recipe, need) -> None:
        need(not recipe.train.group_by_length, "train.group_by_length: text only")
        need(recipe.data.text_pair_column is None,
             "data.text_pair_column: is for text-classification sentence pairs, not images")

    def read(self, spec: str, recipe, key: str) -> dict:
        return read_image_split(spec, recipe, key)

    def onnx_usage(self, info: dict) -> str:
        from finetune.problems import get

        return f"""
import json, numpy as np, onnxruntime as ort
from PIL import Image
info, config = json.load(open("export.json")), json.load(open("config.json"))["pretrained_cfg"]
_, height, width = config["input_size"]
image = Image.open("photo.jpg").convert("RGB")
scale = int(height / (config.get("crop_pct") or 1)) / min(image.size)  # timm's eval: shorter side to size / crop_pct,
image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
left, top = round((image.width - width) / 2), round((image.height - height) / 2)  # then the centre crop
image = image.crop((left, top, left + width, top + height))
pixels = (np.asarray(image, dtype=np.float32) / 255 - config["mean"]) / config["std"]
session = ort.InferenceSession("model.onnx")
logits = session.run(None, {{"pixel_values": pixels.transpose(2, 0, 1)[None].astype(np.float32)}})[0]
{get(info["problem"]).onnx_decode}
"""

    def teacher_on_batch(self, teacher, batch: dict, student):
        """The student's (augmented, mixed) pixels in the teacher's normalisation and input size (timm's distillation
        task renormalises the same way)."""
        from finetune.model import timm_model_of
        from finetune.tasks.image_classification.transforms import teacher_pixels

        return teacher.model(pixel_values=teacher_pixels(batch["pixel_values"], timm_model_of(student),
                                                         timm_model_of(teacher.model)))

    def owns_model_folder(self, directory) -> bool:
        from finetune.tasks.image_classification.model import is_timm_folder

        return is_timm_folder(directory)

    def load_model_folder(self, directory):
        from finetune.tasks.image_classification.model import load_vision_model

        return load_vision_model(directory)

    def read_inputs(self, items: list[str], column: str, pair_column: str | None = None) -> list:
        return read_image_inputs(items, column)

    def parse_input(self, value, position: int):
        return parse_image_input(value, position)

    def timing_inputs(self, raw) -> list:
        from finetune.tasks.image_classification.files import load_image

        return [load_image(entry) for entry in raw.texts]

    def native_runner(self, folder, max_length: int | None):
        from finetune.tasks.image_classification.timm_folder import timm_runner

        return timm_runner(folder)

    def logits(self, predictor, inputs: list, batch_size: int, show: bool):
        return image_logits(predictor, inputs, batch_size, show)

    def explainable(self, predictor):
        from finetune.tasks.image_classification.explaining import ImageExplainable

        return ImageExplainable(predictor)

    def card_usage(self, recipe, reference: str, native: bool) -> str:
        from finetune.model_folder import row_usage

        return row_usage(recipe, reference, native, vision=True)

    def card_input_limits(self, recipe) -> str:
        size = f"{recipe.data.image_size} px" if recipe.data.image_size else "the backbone's input size"
        return f"- Images are resized and cropped to {size} and normalised as recorded in `config.json`."

    def card_tags(self, native: bool) -> list[str]:
        return [] if native else ["timm"]  # the kit's own format around a timm backbone

    def model_reference(self, folder: str, native: bool) -> str:
        return f"local-dir:{folder}" if native else folder  # timm loads a folder by that prefix

    def base_model(self, name: str) -> str | None:
        from finetune.tasks.image_classification.timm_folder import timm_base_model

        return timm_base_model(name)

    def onnx_image_graph(self) -> bool:
        return True

    def onnx_preprocess(self, folder, info: dict):
        from finetune.tasks.image_classification.timm_folder import export_transform

        return export_transform(folder)

    def settings_note(self, data: dict) -> str | None:
        return f"{data['image_size']}px" if data.get("image_size") else "native px"

    def backbone_offline(self, backbone: dict) -> bool:
        return backbone.get("pretrained") is False  # timm builds an architecture by name with no download

    def zoo_data(self) -> tuple[str, ...]:
        from finetune.tasks.image_classification.reading import IMAGE_ZOO

        return tuple(IMAGE_ZOO)

    def check_eval_inputs(self, raw, recipe):
        raw, _ = check_images(raw, "--data", recipe.data.skip_bad_images, recipe.data.image_column)
        return raw

    def baseline_features(self, recipe):
        return TableFeatures(table_pixels)  # logistic regression on raw pixels: the curve's classical floor

    def load_splits(self, recipe):
        with warnings.catch_warnings():  # skipped images are one of the report's warnings
            warnings.simplefilter("ignore", UserWarning)
            return load_image_splits(recipe)

    def check_data(self, recipe):
        splits = self.load_splits(recipe)
        checks.check_vision_backbone(recipe)
        checks.check_augmentation(recipe, splits)
        return checks.data_report(recipe, splits, images=True)

    def job(self, recipe, accelerator) -> Job:
        import torch

        from finetune.tasks.image_classification.model import build_vision_model, save_vision_model
        from finetune.tasks.image_classification.loaders import (
            DecodedImages,
            ImageDataset,
            decoded_cache_budget,
            make_image_loader,
        )

        t = recipe.train
        splits = self.load_splits(recipe)
        report = checks.data_report(recipe, splits, images=True)
        model, data_config = build_vision_model(recipe, splits.label_names)
        if _use_channels_last(recipe, model, accelerator):
            model = model.to(memory_format=torch.channels_last)
        mixup = build_mixup(recipe, len(splits.label_names or []))
        augmenting = not augmentation_off(recipe)
        # training crops are resized down to the input size: a large JPEG needs no full decode for them (evaluation
        # decodes whole, as timm and every exported model's users do)
        draft = draft_side(data_config, recipe) if augmenting else None
        workers, notes = loader_workers(recipe, accelerator)
        # in the training process the decoded training and validation images can stay in memory across epochs
        decoded = DecodedImages(decoded_cache_budget()) if workers == 0 else None
        datasets = {
            key: ImageDataset(table, build_transforms(data_config, recipe, training=key == "train"
                                                                      and augmenting),
                                     draft if key == "train" else None, decoded if key != "test" else None)
            for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
            if table is not None
        }

        def make_loader(dataset, batch, training):
            # mixup pairs each image with the batch reversed: an odd last batch would pair one image with itself
            drop_last = training and mixup is not None
            sampler = train_sampler(recipe, dataset, batch) if training else None
            return make_image_loader(dataset, batch, training, t.seed, workers, drop_last, sampler)

        return Job(
            splits,
            model,
            datasets,
            make_loader=make_loader,
            save=lambda unwrapped, directory: save_vision_model(unwrapped, directory, recipe, splits.label_names,
                                                                data_config),
            mixup=mixup,
            warnings=report.warnings,
            augmenting=augmenting,
            notes=notes,
            add_unlabeled=with_unlabeled_images,
        )


    def step_choice(self, recipe, native_bf16: bool):
        """A CPU run's fastest memory format and precision for a convolutional model that trains (finetune.step_choice),
        or None: nothing left open (step_choice.choose), nothing convolutional, or the backbone frozen (its features
        or the head's steps dominate, not its training step)."""
        import torch

        from finetune import step_choice
        from finetune.tasks.image_classification.model import build_vision_model

        t = recipe.train
        if recipe.lora is not None or t.freeze == "backbone" or t.gradient_checkpointing:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, data_config = build_vision_model(recipe, ["0", "1"])  # the classes barely count: two
        if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            return None
        key = {"task": self.name, "backbone": recipe.backbone.name, "head": [recipe.head.type, recipe.head.hidden],
               "freeze": str(t.freeze), "drop_path": recipe.backbone.drop_path}
        return step_choice.choose(recipe, model, (t.batch_size, *data_config["input_size"]), key, native_bf16)

    def write_without(self, spec, recipe, dropped, output):
        """An image folder (its rows are paths under it) becomes a csv of the kept images' paths and labels, which
        data.train reads as it is; a table file stays a table."""
        from finetune.tasks.row_files import data_file, write_image_list

        path = data_file(spec, "data.train")
        if not path.is_dir():
            return super().write_without(spec, recipe, dropped, output)
        found = self.read(spec, recipe, "data.train")
        split = found.get("train") or found.get("file")
        kept = [i for i, row in enumerate(split.rows) if row not in dropped]
        columns = (recipe.data.image_column, recipe.data.label_column)
        count = write_image_list([split.texts[i] for i in kept], [split.labels[i] for i in kept], columns, output)
        return count, str(output)


def with_unlabeled_images(rows, inputs: list, label):
    """distill.unlabeled: the training images followed by the unlabelled ones with the placeholder label, decoded
    and augmented as they are; and those inputs' table."""
    from finetune.tasks.image_classification.loaders import ImageDataset

    table = {"image": list(inputs), "label": [label] * len(inputs)}
    joined = {"image": list(rows.images) + table["image"], "label": list(rows.labels) + table["label"],
              "row": list(rows.rows) + [str(item) for item in inputs]}
    return ImageDataset(joined, rows.transform, rows.min_side, rows.decoded), table


def loader_workers(recipe, accelerator) -> tuple[int, list[str]]:
    """(data-loading worker processes, log lines). data.num_workers when the recipe sets it. Left open (null), a
    run on CPUs only whose torch threads take every usable core loads in the training process: a worker would
    have no core of its own and would take CPU time from the step's threads (on 2 cores: 3-7% faster in the process
    on the digits, even on a folder of JPEG photos, where the decoded images then stay in memory for the later
    epochs); elsewhere (a GPU, or cores left free) up to 4 workers."""
    import torch

    n = recipe.data.num_workers
    if n is not None:
        return n, []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if accelerator.device.type == "cpu" and accelerator.num_processes * torch.get_num_threads() >= cores:
        return 0, [f"data: read in the training process (its {torch.get_num_threads()} threads take every core; "
                   "data.num_workers sets worker processes), decoded images kept in memory across epochs"]
    return min(4, cores), []


def augmentation_off(recipe) -> bool:
    """No random change to training images: they are then preprocessed exactly like evaluation ones."""
    a = recipe.augment
    return (a.auto_augment is None and a.random_erasing == 0 and a.mixup == 0 and a.cutmix == 0 and a.hflip == 0
            and list(a.scale) == [1.0, 1.0])


def _use_channels_last(recipe, model, accelerator) -> bool:
    """channels_last speeds up convolutions on GPUs; on CPUs it depends on the CPU and the model, so train measures
    it there (finetune.step_choice) unless the recipe says; for transformers it is not worth the copies."""
    import torch

    if recipe.train.channels_last is not None:
        return recipe.train.channels_last
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return has_conv and accelerator.device.type == "cuda"



TASK = ImageClassification()


def table_pixels(table: dict, side: int = 32):
    """A split table's images as rows of RGB pixels in [0, 1], each image resized to side x side."""
    import numpy as np

    from finetune.tasks.image_classification.files import load_image

    return np.stack([np.asarray(load_image(entry).resize((side, side)), dtype=np.float32).ravel() / 255
                     for entry in table["image"]])
