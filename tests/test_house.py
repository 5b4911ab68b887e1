"""The house's shape, read statically from finetune/ as a newcomer (or a reviewer) would: every caller asks the task,
problem and model interfaces instead of comparing names or probing; no import circles (imports inside functions
count); short functions and modules; one name per job."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
PROBLEM_NAMES = {"single_label", "multi_label", "regression", "tags"}
TASK_WORDS = {"text-classification", "image-classification", "token-classification", "text", "image", "words", "timm",
              "transformers"}
WRAPPERS = re.compile(r"\b(TextClassifier|TimmClassifier|VisionClassifier|CachedHead|TokenClassifier)\b")
LONGEST_FUNCTION = 100
LARGEST_MODULE = 700


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def in_a_room(path: Path) -> bool:
    """The task folders and problems.py: the rooms that may know a task's or a problem's name."""
    return "tasks" in path.relative_to(PACKAGE).parts or path.name == "problems.py"


def compared_strings(node: ast.Compare) -> set:
    found = set()
    for side in (node.left, *node.comparators):
        for item in (side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]):
            if isinstance(item, ast.Constant) and isinstance(item.value, str):
                found.add(item.value)
    return found


def comparisons(words: set, allowed) -> list[str]:
    return [where(path, node) for path, tree in sources().values() if not allowed(path)
            for node in ast.walk(tree) if isinstance(node, ast.Compare) and compared_strings(node) & words]


def test_at_most_four_comparisons_against_a_problem_name_outside_its_rooms():
    found = comparisons(PROBLEM_NAMES, in_a_room)
    assert len(found) <= 4, found


def test_no_caller_compares_a_tasks_name_inputs_or_library():
    assert comparisons(TASK_WORDS, lambda path: "tasks" in path.relative_to(PACKAGE).parts) == []


def test_no_caller_probes_a_task_for_a_method():
    probes = [where(path, node) for path, tree in sources().values() for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("hasattr", "getattr") and node.args and "task" in ast.unparse(node.args[0]).lower()]
    assert probes == []


def test_at_most_two_isinstance_on_the_kits_wrappers_outside_the_model_module():
    found = [where(path, node) for path, tree in sources().values() if path.name != "model.py"
             for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == "isinstance" and len(node.args) == 2 and WRAPPERS.search(ast.unparse(node.args[1]))]
    assert len(found) <= 2, found


def imported_modules(name: str, tree: ast.Module) -> set[str]:
    """The finetune modules `name` imports anywhere (functions included), and the packages that importing runs."""
    modules, found = sources(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in modules}
    return found - {name}


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: imported_modules(name, tree) for name, (_, tree) in sources().items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += graph.get(name, ())
        return seen

    circles = sorted(name for name in graph if name in reaches(name))
    assert circles == []


def test_every_function_is_short_enough_to_read_whole():
    long = [(node.end_lineno - node.lineno + 1, where(path, node), node.name) for path, tree in sources().values()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert long == []


def test_no_module_is_over_seven_hundred_lines():
    large = [(len(path.read_text().splitlines()), str(path)) for path, _ in sources().values()
             if len(path.read_text().splitlines()) > LARGEST_MODULE]
    assert large == []


def test_no_two_modules_define_a_function_or_class_of_one_name():
    defined = defaultdict(list)
    for name, (_, tree) in sources().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name].append(name)
    assert {name: places for name, places in defined.items() if len(places) > 1} == {}


def test_no_private_name_is_imported_across_modules():
    private = [f"{where(path, node)} {node.module}.{a.name}" for path, tree in sources().values()
               for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune")
               for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []


@pytest.mark.parametrize("word", sorted(PROBLEM_NAMES))
def test_the_counting_sees_a_comparison_it_should(word):
    """The counters above are not blind: a planted comparison is found."""
    tree = ast.parse(f"if problem == {word!r}:\n    pass\n")
    assert any(isinstance(n, ast.Compare) and compared_strings(n) & PROBLEM_NAMES for n in ast.walk(tree))
