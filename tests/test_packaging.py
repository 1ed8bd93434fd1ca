"""The wheel carries the hook, unit and plist templates, and an installed copy works alone.

Builds a wheel from this tree, installs it into a fresh venv (dependencies from the package
index, cached by pip after the first run) and drives the installed `earthkamal-agent` from
``/`` so nothing can come from the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.helpers import git, make_repo

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ("hooks/reference-transaction", "hooks/post-receive",
             "systemd/earthkamal-agent.service", "launchd/dev.earthkamal.agent.plist")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "EARTHKAMAL_CONFIG",
                        "EARTHKAMAL_UNIT_DIR", "PIP_REQUIRE_VIRTUALENV")}
    env.update(extra)
    return env


def _run(argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("cwd", "/")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{argv} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    start = time.monotonic()
    if importlib.util.find_spec("build") is not None:
        argv = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)]
    else:
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(REPO)]
    _run(argv, timeout=300, env=_env())
    (whl,) = out.glob("earthkamal_agent-*.whl")
    print(f"wheel built in {time.monotonic() - start:.1f} s")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "v"
    start = time.monotonic()
    _run([sys.executable, "-m", "venv", str(root)], env=_env())
    _run([str(root / "bin" / "python"), "-m", "pip", "install", "-q",
          "--disable-pip-version-check", str(wheel)], timeout=300, env=_env())
    print(f"venv with the wheel and its dependencies in {time.monotonic() - start:.1f} s")
    return root


def test_wheel_contains_the_templates(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for t in TEMPLATES:
        assert f"earthkamal_agent/data/{t}" in names, sorted(names)
    assert "earthkamal_agent/__main__.py" in names


def test_installed_package_finds_its_templates_in_site_packages(venv: Path) -> None:
    py = str(venv / "bin" / "python")
    code = ("import json, earthkamal_agent.paths as p; print(json.dumps([str(p.data_path(*t."
            f"split('/'))) for t in {TEMPLATES!r}]))")
    found = json.loads(_run([py, "-c", code], env=_env()).stdout)
    for t, path in zip(TEMPLATES, found, strict=True):
        assert Path(path).is_file(), path
        assert "site-packages" in Path(path).parts and str(REPO) not in path, path
        assert Path(path).relative_to(venv).as_posix().endswith(f"earthkamal_agent/data/{t}")
    hook = Path(found[0])
    assert os.access(hook, os.X_OK) or hook.read_text().startswith("#!")


def test_installed_cli_end_to_end(venv: Path, tmp_path: Path) -> None:
    agent = str(venv / "bin" / "earthkamal-agent")
    home = tmp_path / "home"
    env = _env(EARTHKAMAL_HOME=str(home))
    repo = make_repo(tmp_path / "repo")

    _run([agent, "install", str(repo)], env=env)

    units = tmp_path / "units"
    _run([agent, "service", "install", "--unit-dir", str(units), "--no-start"], env=env)
    unit = (units / "earthkamal-agent.service").read_text()
    assert f"ExecStart={agent} run" in unit
    assert f'Environment="EARTHKAMAL_HOME={home}"' in unit

    git(repo, "tag", "v1.0.0", env={"EARTHKAMAL_HOME": str(home)})
    _run([agent, "run", "--once"], env=env, timeout=180)
    status = json.loads(_run([agent, "status", "--json"], env=env).stdout)
    assert {"agent", "repos", "jobs"} <= set(status)
    assert [r["path"] for r in status["repos"]] == [str(repo)]
    jobs = [j for j in status["jobs"] if j["tag"] == "v1.0.0"]
    assert len(jobs) == 1 and isinstance(jobs[0]["state"], str), status["jobs"]

    _run([agent, "service", "uninstall", "--unit-dir", str(units)], env=env)
    assert not (units / "earthkamal-agent.service").exists()
