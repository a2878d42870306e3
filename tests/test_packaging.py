"""Installing distckpt keeps the user's torch and brings no MPI unless asked for.

Offline and hermetic: the wheel is built from a copy of the source tree, and pip resolves it
(``--dry-run --report``) in a fresh venv that holds a stand-in ``torch`` of another version,
against a folder of stand-in wheels for every dependency (plus newer torch releases and the
``mpich`` wheel, so a wrong requirement would show up as a change in the report).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_TORCH = "2.12.1"  # the user's (CUDA) torch, older than the one this project tests with


def _pip_env() -> dict[str, str]:
    """No pip configuration of this machine (its find-links, indexes or constraints) and no
    PYTHONPATH (through which the venv would see this checkout as installed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_pip_env(), timeout=240)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _stub_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal valid wheel of ``name`` ``version`` with one module and no requirements."""
    module = re.sub(r"[-.]", "_", name).lower()
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def distckpt_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tree (a build in place would leave build/ here)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "distckpt", src / "distckpt", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src)
    (wheel,) = out.glob("distckpt-*.whl")
    return wheel


def _requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


@pytest.fixture(scope="module")
def user_env(tmp_path_factory: pytest.TempPathFactory, distckpt_wheel: Path) -> tuple[Path, Path]:
    """(python of a fresh venv holding only torch USER_TORCH, folder of wheels to offer)."""
    base = tmp_path_factory.mktemp("user")
    wheels = base / "wheels"
    wheels.mkdir()
    shutil.copy(distckpt_wheel, wheels)
    needed = [r for r in _requires_dist(distckpt_wheel) if "extra ==" not in r or '"mpi"' in r]
    names = {re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0] for req in needed}
    for name in names - {"torch"}:
        # The version this test environment runs with satisfies distckpt's range.
        _stub_wheel(wheels, name, importlib.metadata.version(name))
    for version in ("2.13.0", "2.14.1"):  # what pip could swap in if the range demanded it
        _stub_wheel(wheels, "torch", version)
    _stub_wheel(wheels, "mpich", "4.3.0")
    user_torch = _stub_wheel(base, "torch", USER_TORCH)
    venv.create(base / "venv", with_pip=False)
    python = base / "venv" / "bin" / "python"
    _pip("--python", python, "install", "-q", "--no-index", "--no-deps", user_torch)
    return python, wheels


def _would_install(python: Path, wheels: Path, *reqs: str, report: Path) -> dict[str, str]:
    """{name: version} pip would install for ``reqs`` in that venv (nothing is installed)."""
    _pip(
        "--python", python, "install", "--dry-run", "-q", "--no-index", "--find-links", wheels,
        "--report", report, *reqs,
    )  # fmt: skip
    doc = json.loads(report.read_text())
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in doc["install"]}


def test_wheel_declares_a_torch_range_and_mpi_only_as_an_extra(distckpt_wheel: Path) -> None:
    reqs = _requires_dist(distckpt_wheel)
    (torch_req,) = [r for r in reqs if re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0] == "torch"]
    assert "==" not in torch_req, torch_req
    mpi = [r for r in reqs if r.startswith(("mpi4py", "mpich"))]
    assert mpi and all("extra ==" in r and "mpi" in r.split("extra ==")[1] for r in mpi), mpi
    assert not [r for r in reqs if r.startswith("mpich")], "the mpich wheel is for development"


def test_install_keeps_the_users_torch_and_brings_no_mpi(
    user_env: tuple[Path, Path], tmp_path: Path
) -> None:
    python, wheels = user_env
    plan = _would_install(python, wheels, "distckpt", report=tmp_path / "plain.json")
    assert "distckpt" in plan
    assert "torch" not in plan, f"pip would replace torch {USER_TORCH} by {plan.get('torch')}"
    assert "mpi4py" not in plan and "mpich" not in plan, plan


def test_mpi_extra_brings_mpi4py_but_no_mpi_wheel(
    user_env: tuple[Path, Path], tmp_path: Path
) -> None:
    python, wheels = user_env
    plan = _would_install(python, wheels, "distckpt[mpi]", report=tmp_path / "mpi.json")
    assert "mpi4py" in plan
    assert "mpich" not in plan and "torch" not in plan, plan


def test_the_harness_sees_a_torch_replacement(user_env: tuple[Path, Path], tmp_path: Path) -> None:
    """The check above can fail: a pinned torch shows up in the same report as a change."""
    python, wheels = user_env
    plan = _would_install(python, wheels, "torch==2.13.0", report=tmp_path / "pin.json")
    assert plan == {"torch": "2.13.0"}


def test_package_root_loads_public_names_on_first_use():
    """``import distckpt`` imports no torch; every public name still resolves and is listed."""
    script = (
        "import sys, distckpt\n"
        "before = 'torch' in sys.modules\n"
        "assert set(distckpt.__all__) <= set(dir(distckpt))\n"
        "missing = [n for n in distckpt.__all__ if getattr(distckpt, n, None) is None]\n"
        "print(before, missing, distckpt.save.__module__, distckpt.rng.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "False", "[]", "distckpt.engine.api", "distckpt.session.rng"
    ]  # fmt: skip
