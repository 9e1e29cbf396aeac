"""`--download`: fetch the official archives into the data root, verify their MD5, extract safely."""
from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

from longtail.errors import ConfigError
from longtail.progress import Progress

CHUNK = 1 << 20  # bytes read at a time


@dataclass(frozen=True)
class Remote:
    """One file, the mirrors it is published at (tried in order) and its MD5."""

    filename: str
    urls: tuple[str, ...]
    md5: str


CIFAR10 = Remote("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                 "c58f30108f718f92721af3b95e74349a")
CIFAR100 = Remote("cifar-100-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                  "eb9058c3a382ffc7106e4002c42a8d85")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
FASHION_MNIST = [
    Remote(name, tuple(m + name for m in _FASHION_MIRRORS), md5)
    for name, md5 in [
        ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ]
]
_OFFLINE_HINT = ("without network access, copy the dataset files under a directory yourself and pass it "
                 "with --data-root DIR or $LONGTAIL_DATA")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_with_progress(response: BinaryIO, out: BinaryIO, total: Optional[int], name: str) -> None:
    """Copy a download of `total` bytes (None: unknown) to `out`, its bytes and rate shown as it goes: a bar
    on a terminal, a line at each further tenth in a log file."""
    with Progress(total, name, "B") as progress:
        for block in iter(lambda: response.read(CHUNK), b""):
            out.write(block)
            progress.update(len(block))


def fetch(remote: Remote, folder: Path) -> Path:
    """Download `remote` into `folder`. A file already there is kept: downloads land under a `.part`
    name and only a verified file gets the final name."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.filename
    if target.is_file():
        return target
    errors = []
    for url in remote.urls:
        part = target.with_name(target.name + ".part")
        try:
            print(f"downloading {url}", file=sys.stderr)
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
                length = response.headers.get("Content-Length", "")  # http and file URLs both say, mostly
                copy_with_progress(response, out, int(length) if length.isdigit() else None, remote.filename)
        except OSError as exc:  # URLError, timeouts, refused connections are all OSErrors
            part.unlink(missing_ok=True)
            errors.append(f"{url}: {exc}")
            continue
        got = md5sum(part)
        if got == remote.md5:
            part.replace(target)
            return target
        part.unlink()
        errors.append(f"{url}: MD5 {got} does not match the published {remote.md5}")
    raise ConfigError(f"could not download {remote.filename} ({'; '.join(errors)}); {_OFFLINE_HINT}")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing links, devices and members that would land outside `dest`."""
    dest = dest.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                inside = (dest / m.name).resolve()
                if not (m.isfile() or m.isdir()) or (inside != dest and dest not in inside.parents):
                    raise ConfigError(f"{archive}: refusing the archive member '{m.name}' "
                                      f"(only plain files and folders inside the archive are accepted)")
            # The "data" filter (Python >= 3.10.12) re-checks the same rules and strips unsafe modes.
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **safety)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConfigError(f"{archive}: cannot extract ({exc})") from None


def download_archive(remote: Remote, root: Path, folder_name: str) -> Path:
    """Fetch + extract an archive whose top-level folder is `folder_name`; moved into place only when complete."""
    archive = fetch(remote, root)
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        safe_extract(archive, Path(tmp))
        extracted = Path(tmp) / folder_name
        if not extracted.is_dir():
            raise ConfigError(f"{archive}: expected a top-level folder '{folder_name}' in the archive")
        final = root / folder_name
        if final.exists():
            shutil.rmtree(final)
        extracted.replace(final)
    return final


def download_fashion_mnist(folder: Path) -> None:
    for remote in FASHION_MNIST:
        fetch(remote, folder)
