"""Run the transformers_compat tests against the LOWEST versions pyproject.toml declares (issue 22).

Run it with the main environment's Python (the README's .venv, activated), from anywhere:

    python .ci/lowest_versions.py [pytest args...]

It makes `.venv-lowest` beside `.venv`: a virtualenv without packages of its own whose `site` also reads the
running environment's site-packages (a .pth file calling `site.addsitedir`), after its own. pip then installs into
it only what differs from the running environment: `NAME==LOW` for each name in LOWEST, LOW being pyproject's
`>=` bound (a few MB, no torch download: torch's bound is the release on this disk). The versions are checked after
the install (the layering must not leave a newer one first on sys.path), then `pip check`, then
`pytest -m transformers_compat` (the list is in tests/conftest.py).

transformers is installed with its `kernels` extra: transformers 5.25 requires `kernels` 0.19, which an older
transformers' kernels integration may not handle (5.0 fails at import with it; 5.23 imports), so the older
transformers gets the `kernels` release its own extra names, as `pip install "transformers[kernels]==LOW"` gives.

About 45 s on 2 cores (measured: 15 MB of downloads, the tests 25 s).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lowest"
# the packages whose lower bounds are tested here; every other dependency takes whatever pip's resolver gives
LOWEST = ("torch", "torchvision", "transformers", "timm", "accelerate")
EXTRAS = {"transformers": "[kernels]"}


def lower_bounds() -> dict[str, str]:
    """{name: X} for each name in LOWEST, X from its `>=X` in pyproject.toml's dependencies (exactly one)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", requirement)
        if match and match.group(1).lower() in LOWEST:
            bounds[match.group(1).lower()] = match.group(2)
    missing = set(LOWEST) - set(bounds)
    if missing:
        raise SystemExit(f"error: pyproject.toml declares no `>=` lower bound for {sorted(missing)}")
    return bounds


def venv_python() -> Path:
    return VENV / "bin" / "python"


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def make_layered_venv() -> None:
    if not venv_python().exists():
        run(sys.executable, "-m", "venv", "--without-pip", str(VENV))
    own = subprocess.run([str(venv_python()), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    main = sysconfig.get_path("purelib")
    if Path(own).resolve() == Path(main).resolve():
        raise SystemExit("error: run this with the main environment's Python, not .venv-lowest's")
    (Path(own) / "_main_environment.pth").write_text(f"import site; site.addsitedir({main!r})\n")


def check_versions(bounds: dict[str, str]) -> None:
    """What .venv-lowest imports first is the lower bound itself (same release; a local label such as +cu130
    aside)."""
    script = ("import importlib.metadata as m, json; "
              f"print(json.dumps({{n: m.version(n) for n in {sorted(bounds)!r}}}))")
    found = subprocess.run([str(venv_python()), "-c", script], check=True, capture_output=True, text=True).stdout
    versions = json.loads(found)
    wrong = {name: version for name, version in versions.items()
             if Version(version.split("+")[0]) != Version(bounds[name])}
    print("lowest versions:", ", ".join(f"{name} {version}" for name, version in sorted(versions.items())))
    if wrong:
        raise SystemExit(f"error: .venv-lowest has {wrong}, not the lower bounds {bounds}")


def main() -> int:
    bounds = lower_bounds()
    make_layered_venv()
    python = str(venv_python())
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
        *(f"{name}{EXTRAS.get(name, '')}=={version}" for name, version in bounds.items()))
    check_versions(bounds)
    run(python, "-m", "pip", "check", "--disable-pip-version-check")
    tests = subprocess.run([python, "-m", "pytest", "-m", "transformers_compat", *sys.argv[1:]], cwd=ROOT)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
