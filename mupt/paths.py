"""Where mupt writes: the output-path names every command shares, and their validation.

One naming scheme (README, "Where results go"):

- ``--run-dir DIR``: the directory ONE run writes (``train``, ``scale``, ``check coord|transfer|all``);
- ``--runs-dir DIR``: the parent under which ``tune`` creates ``<study>/`` and where ``transfer``
  looks for the newest ``*/best.yaml``;
- ``--out FILE`` (``-o``): a single output file (``transfer``'s recipe).

A directory output is created when missing (with its parents); a FILE output must go into an existing
directory, as for ``cp`` or ``gcc -o`` (a typo in its directory is refused, not silently created), except
in the default place, which mupt itself chose.

Every command calls :func:`check_output_dir` / :func:`check_output_file` on its outputs after
parsing its inputs and BEFORE any work starts, so a bad path is one line (exit 2), not a traceback
after minutes of training.  The checks create nothing: a probe file/directory is made and removed
in the nearest existing ancestor, which also catches read-only file systems and root-owned places
where :func:`os.access` would answer yes.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from pathlib import Path

from mupt.errors import StorageError

#: Parent directory of every run directory by default (``runs/<name>/``).
RUNS_DIR = Path("runs")


def default_run_dir(kind: str, now: _dt.datetime | None = None) -> Path:
    """``runs/<kind>-<UTC timestamp>``: a fresh directory per run, so a rerun never overwrites results.

    ``kind`` is e.g. ``train-w256``; the timestamp is ``YYYYmmdd-HHMMSS`` (UTC).
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return RUNS_DIR / f"{kind}-{now.strftime('%Y%m%d-%H%M%S')}"


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and not p.is_symlink():
        p = p.parent
    return p


def _probe_writable(directory: Path) -> str | None:
    """None when a file can be created (and removed) in ``directory``, else the OS's reason."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mupt-write-probe-", dir=directory)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(name)
    return None


def _check_parent_chain(directory: Path, flag: str, shown: Path) -> None:
    """``directory`` (to be created if missing) must end up writable; errors name ``flag`` and ``shown``."""
    anc = _nearest_existing(directory)
    if not anc.is_dir():
        raise StorageError(f"{flag} {shown}: {anc} is a regular file, not a directory; choose a path outside it")
    why = _probe_writable(anc)
    if why is not None:
        raise StorageError(f"{flag} {shown}: cannot write in {anc} ({why}); choose a writable place")


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Refuse a directory path that cannot be created and written; returns it as a Path.

    Raises StorageError (one line naming ``flag``, the path and the fix) when ``path`` is an existing
    file, lies under a regular file, or is in a place that cannot be written.  Creates nothing.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{flag} {path}: is an existing file, not a directory; pass a directory path")
    _check_parent_chain(path, flag, path)
    return path


def check_output_file(path: str | Path, flag: str, create_parent: bool = False) -> Path:
    """Refuse a file path that cannot be written (a directory, under a regular file, unwritable place), or,
    unless ``create_parent`` (a default path mupt chose), whose directory does not exist.

    An existing file is fine (it is replaced atomically).  Raises StorageError; creates nothing.
    """
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"{flag} {path}: is a directory; pass a file path such as {path / 'recipe.yaml'}")
    _check_parent_chain(path.parent, flag, path)
    if not create_parent and not path.parent.is_dir():
        raise StorageError(
            f"{flag} {path}: directory {path.parent} does not exist; create it (mkdir -p {path.parent}) or pass a "
            "path in an existing directory"
        )
    return path
