"""Faults that lose nothing: a damaged checkpoint is skipped for the newest whole one (and the run still ends exactly
as one never interrupted), none whole is one line, and a disk that fills during a save stops the run with one line
and leaves the last good checkpoint loadable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_dict, subprocess_env, to_recipe, write_recipe
from test_resume import RESUMABLE, assert_identical

from finetune.checkpoints import damage
from finetune.train import latest_checkpoint, train

SETTINGS = RESUMABLE | {"train.keep_checkpoints": 10}  # checkpoints at steps 3, 4, 6, 8, 9, 12


@pytest.fixture(scope="module")
def whole(tiny_bert, tiny_data, tmp_path_factory):
    """An uninterrupted run that kept all its checkpoints: the reference, and the source of damaged copies."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **SETTINGS)))
    return out


def cut_copy(whole: Path, out: Path, last: str) -> Path:
    """The run as a kill after checkpoint `last` leaves it."""
    shutil.copytree(whole, out)
    for later in sorted((out / "checkpoints").glob("step-*")):
        if later.name > last:
            shutil.rmtree(later)
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()
    config = out / "config.yaml"  # the copy's own folder: otherwise the same run
    config.write_text(config.read_text().replace(str(whole), str(out)))
    return out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a half-written file


DAMAGE = {
    "truncated weights": ("model.safetensors", truncate),
    "no progress.json": ("progress.json", Path.unlink),
    "no optimizer state": ("optimizer.bin", Path.unlink),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before_exactly(whole, tiny_bert, tiny_data, tmp_path,
                                                                         kind):
    out = cut_copy(whole, tmp_path / "run", "step-00000006")
    name, spoil = DAMAGE[kind]
    spoil(out / "checkpoints" / "step-00000006" / name)
    assert latest_checkpoint(out).name == "step-00000004"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **SETTINGS)), resume=True)
    log = (out / "train.log").read_text()
    skipped = [line for line in log.splitlines() if line.startswith("--resume: skipped")]
    assert len(skipped) == 1, log[-2000:]
    assert str(out / "checkpoints" / "step-00000006" / name) in skipped[0]
    assert skipped[0].endswith("resuming from step-00000004")
    assert "resumed from" in log and "step-00000004: epoch 2, 0 batches in" in log
    assert_identical(out, whole)


def test_a_checkpoint_from_before_manifests_is_judged_by_its_files_and_a_bad_header_is_not_whole(whole, tmp_path):
    step = whole / "checkpoints" / "step-00000012"
    assert damage(step) is None
    copy = shutil.copytree(step, tmp_path / "step-00000012")
    (copy / "manifest.json").unlink()  # as an older version saved it: still resumable
    assert damage(copy) is None
    truncate(copy / "model.safetensors")
    assert damage(copy) == f"{copy / 'model.safetensors'} is not a whole safetensors file"
    copy = shutil.copytree(step, tmp_path / "other" / "step-00000012")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xff\xff\xff"  # a header that is not JSON, the size unchanged
    weights.write_bytes(bytes(data))
    assert damage(copy) == f"{weights} is not a whole safetensors file"


def run_cli(*args: str, code: str = "") -> subprocess.CompletedProcess:
    script = f"import sys\n{code}\nfrom finetune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


def test_no_whole_checkpoint_is_one_line(whole, tmp_path):
    out = cut_copy(whole, tmp_path / "run", "step-00000004")
    truncate(out / "checkpoints" / "step-00000004" / "model.safetensors")
    (out / "checkpoints" / "step-00000003" / "progress.json").unlink()
    done = run_cli("run", str(out), "--resume")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("finetune: error: --resume: no whole checkpoint in ")
    assert str(out / "checkpoints" / "step-00000004" / "model.safetensors") in lines[0]
    assert "--overwrite" in lines[0]


# torch.save (optimizer, scheduler, RNG) on a disk that is full from the second checkpoint on: half the bytes
# written, then ENOSPC, as the kernel answers a write that does not fit
FULL_DISK = """
import errno, torch
from pathlib import Path
OUT = Path(sys.argv[-1]).parent
_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(f, (str, Path)) and any((OUT / "checkpoints").glob("step-*[0-9]")):
        Path(f).write_bytes(b"\\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return _save(obj, f, *args, **kwargs)
torch.save = save
"""


@pytest.fixture
def small_disk(whole, tmp_path):
    """A tmpfs that holds the run up to its first checkpoint and not its second (root only: mount)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    first = sum(p.stat().st_size for p in (whole / "checkpoints" / "step-00000003").iterdir())
    best = sum(p.stat().st_size for p in (whole / "checkpoints" / "best").iterdir())
    size = (int(1.6 * first) + best + 32 * 1024) // 4096 * 4096
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def check_full_disk_stop(done: subprocess.CompletedProcess, out: Path) -> None:
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("finetune:")]  # not the progress bars
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no space left" in lines[0] and str(out) in lines[0] and "output.dir" in lines[0]
    assert "step-00000004" in lines[0] and "step-00000003 is kept" in lines[0]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["best", "step-00000003"]  # the half-written one is gone, the good one whole
    assert damage(out / "checkpoints" / "step-00000003") is None


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_resumes_exactly(whole, tiny_bert, tiny_data,
                                                                                      tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_bert, tiny_data, out, **SETTINGS))
    done = run_cli("run", str(recipe), code=FULL_DISK.replace("sys.argv[-1]", repr(str(out / "config.yaml"))))
    check_full_disk_stop(done, out)
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **SETTINGS)), resume=True)
    assert_identical(out, whole)


# slow (~10 s): a second run, on a real full disk; the injected one above stays in the default suite
@pytest.mark.slow
def test_a_real_full_disk_is_the_same_one_line_and_the_checkpoint_before_loads(whole, tiny_bert, tiny_data,
                                                                               small_disk, tmp_path):
    out = small_disk / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_bert, tiny_data, out, **SETTINGS))
    check_full_disk_stop(run_cli("run", str(recipe)), out)
    moved = tmp_path / "moved"  # as the line says: output.dir on another disk, the run carried over
    shutil.copytree(out, moved)
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(str(out), str(moved)))
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, moved, **SETTINGS)), resume=True)
    assert_identical(moved, whole)
