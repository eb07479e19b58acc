"""Fetch one file over HTTP(S), verified by checksum, landing atomically."""

from __future__ import annotations

import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

from kdq.errors import KdqError
from kdq.io import atomic_write

_CHUNK = 1 << 20


def fetch(url: str, dest: str | Path, sha256: str | None = None, *, md5: str | None = None, timeout: float = 60) -> Path:
    """Download `url` to `dest`, checking its SHA-256 (or MD5 where only that is published).

    The bytes stream into a temporary file beside `dest` that is renamed into place only
    once the checksum matches, so an interrupted or corrupt download never looks finished.
    """
    dest = Path(dest)
    algo, expected = ("sha256", sha256) if sha256 else ("md5", md5) if md5 else (None, None)
    digest = hashlib.new(algo, usedforsecurity=False) if algo else None

    def write(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    if digest:
                        digest.update(chunk)
                    done += len(chunk)
                    _progress(dest.name, done, total)
        except urllib.error.HTTPError as e:
            raise KdqError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise KdqError(f"could not download {url}: {reason}") from None
        if digest and digest.hexdigest() != expected.lower():
            raise KdqError(
                f"checksum mismatch for {dest.name} from {url}: expected {algo} {expected}, "
                f"got {digest.hexdigest()}; the download is corrupt or the mirror serves another file"
            )

    return atomic_write(dest, write)


def _progress(name: str, done: int, total: int) -> None:
    # only for people watching a terminal; logs and tests stay clean
    if not sys.stderr.isatty():
        return
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    end = "\n" if total and done >= total else ""
    print(f"\rdownloading {name}: {size}", end=end, file=sys.stderr, flush=True)
