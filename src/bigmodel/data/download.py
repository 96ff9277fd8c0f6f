"""Download with a cache directory, checksums and a clear message when offline.

Files are written to a temporary name and renamed into place only after the checksum matches, so the cache never
holds a half-written or corrupt file.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from bigmodel.errors import UserError


def bigmodel_home() -> Path:
    """`$BIGMODEL_HOME`, default `~/.cache/bigmodel`: downloads (cache/) and the run index (runs.sqlite)."""
    return Path(os.environ.get("BIGMODEL_HOME") or Path.home() / ".cache" / "bigmodel")


def default_cache_dir() -> Path:
    return bigmodel_home() / "cache"


def file_digest(path: Path, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(urls: list[str], dest: Path, md5: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch the first URL that works into `dest` (atomically), checking `md5`. Returns `dest`.

    An existing `dest` with the right checksum is reused. Raises `UserError` naming the file when every URL fails
    (no network) or the checksum does not match.
    """
    if dest.is_file() and (md5 is None or file_digest(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:  # noqa: S310
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
            continue
        if md5 is not None and (got := file_digest(tmp)) != md5:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
            continue
        os.replace(tmp, dest)
        return dest
    raise UserError(f"could not download {dest.name} ({'; '.join(errors)})")
