"""Files replaced whole or not at all: write beside, fsync, rename over.

Used for what must survive a crash or never be seen half-written by a concurrent reader:
the replay's checkpoint and its trimmed output file, the cascade's learned examples, the
harmony vocabulary unpacked into the cache.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into.

    When the block ends without an exception, the file is flushed, fsynced and renamed over
    `path` (atomic on POSIX), and the folder is fsynced so that the rename survives a crash:
    a reader, or a restart after a crash, sees either the old file or the new one. On an
    exception the temporary file is removed and `path` is left as it was.
    """
    # A unique name beside the target: the same file system (so the rename is atomic), and
    # two writers of one path never write into each other's temporary file. Created with the
    # usual permissions (0666 less the umask), as `open` would create `path` itself.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform without folder descriptors (Windows): the rename is as durable as it gets
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file itself is synced
    finally:
        os.close(descriptor)
