"""train.precision: bf16 autocast on CPUs that compute bf16 natively, fp32 elsewhere, and bf16 refused where slow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import call_main, one_error_line, recipe_dict, to_recipe, write_recipe
from safetensors.torch import load_file

import finetune
from finetune import precision
from finetune.errors import FinetuneError
from finetune.train import latest_checkpoint, train

NATIVE = precision.cpu_has_native_bf16()
needs_native_bf16 = pytest.mark.skipif(
    not NATIVE, reason=f"this CPU ({precision.cpu_flags()}) has no native bf16: a bf16 run would take ~400x longer")


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def play_cpu(monkeypatch, native: bool) -> None:
    """Make the kit see a CPU with (or without) native bf16: the seam the decision reads."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)


class DtypesSeen:
    """The dtypes of every nn.Linear output, by training/eval mode, while it is active (a global forward hook)."""

    def __enter__(self):
        self.seen = {True: set(), False: set()}

        def hook(module, args, output):
            if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
                self.seen[module.training].add(output.dtype)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# The choice


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_picks_bf16_only_on_a_cpu_with_native_bf16(native, expected):
    assert precision.choose_precision("auto", cuda=False, native_bf16=native) == expected
    assert precision.choose_precision("fp32", cuda=False, native_bf16=native) == "no"


def test_the_cpu_decides_through_the_seam(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "no")):
        play_cpu(monkeypatch, native)
        assert precision.choose_precision("auto", cuda=False) == expected


def test_bf16_is_refused_on_a_cpu_without_native_bf16_saying_how_slow():
    with pytest.raises(FinetuneError, match=r"^train.precision: bf16.*400x slower.*train.precision=fp32"):
        precision.choose_precision("bf16", cuda=False, native_bf16=False)
    assert precision.choose_precision("bf16", cuda=False, native_bf16=True) == "bf16"
    with pytest.raises(FinetuneError, match="fp16 needs a GPU"):
        precision.choose_precision("fp16", cuda=False, native_bf16=True)


def test_auto_resumes_at_the_precision_the_run_started_at():
    assert precision.choose_precision("auto", cuda=False, native_bf16=True, resumed="no") == "no"
    assert precision.choose_precision("auto", cuda=False, native_bf16=True, resumed="bf16") == "bf16"
    with pytest.raises(FinetuneError, match="--resume: the run trained at bf16.*400x"):
        precision.choose_precision("auto", cuda=False, native_bf16=False, resumed="bf16")


def test_the_flag_reading_agrees_with_the_cpu():
    if precision.cpu_capabilities().get("architecture") != "x86_64":
        pytest.skip("the /proc/cpuinfo cross-check is for x86 CPUs")
    words = set(Path("/proc/cpuinfo").read_text().split())
    assert NATIVE == bool({"avx512_bf16", "amx_bf16"} & words)
    assert ("AVX2" in precision.cpu_flags().split()) == ("avx2" in words)


def test_bf16_refused_by_the_cli_in_one_line(monkeypatch, capfd, tiny_bert, tiny_data, tmp_path):
    play_cpu(monkeypatch, False)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_bert, tiny_data, out, **{"train.precision": "bf16"}))
    line = one_error_line(call_main(capfd, "run", path))
    assert "train.precision" in line and "400x" in line
    assert not out.exists()


def test_auto_on_a_cpu_without_native_bf16_trains_in_fp32(monkeypatch, tiny_bert, tiny_data, tmp_path):
    play_cpu(monkeypatch, False)
    out = tmp_path / "run"
    with DtypesSeen() as dtypes:
        metrics = train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **{"train.precision": "auto",
                                                                            "train.epochs": 1})))
    assert dtypes.seen[True] == {torch.float32} and dtypes.seen[False] == {torch.float32}
    assert metrics["train"]["precision"] == "fp32"
    assert "precision fp32 (train.precision auto; this CPU has no native bf16" in (out / "train.log").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Training, evaluation, prediction and cached features at bf16


@pytest.fixture(scope="module")
def bf16_run(tiny_bert, tiny_data, tmp_path_factory):
    if not NATIVE:
        pytest.skip(f"this CPU ({precision.cpu_flags()}) has no native bf16")
    out = tmp_path_factory.mktemp("bf16") / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **{"train.precision": "auto", "train.epochs": 3,
                                                   "backbone.dropout": 0.1, "head.dropout": 0.1})
    with DtypesSeen() as dtypes:
        metrics = train(to_recipe(raw))
    return out, metrics, dtypes.seen


@needs_native_bf16
def test_auto_trains_and_evaluates_under_bf16_autocast_with_fp32_weights(bf16_run):
    out, metrics, seen = bf16_run
    assert torch.bfloat16 in seen[True], "no training forward ran under bf16 autocast"
    assert torch.bfloat16 in seen[False], "evaluation did not run under bf16 autocast"
    assert metrics["train"]["precision"] == "bf16"
    assert json.loads((out / "metrics.json").read_text())["train"]["precision"] == "bf16"
    assert "precision bf16 autocast, fp32 weights and optimizer" in (out / "train.log").read_text()
    weights = load_file(out / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # master weights stay fp32
    optimizer = torch.load(latest_checkpoint(out) / "optimizer.bin", weights_only=False)
    moments = [v for state in optimizer["state"].values() for v in state.values() if v.dim() > 0]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    losses = [epoch["loss"] for epoch in metrics["epochs"]]
    assert losses[-1] < losses[0]  # it learns
    assert metrics["test"]["accuracy"] > 1 / 3


@needs_native_bf16
def test_a_bf16_run_predicts_under_bf16_where_native_and_fp32_elsewhere(bf16_run, monkeypatch):
    out, _, _ = bf16_run
    texts = ["the goal today news", "a chip of data story", "very rice and soup"]
    predictor = finetune.load(out)
    assert predictor.precision == "bf16"
    with DtypesSeen() as dtypes:
        at_bf16 = predictor.logits(texts)
    assert torch.bfloat16 in dtypes.seen[False]
    play_cpu(monkeypatch, False)
    fp32 = finetune.load(out)
    assert fp32.precision == "fp32"
    at_fp32 = fp32.logits(texts)
    assert at_bf16.dtype == at_fp32.dtype
    assert (at_bf16.argmax(1) == at_fp32.argmax(1)).all()
    assert abs(at_bf16 - at_fp32).max() < 0.1  # bf16 keeps ~3 significant digits


@needs_native_bf16
def test_bf16_resume_equals_the_uninterrupted_bf16_run(tiny_bert, tiny_data, tmp_path):
    settings = {"backbone.dropout": 0.1, "head.dropout": 0.1, "train.batch_size": 4, "train.epochs": 2,
                "train.checkpoint_every": 3, "train.keep_checkpoints": 10, "train.precision": "bf16"}
    whole = tmp_path / "whole"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, whole, **settings)))
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **settings)
    train(to_recipe(raw))
    steps = sorted((out / "checkpoints").glob("step-*"))
    for later in steps[1:]:  # as if killed after the first (mid-epoch) checkpoint
        subprocess.run(["rm", "-rf", str(later)], check=True)
    for name in ("model", "metrics.json"):
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
    train(to_recipe(raw), resume=True)
    assert "resumed from" in (out / "train.log").read_text()
    assert_same_run(out, whole)


def test_auto_resumes_at_its_first_precision_on_another_kind_of_cpu(monkeypatch, tiny_bert, tiny_data, tmp_path):
    """A run started in fp32 (no native bf16) and resumed where auto would pick bf16 stays fp32, so it is exact."""
    play_cpu(monkeypatch, False)
    settings = {"train.batch_size": 4, "train.epochs": 2, "train.checkpoint_every": 3, "train.keep_checkpoints": 10,
                "train.precision": "auto"}
    whole = tmp_path / "whole"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, whole, **settings)))
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **settings)
    train(to_recipe(raw))
    for later in sorted((out / "checkpoints").glob("step-*"))[1:]:
        subprocess.run(["rm", "-rf", str(later)], check=True)
    for name in ("model", "metrics.json"):
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
    play_cpu(monkeypatch, True)
    with DtypesSeen() as dtypes:
        metrics = train(to_recipe(raw), resume=True)
    assert dtypes.seen[True] == {torch.float32}
    assert metrics["train"]["precision"] == "fp32"
    assert_same_run(out, whole)


def assert_same_run(a, b) -> None:
    metrics_a, metrics_b = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    metrics_a.pop("train"), metrics_b.pop("train")
    assert metrics_a == metrics_b
    weights_a, weights_b = (load_file(run / "model" / "model.safetensors") for run in (a, b))
    assert sorted(weights_a) == sorted(weights_b)
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@needs_native_bf16
def test_cached_features_at_bf16_match_training_through_the_frozen_backbone(tiny_bert, tiny_data, tmp_path):
    runs = {}
    for cache in (True, False):
        out = tmp_path / f"cache-{cache}"
        dotted = {"train.freeze": "backbone", "train.cache_features": cache, "head.pooling": "mean",
                  "head.dropout": 0.2, "train.epochs": 3, "train.lr": 3e-2, "train.precision": "bf16"}
        with DtypesSeen() as dtypes:
            runs[cache] = train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **dotted)))
        assert torch.bfloat16 in dtypes.seen[False]  # the frozen backbone ran (in eval mode) under autocast
    assert "cached features" in (tmp_path / "cache-True" / "train.log").read_text()
    for a, b in zip(runs[True]["epochs"], runs[False]["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-2)
        assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], abs=2e-2)


@needs_native_bf16
def test_bf16_features_are_cached_apart_from_fp32_ones(tiny_bert, tiny_data, tmp_path):
    dotted = {"train.freeze": "backbone", "head.pooling": "mean", "train.epochs": 1}
    for name in ("fp32", "bf16"):
        train(to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path / name, **dotted, **{"train.precision": name})))
        assert "computing train features" in (tmp_path / name / "train.log").read_text()
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 6  # 3 splits x 2 precisions
