"""Downloading CLINC150 and BANKING77 on first use: pinned sources, checksums, atomic folders, clear errors. A local
http.server (or a file:// URL) serves a copy of the offline data as a mirror; nothing here reaches the network."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from conftest import shared_data_dir
from inflora.cli import main
from inflora.data import DataError, load_dataset
from inflora.data import download as download_mod
from inflora.data.text import BANKING77, CLINC150

SHARED = shared_data_dir()
pytestmark = pytest.mark.skipif(SHARED is None, reason="offline data (../shared/data or $INFLORA_DATA) not found")
SOURCES = {"clinc150": CLINC150, "banking77": BANKING77}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under ``root``: contents and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFLORA_OFFLINE", raising=False)
    monkeypatch.delenv("INFLORA_MIRROR", raising=False)


@pytest.fixture
def mirror_dir(tmp_path: Path) -> Path:
    """A mirror's files: a copy of the pinned files of both datasets, laid out like the data directory."""
    root = tmp_path / "mirror"
    for name, source in SOURCES.items():
        (root / name).mkdir(parents=True)
        for file in source.files:
            shutil.copyfile(SHARED / name / file, root / name / file)
    return root


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        _Quiet.requests.append(self.path)


@pytest.fixture
def server(mirror_dir: Path) -> Iterator[str]:
    """An HTTP server on localhost serving ``mirror_dir``; yields its base URL."""
    _Quiet.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(mirror_dir)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_sources_are_pinned_and_their_checksums_are_the_offline_copies() -> None:
    assert CLINC150.url("domains.json") == ("https://raw.githubusercontent.com/clinc/oos-eval/"
                                            "828f8093932c8fe6ca7936c3d2e52903b1c523de/data/domains.json")
    assert BANKING77.url("train.csv") == ("https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/"
                                          "57ec275d8078af65b7731c2a98be812d844a6d6b/banking_data/train.csv")
    for name, source in SOURCES.items():
        assert source.files == {f: sha256(SHARED / name / f) for f in source.files}
    assert CLINC150.url("domains.json", "http://m/x/") == "http://m/x/clinc150/domains.json"


@pytest.mark.parametrize("name", ["clinc150", "banking77"])
def test_a_missing_dataset_is_downloaded_with_verified_checksums(online, server: str, tmp_path: Path, name: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[tuple[int | None, int]] = []

    class Bar:  # records what the progress bar is told
        def __init__(self, total: int | None = None, **kwargs: object) -> None:
            self.total, self.done = total, 0

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            bars.append((self.total, self.done))

        def update(self, n: int) -> None:
            self.done += n

    monkeypatch.setattr(download_mod, "tqdm", Bar)
    data = tmp_path / "cache" / "inflora" / "data"  # not there yet: created
    ds = load_dataset(name, data, mirror=server + "/")
    files = SOURCES[name].files
    assert sorted(p.name for p in data.iterdir()) == [name]  # no temporary folder left
    assert {p.name: sha256(p) for p in (data / name).iterdir()} == files
    assert ds.num_classes == len(load_dataset(name, SHARED).class_names)
    sizes = [(SHARED / name / f).stat().st_size for f in files]
    assert bars == [(s, s) for s in sizes]  # one bar per file, its total the file's size
    assert _Quiet.requests == [f"/{name}/{f}" for f in files]
    load_dataset(name, data, mirror=server)  # the second time: nothing downloaded
    assert len(_Quiet.requests) == len(files)


def test_a_file_url_mirror_from_the_environment(online, mirror_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLORA_MIRROR", mirror_dir.as_uri())
    ds = load_dataset("clinc150", tmp_path)
    assert ds.num_classes == 150 and sha256(tmp_path / "clinc150" / "data_full.json") == CLINC150.files[
        "data_full.json"]


def test_a_corrupted_file_raises_and_leaves_nothing(online, server: str, mirror_dir: Path, tmp_path: Path) -> None:
    bad = mirror_dir / "clinc150" / "domains.json"
    bad.write_bytes(bad.read_bytes().replace(b"banking", b"bankinG", 1))
    data = tmp_path / "new" / "data"
    with pytest.raises(DataError, match=r"checksum mismatch for http://127\.0\.0\.1:\d+/clinc150/domains\.json: "
                                        r"expected SHA-256 b947b5.*got " + sha256(bad)):
        load_dataset("clinc150", data, mirror=server)
    assert not (tmp_path / "new").exists()  # the folders it created are gone, no partial file anywhere
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("clinc150", tmp_path / "kept", mirror=server)
    assert list((tmp_path / "kept").iterdir()) == []  # a folder that was there stays, empty


def test_no_network_names_the_url_and_data_dir(online, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as e:
        load_dataset("banking77", tmp_path / "data", mirror=f"http://127.0.0.1:{port}")
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/banking77/train.csv" in msg and "no network?" in msg
    assert "--data-dir" in msg and "INFLORA_DATA" in msg and "INFLORA_OFFLINE=1" in msg
    assert not (tmp_path / "data").exists()


def test_an_existing_folder_is_never_touched(online, server: str, tmp_path: Path) -> None:
    folder = tmp_path / "clinc150"
    folder.mkdir()
    (folder / "domains.json").write_text("{}")  # the user's, incomplete
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"lacks data_full\.json.*leaves a folder it did not make alone"):
        load_dataset("clinc150", tmp_path, mirror=server)
    assert snapshot(tmp_path) == before and _Quiet.requests == []


@pytest.mark.parametrize("how", ["env", "option"])
def test_downloading_can_be_turned_off(online, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       how: str) -> None:
    if how == "env":
        monkeypatch.setenv("INFLORA_OFFLINE", "1")
    options = {"download": "false"} if how == "option" else {}
    with pytest.raises(DataError, match=r"not in .*clinc150.*--data-dir.*Downloading is off") as e:
        load_dataset("clinc150", tmp_path / "data", mirror=server, **options)
    assert ("$INFLORA_OFFLINE is set" if how == "env" else "data.options.download=false") in str(e.value)
    assert _Quiet.requests == [] and not (tmp_path / "data").exists()
    monkeypatch.setenv("INFLORA_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="INFLORA_OFFLINE"):
        load_dataset("clinc150", tmp_path / "data", mirror=server)


def test_the_command_line_reports_no_network(online, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["run", "--quiet", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
                 "--set", f"data.options.mirror=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1 and "inflora: error: could not download CLINC150" in err and "--data-dir" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_folder_another_process_finished_first_is_kept(online, server: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fetch = download_mod._fetch

    def racing(url: str, dest: Path, *args: object) -> None:
        fetch(url, dest, *args)
        if dest.name == "domains.json":  # the other process renames its complete folder into place now
            theirs = tmp_path / "clinc150"
            theirs.mkdir()
            for file in CLINC150.files:
                shutil.copyfile(SHARED / "clinc150" / file, theirs / file)
            (theirs / "theirs").write_text("1")

    monkeypatch.setattr(download_mod, "_fetch", racing)
    assert load_dataset("clinc150", tmp_path, mirror=server).num_classes == 150
    assert (tmp_path / "clinc150" / "theirs").is_file()  # theirs, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clinc150", "mirror"]  # our copy is gone
