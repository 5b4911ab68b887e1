"""`finetune report RUNS`: one self-contained HTML page comparing real runs, opened in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from browser import needs_chromium, open_page, wait_for
from conftest import call_main, recipe_dict, to_recipe

from finetune.train import train

LRS = (1e-3, 3e-4, 3e-3)


@pytest.fixture(scope="module")
def runs_folder(tiny_bert, tiny_data, tmp_path_factory):
    """runs/ with three finished runs that differ in train.lr (one nested as a sweep's trial) and an unfinished one."""
    root = tmp_path_factory.mktemp("report") / "runs"
    for name, lr in zip(("lr-a", "sweep/trial-b", "lr-c"), LRS):
        train(to_recipe(recipe_dict(tiny_bert, tiny_data, root / name, **{"train.lr": lr, "train.epochs": 3})))
    (root / "crashed").mkdir()
    (root / "crashed" / "config.yaml").write_text((root / "lr-a" / "config.yaml").read_text())
    return root


def test_the_page_holds_every_run_its_curves_and_the_recipe_differences(runs_folder, capfd, tmp_path):
    output = tmp_path / "out" / "page.html"
    result = call_main(capfd, "report", runs_folder, "--output", output)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(output)
    page = output.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|file:|/)""", page)  # self-contained: nothing to fetch
    for name in ("lr-a", "sweep/trial-b", "lr-c", "crashed"):
        assert f">{name}<" in page
    differences = page.split("Recipe differences", 1)[1]
    row = re.search(r"<td[^>]*>train\.lr</td>(.*?)</tr>", differences).group(1)
    assert re.findall(r">([^<]+)</td>", row) == ["0.001", "0.001", "0.003", "0.0003"]  # sorted by path
    assert "train.epochs" not in differences  # equal in every run: not a difference
    assert page.count('class="curves"') == 2  # validation accuracy and validation loss, every run on each


def test_report_writes_into_the_folder_by_default_and_refuses_an_empty_one(runs_folder, capfd, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs_folder / "lr-a", copy / "lr-a")
    result = call_main(capfd, "report", copy)
    assert result.returncode == 0 and (copy / "report.html").is_file()
    (tmp_path / "empty").mkdir()
    result = call_main(capfd, "report", tmp_path / "empty")
    assert result.returncode == 2 and "no run folders inside" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@needs_chromium
def test_the_table_sorts_and_the_images_load_in_chromium(runs_folder, capfd, tmp_path):
    output = tmp_path / "report.html"
    assert call_main(capfd, "report", runs_folder, "--output", output).returncode == 0
    tests = {}
    for name in ("lr-a", "sweep/trial-b", "lr-c"):
        metrics = json.loads((runs_folder / name / "metrics.json").read_text())
        tests[name] = metrics["test"]["loss"]
    with open_page(output.as_uri(), tmp_path / "profile") as page:
        images = wait_for(lambda: page.js(
            "[...document.images].every(i => i.complete) && document.images.length"), 30, "the images")
        assert images >= 2 + 3  # the two curve plots and a confusion matrix per finished run
        assert page.js("[...document.images].every(i => i.naturalWidth > 100)")
        headers = page.js("[...document.querySelectorAll('#runs th')].map(h => h.textContent)")
        column = headers.index("test loss")
        names = "[...document.querySelectorAll('#runs tbody tr')].map(r => r.cells[0].textContent)"
        page.js(f"document.querySelectorAll('#runs th')[{column}].click()")
        ascending = sorted(tests, key=tests.get)
        assert page.js(names) == [*ascending, "crashed"]  # a run without a test loss sorts last
        page.js(f"document.querySelectorAll('#runs th')[{column}].click()")
        assert page.js(names) == [*ascending[::-1], "crashed"]
        lr = headers.index("train.lr")
        page.js(f"document.querySelectorAll('#runs th')[{lr}].click()")
        shown = page.js(f"[...document.querySelectorAll('#runs tbody tr')].map(r => r.cells[{lr}].textContent)")
        assert [float(value) for value in shown] == sorted(float(value) for value in shown)
    config = yaml.safe_load((runs_folder / "lr-a" / "config.yaml").read_text())
    assert config["train"]["lr"] == LRS[0]  # reading the runs changed nothing
