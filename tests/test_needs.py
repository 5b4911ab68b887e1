"""What `finetune ls` says a recipe needs beyond pip, derived from its data and backbone keys."""

from __future__ import annotations

from finetune.needs import recipe_needs


def recipe(task="text-classification", backbone="minilm-l6", pretrained=None, **data) -> dict:
    raw = {"task": task, "backbone": {"name": backbone}, "data": {"train": "bbc-news", **data}}
    if pretrained is not None:
        raw["backbone"]["pretrained"] = pretrained
    return raw


def test_zoo_backbones_and_data_need_nothing(tmp_path):
    assert recipe_needs(recipe()) == []
    assert recipe_needs(recipe("image-classification", "efficientnet-lite0", train="digits")) == []
    (tmp_path / "train.csv").write_text("text,label\na,b\n")  # a file that is there needs nothing more
    assert recipe_needs(recipe(backbone=str(tmp_path), train=str(tmp_path / "train.csv"))) == []  # local folder


def test_an_apt_data_set_and_the_network_are_named():
    assert recipe_needs(recipe("image-classification", "efficientnet-lite0", train="fashion-mnist",
                               test="fashion-mnist")) == ["apt:dataset-fashion-mnist"]  # once
    assert recipe_needs(recipe(train="hub:imdb")) == ["network"]
    assert recipe_needs(recipe(validation="hub:imdb")) == ["network"]
    assert recipe_needs(recipe(backbone="bert-base-uncased")) == ["network"]  # a hub id
    assert recipe_needs(recipe("image-classification", "resnet18", train="digits")) == ["network"]  # timm weights
    both = recipe("image-classification", "resnet18", train="fashion-mnist")
    assert recipe_needs(both) == ["apt:dataset-fashion-mnist", "network"]


def test_random_init_timm_needs_no_weights_but_a_hub_text_model_still_needs_its_config():
    assert recipe_needs(recipe("image-classification", "resnet18", pretrained=False, train="digits")) == []
    assert recipe_needs(recipe(backbone="bert-base-uncased", pretrained=False)) == ["network"]


def test_data_that_names_a_file_not_there_needs_your_files(tmp_path):
    """The NER recipe names train.conll: it runs once you bring the files, and `finetune ls` says so."""
    ner = recipe("token-classification", train="train.conll")
    assert recipe_needs(ner) == ["files"]
    assert recipe_needs(recipe(train=str(tmp_path / "mine.csv"), validation="hub:imdb")) == ["files", "network"]
    assert recipe_needs(recipe("image-classification", "efficientnet-lite0", train="my_images/")) == ["files"]
    assert recipe_needs(recipe(train="digits")) == ["files"]  # an image zoo set is no text data set
    (tmp_path / "train.conll").write_text("John B-PER\n")
    assert recipe_needs(recipe("token-classification", train=str(tmp_path / "train.conll"))) == []
