"""`pneumoscope data download` against a loopback HTTP server serving a zip the test builds
from real sample images, in the layout of the Kaggle archive (nested duplicate, macOS junk)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from pneumoscope.cli import main
from pneumoscope.data.discover import discover_root
from pneumoscope.data.download import DownloadError, fetch, kermany_prefix, unpack

PER_CLASS = 3


@pytest.fixture(scope="module")
def sources(sample_data) -> dict[str, list[Path]]:
    """Real images per split/class that go into the archive."""
    return {
        f"{split}/{cls}": sorted(
            (sample_data / ("val" if split == "test" else split) / cls).glob("*.jpeg")
        )[:PER_CLASS]
        for split in ("train", "test")
        for cls in ("NORMAL", "PNEUMONIA")
    }


@pytest.fixture(scope="module")
def archive(sources) -> bytes:
    """chest_xray/{train,test}/..., its duplicate chest_xray/chest_xray/..., and __MACOSX junk."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for folder, files in sources.items():
            for f in files:
                zf.writestr(f"chest_xray/{folder}/{f.name}", f.read_bytes())
                zf.writestr(f"chest_xray/chest_xray/{folder}/{f.name}", f.read_bytes())
                zf.writestr(f"__MACOSX/chest_xray/{folder}/._{f.name}", b"\x00\x05\x16\x07junk")
        zf.writestr("chest_xray/.DS_Store", b"junk")
    return buf.getvalue()


class Server:
    """Serves `body` at /data.zip with Range support; `cut_after` bytes into the first
    full (non-range) reply it closes the connection; `cut_every` bytes into every reply too;
    nothing past byte `stop_at` is ever sent. Records each Range header it saw."""

    def __init__(
        self,
        body: bytes,
        cut_after: int | None = None,
        honour_range: bool = True,
        cut_every: int | None = None,
        stop_at: int | None = None,
    ):
        self.body, self.cut_after, self.honour_range = body, cut_after, honour_range
        self.cut_every, self.stop_at = cut_every, stop_at
        self.ranges: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng and outer.honour_range else 0
                data = outer.body[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(outer.body) - 1}/{len(outer.body)}"
                    )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                cut = None
                if outer.cut_after is not None and start == 0:
                    outer.cut_after, cut = None, outer.cut_after
                if outer.cut_every is not None:
                    cut = outer.cut_every
                if outer.stop_at is not None:
                    cut = max(0, min(cut if cut is not None else len(data), outer.stop_at - start))
                if cut is not None:
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_cut_connection_resumes_with_range(archive, tmp_path):
    cut = len(archive) // 3
    with Server(archive, cut_after=cut) as server:
        digest = fetch(server.url, tmp_path / "a.zip", show_progress=False)
    assert (tmp_path / "a.zip").read_bytes() == archive
    assert digest == hashlib.sha256(archive).hexdigest()
    assert server.ranges == [None, f"bytes={cut}-"]
    assert not (tmp_path / "a.zip.part").exists()


def test_a_download_cut_in_every_reply_keeps_going_while_it_progresses(archive, tmp_path):
    with Server(archive, cut_every=len(archive) // 10) as server:
        fetch(server.url, tmp_path / "a.zip", retries=2, show_progress=False, backoff=0)
    assert (tmp_path / "a.zip").read_bytes() == archive
    assert len(server.ranges) > 3  # more cut replies than retries: progress does not use them up


def test_a_download_that_stops_progressing_fails_and_keeps_its_part(archive, tmp_path):
    stop = len(archive) // 2
    with Server(archive, stop_at=stop) as server:
        with pytest.raises(DownloadError, match=f"stopped at {stop} bytes.*run the command again"):
            fetch(server.url, tmp_path / "a.zip", retries=2, show_progress=False, backoff=0)
    assert not (tmp_path / "a.zip").exists()  # never promoted while incomplete
    assert (tmp_path / "a.zip.part").read_bytes() == archive[:stop]
    with Server(archive) as server:  # the next call resumes where it stopped
        fetch(server.url, tmp_path / "a.zip", show_progress=False)
    assert server.ranges == [f"bytes={stop}-"]
    assert (tmp_path / "a.zip").read_bytes() == archive


def test_a_part_file_left_by_an_earlier_run_is_continued(archive, tmp_path):
    (tmp_path / "a.zip.part").write_bytes(archive[:1000])
    with Server(archive) as server:
        fetch(server.url, tmp_path / "a.zip", show_progress=False)
    assert server.ranges == ["bytes=1000-"]
    assert (tmp_path / "a.zip").read_bytes() == archive


def test_server_that_ignores_range_is_read_from_the_start(archive, tmp_path):
    (tmp_path / "a.zip.part").write_bytes(b"stale bytes of something else")
    with Server(archive, honour_range=False) as server:
        fetch(server.url, tmp_path / "a.zip", show_progress=False)
    assert (tmp_path / "a.zip").read_bytes() == archive


def test_bad_checksum_is_refused_and_the_file_removed(archive, tmp_path, capsys):
    with Server(archive) as server:
        code = main(
            [
                "-q",
                "data",
                "download",
                "--to",
                str(tmp_path),
                "--url",
                server.url,
                "--sha256",
                "0" * 64,
            ]
        )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "SHA-256" in err
        and hashlib.sha256(archive).hexdigest() in err
        and len(err.strip().splitlines()) == 1
    )
    assert not list(tmp_path.glob("*.zip*")) and not (tmp_path / "chest_xray").exists()


def test_download_unpacks_to_the_layout_train_reads(archive, sources, tmp_path, capsys):
    with Server(archive) as server:
        assert (
            main(
                [
                    "-q",
                    "data",
                    "download",
                    "--to",
                    str(tmp_path),
                    "--url",
                    server.url,
                    "--sha256",
                    hashlib.sha256(archive).hexdigest(),
                ]
            )
            == 0
        )
    root = tmp_path / "chest_xray"
    assert str(root) in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask  # the usual mode, not mkdtemp's 0700
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert found == sorted(f"{folder}/{f.name}" for folder, files in sources.items() for f in files)
    for folder, files in sources.items():
        for f in files:
            assert (root / folder / f.name).read_bytes() == f.read_bytes()
    splits = discover_root(root)
    assert {s: len(v) for s, v in splits.items()} == {"train": 2 * PER_CLASS, "test": 2 * PER_CLASS}
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".chest_xray.*"))


def test_damaged_archive_is_refused_and_nothing_is_left(archive, tmp_path):
    bad = bytearray(archive)
    first = archive.index(b"\xff\xd8")  # the first JPEG's bytes, stored uncompressed
    bad[first + 200] ^= 0xFF
    (tmp_path / "bad.zip").write_bytes(bytes(bad))
    with pytest.raises(DownloadError, match="CRC"):
        unpack(tmp_path / "bad.zip", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_a_damaged_download_is_removed_so_the_next_call_fetches_again(archive, tmp_path, capsys):
    bad = bytearray(archive)
    bad[archive.index(b"\xff\xd8") + 200] ^= 0xFF
    with Server(bytes(bad)) as server:
        assert main(["-q", "data", "download", "--to", str(tmp_path), "--url", server.url]) == 2
    assert "CRC" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.zip*"))
    with Server(archive) as server:
        assert main(["-q", "data", "download", "--to", str(tmp_path), "--url", server.url]) == 0
    assert (tmp_path / "chest_xray" / "train").is_dir()


def test_prefix_picks_the_shallowest_kermany_folder():
    names = [
        "x/chest_xray/chest_xray/train/NORMAL/a.jpeg",
        "x/chest_xray/train/NORMAL/a.jpeg",
        "__MACOSX/train/NORMAL/._a.jpeg",
    ]
    assert str(kermany_prefix(names)) == "x/chest_xray"
    with pytest.raises(DownloadError, match="no train/NORMAL"):
        kermany_prefix(["OCT2017/train/CNV/a.jpeg"])


def test_offline_is_one_line_and_exit_2(tmp_path):
    with Server(b"") as server:  # a port that was open and is now closed: connection refused
        url = server.url
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumoscope",
            "data",
            "download",
            "--to",
            str(tmp_path),
            "--url",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().count("\n") == 0
        and "cannot download" in done.stderr
        and "offline?" in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_kaggle_without_credentials_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_kaggle"))
    assert main(["-q", "data", "download", "--to", str(tmp_path / "d"), "--source", "kaggle"]) == 2
    assert "kaggle source needs credentials" in capsys.readouterr().err


def test_download_path_does_not_import_torch():
    code = "import sys, pneumoscope.data.download; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_umask_helper_reads_the_mask_without_torch():
    """download and rundir share pneumoscope.fsio; it must stay importable without torch."""
    code = (
        "import os, sys; os.umask(0o027); from pneumoscope import fsio as umask; "
        "print(oct(umask.current_umask()), oct(umask.default_file_mode()), oct(umask.default_dir_mode()), "
        "oct(os.umask(0o027)), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0o27", "0o640", "0o750", "0o27", "False"], done.stderr
