"""STAR files: reading (via ``starfile``) and writing in RELION 5's own formatting.

Reading returns every data block of a file, in file order, as a ``pandas.DataFrame`` (loop
blocks) or a ``dict`` (key-value blocks). Labels that RELION defines as strings (names, paths)
are always read as strings, so a tomogram called ``001`` is not turned into the integer 1.

Writing reproduces ``MetaDataTable::write`` of RELION 5 (``src/metadata_table.cpp``; spec §5.9):

* every block is preceded by a blank line and ``# version 50001``, then ``data_<name>``;
* loop blocks: ``loop_`` then ``_rlnLabel #n`` headers, one row per line, each value
  right-aligned in 10 characters and followed by a space, a final `` `` line;
* key-value blocks: ``_rlnLabel`` padded so that all values start in the same column;
* floats ``%12.6f`` (negatives ``%12.5f``), exponent form ``%12.6e``/``%12.5e`` when
  ``0 < |v| < 0.001`` or ``|v| > 100000``; integers and booleans ``%12d``; strings as they are
  (``""`` for an empty string, double quotes around strings with blanks); vector cells (lists,
  tuples, arrays) as ``[a,b,c]`` with 12 significant digits and no spaces.

Unlike RELION, values are never truncated to 12 characters (RELION's ``snprintf(buf, 13, …)``
would cut e.g. ``1e+100``). Files are written atomically (temporary file in the same folder,
then ``os.replace``), as RELION does for table-level writes.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from polish3d.errors import InputError

__all__ = [
    "STRING_LABELS",
    "atomic_write",
    "atomic_write_text",
    "check_loop_rows",
    "format_value",
    "parse_vector",
    "read_star",
    "write_star",
]

#: RELION labels whose values are strings (names and paths); always parsed as strings.
STRING_LABELS: tuple[str, ...] = (
    "rlnTomoName",
    "rlnTomoParticleName",
    "rlnTomoTiltSeriesName",
    "rlnTomoTiltSeriesStarFile",
    "rlnTomoTomogramsFile",
    "rlnTomoParticlesFile",
    "rlnTomoTrajectoriesFile",
    "rlnTomoManifoldsFile",
    "rlnTomoReferenceMap1File",
    "rlnTomoReferenceMap2File",
    "rlnTomoReferenceMaskFile",
    "rlnTomoReferenceFscFile",
    "rlnTomoDeformationType",
    "rlnTomoReconstructedTomogram",
    "rlnTomoReconstructedTomogramHalf1",
    "rlnTomoReconstructedTomogramHalf2",
    "rlnTomoReconstructedTomogramDenoised",
    "rlnTomoFiducialsStarFile",
    "rlnTomoMicrographNameEven",
    "rlnTomoMicrographNameOdd",
    "rlnMicrographName",
    "rlnMicrographNameEven",
    "rlnMicrographNameOdd",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
    "rlnImageName",
    "rlnOpticsGroupName",
    "rlnEtomoDirectiveFile",
    "rlnMtfFileName",
    "rlnMaskName",
)

_VERSION_LINE = "# version 50001"


def read_star(path) -> dict[str, pd.DataFrame | dict]:
    """Read every data block of a STAR file.

    Args:
        path: the STAR file.

    Returns:
        ``{block name: DataFrame | dict}`` in file order (``data_`` gives the name ``""``).

    Raises:
        InputError: the file is missing, empty of data blocks, or cannot be parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"STAR file not found: {p}")
    check_loop_rows(p)
    try:
        blocks = starfile.read(p, always_dict=True, parse_as_string=list(STRING_LABELS))
    except Exception as exc:  # starfile/pandas raise many kinds of errors
        why = " ".join(str(exc).split())
        raise InputError(f"cannot parse STAR file {p}: {type(exc).__name__}: {why}") from exc
    if not isinstance(blocks, dict) or len(blocks) == 0:
        raise InputError(f"no data_ block found in STAR file {p}")
    for name, block in blocks.items():
        if block is None:
            raise InputError(f"cannot parse block data_{name} of STAR file {p}")
    return dict(blocks)


#: one value of a loop row: a quoted string (may hold blanks) or a run of non-blanks
_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|\S+')


def _row_width(line: str) -> int:
    """Number of values on one data line of a loop (quoted strings count as one)."""
    if '"' in line or "'" in line:
        return len(_TOKEN.findall(line))
    return len(line.split())


def check_loop_rows(path) -> None:
    """Check that every data row of every loop block has one value per column.

    ``starfile`` (pandas) fills a short row with NaN, so a file cut off in its last row would
    otherwise surface later as a misleading "non-finite value"; a long row would give a
    pandas tokenizer message without the block name.

    Raises:
        InputError: naming the file, the block, the line (1-based) and the counts.
    """
    p = Path(path)
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    block, n_labels, in_loop, last_data = "", 0, False, None
    rows: list[tuple[int, int, str, int]] = []  # (line number, width, block, n_labels)
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            block = line[5:].split()[0] if len(line) > 5 else ""
            n_labels, in_loop = 0, False
        elif line.startswith("loop_"):
            n_labels, in_loop = 0, True
        elif line.startswith("_"):
            if in_loop:
                n_labels += 1
        elif in_loop:
            rows.append((number, _row_width(line), block, n_labels))
            last_data = number
    for number, width, name, n in rows:
        if width == n:
            continue
        kind = "short" if width < n else "long"
        hint = ""
        if number == last_data and width < n:
            kind = "truncated"
            hint = "; it is the last row of the file: was the file cut short?"
        raise InputError(
            f"{p} (block data_{name}), line {number}: {kind} row with {width} values, expected "
            f"{n} (one per column){hint}"
        )


def parse_vector(cell) -> np.ndarray:
    """Parse a RELION vector cell ``[a,b,c,d]`` (or a list/array) into a float64 array.

    RELION's reader splits on ``[``, ``,`` and ``]`` (``metadata_table.cpp``); blanks are
    tolerated here as well.

    Raises:
        ValueError: the cell holds no parsable numbers.
    """
    if isinstance(cell, np.ndarray | list | tuple):
        return np.asarray(cell, dtype=np.float64).ravel()
    text = str(cell).strip()
    parts = [t for t in text.replace("[", " ").replace("]", " ").replace(",", " ").split() if t]
    if not parts:
        if text in ("[]", ""):
            return np.zeros(0)
        raise ValueError(f"not a vector cell: {cell!r}")
    return np.array([float(t) for t in parts], dtype=np.float64)


def _escape(s: str) -> str:
    if s == "":
        return '""'
    if s[0] in "\"'" or " " in s or "\t" in s:
        return '"' + s + '"'
    return s


def _format_float(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return f"{v:12f}"
    a = abs(v)
    if (0.0 < a < 0.001) or a > 100000.0:
        return f"{v:12.5e}" if v < 0 else f"{v:12.6e}"
    return f"{v:12.5f}" if v < 0 else f"{v:12.6f}"


def _format_vector(v) -> str:
    arr = np.asarray(v).ravel()
    if arr.size == 0:
        return "[]"
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_):
        return "[" + ",".join(str(int(x)) for x in arr) + "]"
    return "[" + ",".join(f"{float(x):.12g}" for x in arr) + "]"


def format_value(v) -> str:
    """Format one value the way RELION writes it (see the module docstring)."""
    if isinstance(v, bool | np.bool_):
        return f"{int(v):12d}"
    if isinstance(v, int | np.integer):
        return f"{int(v):12d}"
    if isinstance(v, float | np.floating):
        return _format_float(float(v))
    if isinstance(v, np.ndarray | list | tuple):
        return _format_vector(v)
    if v is None or v is pd.NA:
        return '""'
    return _escape(str(v))


def _format_column(col: pd.Series) -> list[str]:
    dt = col.dtype
    if pd.api.types.is_bool_dtype(dt) or pd.api.types.is_integer_dtype(dt):
        return [f"{int(x):12d}" for x in col.to_numpy()]
    if pd.api.types.is_float_dtype(dt):
        return [_format_float(float(x)) for x in col.to_numpy()]
    return [format_value(x) for x in col.tolist()]


def _block_text(name: str, block) -> str:
    out = ["", _VERSION_LINE, "", f"data_{name}", ""]
    if isinstance(block, Mapping):
        labels = [str(k) for k in block]
        width = max([10] + [len(k) for k in labels])
        for k, v in block.items():
            pad = " " * (12 + width - len(str(k)))
            out.append(f"_{k}{pad}{format_value(v)}")
        out.append(" ")
    elif isinstance(block, pd.DataFrame):
        out.append("loop_ ")
        for i, c in enumerate(block.columns, start=1):
            out.append(f"_{c} #{i} ")
        cols = [_format_column(block[c]) for c in block.columns]
        for row in zip(*cols, strict=True):
            out.append("".join(f"{s:>10} " for s in row))
        out.append(" ")
    else:
        raise TypeError(f"block data_{name}: expected a DataFrame or a dict, got {type(block)}")
    return "\n".join(out) + "\n"


def _umask_mode() -> int:
    """``0o666`` less the process umask: the mode a plain ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp, path) -> None:
    """Give a finished temporary file the usual permissions and rename it onto ``path``.

    (``tempfile.mkstemp`` creates files readable by the owner only.)
    """
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def atomic_write(path, write: Callable[[str], object]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder,
    which is then renamed onto ``path`` (removed instead if ``write`` fails)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    return atomic_write(path, write)


def write_star(path, blocks: Mapping[str, pd.DataFrame | Mapping]) -> Path:
    """Write blocks to a STAR file in RELION 5's formatting, atomically.

    Args:
        path: destination (its folder is created if needed).
        blocks: ``{block name: DataFrame | dict}``; a DataFrame becomes a ``loop_`` block, a dict
            a key-value block. Cells may be numbers, strings, or vectors (list/tuple/ndarray).

    Returns:
        The path written.
    """
    text = "".join(_block_text(str(name), block) for name, block in blocks.items())
    return atomic_write_text(path, text)
