"""Fetch the full Kermany chest X-ray data set and unpack it to the layout `train` reads.

    pneumoscope data download --to DIR [--source mendeley|kaggle] [--sha256 HEX]

Mendeley: ChestXRay2017.zip (about 1.2 GB) over HTTP(S), resumable: the bytes go to
DIR/ChestXRay2017.zip.part and a cut connection, or a second run of the command, continues
with an HTTP Range request from where it stopped. Kaggle: the `kaggle` package's own
download, when the package and its credentials are there. Either archive is checked (the
CRC-32 of every member, plus SHA-256 when given) and unpacked to DIR/chest_xray/
{train,test[,val]}/{NORMAL,PNEUMONIA}; macOS junk and Kaggle's duplicate nested copy are
left out. Standard library and tqdm only (no torch), so it runs before anything else.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from pneumoscope.errors import UserError
from pneumoscope.fsio import default_dir_mode

# Mendeley Data record rscbjbr9sj v2, file ChestXRay2017.zip (public, no login). The record
# publishes no checksum and none could be verified here, so none is pinned: pass --sha256
# to check one you trust; the digest of what was fetched is always printed.
MENDELEY_URL = (
    "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
    "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"
)
MENDELEY_ZIP = "ChestXRay2017.zip"
MENDELEY_SHA256: str | None = None
KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
LAYOUT = "chest_xray"
SPLITS = ("train", "test", "val")
CHUNK = 1 << 20
_CUT = (http.client.IncompleteRead, ConnectionError, TimeoutError, urllib.error.URLError)


class DownloadError(UserError, RuntimeError):
    """A download or unpack that cannot go on; the message says what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": "pneumoscope-data-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _total_size(resp, start: int) -> int | None:
    """Full size of the file from Content-Range (partial reply) or Content-Length."""
    content_range = resp.headers.get("Content-Range", "")
    if resp.status == 206 and "/" in content_range and not content_range.endswith("*"):
        return int(content_range.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return int(length) + (start if resp.status == 206 else 0) if length else None


def _fetch_once(url: str, part: Path, timeout: float, show_progress: bool) -> bool:
    """Append what the server sends to `part`; True when the file is complete."""
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # nothing left to send: the part is whole
            return True
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
    with resp:
        if start and resp.status != 206:  # the server ignored Range: start over
            start = 0
        total = _total_size(resp, start)
        with (
            open(part, "ab" if start else "wb") as out,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not show_progress,
            ) as bar,
        ):
            while block := resp.read(CHUNK):
                out.write(block)
                bar.update(len(block))
    return total is None or part.stat().st_size >= total


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fill_part(
    url: str, part: Path, retries: int, timeout: float, show_progress: bool, backoff: float
) -> None:
    """Append to `part` until the server's full size is there. A try that adds bytes does not
    use up a retry (a long download over a flaky line keeps going); `retries` tries in a row
    without progress give up, keeping `part` for the next call to resume."""
    stalled = 0
    while True:
        had = _size(part)
        try:
            if _fetch_once(url, part, timeout, show_progress):
                return
            reason = "the server closed the connection early"
        except _CUT as err:
            reason = getattr(err, "reason", err)
            if had == 0 and not part.exists():
                raise DownloadError(
                    f"cannot download {url}: {reason} (offline? fetch {part.name.removesuffix('.part')} "
                    f"elsewhere, or pass a folder you have to `train --data`)"
                ) from None
        if _size(part) > had:
            stalled = 0
            continue
        stalled += 1
        if stalled > retries:
            raise DownloadError(
                f"download of {url} stopped at {_size(part)} bytes ({reason}); "
                "run the command again to resume"
            )
        time.sleep(min(backoff * 2**stalled, 30))


def fetch(
    url: str,
    dest: Path,
    sha256: str | None = None,
    retries: int = 5,
    timeout: float = 60,
    show_progress: bool = True,
    backoff: float = 1.0,
) -> str:
    """Download `url` to `dest` through `dest.part`, resuming after a cut connection (and on
    the next call); `dest` appears only once the whole file is there. Returns the file's
    SHA-256; a file whose digest differs from `sha256` is removed and refused."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if not dest.exists():
        _fill_part(url, part, retries, timeout, show_progress, backoff)
        os.replace(part, dest)
    actual = sha256_file(dest)
    if sha256 and actual != sha256.lower():
        dest.unlink()
        raise DownloadError(
            f"{dest}: SHA-256 {actual} is not the expected {sha256.lower()}; "
            "the file was removed (download it again)"
        )
    return actual


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or p.startswith("._") or p == ".DS_Store" for p in parts)


def kermany_prefix(names: list[str]) -> PurePosixPath:
    """The shallowest folder in the archive that holds train/NORMAL/ images (Kaggle's zip
    holds chest_xray/ and a duplicate chest_xray/chest_xray/; the shallower one wins)."""
    found = set()
    for name in names:
        parts = PurePosixPath(name).parts
        if _is_junk(name) or len(parts) < 3:
            continue
        for i in range(len(parts) - 2):
            if parts[i].lower() == "train" and parts[i + 1].upper() == "NORMAL":
                found.add(PurePosixPath(*parts[:i]))
    if not found:
        raise DownloadError(
            "the archive holds no train/NORMAL/ folder: not the Kermany chest X-ray data"
        )
    return min(found, key=lambda p: (len(p.parts), str(p)))


def unpack(archive: Path, to: Path, show_progress: bool = True) -> Path:
    """Check every member's CRC and unpack the Kermany folder of `archive` to to/chest_xray,
    through a temporary folder renamed into place (a half unpack is never left as the data)."""
    archive, to = Path(archive), Path(to)
    target = to / LAYOUT
    if (target / "train").is_dir():
        raise DownloadError(f"{target} already holds train/: remove it to unpack again")
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive}: not a readable zip archive ({err})") from None
    with zf:
        damaged = zf.testzip()
        if damaged:
            raise DownloadError(
                f"{archive}: member {damaged} fails its CRC check (download it again)"
            )
        prefix = kermany_prefix(zf.namelist())
        # only prefix/{train,test,val}/...: Kaggle's nested duplicate prefix/chest_xray/ stays out
        members = [
            m
            for m in zf.infolist()
            if not m.is_dir()
            and not _is_junk(m.filename)
            and PurePosixPath(m.filename).parts[: len(prefix.parts)] == prefix.parts
            and PurePosixPath(m.filename).parts[len(prefix.parts)].lower() in SPLITS
        ]
        tmp = Path(tempfile.mkdtemp(dir=to, prefix=f".{LAYOUT}.", suffix=".partial"))
        try:
            for member in tqdm(members, desc="unpack", unit="file", disable=not show_progress):
                rel = PurePosixPath(member.filename).parts[len(prefix.parts) :]
                if (
                    any(p in ("", "..") for p in rel)
                    or PurePosixPath(member.filename).is_absolute()
                ):
                    raise DownloadError(f"{archive}: unsafe member path {member.filename}")
                out = tmp.joinpath(*rel)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            if target.exists():
                target.rmdir()  # an empty leftover folder; a full one was refused above
            # mkdtemp makes it 0700; the data is the user's usual mode
            os.chmod(tmp, default_dir_mode())
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (folder / "kaggle.json").is_file()


def fetch_kaggle(to: Path) -> Path:
    """Download the Kaggle copy with the `kaggle` package; returns the zip's path."""
    if not _kaggle_credentials():
        raise DownloadError(
            "the kaggle source needs credentials: KAGGLE_USERNAME and KAGGLE_KEY, or "
            "~/.kaggle/kaggle.json (kaggle.com > Settings > API); or use --source mendeley"
        )
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise DownloadError(
            "the kaggle source needs the kaggle package: pip install kaggle "
            "(or use --source mendeley)"
        ) from None
    api = KaggleApi()
    api.authenticate()
    try:
        api.dataset_download_files(KAGGLE_DATASET, path=str(to), quiet=False, unzip=False)
    except Exception as err:  # the package raises its own HTTP and connection errors
        raise DownloadError(f"kaggle download of {KAGGLE_DATASET} failed: {err}") from None
    zips = sorted(Path(to).glob("*.zip"), key=lambda p: p.stat().st_mtime)
    if not zips:
        raise DownloadError(f"kaggle download of {KAGGLE_DATASET} left no zip in {to}")
    return zips[-1]


def download(
    to: str | Path,
    source: str = "mendeley",
    url: str | None = None,
    sha256: str | None = None,
    keep_zip: bool = False,
    show_progress: bool = True,
) -> Path:
    """Fetch, check and unpack the data set into to/chest_xray; returns that folder."""
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    if (to / LAYOUT / "train").is_dir():
        return to / LAYOUT
    expected = sha256 or (MENDELEY_SHA256 if source == "mendeley" else None)
    if source == "kaggle":
        archive = fetch_kaggle(to)
        digest = sha256_file(archive)
        if expected and digest != expected.lower():
            raise DownloadError(
                f"{archive}: SHA-256 {digest} is not the expected {expected.lower()}"
            )
    elif source == "mendeley":
        archive = to / MENDELEY_ZIP
        digest = fetch(url or MENDELEY_URL, archive, expected, show_progress=show_progress)
    else:
        raise DownloadError(f"unknown source {source!r}: mendeley or kaggle")
    print(
        f"{archive.name}: SHA-256 {digest}"
        + (" (matches)" if expected else " (no checksum pinned: not checked)")
    )
    try:
        target = unpack(archive, to, show_progress=show_progress)
    except DownloadError:
        if source == "mendeley":  # a damaged archive would be skipped, not fetched, next time
            archive.unlink(missing_ok=True)
        raise
    if not keep_zip:
        archive.unlink()
    return target
