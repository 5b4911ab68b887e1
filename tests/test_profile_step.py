"""scripts/profile_step.py on an image recipe: the image task's own step, timed by phase, with the variants that
change its layout and its data path really changed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, subprocess_env, write_recipe
from test_predict import COLOURS, colour_image  # the same toy images

SCRIPT = REPO / "scripts" / "profile_step.py"


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile-colours")
    rng = np.random.RandomState(0)
    for split, count in (("train", 8), ("validation", 4)):
        for colour in COLOURS:
            (root / split / colour).mkdir(parents=True)
            for i in range(count):
                colour_image(colour, rng).save(root / split / colour / f"{i}.png")
    return root


# slow (the default suite's time): a profiling script, run by hand
@pytest.mark.slow
def test_an_image_recipe_is_profiled_by_phase_with_its_variants(colours, tmp_path):
    recipe = write_recipe(tmp_path / "vision.yaml", {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False},
        "data": {"train": str(colours / "train"), "validation": str(colours / "validation"), "image_size": 32},
        "augment": {"scale": [0.5, 1.0], "hflip": 0.5},
        "train": {"batch_size": 4, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    })
    markdown = tmp_path / "profile.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(recipe), "--variants", "base,channels-last,no-augment+no-workers",
         "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--threads", "1", "--markdown", str(markdown),
         "--name", "profile-images"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    table = done.stdout.split("\nvariant ", 1)[1].split("\nnote:", 1)[0]  # the table printed before the notes
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.strip()}
    assert set(rows) == {"base", "channels-last", "no-augment+no-workers"}
    for row in rows.values():  # median step and its four phases, in seconds, then padding (none for images)
        step, *phases = (float(x) for x in row[1:6])
        assert step > 0 and all(x >= 0 for x in phases) and row[6] == "0"
    assert "layouts: base contiguous, channels-last channels_last, no-augment+no-workers contiguous" in done.stdout
    assert "16 training images" in done.stdout and "CPU flags" in done.stdout
    assert "convolution" in done.stdout  # the profiler's table of the base step's operators
    assert "### profile-images" in markdown.read_text()


def test_a_text_only_variant_is_refused_for_an_image_recipe(colours, tmp_path):
    recipe = write_recipe(tmp_path / "vision.yaml", {
        "task": "image-classification", "backbone": {"name": "test_efficientnet", "pretrained": False},
        "data": {"train": str(colours / "train"), "validation": str(colours / "validation"), "image_size": 32},
        "output": {"dir": str(tmp_path / "run")}})
    done = subprocess.run([sys.executable, str(SCRIPT), str(recipe), "--variants", "base,ungrouped"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "ungrouped only for text recipes" in done.stderr
