"""fetch and downloading through load_dataset, against a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kdq.data import catalog, fetch, load_dataset
from kdq.data.sources import IdxSource
from kdq.errors import KdqError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) on 127.0.0.1; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_verified(server, tmp_path):
    root, url = server
    (root / "a.bin").write_bytes(b"hello" * 1000)
    dest = tmp_path / "out" / "a.bin"
    good = hashlib.sha256(b"hello" * 1000).hexdigest()
    assert fetch(url + "a.bin", dest, good) == dest
    assert dest.read_bytes() == b"hello" * 1000
    assert [p.name for p in dest.parent.iterdir()] == ["a.bin"]


def test_fetch_md5(server, tmp_path):
    root, url = server
    (root / "a.bin").write_bytes(b"abc")
    assert fetch(url + "a.bin", tmp_path / "a.bin", md5=hashlib.md5(b"abc").hexdigest()).read_bytes() == b"abc"


def test_fetch_checksum_mismatch_leaves_nothing(server, tmp_path):
    root, url = server
    (root / "a.bin").write_bytes(b"tampered")
    dest = tmp_path / "out" / "a.bin"
    with pytest.raises(KdqError, match="checksum mismatch for a.bin") as e:
        fetch(url + "a.bin", dest, "0" * 64)
    assert "0" * 64 in str(e.value) and hashlib.sha256(b"tampered").hexdigest() in str(e.value)
    assert list(dest.parent.iterdir()) == []  # neither the file nor its temporary


def test_fetch_missing_file(server, tmp_path):
    _, url = server
    with pytest.raises(KdqError, match="could not download .*nope.bin: HTTP 404"):
        fetch(url + "nope.bin", tmp_path / "out" / "nope.bin", "0" * 64)
    assert list((tmp_path / "out").iterdir()) == []


def _publish_mnist(root, datafiles, monkeypatch):
    """Tiny MNIST files on the local mirror, with the real source's checksums swapped for theirs."""
    datafiles.write_mnist(root / "mnist")
    sums = {p.name: ("sha256", hashlib.sha256(p.read_bytes()).hexdigest()) for p in (root / "mnist").iterdir()}
    source = catalog.DATASETS.get("mnist")
    fake = IdxSource(**{**source.__dict__, "checksums": sums})
    monkeypatch.setitem(catalog.DATASETS._items, "mnist", fake)


def test_load_dataset_downloads_into_the_cache(server, datafiles, monkeypatch, no_real_data):
    root, url = server
    _publish_mnist(root, datafiles, monkeypatch)
    monkeypatch.setenv("KDQ_MIRROR", url)
    b = load_dataset("mnist", val_size=10)
    assert (len(b.train), len(b.test)) == (50, 20)
    cache = no_real_data / "cache" / "kdq" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in (root / "mnist").iterdir())
    # the second load finds the cache and needs no server
    monkeypatch.setenv("KDQ_MIRROR", "http://127.0.0.1:9/")
    assert len(load_dataset("mnist", val_size=10, download=False).train) == 50


def test_failed_download_explains_where_to_get_the_data(server, datafiles, monkeypatch):
    root, url = server
    _publish_mnist(root, datafiles, monkeypatch)
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"swapped on the mirror")
    monkeypatch.setenv("KDQ_MIRROR", url)
    with pytest.raises(KdqError, match="mnist data not found \\(checksum mismatch for t10k-labels-idx1-ubyte.gz.*looked in"):
        load_dataset("mnist")
