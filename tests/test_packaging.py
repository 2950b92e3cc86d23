"""shardrt as users install it: the wheel holds every subpackage of the source tree, the package
and its command say one version, and a coordinator refuses a daemon interpreter that runs
another shardrt version with one line naming both versions and the interpreter."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import shardrt
from shardrt.config import LaunchConfig
from shardrt.errors import ConfigError
from shardrt.launch import Cluster
from shardrt.placement import parse_devices

from .test_multiprocess import shm_segments

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "src" / "shardrt"


def test_the_wheel_holds_every_subpackage(tmp_path):
    # no build isolation: the setuptools already here builds it, as offline as the rest of the tests
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("shardrt-*.whl")
    assert wheel.name.startswith(f"shardrt-{shardrt.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(SOURCE.parent).as_posix() for p in SOURCE.rglob("__init__.py"))
    assert {"shardrt", "shardrt/ipc", "shardrt/spec", "shardrt/server", "shardrt/daemons", "shardrt/kernels"} <= set(packages)
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert missing == [], f"the wheel lacks {missing}"
    modules = sorted(p.relative_to(SOURCE.parent).as_posix() for p in SOURCE.rglob("*.py"))
    assert [m for m in modules if m not in names] == []


def test_version_everywhere_is_the_package_version():
    done = subprocess.run([sys.executable, "-m", "shardrt.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"shardrt {shardrt.__version__}"
    from importlib.metadata import version

    assert version("shardrt") == shardrt.__version__  # what pip recorded is what the code says


def test_a_daemon_of_another_shardrt_version_is_refused(demo_model, tmp_path):
    """The daemon's interpreter imports a copy of shardrt that says another version: a real second
    installation, put first on its path by a wrapper around this Python."""
    other = tmp_path / "other"
    shutil.copytree(SOURCE, other / "shardrt", ignore=shutil.ignore_patterns("__pycache__"))
    init = other / "shardrt" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{shardrt.__version__}"', '__version__ = "0.0.1"'))
    python = tmp_path / "python-other"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{other}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    config = LaunchConfig(devices=parse_devices("cpu:0,cpu:1"), max_ctx=64, pythons={"cpu": str(python)})
    with pytest.raises(ConfigError) as refused:
        with Cluster(config, demo_model):
            pass
    message = str(refused.value)
    assert "\n" not in message
    assert f"its interpreter {python} ({sys.executable}) runs shardrt 0.0.1" in message
    assert f"this coordinator shardrt {shardrt.__version__}" in message
    assert shm_segments(__import__("os").getpid()) == []
