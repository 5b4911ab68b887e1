"""The run's state on disk: the run folder's guard, resumable checkpoints (accelerate's state and our progress,
written atomically, with a manifest that proves them whole), the best epoch's weights, and the check that a resumed
run is the same run."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from finetune import recipe as recipe_module
from finetune.errors import FinetuneError


def prepare_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to touch an existing run unless asked; checked by every process before any of them writes."""
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"output.dir: '{path}' is a file; choose a folder path")
    if resume:
        if overwrite:
            raise FinetuneError("--resume and --overwrite: pick one (continue the run, or replace it)")
        if (path / "metrics.json").is_file():
            raise FinetuneError(
                f"output.dir: the run in '{path}' has finished; nothing to resume (--overwrite reruns it)"
            )
        return
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        unfinished = not (path / "metrics.json").is_file() and latest_checkpoint(path) is not None
        hint = (
            "pass --resume to continue it, --overwrite to replace it" if unfinished
            else "pass --overwrite to replace it"
        )
        raise FinetuneError(f"output.dir: '{path}' already holds a run; {hint}, or set output.dir=<new folder>")


def _temporary(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


def _replace_with_temporary(directory: Path) -> None:
    """Rename the finished temporary folder into place: a crash before this leaves the previous one intact."""
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(_temporary(directory), directory)
    shutil.rmtree(old, ignore_errors=True)


def atomic_save(directory: Path, write) -> None:
    """Write into a temporary folder, then rename it into place; a full disk stops the run with one line."""
    shutil.rmtree(_temporary(directory), ignore_errors=True)
    try:
        write(_temporary(directory))
    except Exception as error:
        if not is_no_space(error, _temporary(directory)):
            raise
        shutil.rmtree(_temporary(directory), ignore_errors=True)
        raise no_space(directory) from None
    _replace_with_temporary(directory)


def is_no_space(error: BaseException, folder: Path) -> bool:
    """A write into `folder` that failed for lack of space. torch.save loses the errno (a RuntimeError "unexpected
    pos 77952 vs 77840" on a full tmpfs), so a disk left with almost nothing free says it as well."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(mark in str(error) for mark in ("No space left on device", "StorageFull", "os error 28")):
        return True
    try:
        return shutil.disk_usage(folder if folder.exists() else folder.parent).free < NEARLY_FULL
    except OSError:
        return False


NEARLY_FULL = 16 * 2**20  # bytes: a save that failed with less than this free failed for lack of space


def no_space(folder: Path) -> FinetuneError:
    """The one line for a save that found the disk full: where, what is kept, and what to do."""
    out = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    try:
        free = f"{shutil.disk_usage(out).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    kept = latest_checkpoint(out)
    keeps = f"the last good checkpoint {kept} is kept: " if kept else ""
    return FinetuneError(
        f"save: no space left on the device of '{out}' writing {folder.name} ({free}); {keeps}free some space or "
        f"set output.dir to another disk, then resume with finetune run {out / 'config.yaml'} --resume"
    )


def check_same_recipe(saved: Path, recipe) -> None:
    """A resumed run must be the same run: every key as when it started."""
    # read through today's schema: a key added since the run started takes its default, as loading the run gives it
    started = recipe_module.from_dict(recipe_module.parse_yaml(saved.read_text(), str(saved)) or {}, str(saved))
    before = flat_config(recipe_module.parse_yaml(recipe_module.to_yaml(started), str(saved)))
    now = flat_config(recipe_module.parse_yaml(recipe_module.to_yaml(recipe), "recipe"))
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise FinetuneError(
            f"--resume: the recipe differs from the run's {saved} ({shown}); resume with the same recipe "
            f"(finetune run {saved} --resume) or start a new run in another output.dir"
        )


@dataclass
class Progress:
    """Where training stands: all a resumed run needs besides accelerate's state (weights, optimizer, scheduler,
    RNG)."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps over the whole run
    epoch_loss: list = field(default_factory=list)  # per process: the sum of its batch losses so far this epoch
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0  # finished epochs
    train_samples: int = 0
    history: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    best: dict | None = None
    stale: int = 0
    precision: str = ""  # accelerate's mixed_precision value: a resumed `auto` run keeps it
    channels_last: bool | None = None  # the model's memory format: a resumed run whose layout was measured keeps it


def keep_only(state: dict, names: set) -> None:
    for name in [n for n in state if n not in names]:
        del state[name]


def save_best(accelerator, model, out: Path, names: set | None = None) -> None:
    """The best epoch's weights (only `names` when given: what trains)."""
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)  # all processes take part (needed under FSDP/DeepSpeed)
    if names is not None:
        keep_only(state, names)
    if accelerator.is_main_process:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        (out / "checkpoints").mkdir(exist_ok=True)
        atomic_save(out / "checkpoints" / "best", lambda d: (d.mkdir(), save_file(tensors, d / "model.safetensors")))
    accelerator.wait_for_everyone()


CHECKPOINT_PREFIX = "step-"


PROGRESS_FILE = "progress.json"
# written last, into the temporary folder before its rename: the size of every file. A checkpoint without it, or
# whose files differ from it, is not whole (a copy cut short, a disk that filled, a file removed by hand)
MANIFEST_FILE = "manifest.json"


def save_checkpoint(accelerator, out: Path, progress: Progress, keep: int) -> None:
    """A resumable checkpoint, checkpoints/step-N: accelerate's state (model, optimizer, scheduler, RNG, registered
    EMA), our progress and the manifest, written under a temporary name and renamed into place; then the oldest
    beyond `keep` go. A full disk ends the run with one line and leaves the checkpoints before this one as they were.
    """
    folder = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{progress.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(_temporary(folder), ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(_temporary(folder)))  # every process writes its own part
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (_temporary(folder) / PROGRESS_FILE).write_text(json.dumps(dataclasses.asdict(progress)) + "\n")
            _write_manifest(_temporary(folder))
    except Exception as error:
        if not is_no_space(error, _temporary(folder)):
            raise
        shutil.rmtree(_temporary(folder), ignore_errors=True)
        raise no_space(folder) from None
    if accelerator.is_main_process:
        _replace_with_temporary(folder)
        _sync(folder.parent)
        for old in checkpoint_folders(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _sync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk: a manifest must not reach it before the files it lists."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        _sync(path)
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in files}
    temporary = folder / (MANIFEST_FILE + ".tmp")
    temporary.write_text(json.dumps({"files": sizes}, indent=1) + "\n")
    _sync(temporary)
    os.replace(temporary, folder / MANIFEST_FILE)
    _sync(folder)


def checkpoint_folders(out: Path) -> list[Path]:
    """Every checkpoint folder, whole or not, oldest first (a temporary one left by a kill during a save is none)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def damage(folder: Path) -> str | None:
    """What makes a checkpoint unusable, naming the file; None when it is whole. Cheap: sizes against the manifest,
    progress.json parsed, each safetensors file's header read and its length checked against it (no hashing)."""
    manifest = folder / MANIFEST_FILE
    try:
        sizes = json.loads(manifest.read_text())["files"]
        sizes = {str(name): int(size) for name, size in sizes.items()}
    except FileNotFoundError:
        # Saves are renamed into place whole, so a named folder without a manifest was written by a version before
        # manifests: judged by what can be read (safetensors lengths, progress.json), not refused.
        sizes = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is unreadable"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is cut short or changed ({path.stat().st_size} bytes, {size} written)"
        if name.endswith(".safetensors") and not _whole_safetensors(path):
            return f"{path} is not a whole safetensors file"
    if PROGRESS_FILE not in sizes:
        return f"{folder / PROGRESS_FILE} is missing"
    try:
        Progress(**json.loads((folder / PROGRESS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return f"{folder / PROGRESS_FILE} is unreadable"
    return None


def _whole_safetensors(path: Path) -> bool:
    """The header parses and the tensors it lists end where the file does."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or length > 100 * 2**20:
                return False
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return 8 + length + end == path.stat().st_size


def latest_checkpoint(out: Path) -> Path | None:
    """The newest whole checkpoint."""
    return next((p for p in reversed(checkpoint_folders(out)) if damage(p) is None), None)


def resume_point(out: Path) -> tuple[Path | None, list[str]]:
    """Where --resume starts: the newest whole checkpoint, and a line for each newer one skipped. None when the run
    saved none yet (it starts again); a FinetuneError when it saved some and none is whole."""
    folders = checkpoint_folders(out)
    problems: list[tuple[str, str]] = []
    for folder in reversed(folders):
        problem = damage(folder)
        if problem is None:
            return folder, [f"--resume: skipped checkpoint {name}: {why}; resuming from {folder.name}"
                            for name, why in problems]
        problems.append((folder.name, problem))
    if folders:
        more = f" and {len(problems) - 1} older ones" if len(problems) > 1 else ""
        raise FinetuneError(f"--resume: no whole checkpoint in {out / 'checkpoints'} ({problems[0][1]}{more}); "
                            "start the run again with --overwrite")
    return None, []


def load_checkpoint(accelerator, folder: Path, strict: bool = True) -> Progress:
    try:
        accelerator.load_state(str(folder), strict=strict)
    except (OSError, RuntimeError, ValueError, EOFError) as error:  # whole by size, yet damaged inside
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise FinetuneError(
            f"--resume: checkpoint {folder} cannot be loaded ({error.__class__.__name__}: {first}); move it away to "
            "resume from an older one"
        ) from None
    return Progress(**json.loads((folder / PROGRESS_FILE).read_text()))


def flatten(tree, prefix: str = "") -> dict:
    """{"train.lr": 1e-4, ...}: a nested config as dotted keys, the values as they are (lists stay lists)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def flat_config(tree: dict) -> dict:
    """TensorBoard's hparams want flat scalars."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(tree).items()}


# ---------------------------------------------------------------------------------------------------------------
# sharded models (FSDP, DeepSpeed ZeRO-3): whole-model state dicts gathered and loaded collectively


def is_sharded(model) -> bool:
    """True when no process holds the whole model: FSDP2 (DTensor parameters), FSDP1's wrapper, DeepSpeed ZeRO-3
    (partitioned parameters carry a ds_id). DDP and one process hold it whole."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            return True
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def full_state_dict(model, accelerator=None) -> dict:
    """The whole model's state dict on the main process (CPU tensors; other processes may get an empty dict).

    Every process must call it: under sharding it is a collective. accelerate's get_state_dict when there is an
    accelerator and it shards (FSDP, DeepSpeed), torch's own gather for DTensor parameters otherwise (the same call
    accelerate makes under FSDP2), the plain state dict when nothing is sharded."""
    from torch.distributed.tensor import DTensor

    if accelerator is not None and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        return accelerator.get_state_dict(model)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator is not None:
        return accelerator.get_state_dict(model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_state_dict(model, state: dict, strict: bool = True, main_process: bool = True) -> None:
    """Load a whole-model state dict into `model`, sharded or not; every process must call it.

    Sharded (DTensor parameters, FSDP1): the main process's `state` is broadcast and each process keeps its own
    shard of it (the others may pass {}); DeepSpeed ZeRO-3: the parameters are gathered, the main process loads,
    the shards are written back. Not sharded: each process loads its own `state`."""
    import torch
    from torch.distributed.tensor import DTensor

    if any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 (untested here: no GPU)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if main_process:
                model.load_state_dict(state, strict=strict)
        return
    if is_sharded(model) or any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        with torch.no_grad():  # a copy of `state`: torch replaces its entries with the shards
            set_model_state_dict(model, dict(state) if main_process else {}, options=options)
        return
    model.load_state_dict(state, strict=strict)


def skeleton(model):
    """A copy of `model` with no storage (meta tensors), taken before it is sharded: rebuild_unsharded fills it in."""
    import copy

    return copy.deepcopy(model).to("meta")


def rebuild_unsharded(template, live, state: dict):
    """An unsharded model (on the CPU) with the weights of `state` (full_state_dict of the sharded `live` model),
    built from its skeleton: what the export writes with the ecosystem's own save functions. Buffers that a state
    dict leaves out (non-persistent ones, e.g. BERT's position_ids) come from the live model, which keeps them whole.
    """
    model = template
    model.load_state_dict(state, strict=False, assign=True)
    live_buffers = dict(live.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[leaf] = live_buffers[name].detach().cpu().clone()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FinetuneError(f"export: the gathered weights lack {', '.join(missing[:3])}; report this as a bug")
    return model
