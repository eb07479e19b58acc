"""Where data files are looked for, in order, and where downloads go."""

from __future__ import annotations

import os
from pathlib import Path

# Folders that distribution packages install into (Debian: dataset-fashion-mnist).
SYSTEM_DIRS: dict[str, list[Path]] = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}


def cache_dir(name: str) -> Path:
    """The per-user download folder: $XDG_CACHE_HOME/kdq/<name>, else ~/.cache/kdq/<name>."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kdq" / name


def search_folders(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Folders to look in, first match wins: data_dir, $KDQ_DATA, system folders, the cache.

    data_dir and $KDQ_DATA are tried both as the folder itself and as its `<name>` sub-folder,
    so one $KDQ_DATA can hold every data set.
    """
    folders: list[Path] = []
    for root in (data_dir, os.environ.get("KDQ_DATA")):
        if root:
            root = Path(root).expanduser()
            folders += [root, root / name]
    folders += SYSTEM_DIRS.get(name, [])
    folders.append(cache_dir(name))
    return list(dict.fromkeys(folders))


def mirror(name: str, base_url: str) -> str:
    """The base URL to download from; $KDQ_MIRROR/<name>/ replaces the upstream one when set."""
    override = os.environ.get("KDQ_MIRROR")
    return f"{override.rstrip('/')}/{name}/" if override else base_url
