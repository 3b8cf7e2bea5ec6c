"""The rows of a results folder: the resumable ``scores.csv`` (:class:`ScoresCSVWriter`), reading the complete
rows back (:func:`read_complete_rows`, :func:`done_images`), the part files of a distributed run and their merge, and
whole tables written by atomic replace (``skipped.csv``)."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medad_monai.io.outputs import write_atomic

__all__ = [
    "ScoresCSVWriter",
    "read_complete_rows",
    "done_images",
    "done_images_in",
    "part_csv_name",
    "merge_part_files",
    "write_skipped_csv",
    "write_csv_atomic",
]

logger = logging.getLogger("medad_monai.io.writers")


class ScoresCSVWriter:
    """Appends one row per image to a CSV file, flushing after every row.

    The first column identifies the image (``"image"`` by default). The header is written once, when the file is
    new or empty. With ``resume=True`` an existing file is kept: its header must match, a last row cut short by a
    killed job is dropped, and :meth:`done_images` tells the caller which images need no new run. With
    ``resume=False`` an existing file is replaced.

    Values are written with ``str`` after converting tensors and numpy scalars to Python numbers, so floats keep
    full precision; ``None`` becomes an empty cell.

    Args:
        path: CSV file; parent folders are created.
        fieldnames: the leading columns, the first being the image identifier.
        extra_fields: more columns appended after ``fieldnames`` (e.g. ``("normalized_score",)``).
        resume: keep an existing file and append to it.

    Example:
        >>> with ScoresCSVWriter("/tmp/scores.csv") as w:
        ...     w.write({"image": "a.png", "pred_score": 0.12, "pred_label": 1})
        >>> sorted(ScoresCSVWriter("/tmp/scores.csv", resume=True).done_images())
        ['a.png']
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fieldnames: Sequence[str] = ("image", "pred_score", "pred_label"),
        extra_fields: Sequence[str] = (),
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fieldnames = tuple(fieldnames) + tuple(f for f in extra_fields if f not in fieldnames)
        if not self.fieldnames:
            raise ValueError(f"ScoresCSVWriter for {self.path} needs at least one column.")
        self._done: set[str] = set()
        self._rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        need_header = True
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            self._load_existing()
            need_header = False
        elif self.path.exists() and self.path.stat().st_size > 0:
            logger.info("Replacing existing %s (resume=False)", self.path)
        self._fh = open(self.path, "a" if not need_header else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        if need_header:
            self._writer.writerow(self.fieldnames)
            self._fh.flush()

    def _load_existing(self) -> None:
        header, rows, torn = read_complete_rows(self.path)
        if torn:
            # a job killed mid-row: drop the incomplete row so the file stays a valid table
            logger.warning("Dropping an incomplete last row of %s: %r", self.path, torn[:200])
            with open(self.path, "rb+") as fb:
                fb.truncate(os.path.getsize(self.path) - len(torn))
        if header is None:
            raise ValueError(f"{self.path} has no complete header line; delete it or use resume=False.")
        if tuple(header) != self.fieldnames:
            raise ValueError(
                f"Cannot resume {self.path}: its columns are {header} but this writer writes {list(self.fieldnames)}. "
                "Use another output folder, or resume=False to start the file again."
            )
        for row in rows:
            self._done.add(row[0])
            self._rows += 1

    def write(self, row: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Append one row and flush it.

        Args:
            row: column -> value; missing columns are left empty.
            fields: more column values (``write(image="a.png", pred_score=0.1)``).
        """
        values = dict(row or {}, **fields)
        unknown = set(values) - set(self.fieldnames)
        if unknown:
            raise ValueError(f"{self.path}: unknown column(s) {sorted(unknown)}; columns are {list(self.fieldnames)}.")
        key = values.get(self.fieldnames[0])
        if key is None or str(key) == "":
            raise ValueError(f"{self.path}: every row needs a value for the {self.fieldnames[0]!r} column.")
        self._writer.writerow([_cell(values.get(f)) for f in self.fieldnames])
        self._fh.flush()
        self._done.add(str(key))
        self._rows += 1

    def done_images(self) -> set[str]:
        """Identifiers (first column) of every row in the file, including rows kept from a resumed file."""
        return set(self._done)

    def __len__(self) -> int:
        return self._rows

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ScoresCSVWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_complete_rows(path: str | os.PathLike) -> tuple[list[str] | None, list[list[str]], bytes]:
    """The rows of a CSV file written row by row, without a last row cut short by a killed writer.

    A row is complete when its line ending was written (rows are flushed whole, so a kill can only cut the last one).

    Returns:
        ``(header, rows, torn)``: the header (``None`` when even it is incomplete), the complete non-empty rows, and
        the bytes of the incomplete last row (empty when there is none).
    """
    data = Path(path).read_bytes()
    cut = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
    reader = csv.reader(io.StringIO(data[:cut].decode("utf-8"), newline=""))
    header = next(reader, None)
    return header, [row for row in reader if row], data[cut:]


def done_images(csv_path: str | os.PathLike, column: str = "image") -> set[str]:
    """The images that have a complete row in a results CSV (``scores.csv``) of an earlier run: what a resumed run
    need not process again. An incomplete last row does not count. Empty when the file does not exist."""
    if not os.path.isfile(csv_path):
        return set()
    header, rows, _ = read_complete_rows(csv_path)
    if not header or column not in header:
        return set()
    i = header.index(column)
    return {row[i] for row in rows if len(row) > i}


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if hasattr(v, "item"):  # numpy / torch scalars -> Python numbers (full-precision str)
        n = v.numel() if hasattr(v, "numel") else np.asarray(v).size
        if n == 1:
            v = v.item()
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


def write_skipped_csv(path: str, skipped: list[dict]) -> str:
    """Writes ``image,reason`` rows of the items a run skipped (all at once, through a temporary file)."""
    write_csv_atomic(path, ["image", "reason"], ([item["image"], item["reason"]] for item in skipped))
    return path


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A whole CSV table written by atomic replace (:func:`~medad_monai.io.outputs.write_atomic`)."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, text.getvalue())


def part_csv_name(rank: int, csv_name: str = "scores.csv") -> str:
    """The file a process of a distributed run writes its rows to before they are merged into ``csv_name``."""
    stem, _, ext = csv_name.rpartition(".")
    return f"{stem}.part{int(rank)}.{ext}"


def _part_files(output_dir: Path, csv_name: str) -> list[Path]:
    stem, _, ext = csv_name.rpartition(".")
    return sorted(output_dir.glob(f"{stem}.part*.{ext}"))


def done_images_in(output_dir: str | os.PathLike, csv_name: str = "scores.csv") -> set[str]:
    """Images with a complete row in ``output_dir``'s ``scores.csv`` or in the part files of a distributed run that
    stopped before merging them: what a resumed run need not process again."""
    out = Path(output_dir)
    done = done_images(out / csv_name)
    for part in _part_files(out, csv_name):
        done |= done_images(part)
    return done


def merge_part_files(output_dir: str | os.PathLike, order: Sequence[str], csv_name: str = "scores.csv") -> int:
    """Merges the part files of a distributed run (and the rows already in ``csv_name``) into ``csv_name``: one row
    per image, in the order of ``order`` (images not in it last, in file order), written by atomic replace; the part
    files are then removed.

    Returns:
        The number of rows in the merged file.

    Raises:
        ValueError: when the files do not have the same columns.
    """
    out = Path(output_dir)
    target = out / csv_name
    sources = ([target] if target.exists() else []) + _part_files(out, csv_name)
    header, rows, seen = None, [], set()
    for src in sources:
        h, body, _ = read_complete_rows(src)
        if h is None:
            continue
        if header is None:
            header = h
        elif h != header:
            raise ValueError(f"Cannot merge {src}: its columns {h} differ from {header}.")
        for row in body:
            if row[0] not in seen:
                seen.add(row[0])
                rows.append(row)
    if header is None:
        return 0
    position = {p: i for i, p in enumerate(order)}
    rows.sort(key=lambda r: position.get(r[0], len(position)))  # stable: unknown rows keep their order
    write_csv_atomic(target, header, rows)
    for part in _part_files(out, csv_name):
        part.unlink()
    return len(rows)
