"""Files written whole or not at all: a temp file in the same folder, then os.replace, so a
reader (or a crash) never sees half a file. Used for a run folder's files, checkpoints and
the tables of the experiments."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path beside ``path`` (``<name>.<pid>.tmp``: one per process) to
    write; when the block ends without an error, os.replace moves it onto ``path`` (so
    readers see the old file or the whole new one, never a part), else it is removed and
    ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`replaced_atomically`)."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
