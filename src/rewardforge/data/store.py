"""Tokenized data as memory-mapped Arrow columns: written once in record batches, mapped by every process.

A built dataset is one Arrow IPC file (``data.arrow``, uncompressed) of record batches: token ids as
``large_list<int32>`` columns, prompt keys and extra fields as ``large_string`` columns, margins, labels and the
source of each example as plain numbers. It is opened with ``pyarrow.memory_map``, so its pages belong to the page
cache, not to a process: the processes of a node that open the same file share one copy, and the file may be larger
than memory. What a process holds privately is a few numbers per example (lengths, index arrays of a subset).

:class:`TokenColumn` and :class:`TextColumn` are the columns as Python sequences: ``column[i]`` reads one
example from the mapped buffers (a read-only int32 numpy view for token ids, no copy), ``take(idx)`` is a view
through an index array (a subset or a weighted mixture without copying the data).

Example:
    >>> import numpy as np
    >>> col = TokenColumn.from_arrays([np.array([1, 2], np.int32), np.array([3], np.int32)])
    >>> col[1].tolist(), col.lengths().tolist(), [x.tolist() for x in col.take([1, 1, 0])]
    ([3], [2, 1], [[3], [3], [1, 2]])
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

DATA_FILE = "data.arrow"
REPORT_FILE = "report.json"
TOKENS = pa.large_list(pa.int32())
FLOATS = pa.large_list(pa.float32())
TOKEN_LISTS = pa.large_list(TOKENS)  # lists of sequences (the K responses of a list, model.reward_model_type=listwise)


def plain_array(values: np.ndarray, type: pa.DataType) -> pa.Array:
    """A fixed-width Arrow array over a numpy array's buffer (no copy; ``pa.array`` would import pandas, ~0.35 s)."""
    values = np.ascontiguousarray(values, dtype=type.to_pandas_dtype())
    return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(values)])


def _offsets(lengths) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def list_array(values: pa.Array, lengths) -> pa.LargeListArray:
    """A ``large_list`` array of the rows ``values`` holds back to back, ``lengths[i]`` each (no copy of ``values``)."""
    return pa.LargeListArray.from_arrays(plain_array(_offsets(lengths), pa.int64()), values)


def token_array(values: np.ndarray, lengths: np.ndarray) -> pa.LargeListArray:
    """A ``large_list<int32>`` array of the sequences ``values`` holds back to back, ``lengths[i]`` each (no copy)."""
    return list_array(plain_array(values, pa.int32()), lengths)


def float_rows(values: np.ndarray) -> pa.LargeListArray:
    """A ``large_list<float32>`` array of the rows of a 2-d array (labels: one value per attribute)."""
    values = np.asarray(values, np.float32)
    n, width = values.shape
    return list_array(plain_array(values.reshape(-1), pa.float32()), np.full(n, width, np.int64))


def _view(array: pa.Array, dtype) -> np.ndarray:
    """The values of a fixed-width Arrow array without nulls as a read-only numpy view of its buffer (no copy; unlike
    ``to_numpy``, which imports pandas, ~0.35 s of a cached load)."""
    data = array.buffers()[1]
    if data is None:
        return np.zeros(0, dtype)
    return np.frombuffer(data, dtype)[array.offset : array.offset + len(array)]


class _Column(Sequence):
    """The chunks of one Arrow column as (offsets, values) numpy views, indexed through an optional index array."""

    def __init__(self, parts: list[tuple[np.ndarray, Any]], index: np.ndarray | None = None):
        self._parts = parts
        self._starts = [0]
        for offsets, _ in parts:
            self._starts.append(self._starts[-1] + len(offsets) - 1)
        self._index = index

    @classmethod
    def _of(cls, column: pa.ChunkedArray | pa.Array):
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        return cls([cls._part(c) for c in chunks if len(c)])

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else self._starts[-1]

    def _locate(self, i: int) -> tuple[np.ndarray, Any, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} examples")
        i = i % n
        if self._index is not None:
            i = int(self._index[i])
        c = bisect.bisect_right(self._starts, i) - 1 if len(self._parts) > 1 else 0
        offsets, values = self._parts[c]
        return offsets, values, i - self._starts[c]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        offsets, values, k = self._locate(int(i))
        return self._item(values, int(offsets[k]), int(offsets[k + 1]))

    def __iter__(self):
        if self._index is not None:
            for i in range(len(self)):
                yield self[i]
            return
        for offsets, values in self._parts:  # record batch by record batch, without locating each row
            bounds = offsets.tolist()
            for a, b in zip(bounds, bounds[1:]):
                yield self._item(values, a, b)

    def lengths(self) -> np.ndarray:
        """Items per row (tokens of a sequence, bytes of a string), int64, in this column's order."""
        full = np.concatenate([np.diff(o) for o, _ in self._parts]) if self._parts else np.zeros(0, np.int64)
        return full if self._index is None else full[self._index]

    def take(self, idx) -> "_Column":
        """The rows ``idx`` (repeats allowed), sharing this column's buffers."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"take: indices must be in [0, {len(self)})")
        return type(self)(self._parts, idx if self._index is None else self._index[idx])

    def __add__(self, other):  # list-like: ds.chosen + ds.rejected
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (Sequence, np.ndarray)) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(_same(a, b) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} rows)"


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    return a == b


class TokenColumn(_Column):
    """Token id sequences of a ``large_list<int32>`` column; ``column[i]`` is a read-only int32 view (no copy)."""

    @staticmethod
    def _part(chunk: pa.LargeListArray):
        return _view(chunk.offsets, np.int64), _view(chunk.values, np.int32)

    @staticmethod
    def _item(values, a: int, b: int) -> np.ndarray:
        return values[a:b]

    @classmethod
    def from_arrays(cls, arrays: Iterable[np.ndarray]) -> "TokenColumn":
        arrays = [np.asarray(a, np.int32) for a in arrays]
        values = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return cls._of(token_array(values, np.array([len(a) for a in arrays], np.int64)))


class TextColumn(_Column):
    """Strings of a ``large_string`` column, decoded when read."""

    @staticmethod
    def _part(chunk: pa.Array):
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        return offsets, (memoryview(data) if data is not None else memoryview(b""))

    @staticmethod
    def _item(values, a: int, b: int) -> str:
        return str(values[a:b], "utf-8", "surrogatepass")

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> "TextColumn":
        return cls._of(text_array(strings))


class JSONColumn(TextColumn):
    """JSON objects stored as strings (the extra fields of an example), parsed when read."""

    @staticmethod
    def _item(values, a: int, b: int) -> Any:
        return json.loads(str(values[a:b], "utf-8", "surrogatepass"))

    @classmethod
    def from_objects(cls, objects: Iterable[Any]) -> "JSONColumn":
        return cls._of(text_array(json.dumps(o) for o in objects))


def text_array(strings: Iterable[str]) -> pa.Array:
    """A ``large_string`` array of ``strings``."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]  # (prompt keys are hex; extras are JSON, escaped)
    offsets = _offsets([len(b) for b in encoded])
    return pa.Array.from_buffers(pa.large_string(), len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def numbers(column: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """A fixed-width column as one private numpy array (a few bytes per example)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_view(c, dtype) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def nested(column: pa.ChunkedArray | pa.Array) -> tuple[pa.ChunkedArray, np.ndarray]:
    """The inner rows of a ``large_list`` column (its chunks' values, no copy) and where each of its rows starts in
    them: int64 offsets, ``len(column) + 1`` of them, 0 first (a private array, 8 bytes per row).

    Example:
        >>> inner, offsets = nested(list_array(token_array(np.arange(3, dtype=np.int32), [1, 2, 0]), [2, 1]))
        >>> [x.tolist() for x in TokenColumn._of(inner)], offsets.tolist()
        ([[0], [1, 2], []], [0, 2, 3])
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    inner, offsets, base = [], [np.zeros(1, np.int64)], 0
    for c in chunks:
        if len(c):
            o = _view(c.offsets, np.int64)
            inner.append(c.values.slice(int(o[0]), int(o[-1] - o[0])))
            offsets.append(o[1:] - o[0] + base)
            base += int(o[-1] - o[0])
    return pa.chunked_array(inner, type=column.type.value_type), np.concatenate(offsets)


def list_values(column: pa.ChunkedArray | pa.Array, dtype) -> np.ndarray:
    """The values of a ``large_list`` column of fixed-width numbers, row after row, as one private numpy array."""
    return numbers(nested(column)[0], dtype)


def float_matrix(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A ``large_list<float32>`` column of rows of ``width`` values as an (n, width) private array."""
    return list_values(column, np.float32).reshape(len(column), width)


# ------------------------------------------------------------------ files


class TableWriter:
    """Writes record batches to ``data.arrow`` in a new directory that appears under its final name only when complete.

    Use as a context manager: on success the directory is renamed to ``path`` (an atomic rename: a reader never
    sees half a file); on an error it is removed. When another process completed the same entry first, its entry
    is kept and this one dropped (both hold the same data).
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"))
        self._sink = pa.OSFile(str(self.tmp / DATA_FILE), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def __enter__(self) -> "TableWriter":
        return self

    def finish(self, report: dict[str, Any]) -> None:
        """Close the file, write the report beside it and move the directory into place."""
        self._writer.close()
        self._sink.close()
        (self.tmp / REPORT_FILE).write_text(json.dumps(report))
        try:
            os.rename(self.tmp, self.path)
        except OSError:  # completed meanwhile by another process (same key: same data), or a damaged one is in the way
            if (self.path / REPORT_FILE).is_file():
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                shutil.rmtree(self.path, ignore_errors=True)
                os.rename(self.tmp, self.path)

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            try:
                self._writer.close()
                self._sink.close()
            except Exception:  # noqa: BLE001 - already failing; the directory goes either way
                pass
            shutil.rmtree(self.tmp, ignore_errors=True)


def open_table(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The mapped table and the report of a directory :class:`TableWriter` completed."""
    path = Path(path)
    report = json.loads((path / REPORT_FILE).read_text())
    table = pa.ipc.open_file(pa.memory_map(str(path / DATA_FILE), "r")).read_all()
    return table, report
