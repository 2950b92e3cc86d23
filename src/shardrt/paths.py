"""Where shardrt keeps what it fetches or derives: `~/.cache/shardrt`, or `SHARDRT_CACHE`."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def cache_dir() -> Path:
    raw = os.environ.get("SHARDRT_CACHE")
    if raw is None:
        path = Path.home() / ".cache" / "shardrt"
    elif not raw.strip():
        raise ConfigError("SHARDRT_CACHE: is blank; set it to a directory path or unset it")
    else:
        path = Path(raw).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"SHARDRT_CACHE: cannot create {str(path)!r}: {exc.strerror}") from None
    return path
