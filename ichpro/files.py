"""Files written whole or not at all, read back with a clear error, and identified by their sha256."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ichpro.errors import IchproError


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes (None when it does not exist)."""
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_json(path: Path, what: str) -> Any:
    """A JSON file written by :func:`write_json`; an IchproError naming it when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IchproError(f"{path} ({what}) is damaged ({err}): delete it, or the folder holding it, "
                          "and run again") from None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=str) + "\n"))


def checksums(folder: Path, files: Iterable[Path]) -> dict[str, str | None]:
    """The sha256 of each file, keyed by its path relative to ``folder``."""
    return {path.relative_to(folder).as_posix(): file_digest(path) for path in files}


def changed_files(folder: Path, recorded: Mapping[str, str]) -> list[str]:
    """The files of ``recorded`` (:func:`checksums`) that are missing or differ from their sha256."""
    return [name for name, digest in recorded.items() if file_digest(folder / name) != digest]
