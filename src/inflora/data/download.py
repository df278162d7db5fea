"""Downloading a small public dataset on first use: files at a pinned commit, SHA-256 checked, written atomically.

A :class:`Source` lists a dataset's files with their SHA-256 and where they live (a base URL at a pinned commit).
:func:`ensure_files` gives the dataset's folder under the data directory:

* a folder that exists is used as it is and never touched (a folder missing files is an error naming them);
* a missing folder is downloaded, unless downloading is off (``download=false`` or ``$INFLORA_OFFLINE``): every file
  goes into a temporary folder beside it (a tqdm progress bar per file), is checked against its SHA-256, and the
  folder is renamed into place only when all files are there and correct. A failed or interrupted download leaves
  nothing behind (the folders it created included); nothing it did not write is overwritten or removed.

A mirror (``mirror=`` option or ``$INFLORA_MIRROR``) is a URL with the data directory's layout
(``<mirror>/clinc150/data_full.json``): an ``http(s)://`` server or a ``file://`` folder; its files must have the
same checksums.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .base import DataError, as_bool

__all__ = ["MIRROR_ENV", "OFFLINE_ENV", "Source", "ensure_files", "offline"]

log = logging.getLogger("inflora")

OFFLINE_ENV = "INFLORA_OFFLINE"
"""Set to 1 (true, yes, on) to never download; the data must then be in the data directory."""
MIRROR_ENV = "INFLORA_MIRROR"
"""A base URL used instead of the pinned sources, laid out like the data directory."""


@dataclass(frozen=True)
class Source:
    """A downloadable dataset: its folder name, title, base URL at a pinned commit, ``{file: sha256}`` and how to
    get the files by hand."""

    name: str
    title: str
    base_url: str
    files: dict[str, str]
    how: str

    def url(self, file: str, mirror: str | None = None) -> str:
        """Where ``file`` is downloaded from: ``<mirror>/<name>/<file>``, else the pinned ``<base_url><file>``."""
        return f"{mirror.rstrip('/')}/{self.name}/{file}" if mirror else self.base_url + file


def offline() -> bool:
    """Whether ``$INFLORA_OFFLINE`` turns downloading off."""
    value = os.environ.get(OFFLINE_ENV, "").strip()
    return bool(value) and as_bool(value, OFFLINE_ENV)


def ensure_files(data_dir: Path, source: Source, download: bool = True, mirror: str | None = None,
                 timeout: float = 60.0) -> Path:
    """The folder ``data_dir/<source.name>`` with all of ``source.files``, downloaded first when it does not exist
    and downloading is allowed (see the module's docstring). Raises :class:`DataError` saying what to do."""
    folder = data_dir / source.name
    if folder.exists():
        missing = [f for f in source.files if not (folder / f).is_file()]
        if missing:
            raise DataError(f"{folder} exists but lacks {', '.join(missing)} (looked for {', '.join(source.files)}); "
                            f"inflora leaves a folder it did not make alone: {source.how} Or remove the folder to "
                            "have it downloaded.")
        return folder
    if not download or offline():
        why = f"${OFFLINE_ENV} is set" if download else "data.options.download=false"
        raise DataError(f"{source.title} is not in {folder}. {source.how} Or pass --data-dir (or set INFLORA_DATA) "
                        f"to a folder that holds {source.name}/. Downloading is off ({why}); with network, allow it "
                        f"to fetch the files from {source.url('')} on first use.")
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    _download(folder, source, mirror, timeout)
    return folder


def _new_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out[::-1]


def _download(folder: Path, source: Source, mirror: str | None, timeout: float) -> None:
    created = _new_folders(folder.parent)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}.download-", dir=folder.parent))
    except OSError as e:
        raise DataError(f"cannot create {folder} to download {source.title} into: {e}. Pass --data-dir (or set "
                        f"INFLORA_DATA) to a writable folder, or to one that holds {source.name}/.") from e
    log.info("downloading %s into %s", source.title, folder)
    try:
        for file, sha256 in source.files.items():
            _fetch(source.url(file, mirror), tmp / file, sha256, source, folder, timeout)
        try:
            if folder.exists():  # another process finished first (torchrun ranks): keep its folder
                raise FileExistsError(folder)
            os.rename(tmp, folder)
            log.info("%s: %d files, checksums verified", folder, len(source.files))
        except OSError as e:
            if not all((folder / f).is_file() for f in source.files):
                raise DataError(f"cannot move the downloaded {source.title} into {folder}: {e}") from e
            log.info("%s appeared while downloading; using it", folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in reversed(created):
            try:
                path.rmdir()  # only the empty folders this download created
            except OSError:
                break
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # left only when another process won


def _fetch(url: str, dest: Path, sha256: str, source: Source, folder: Path, timeout: float) -> None:
    """Download ``url`` into ``dest`` with a progress bar; check its SHA-256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            length = resp.headers.get("Content-Length")
            with tqdm(total=int(length) if length and length.isdigit() else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=f"{source.name}/{dest.name}", disable=None, leave=False) as bar:
                while chunk := resp.read(1 << 16):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DataError(f"could not download {source.title}: {url} answered HTTP {e.code} {e.reason}. "
                        f"{source.how} Or pass --data-dir (or set INFLORA_DATA) to a folder that holds "
                        f"{source.name}/.") from e
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {source.title} from {url} ({reason}): no network? {source.how} Or "
                        f"pass --data-dir (or set INFLORA_DATA) to a folder that holds {source.name}/, point "
                        f"${MIRROR_ENV} at a mirror, or set {OFFLINE_ENV}=1 to stop trying.") from e
    except OSError as e:
        raise DataError(f"could not write {dest.name} while downloading {source.title} next to {folder}: {e}") from e
    if digest.hexdigest() != sha256:
        raise DataError(f"checksum mismatch for {url}: expected SHA-256 {sha256}, got {digest.hexdigest()}; the "
                        f"file is not the pinned {source.title} file (a changed mirror or a broken transfer). Nothing "
                        f"was written to {folder}.")
