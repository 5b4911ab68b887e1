"""The README as a front door and docs/ as the manual: the quickstart first, the test command CI runs, links that
resolve, a site that builds strictly, and the run-folder page naming what a run really writes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, recipe_dict, to_recipe

README = REPO / "README.md"
DOCS = REPO / "docs"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    headings = re.findall(r"(?m)^## (.*)$", text)
    for section in ("Quickstart", "Your CSV", "Your images", "Your NER files", "The Python API", "Where to go next"):
        assert section in headings, section


def test_the_quickstart_is_the_first_bash_block_and_names_a_built_in_recipe():
    first = blocks(README.read_text(), "bash")[0].strip()
    assert first == "pip install -e . && finetune run recipes/text/minilm-bbc-news.yaml"
    recipe = REPO / shlex.split(first)[-1]
    assert recipe.is_file() and yaml.safe_load(recipe.read_text())["data"]["train"] == "bbc-news"  # offline zoo


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    tests = blocks(README.read_text().split("## Tests", 1)[1], "bash")[0].strip()
    install, _, run = tests.partition(" && ")
    assert install == 'pip install -e ".[test]"' and ci.startswith(install)
    assert ci.endswith(f"&& {run}") and run == "python -m pytest"


def test_the_readme_links_resolve():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert "docs/install.md" in local and "docs/reference.md" in local
    missing = sorted({t for t in local if not (REPO / t).exists()})
    assert not missing, missing


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_site_nav_and_builds_strictly(tmp_path):
    """mkdocs --strict fails on a broken link, a missing anchor, a nav entry without a page and a page without a nav
    entry (validation: warn in mkdocs.yml); .ci/run builds it too."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "reference" / "index.html").is_file()


@pytest.fixture(scope="module")
def run_folder(tiny_bert, tiny_data, tmp_path_factory):
    from finetune.train import train

    out = tmp_path_factory.mktemp("docs") / "run"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **{"train.epochs": 1})))
    return out


def test_the_run_folder_page_names_everything_a_run_writes(run_folder):
    """docs/runs.md's list of a run folder: each entry a real run leaves (train.log was missing once), and export/,
    which `finetune export` adds."""
    page = (DOCS / "runs.md").read_text().split("## The run folder", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"(?m)^- `([^`]+?)/?`", page))
    written = {path.name for path in run_folder.iterdir()}
    assert {"train.log", "config.yaml", "model", "checkpoints"} <= written
    assert written - listed == set()
    assert "export" in listed and "adapter" in listed  # written by `finetune export` and by LoRA runs
