"""What a recipe needs beyond the pip install: your own files for a data key that names a file or folder not
there, an apt package for a zoo data set, or the network for a hub data set or a backbone that is not in the offline
zoo. Read from the recipe's own data and backbone keys."""

from __future__ import annotations

from pathlib import Path

# Zoo data sets that come from a Debian/Ubuntu package: name -> (apt package, the folder it installs)
APT_DATA = {"fashion-mnist": ("dataset-fashion-mnist", Path("/usr/share/datasets/fashion-mnist"))}


def recipe_needs(raw: dict) -> list[str]:
    """E.g. ["files"], ["apt:dataset-fashion-mnist", "network"]; [] when the recipe runs offline on a plain install.

    raw: the recipe as YAML data (unvalidated), so `finetune ls` stays fast and lists even a broken recipe.
    """
    from finetune.backbones import TEXT_ZOO, VISION_ZOO
    from finetune.tasks import TASKS, get_task

    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    backbone = raw.get("backbone") if isinstance(raw.get("backbone"), dict) else {}
    task = raw.get("task")
    task = get_task(task) if isinstance(task, str) and task in TASKS else None
    zoo = task.zoo_data() if task is not None else ()
    found: list[str] = []
    network = False
    for key in ("train", "validation", "test"):
        spec = data.get(key)
        if not isinstance(spec, str):
            continue
        if spec in APT_DATA:
            found.append(f"apt:{APT_DATA[spec][0]}")
        elif not spec.startswith("hub:") and spec not in zoo and not Path(spec).expanduser().exists():
            found.append("files")  # the recipe names a file of yours (token-classification's train.conll)
        network |= spec.startswith("hub:")
    name = str(backbone.get("name", ""))
    local = name.startswith("local-dir:") or (bool(name) and Path(name).expanduser().exists())
    built_offline = task is not None and task.backbone_offline(backbone)
    network |= not (name in TEXT_ZOO or name in VISION_ZOO or local or built_offline)
    return list(dict.fromkeys(found)) + (["network"] if network else [])
