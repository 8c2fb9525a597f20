"""The test suite on every CPython that ``requires-python >= 3.11`` promises: 3.11, 3.12, 3.13.

    nox -s tests-3.12                  # one version
    nox -s tests -- -k stream -x       # all three, arguments passed to pytest

``make test`` runs 3.11 in .venv and then the 3.12 and 3.13 sessions below. Each session
installs from the project's own files exactly as the Makefile does: the core with
``[testing,dev,cli,mcp,ray,video]``, every adapter under ``integrations/`` with ``[dev]`` and the pinned
official client (tests/requirements-official-client.txt) with ``--no-deps``.

Interpreters: a working ``python3.X`` on PATH is used as it is. Otherwise the newest
``$PYENV_ROOT/versions/3.X.*/bin`` (``~/.pyenv`` by default) is put on PATH: pyenv's
shims only resolve the versions selected with ``pyenv global``/``local``, so on a machine
whose global is 3.11 the ``python3.12`` shim exists but fails. A version found in neither
place fails its session (never skips it) with the message printed below.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

PYTHONS = ["3.11", "3.12", "3.13"]
ROOT = Path(__file__).resolve().parent
OFFICIAL_CLIENT = "tests/requirements-official-client.txt"

nox.needs_version = ">=2025.5.1"
nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"  # the stdlib venv, as the Makefile uses
nox.options.reuse_venv = "yes"  # reuse .nox/<session>; the installs still run and pick up changes
nox.options.error_on_missing_interpreters = True
if hasattr(nox.options, "download_python"):
    nox.options.download_python = "never"  # no interpreter downloads: only package registries are reachable


def _minor_version(executable: str) -> str | None:
    """``"3.12"`` if *executable* runs and is that CPython, else None (a pyenv shim may exist but fail)."""
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _patch_key(bin_dir: str) -> tuple[int, ...]:
    name = Path(bin_dir).parent.name  # "3.12.1"
    return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))


def _locate_interpreters() -> list[str]:
    """Put a working ``python3.X`` for each of PYTHONS on PATH; return the versions not found."""
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    missing = []
    for version in PYTHONS:
        name = f"python{version}"
        on_path = shutil.which(name)
        if on_path and _minor_version(on_path) == version:
            continue
        candidates = sorted(
            glob.glob(os.path.join(pyenv_root, "versions", f"{version}.*", "bin")), key=_patch_key, reverse=True
        )
        for bin_dir in candidates:
            if _minor_version(os.path.join(bin_dir, name)) == version:
                os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
                break
        else:
            missing.append(version)
    return missing


MISSING = _locate_interpreters()
if MISSING:
    print(
        "noxfile: no working CPython "
        + ", ".join(MISSING)
        + f" (looked for python3.X on PATH and in {os.environ.get('PYENV_ROOT', '~/.pyenv')}/versions/3.X.*);"
        " install it (e.g. `pyenv install 3.13`) or put python3.X on PATH; its sessions will fail.",
        file=sys.stderr,
    )


def _integrations() -> list[str]:
    return sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("integrations/*/pyproject.toml"))


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole test suite (core, both adapters, doctests) with every extra."""
    session.install("--upgrade", "pip")
    extras = [arg for path in _integrations() for arg in ("-e", f"{path}/[dev]")]
    session.install("-e", ".[testing,dev,cli,mcp,ray,video]", *extras)
    session.install("--no-deps", "-r", OFFICIAL_CLIENT)
    session.run("python", "-m", "pytest", *session.posargs)
