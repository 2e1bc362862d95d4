"""Reading the datasets' text tables line by line: a header line is tolerated, a bad line is named.

Every text loader (MovieLens, CUB, Pet) reads its tables through `read_rows`, so a malformed file
is an error naming the file, the line, what was found and what the line should hold — never a
bare ``invalid literal for int()``. Nothing here decides what a dataset means.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

__all__ = ["read_rows", "bad_line", "check_text", "line_numbers"]


def bad_line(path: str | os.PathLike, number: int, line: str, problem: str, expected: str) -> ValueError:
    """The error for line `number` of `path`: the problem, the line, and the fix."""
    shown = line.strip()
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return ValueError(
        f"{path}, line {number}: {problem} in {shown!r}. Each line should be {expected}; "
        "correct or delete that line (a copy of the file from its official source is known to be good)."
    )


def check_text(path: str | os.PathLike, text: str, *, complete: bool = True) -> str:
    """`text` (the decoded file `path`) unchanged, or a `ValueError` naming the file and line when it
    holds NUL bytes (a damaged or binary file) or, with `complete`, its last line has no line end
    (the file was cut short: every table of the datasets ends with one)."""
    nul = text.find("\x00")
    if nul >= 0:
        number = text.count("\n", 0, nul) + 1
        line = text.splitlines()[number - 1] if text.splitlines() else ""
        shown = line[:120]
        raise ValueError(
            f"{path}, line {number}: NUL bytes in {shown!r} (the file is damaged or not "
            "text); replace the file with a copy from its official source."
        )
    if complete and text and not text.endswith(("\n", "\r")):
        number = text.count("\n") + 1
        raise ValueError(
            f"{path}, line {number}: the last line {text.rsplit(chr(10), 1)[-1][:120]!r} has no line end, so the file "
            "was cut short (an interrupted download or copy); replace the file with a copy from its official source."
        )
    return text


def line_numbers(text: str, rows: int) -> list[int]:
    """The line numbers of the `rows` data rows of `text` (non-blank lines; a header line left out)."""
    numbers = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return numbers[len(numbers) - rows:] if len(numbers) >= rows else numbers


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def read_rows(
    path: str | os.PathLike,
    *,
    sep: str | None = None,
    width: int | None = None,
    min_width: int | None = None,
    integer: Sequence[int] = (0,),
    expected: str,
    text: str | None = None,
    comment: str | None = None,
) -> list[tuple[int, list[str]]]:
    """The non-blank lines of `path` as ``(line number, fields)``, checked.

    A first non-blank line whose `integer` columns are not all integers is a header (some copies
    of MovieLens' ``u.item`` carry one) and is skipped. Any other line with the wrong number of
    fields (`width` exactly or at least `min_width`) or a non-integer in an `integer` column is a
    `ValueError` naming the file, the line number, the line and `expected` (what a line holds).

    Args:
        sep: field separator (None: any whitespace). text: the file's decoded text, when the
            caller decoded it already (e.g. latin-1). comment: lines starting with it are skipped.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "u.genre"
        >>> _ = p.write_text("genre|id\\nunknown|0\\nAction|1\\n")
        >>> read_rows(p, sep="|", width=2, integer=(1,), expected="'<genre>|<id>'")
        [(2, ['unknown', '0']), (3, ['Action', '1'])]
    """
    path = Path(path)
    if text is None:
        text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, list[str]]] = []
    first = True
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or (comment is not None and line.lstrip().startswith(comment)):
            continue
        fields = line.split(sep) if sep is not None else line.split()
        numeric_ok = all(i < len(fields) and _is_int(fields[i].strip()) for i in integer)
        if first:
            first = False
            if not numeric_ok and not any(i < len(fields) and _is_int(fields[i].strip()) for i in integer):
                continue  # a header line: no integer where every data line has one
        if width is not None and len(fields) != width:
            raise bad_line(path, number, line, f"{len(fields)} fields where {width} are expected", expected)
        if min_width is not None and len(fields) < min_width:
            raise bad_line(path, number, line, f"{len(fields)} fields where at least {min_width} are expected", expected)
        if not numeric_ok:
            bad = next(fields[i] for i in integer if not _is_int(fields[i].strip()))
            raise bad_line(path, number, line, f"{bad.strip()!r} is not an integer", expected)
        rows.append((number, fields))
    return rows
