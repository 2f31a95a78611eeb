"""What ships, and where: the remote code a saved folder carries (only its own four files, importing only what a
Hub user has), and the installed package (a normal, non-editable `pip install` holds every module and the
model-card template, and builds a Hub folder without the checkout)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor

PACKAGE = ROOT / "modeling_detr_custom"
REMOTE_CODE_FILES = ("configuration_detr_custom.py", "modeling_detr_custom.py", "loss_detr_custom.py",
                     "image_processing_detr_custom.py")
REMOTE_CODE_MODULES = {Path(name).stem for name in REMOTE_CODE_FILES}
# torch, transformers, timm and scipy are what a user loading the folder installs; numpy comes with all of them.
ALLOWED_IMPORTS = {"torch", "transformers", "timm", "scipy", "numpy"}
# transformers' optional vision dependency: allowed only behind `if is_vision_available():`, as transformers does.
GUARDED_IMPORTS = {"PIL"}


# ----------------------------------------------------------------------------- (a) remote-code imports


def _is_availability_check(node: ast.AST) -> bool:
    """`if is_<library>_available():` (transformers' guard of an optional dependency)."""
    calls = ast.walk(node.test) if isinstance(node, ast.If) else []
    return any(isinstance(call, ast.Call) and getattr(call.func, "id", "").endswith("_available") for call in calls)


def import_problems(source: str, name: str) -> list[str]:
    """Every import in ``source`` (at any depth: in functions, try and if blocks too) that a remote-code file
    may not have: a module outside the standard library and ALLOWED_IMPORTS, an unguarded GUARDED_IMPORTS one,
    or a relative import of anything but the other remote-code modules."""
    problems: list[str] = []

    def check(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                problems.extend(_absolute_problem(alias.name, guarded, f"{name}:{node.lineno}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            problems.extend(_absolute_problem(node.module or "", guarded, f"{name}:{node.lineno}"))
        elif isinstance(node, ast.ImportFrom):
            targets = [node.module] if node.module else [alias.name for alias in node.names]
            problems.extend(f"{name}:{node.lineno}: relative import of {'.' * node.level}{t}" for t in targets
                            if node.level != 1 or t.split(".")[0] not in REMOTE_CODE_MODULES)
        if _is_availability_check(node):
            check(node.test, guarded)
            for child in node.body:
                check(child, True)
            for child in node.orelse:
                check(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            check(child, guarded)

    check(ast.parse(source), False)
    return problems


def _absolute_problem(module: str, guarded: bool, where: str) -> list[str]:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ALLOWED_IMPORTS or (guarded and top in GUARDED_IMPORTS):
        return []
    return [f"{where}: import of {module}" + (" outside an `if is_..._available():` guard" if top in GUARDED_IMPORTS
                                              else "")]


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_imports_only_each_other_torch_transformers_timm_scipy_numpy(name: str) -> None:
    """A Hub user has only these: transformers raises ImportError for any other import of the folder's code, and
    a relative import of a tooling module would ship that module (and what it imports) too."""
    assert import_problems((PACKAGE / name).read_text(), name) == []


@pytest.mark.parametrize("source, problem", [
    ("import yaml", "import of yaml"),
    ("def f():\n    from accelerate import Accelerator", "import of accelerate"),
    ("try:\n    import PIL.Image\nexcept ImportError:\n    pass", "import of PIL.Image outside"),
    ("from .checks import read_json", "relative import of .checks"),
    ("from ..hub import card", "relative import of ..hub"),
    ("from . import training", "relative import of .training"),
])
def test_the_import_check_finds_what_a_hub_user_could_not_import(source: str, problem: str) -> None:
    assert any(problem in p for p in import_problems(source, "x.py")), import_problems(source, "x.py")
    guarded = "if is_vision_available():\n    import PIL.Image\nfrom .loss_detr_custom import SetCriterion"
    assert import_problems(guarded, "x.py") == []


# ----------------------------------------------------------------------------- (b) what save_pretrained writes


def test_save_pretrained_writes_exactly_the_four_remote_code_files(tmp_path: Path) -> None:
    """The model's auto_map needs configuration + modeling (which imports loss), the processor's needs
    image_processing; a tooling module (checks, hub, training, ...) in the folder would mean remote code imports it."""
    config = DetrCustomConfig(backbone="test_resnet", d_model=32, encoder_layers=1, decoder_layers=1,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, num_queries=5)
    DetrCustomForObjectDetection(config).save_pretrained(tmp_path)
    DetrCustomImageProcessor().save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                    *REMOTE_CODE_FILES}


# ----------------------------------------------------------------------------- (c) the installed package


def test_the_model_card_template_is_package_data_and_the_top_level_card_links_to_it() -> None:
    from modeling_detr_custom.hub import MODEL_CARD_TEMPLATE

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    assert MODEL_CARD_TEMPLATE.parent == PACKAGE / "hub" and MODEL_CARD_TEMPLATE.is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "model_card.md" in package_data["modeling_detr_custom.hub"]
    assert (ROOT / "model_card.md").is_symlink() and (ROOT / "model_card.md").resolve() == MODEL_CARD_TEMPLATE


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --target`` (not editable) of a copy of the checkout's package; returns the target folder.
    The copy keeps pip's build files out of the checkout."""
    tmp_path = tmp_path_factory.mktemp("install")
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def _package_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".md")}


def _installed_env(site: Path, tmp_path: Path) -> dict[str, str]:
    """Only the installed copy importable (no PYTHON* variables of this process), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    return env


# Runs with only the installed copy importable: builds and verifies a Hub folder as push_to_hub.py --local_dir does.
BUILD_FROM_INSTALL = r"""
import json, sys
from pathlib import Path
import torch
import modeling_detr_custom
from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.hub import push_model_folder

work = Path(sys.argv[1])
torch.manual_seed(0)
config = DetrCustomConfig(backbone="test_resnet", d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, num_queries=5, id2label={0: "circle", 1: "square"})
DetrCustomForObjectDetection(config).save_pretrained(work / "model")
DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(work / "model")
(work / "model" / "all_results.json").write_text(json.dumps({"AP": 0.5, "AP50": 0.8, "eval_split": "val"}))
folder = push_model_folder(work / "model", "someone/detr-installed", local_dir=work / "hub", upload=False)
print(json.dumps({"package": modeling_detr_custom.__file__, "sys_path": sys.path, "folder": str(folder)}))
"""


@pytest.mark.slow
def test_a_non_editable_install_holds_every_module_and_builds_a_hub_folder(installed: Path, tmp_path: Path) -> None:
    site = installed
    assert _package_files(site / PACKAGE.name) == _package_files(PACKAGE)  # subpackages and the card template too
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", BUILD_FROM_INSTALL, str(work)], cwd=work,
                          env=_installed_env(site, tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(site), report["package"]
    # the checkout's own folders are not importable; the interpreter's environment may live inside it (.venv)
    env = Path(sys.prefix).resolve()
    checkout = [p for p in report["sys_path"] if Path(p or work).resolve().is_relative_to(ROOT.resolve())
                and not Path(p).resolve().is_relative_to(env)]
    assert checkout == [], checkout
    card = (Path(report["folder"]) / "README.md").read_text()
    assert "<!-- generated by detr-custom's push_to_hub" in card and "| AP50 | IoU 0.50 | 80.0 |" in card
    assert set(REMOTE_CODE_FILES) <= {p.name for p in Path(report["folder"]).iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["push_to_hub", "predict", "export_onnx", "convert_hf_detr"])
def test_the_scripts_run_against_the_installed_package(installed: Path, tmp_path: Path, script: str) -> None:
    """`python scripts/X.py` puts scripts/ first on sys.path and nothing adds the checkout: the package must come
    from the install, and no file in scripts/ may shadow a module the package imports."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"], cwd=tmp_path,
                          env=_installed_env(installed, tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-3000:]


# ----------------------------------------------------------------------------- (d) the README's Quickstart and CI

# Each Quickstart command starts by making (or reusing) the virtualenv .venv and installing into it: a stock
# Debian 12 / Ubuntu 23.04+ python3 refuses `pip install` outside one (PEP 668, externally-managed-environment).
VENV_AND_INSTALL = ('[ -f .venv/bin/activate ] || python3 -m venv .venv && . .venv/bin/activate && '
                    'pip install -e ".[dev]" && ')
MAIN_JOB = "accelerate launch scripts/train.py --output_dir outputs/demo"


def quickstart_commands() -> list[str]:
    """The command lines of the README's Quickstart code block (comments and blank lines left out)."""
    section = (ROOT / "README.md").read_text().split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_each_quickstart_command_makes_or_reuses_a_virtualenv_and_installs_into_it() -> None:
    assert quickstart_commands() == [VENV_AND_INSTALL + MAIN_JOB, VENV_AND_INSTALL + "python -m pytest"]


def test_ci_runs_the_quickstart_tests_line_verbatim_and_the_main_job_through_test_demo() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    main_job, tests = quickstart_commands()
    at = [i for i, line in enumerate(ci) if tests in line]
    assert len(at) == 1 and at[0] < ci.index("python -m pytest -m demo"), at
    # tests/test_demo.py runs the main job's command as it is, its output folder in a temporary directory
    words = main_job.removeprefix(VENV_AND_INSTALL).split()
    demo = ast.parse((ROOT / "tests" / "test_demo.py").read_text())
    commands = [[e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                for node in ast.walk(demo) if isinstance(node, ast.List)]
    assert [None, *words[1:-1], None] in commands, commands


def test_the_quickstart_makes_the_virtualenv_once_and_its_pip_is_the_one_that_installs(tmp_path: Path) -> None:
    """Run the Quickstart's own prefix up to the install, twice, in an empty folder: the first run makes .venv (over
    a half-made one without bin/activate, as a python3 without venv's ensurepip leaves), the second reuses it, and
    after the activation `python` and `pip` are the virtualenv's."""
    prefix = VENV_AND_INSTALL.split(" && pip install")[0]
    probe = prefix + ' && python -c "import sys; print(sys.prefix)" && command -v pip'
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    runs = []
    for _ in range(2):
        runs.append(subprocess.run(["bash", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
        if len(runs) == 1:
            (venv / "made_by_the_first_run").touch()
    assert runs[0].stdout.split() == [str(venv), str(venv / "bin" / "pip")]
    assert runs[1].stdout == runs[0].stdout and (venv / "made_by_the_first_run").exists()
