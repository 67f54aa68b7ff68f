"""persona as pip installs it: what its wheel and sdist carry, and what each command does
on an install that lacks an extra.

The wheel and sdist are built here from a copy of the checkout (the build writes build/ and
an egg-info beside the sources), by the setuptools that pyproject.toml's build-system names.
An extra is "not installed" in a command of its own whose ``sys.modules`` holds None for the
extra's modules: importing them fails as on an install without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# What the build does not read, and what running the checkout left in it.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".hypothesis", ".ruff_cache", ".data", ".whl", ".gpu")


def _setuptools_builds() -> bool:
    """Whether this environment's setuptools is one pyproject.toml's build-system accepts."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= (77, 0)


needs_setuptools = pytest.mark.skipif(not _setuptools_builds(), reason="setuptools>=77 (the dev extra) is not installed")


def _build(kind: str, out: Path, tmp: Path) -> Path:
    """Build the wheel or sdist of a copy of the checkout into ``out``; its path."""
    source = tmp / "source"
    if not source.exists():
        shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    out.mkdir(exist_ok=True)
    built = subprocess.run(
        [sys.executable, "-c", f"import sys; from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))",
         str(out)], cwd=source, capture_output=True, text=True, timeout=120, check=False)
    assert built.returncode == 0, built.stderr
    return out / built.stdout.splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("wheel", tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def installed(wheel: Path, tmp_path: Path) -> Path:
    """The wheel unpacked as pip lays out a pure-Python wheel in site-packages."""
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def run_installed(site: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`persona ARGS` run from ``site`` (not from the checkout: run from its folder,
    `python -m persona` would find the checkout's own persona first)."""
    ran = subprocess.run([sys.executable, "-m", "persona", *args], cwd=site.parent, capture_output=True, text=True,
                         env=env | {"PYTHONPATH": str(site)}, timeout=60, check=False)
    assert "Traceback" not in ran.stderr, ran.stderr
    return ran


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    return clean | {"PERSONA_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}


@needs_setuptools
def test_the_wheel_carries_the_bundled_personas_where_an_install_finds_them(installed: Path, env):
    """The wheel held no persona file: after `pip install`, `persona up --chat sage` said
    "unknown persona 'sage'; known personas: none"."""
    assert sorted(p.name for p in (installed / "personas").iterdir()) == ["bofh.toml", "sage.toml"]
    listed = run_installed(installed, "personas", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    sources = {p["name"]: p["source"] for p in json.loads(listed.stdout)["personas"]}
    assert sources == {"bofh": str(installed / "personas" / "bofh.toml"), "sage": str(installed / "personas" / "sage.toml")}


@needs_setuptools
def test_an_install_without_persona_files_says_where_it_looked(installed: Path, env, tmp_path: Path):
    """`personas list` printed nothing and `personas validate` passed ("ok": true, nothing
    checked) on the wheel that had lost them, while `persona up` sent people to validate."""
    shutil.rmtree(installed / "personas")
    searched = (f"no persona files (*.toml) found; searched {installed / 'personas'} (not there), "
                f"{tmp_path / 'data' / 'personas'} (not there). Put one in {tmp_path / 'data' / 'personas'}, "
                "or name the folder that holds yours in PERSONA_PERSONAS_DIRS; the bundled personas (sage, bofh) "
                f"belong in {installed / 'personas'}: reinstall persona")
    listed = run_installed(installed, "personas", "list", env=env)
    assert (listed.returncode, listed.stdout) == (0, "")  # an empty listing is still a listing
    assert searched in " ".join(listed.stderr.split())
    checked = run_installed(installed, "personas", "validate", env=env)
    assert checked.returncode == 1 and searched in " ".join(checked.stderr.split())
    as_json = run_installed(installed, "personas", "validate", "--json", env=env)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"ok": False, "checked": [], "error": {"kind": "ConfigError", "message": searched}}


@needs_setuptools
def test_the_wheel_carries_the_licence(wheel: Path):
    """pyproject.toml said MIT, and no licence text went with a copy."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("persona-0.1.0.dist-info/METADATA").decode()
        assert "MIT License" in archive.read("persona-0.1.0.dist-info/licenses/LICENSE").decode()
    assert "License-File: LICENSE" in metadata.splitlines()


@needs_setuptools
def test_the_sdist_carries_what_its_tests_need(tmp_path: Path):
    """The sdist held tests/test_*.py alone: no conftest.py, no fakes, no helper modules."""
    sdist = _build("sdist", tmp_path / "dist", tmp_path)
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    copied = tmp_path / "source"
    wanted = {str(p.relative_to(copied)) for folder in ("tests", "bench", "docker", "personas")
              for p in (copied / folder).rglob("*") if p.is_file()}
    wanted |= {"LICENSE", "README.md", "Makefile", "docker-compose.yml", ".dockerignore", "pyproject.toml"}
    assert wanted - names == set()
    assert [name for name in names if "__pycache__" in name or name.endswith(".pyc")] == []


def test_all_is_the_service_without_the_test_tools_which_make_installs_beside_it():
    """`pip install 'persona[all]'` brought pytest, ruff, hypothesis, compose-spec and fpdf2."""
    assert EXTRAS["all"] == ["persona[discord,telegram,posting,dashboard,train]"]
    assert {"pytest>=8", "ruff>=0.5", "hypothesis>=6.100"} <= set(EXTRAS["dev"])
    assert 'pip install -q -e ".[all,dev]"' in (ROOT / "Makefile").read_text()


def _distribution(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def _brought_by(extra: str) -> set[str]:
    """The distributions an extra installs, theirs included (as installed here)."""
    todo = [_distribution(r) for r in EXTRAS[extra]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_distribution(r) for r in requires if "extra ==" not in r]
    return seen


def test_each_missing_module_is_said_with_the_extra_that_installs_it():
    """The names the error handler and `persona up` give are pyproject.toml's extras, and
    each installs the module it is named for."""
    from persona.cli.common import EXTRA_OF_MODULE
    from persona.supervisor import SERVICE_EXTRAS

    named = dict(EXTRA_OF_MODULE)
    for modules, extra in SERVICE_EXTRAS.values():
        for module in modules:
            assert named.setdefault(module, extra) == extra, module
    providers = importlib.metadata.packages_distributions()
    for module, extra in named.items():
        assert extra in EXTRAS, f"{module}: no extra {extra!r} in pyproject.toml"
        dists = {_distribution(d) for d in providers.get(module, [])}
        if dists:  # installed here: one of its distributions comes with that extra
            assert dists & _brought_by(extra), f"{module} ({dists}) does not come with persona[{extra}]"


def without(modules: list[str], *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`persona ARGS` (run in the data directory's parent) on an install where ``modules`` are missing."""
    script = (f"import sys; sys.modules.update(dict.fromkeys({modules!r})); "
              "sys.argv[0] = 'persona'; from persona.cli import main; main()")
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          cwd=Path(env["PERSONA_DATA_DIR"]).parent, timeout=60, check=False)


@pytest.mark.parametrize(("missing", "args", "changes", "extra"), [
    (["discord", "aiohttp"], ["discord"], {"PERSONA_DISCORD__TOKEN": "x"}, "discord"),
    (["telegram"], ["telegram"], {"PERSONA_TELEGRAM__TOKEN": "1:x"}, "telegram"),
    (["fastapi"], ["dashboard"], {}, "dashboard"),
    (["pypdf"], ["corpus", "build", "book.pdf", "-o", "book.jsonl"], {}, "train"),
])
def test_a_command_whose_extra_is_missing_says_what_to_install(env, tmp_path, missing, args, changes, extra):
    """Each ended in a traceback naming a module (aiohttp, for `persona discord`), never the extra."""
    (tmp_path / "book.pdf").write_bytes(b"%PDF-1.4\n")
    result = without(missing, *args, env=env | changes)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    said = " ".join(result.stderr.split())
    assert f"error: this needs the {extra} extra, which is not installed (no module named " in said
    assert said.endswith(f"pip install 'persona[{extra}]'"), said


def test_a_missing_extra_under_json_is_one_config_error(env):
    result = without(["croniter"], "post", "sage", "--dry-run", "--json", env=env)
    assert (result.returncode, result.stderr) == (1, "")
    failed = json.loads(result.stdout)
    assert failed["ok"] is False and failed["error"]["kind"] == "ConfigError"
    assert failed["error"]["message"].endswith("pip install 'persona[posting]'")


def test_validate_without_the_posting_extra_still_refuses_a_six_field_cron_and_says_nothing_posts(env, tmp_path):
    """Without croniter a cron of six fields ("0 0 9 * * *", which croniter reads as every
    second of midnight on the 9th) passed, and so did a schedule nothing would run."""
    folder = tmp_path / "mine"
    folder.mkdir()
    schedule = 'adapters = ["scheduler"]\n[schedule]\nenabled = true\nsinks = ["file:posts.jsonl"]\n'
    (folder / "quartz.toml").write_text(schedule + 'cron = "0 0 9 * * *"\n')
    (folder / "daily.toml").write_text(schedule + 'cron = "0 9 * * *"\n')
    result = without(["croniter"], "personas", "validate", str(folder), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    said = " ".join(result.stderr.split())
    assert "schedule.cron: '0 0 9 * * *' has 6 fields; a schedule has 5" in said
    assert (f"{folder / 'daily.toml'}: schedule.enabled is true, but the posting extra is not installed, so nothing "
            "posts on schedule and schedule.cron cannot be checked: pip install 'persona[posting]'") in said
