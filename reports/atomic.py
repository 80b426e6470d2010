"""Every report file is written whole or not at all: into a temporary file beside it, then renamed over it.

A browser reloading a live page, or a reader of ``summary.json``, sees the old
file or the new one, never half of one; an interrupted write leaves no
temporary file behind. Temporary names start with a dot and end in ``.tmp``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".tmp"


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; when the block ends normally it replaces ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the page from a web server's user
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically."""
    with replaced(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path
