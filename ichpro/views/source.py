"""The package's own lines beside the equations: a notebook shows the source of a class, method or
function as read from the installed package, never a copy pasted into markdown."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

import ichpro
from ichpro.errors import IchproError

PACKAGE_PARENT = Path(ichpro.__file__).resolve().parent.parent


@dataclass(frozen=True)
class Source:
    """Lines ``first``..``last`` of ``path`` (relative to the package's parent), the code of ``name``."""

    name: str
    path: str
    first: int
    last: int
    code: str

    @property
    def caption(self) -> str:
        """``name`` · path, lines first-last."""
        return f"{self.name} · {self.path}, lines {self.first}-{self.last}"

    def _repr_markdown_(self) -> str:
        """A caption and a Python code block (highlighted by JupyterLab and code hosts)."""
        return f"`{self.caption}`\n\n```python\n{self.code}\n```"

    def __repr__(self) -> str:
        return f"# {self.caption}\n{self.code}"


def qualified_name(obj: object) -> str:
    """``module.Qualified.name`` of a class, function or method."""
    obj = inspect.unwrap(obj)
    return f"{obj.__module__}.{obj.__qualname__}"


def show_source(obj: object, start: str | None = None, stop: str | None = None) -> Source:
    """The source of ``obj``; with ``start``, only the lines from the first one holding ``start`` to
    the first one from there holding ``stop`` or, without ``stop``, to the end of the statement
    that begins on the ``start`` line."""
    lines, first = inspect.getsourcelines(inspect.unwrap(obj))
    begin, end = 0, len(lines) - 1
    if start is not None:
        begin = _find(lines, start, 0, obj)
        end = _statement_end(lines, begin) if stop is None else _find(lines, stop, begin, obj)
    path = Path(inspect.getsourcefile(inspect.unwrap(obj))).resolve()
    shown = path.relative_to(PACKAGE_PARENT) if path.is_relative_to(PACKAGE_PARENT) else path
    code = textwrap.dedent("".join(lines[begin:end + 1])).rstrip()
    return Source(qualified_name(obj), shown.as_posix(), first + begin, first + end, code)


def _statement_end(lines: list[str], begin: int) -> int:
    """Index of the last line of the statement that begins on line ``begin`` (just ``begin`` when
    no statement begins there)."""
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ends = [node.end_lineno for node in ast.walk(tree)
            if isinstance(node, ast.stmt) and node.lineno == begin + 1]
    return max(ends, default=begin + 1) - 1


def _find(lines: list[str], marker: str, begin: int, obj: object) -> int:
    """Index of the first line from ``begin`` holding ``marker``."""
    for index in range(begin, len(lines)):
        if marker in lines[index]:
            return index
    raise IchproError(f"no line of {qualified_name(obj)} from line {begin + 1} holds {marker!r}")
