"""Param groups (no decay on biases and norms, a head lr) and warmup schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import LABELS, to_recipe
from torch import nn

from finetune.model import head_parameter_names
from finetune.tasks.text_classification.model import build_text_model
from finetune.optim import build_param_groups, build_scheduler, warmup_steps


def groups_by_parameter(model, groups) -> dict[str, dict]:
    """name -> the group holding that parameter (each parameter must be in exactly one)."""
    owner = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in owner, "a parameter is in two groups"
            owner[id(param)] = group
    return {name: owner.get(id(param)) for name, param in model.named_parameters()}


@pytest.fixture(params=["native", "mlp"])
def model(request, make_recipe):
    dotted = {"head.type": "mlp", "head.hidden": [16]} if request.param == "mlp" else {}
    built, _ = build_text_model(to_recipe(make_recipe(**dotted)), LABELS)
    return built


def test_no_weight_decay_on_biases_and_norm_weights(model):
    groups = build_param_groups(model, lr=1e-4, head_lr=None, weight_decay=0.05, head_names=head_parameter_names(model))
    owner = groups_by_parameter(model, groups)
    norms = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)}
    assert norms  # the test sees the LayerNorms
    for name, param in model.named_parameters():
        group = owner[name]
        assert group is not None, f"{name} is in no group"
        if name.endswith(".bias") or name in norms:
            assert group["weight_decay"] == 0.0, name
        else:
            assert param.ndim >= 2 and group["weight_decay"] == 0.05, name
    assert any(name.endswith("word_embeddings.weight") and owner[name]["weight_decay"] == 0.05 for name in owner)


def test_head_parameters_get_head_lr(model):
    head = head_parameter_names(model)
    assert head and all(name.startswith(("classifier.", "head.")) for name in head)
    groups = build_param_groups(model, lr=1e-4, head_lr=3e-3, weight_decay=0.01, head_names=head)
    owner = groups_by_parameter(model, groups)
    for name in owner:
        assert owner[name]["lr"] == (3e-3 if name in head else 1e-4), name
    # each group writes its own lr out (no reliance on an optimizer-wide default)
    optimizer = torch.optim.AdamW(groups, lr=123.0)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-4, 3e-3}


def test_head_lr_null_means_lr(model):
    groups = build_param_groups(model, lr=2e-5, head_lr=None, weight_decay=0.01, head_names=head_parameter_names(model))
    assert {g["lr"] for g in groups} == {2e-5}


def test_frozen_parameters_get_no_group(model):
    frozen = [p for name, p in model.named_parameters() if "embeddings" in name]
    for param in frozen:
        param.requires_grad_(False)
    groups = build_param_groups(model, 1e-4, None, 0.01, head_parameter_names(model))
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not grouped & {id(p) for p in frozen}
    assert len(grouped) == sum(1 for p in model.parameters() if p.requires_grad)


def test_warmup_steps():
    assert warmup_steps(0.1, 95) == 10  # a fraction rounds up
    assert warmup_steps(0.0, 95) == 0
    assert warmup_steps(7, 95) == 7  # an int is a step count


def lr_curve(name: str, warmup: int, total: int, base: tuple[float, ...] = (1.0, 10.0)) -> list[list[float]]:
    params = [nn.Parameter(torch.zeros(1)) for _ in base]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base)])
    scheduler = build_scheduler(optimizer, name, warmup, total)
    curve = []
    for _ in range(total + 1):
        curve.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return curve


def expected(name: str, step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        return max(0.0, 1 - progress)
    return 1.0


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay(name):
    warmup, total = 3, 11
    curve = lr_curve(name, warmup, total)
    for step, (lr, head_lr) in enumerate(curve):
        assert lr == pytest.approx(expected(name, step, warmup, total), abs=1e-9), (name, step)
        assert head_lr == pytest.approx(10 * lr, abs=1e-9)  # every group follows the same multiplier
    assert curve[0][0] == 0.0 and curve[warmup][0] == pytest.approx(1.0)
    if name != "constant":
        assert curve[total][0] == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_starts_at_full_lr():
    assert lr_curve("cosine", 0, 4)[0][0] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# every schedule of transformers' SchedulerType, with its own arguments (train.scheduler_args)


def curve_of(name: str, total: int, warmup: int = 0, args: dict | None = None, step_scale: int = 1) -> list[float]:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, name, warmup, total, args, step_scale)
    curve = []
    for _ in range(total + 1):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


def test_the_recipe_takes_every_schedule_transformers_has():
    import typing

    from transformers import SchedulerType

    from finetune.recipe import Train

    names = set(typing.get_args(typing.get_type_hints(Train)["scheduler"]))
    assert {s.value for s in SchedulerType} <= names  # a schedule added to transformers shows up here


def test_cosine_with_min_lr_ends_at_its_floor():
    curve = curve_of("cosine_with_min_lr", 10, args={"min_lr_rate": 0.1})
    assert curve[0] == pytest.approx(1.0) and curve[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(curve))  # decays monotonically to the floor
    assert curve_of("cosine_with_min_lr", 10, args={"min_lr": 0.25})[10] == pytest.approx(0.25)


def test_warmup_stable_decay_holds_then_decays_over_a_fraction_of_the_steps():
    curve = curve_of("warmup_stable_decay", 10, warmup=2, args={"num_decay_steps": 0.3, "decay_type": "linear"})
    assert curve[0] == 0.0 and curve[2:7] == pytest.approx([1.0] * 5)  # warmup 2, stable to step 7
    assert curve[7] > curve[8] > curve[9] and curve[10] == pytest.approx(0.0, abs=1e-9)  # 3 decay steps
    scaled = curve_of("warmup_stable_decay", 20, args={"num_decay_steps": 3}, step_scale=2)  # 2 processes
    assert scaled[14] == pytest.approx(1.0) and scaled[15] < 1.0  # 3 optimizer steps: the last 6 scheduler steps


def test_polynomial_and_restarts_take_their_arguments():
    curve = curve_of("polynomial", 4, args={"lr_end": 0.0, "power": 2.0})
    assert curve == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0])  # (1 - t)^2
    restarts = curve_of("cosine_with_restarts", 8, args={"num_cycles": 2})
    assert restarts[4] == pytest.approx(1.0) and restarts[3] < 0.5  # back to the top half way


def test_bad_scheduler_arguments_name_the_key():
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"train.scheduler_args.min_lr_rate: not an argument of the polynomial"):
        curve_of("polynomial", 4, args={"min_lr_rate": 0.1})
    with pytest.raises(FinetuneError, match=r"train.scheduler_args.num_decay_steps: warmup_stable_decay needs"):
        curve_of("warmup_stable_decay", 4)
    with pytest.raises(FinetuneError, match=r"train.scheduler_args: cosine_with_min_lr"):
        curve_of("cosine_with_min_lr", 4)  # neither min_lr nor min_lr_rate: transformers' own message, one line
    with pytest.raises(FinetuneError, match=r"train.scheduler_args.num_cycles: not an argument of the reduce_lr_on"):
        curve_of("reduce_lr_on_plateau", 4, args={"num_cycles": 2})  # its own arguments are ReduceLROnPlateau's


@pytest.mark.parametrize("name", ["reduce_lr_on_plateau", "greedy"])
def test_metric_driven_schedules_lower_the_lr_when_the_metric_stops_improving(name):
    """Stepped with the validation metric (max: accuracy), the lr holds while it improves and drops on a plateau."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    args = {"patience": 1, "factor": 0.5} | ({"min_lr": 0.0} if name == "greedy" else {})
    scheduler = build_scheduler(optimizer, name, 0, 10, args, mode="max")
    lrs = []
    for accuracy in [0.5, 0.6, 0.7, 0.7, 0.7, 0.7]:
        scheduler.step(accuracy)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:3] == [1.0, 1.0, 1.0]  # improving: held (mode max from the metric; min would have cut it)
    assert lrs[-1] < 1.0, lrs


def test_timm_no_weight_decay_names_get_no_decay_inside_the_kits_model(tmp_path):
    import timm
    from peft import LoraConfig, get_peft_model

    from finetune.optim import no_weight_decay_names

    class Wrapper(nn.Module):  # a timm model inside another module, as the kit's and peft's wrappers hold it
        def __init__(self):
            super().__init__()
            self.model = timm.create_model("test_vit", pretrained=False, num_classes=3)

    wrapped = Wrapper()
    assert {"model.pos_embed", "model.cls_token"} <= no_weight_decay_names(wrapped)
    owner = groups_by_parameter(wrapped, build_param_groups(wrapped, 1e-3, None, 0.05, set()))
    assert owner["model.pos_embed"]["weight_decay"] == 0.0 and owner["model.cls_token"]["weight_decay"] == 0.0
    assert owner["model.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05  # matrices still decay
    lora = get_peft_model(Wrapper(), LoraConfig(r=2, target_modules=["qkv"]))
    for param in lora.parameters():
        param.requires_grad = True
    owner = groups_by_parameter(lora, build_param_groups(lora, 1e-3, None, 0.05, set()))
    names = [n for n in owner if n.endswith("pos_embed")]
    assert names and all(owner[n]["weight_decay"] == 0.0 for n in names)
