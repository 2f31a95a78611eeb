"""transformers internals (issue 22): every one this repository uses is listed once, in
`modeling_detr_custom/_transformers_internals.py`, with why; each is still there and behaves as relied on in the
installed transformers (a failure names it); and no file uses one that the table does not list.

"Internal": a name imported from a transformers submodule, a top-level name outside `transformers.__all__` (a
submodule such as `transformers.initialization`), or a private (`_name`) attribute of transformers' base classes
that our code reads, sets or overrides.
"""

from __future__ import annotations

import ast
from collections import OrderedDict
from pathlib import Path

import pytest
import transformers
from conftest import ROOT
from torch import nn
from transformers import BaseImageProcessor, GradientCheckpointingLayer, PreTrainedConfig, PreTrainedModel

from modeling_detr_custom._transformers_internals import INTERNALS, Internal, problems

SCANNED = ("modeling_detr_custom", "scripts", "tests", "benchmarks")
THIS_TABLE = (ROOT / "modeling_detr_custom" / "_transformers_internals.py", Path(__file__).resolve())


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: internal.name.split(" ")[0])
def test_every_listed_internal_is_still_there(internal: Internal) -> None:
    problem = internal.problem()
    assert problem is None, problem


def test_a_missing_or_changed_internal_is_named_with_its_users() -> None:
    gone = Internal("transformers.models.auto.modeling_auto.NO_SUCH_TABLE", ("modeling_detr_custom.py",), "a reason")
    problem = gone.problem()
    assert problem is not None and "transformers.models.auto.modeling_auto.NO_SUCH_TABLE" in problem
    assert "modeling_detr_custom.py" in problem and "a reason" in problem and transformers.__version__ in problem

    def changed() -> None:
        raise AssertionError("no longer maps model types to class names")

    problem = Internal("transformers.utils.ModelOutput", ("x.py",), "why", probe=changed).problem()
    assert problem is not None and "no longer maps model types to class names" in problem
    assert Internal("transformers.utils.ModelOutput", ("x.py",), "why").problem() is None


def test_the_command_line_check_passes_on_the_installed_transformers() -> None:
    assert problems() == []


# ----------------------------------------------------------------------------- every use is listed


def python_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py") if p.resolve() not in THIS_TABLE)


def transformers_names(tree: ast.AST) -> set[str]:
    """Dotted transformers paths a module imports or reads: `from transformers.x import y` -> "transformers.x.y",
    `import transformers.x` -> "transformers.x", `transformers.Name` after `import transformers` (any alias)."""
    names, aliases = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "transformers" or alias.name.startswith("transformers."):
                    if alias.name != "transformers":
                        names.add(alias.name)
                    else:
                        aliases.add(alias.asname or "transformers")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None \
                and node.module.split(".")[0] == "transformers":
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            names.add(f"transformers.{node.attr}")
    return names


def is_public(name: str) -> bool:
    """A top-level name in transformers.__all__ that is not a submodule, or a dunder (`__version__`)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[1].startswith("__") and parts[1].endswith("__"):
        return True
    if len(parts) != 2 or parts[1] not in transformers.__all__:
        return False
    return not isinstance(getattr(transformers, parts[1], None), type(transformers))


def private_names(tree: ast.AST) -> set[str]:
    """`_name` (not dunder) attributes read or set anywhere, and `_name` methods and class attributes defined in
    class bodies (an override of a transformers hook is a use of it)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.add(statement.name)
                elif isinstance(statement, ast.Assign):
                    found.update(t.id for t in statement.targets if isinstance(t, ast.Name))
                elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    found.add(statement.target.id)
    return {name for name in found if name.startswith("_") and not name.endswith("__")}


def transformers_private_names() -> set[str]:
    """Private attributes transformers' base classes add to what they derive from (torch's and Python's own
    private names are not transformers')."""
    names = set()
    for cls, base in ((PreTrainedModel, nn.Module), (GradientCheckpointingLayer, nn.Module),
                      (PreTrainedConfig, object), (BaseImageProcessor, object),
                      (transformers.utils.ModelOutput, OrderedDict)):
        names |= {name for name in set(dir(cls)) - set(dir(base)) if name.startswith("_") and not name.endswith("__")}
    return names


def test_every_transformers_internal_used_in_the_repository_is_listed() -> None:
    listed = {internal.name for internal in INTERNALS}
    listed_attributes = {internal.attribute for internal in INTERNALS}
    hooks = transformers_private_names()
    unlisted = []
    for path in python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT).as_posix()
        unlisted += [f"{where}: {name}" for name in sorted(transformers_names(tree))
                     if not is_public(name) and name not in listed]
        unlisted += [f"{where}: attribute {name} of a transformers base class"
                     for name in sorted(private_names(tree) & hooks) if name not in listed_attributes]
    assert unlisted == [], ("transformers internals not listed in modeling_detr_custom/_transformers_internals.py "
                            "(add each with the files that use it and why, or use a public name):\n"
                            + "\n".join(unlisted))


def test_the_scan_finds_submodule_imports_module_attributes_and_overridden_hooks() -> None:
    source = ("import transformers as tf\nfrom transformers.utils import ModelOutput\nfrom transformers import "
              "initialization, pipeline\nx = tf.DetrImageProcessor\nclass M:\n    _no_split_modules = []\n"
              "    def _init_weights(self, m):\n        self.config._attn_implementation\n")
    tree = ast.parse(source)
    names = transformers_names(tree)
    assert names == {"transformers.utils.ModelOutput", "transformers.initialization", "transformers.pipeline",
                     "transformers.DetrImageProcessor"}
    assert {name for name in names if not is_public(name)} == {"transformers.utils.ModelOutput",
                                                               "transformers.initialization"}
    assert {"_no_split_modules", "_init_weights", "_attn_implementation"} <= private_names(tree) & \
        transformers_private_names()


def test_every_transformers_compat_entry_names_an_existing_test() -> None:
    """conftest.TRANSFORMERS_COMPAT marks by name: a renamed or removed test would silently leave the list."""
    from conftest import TRANSFORMERS_COMPAT

    missing = []
    for entry in TRANSFORMERS_COMPAT:
        path, _, name = entry.partition("::")
        if not (ROOT / path).is_file():
            missing.append(entry)
            continue
        tests = {node.name for node in ast.parse((ROOT / path).read_text()).body
                 if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}
        if name and name not in tests or not tests:
            missing.append(entry)
    assert missing == [], f"tests/conftest.py TRANSFORMERS_COMPAT names tests that do not exist: {missing}"
