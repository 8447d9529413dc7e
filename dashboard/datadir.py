"""The dashboard's data directory (`--data`): the directory 0700, and every database and secret in it 0600.

Two things would otherwise follow the umask (0755 and 0644 under the usual 022): a directory that `os.makedirs`
makes as the parent of the one asked for (the CA's `ca/` made the data directory that way), and a database SQLite
creates (it gives its `-wal` and `-shm` files the mode of the database). So the data directory is made before
anything inside it (`private_directory`), and a database file is created empty with mode 0600 before SQLite opens
it (`private_file`). At every start `private_directory` also tightens a directory or file that other users can
read (made by an older meshgate, or by hand) and logs that it did; one it may not change (not its owner, as with
a Kubernetes emptyDir's mount point) is logged and left, the files inside being 0600 regardless.

>>> private_directory("/var/lib/meshgate", files=("mesh.db", "operator-token"))   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable

log = logging.getLogger("meshgate.dashboard")

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm")  # a database and the files SQLite keeps beside it


def private_directory(path: str, files: Iterable[str] = ()) -> None:
    """Make `path` (mode 0700) if it is missing; tighten it, and those of `files` in it that exist, if others may
    read them. Raises OSError when `path` cannot be made."""
    os.makedirs(path, mode=DIRECTORY_MODE, exist_ok=True)
    _tighten(path)
    for name in files:
        _tighten(os.path.join(path, name), missing_ok=True)


def private_file(path: str) -> None:
    """Create `path` empty with mode 0600 unless it exists (tightened then, if others may read it), so that SQLite
    opening it keeps that mode for the database and its -wal and -shm files."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE))
    for suffix in SQLITE_SUFFIXES:
        _tighten(path + suffix, missing_ok=True)


def sqlite_files(*databases: str) -> list[str]:
    """The names of `databases` and of the files SQLite keeps beside each."""
    return [name + suffix for name in databases for suffix in SQLITE_SUFFIXES]


def _tighten(path: str, missing_ok: bool = False) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & ~0o077)
    except OSError as err:
        log.warning("%s: mode %04o lets other users in, and cannot be changed: %s", path, mode, err.strerror or err)
        return
    log.warning("%s: mode %04o let other users in; changed to %04o", path, mode, mode & ~0o077)
