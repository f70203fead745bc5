"""Data sets: the standard MIA files, a synthetic Purchase100 stand-in, and the paper's splits.

Loaders (docs/DESIGN.md, "Data"): files are read from a path the user gives, never downloaded.

* :func:`load_shokri_csv` — Shokri-format CSV, one record per line, ``label,f1,...,fd``
  (Purchase100's ``dataset_purchase``, Location30's ``bangkok``), plain or inside a tar
  archive (``dataset_location.tgz``). Quoted labels (``"13",0,1,...``) and CRLF are fine.
* :func:`load_texas` — Texas100: a ``feats`` file (``f1,...,fd`` per line) and a ``labels``
  file (one label per line), in a directory or a tar archive.
* :func:`load_npz` / :func:`save_npz` — ``.npz`` with arrays ``x`` ``[N, d]``, ``y`` ``[N]``
  and optionally ``classes``.
* :func:`from_arrays` — numpy arrays or tensors already in memory.
* :func:`load_dataset` — any of the above, chosen from the path.

Text files are parsed once and cached as ``.npz`` (written atomically: a temporary file, then
``os.replace``), keyed by the source's absolute path, size, modification and change times and
inode, so editing or replacing the source invalidates the cache (also when the modification
time is restored, as ``cp -p`` and ``rsync -t`` do). The cache is checksummed; a cache file that
fails to load or to verify is reported with a warning and rebuilt, never trusted.

Labels are remapped to ``0..k-1`` in sorted order of the original labels, and the mapping is
kept: ``dataset.classes[i]`` is the original label of class ``i``.

Bad files raise :class:`DataError`, a ``ValueError`` whose message names the file and the
line (1-based, counted in the decompressed text).

:func:`synthetic_purchase` makes a seeded data set with Purchase100's shape, the embedded
default for demos and tests; :func:`make_splits` draws the paper's Train / Test / Known /
Target sets plus the adversary's shadow pool (see :class:`Splits` for what each one is).
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import MAX_SIZE, check_int as _check_int, check_seed, tensor_to_numpy

__all__ = [
    "DataError", "Dataset", "load_shokri_csv", "load_texas", "load_npz", "save_npz",
    "from_arrays", "load_dataset", "default_cache_dir", "synthetic_purchase", "Splits",
    "make_splits", "SPLIT_PRESETS",
]

PathLike = Union[str, os.PathLike]

_BLOCK_BYTES = 1 << 24  # text parsed per step: bounds the float64 temporaries (~64 MiB)
_CACHE_VERSION = 1  # bump when the parser or the cache layout changes: old caches are ignored
_FORMATS = ("auto", "shokri", "texas", "npz")


class DataError(ValueError):
    """A data file that cannot be read as the format asks; the message names file and line."""


# ----------------------------------------------------------------------------- Dataset

@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled data set in memory.

    Attributes:
        x: ``[N, d]`` float32 features, CPU, contiguous.
        y: ``[N]`` int64 class indices in ``0..k-1``.
        classes: ``classes[i]`` is the original label of class index ``i`` (sorted).
        name: a short name for reports (the file's stem for loaded files).
    """

    x: Tensor
    y: Tensor
    classes: tuple
    name: str = "dataset"

    def __post_init__(self):
        if not isinstance(self.x, Tensor) or not isinstance(self.y, Tensor):
            raise TypeError(f"Dataset x and y must be tensors, got {type(self.x).__name__} "
                            f"and {type(self.y).__name__}")
        if self.x.dtype != torch.float32 or self.x.dim() != 2 or self.x.device.type != "cpu" \
                or not self.x.is_contiguous():
            raise ValueError(f"Dataset x must be a contiguous float32 CPU tensor [N, d], got "
                             f"{self.x.dtype} {tuple(self.x.shape)} on {self.x.device}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],) \
                or self.y.device.type != "cpu":
            raise ValueError(f"Dataset y must be an int64 CPU tensor [{self.x.shape[0]}], got "
                             f"{self.y.dtype} {tuple(self.y.shape)} on {self.y.device}")
        if not isinstance(self.classes, tuple) or len(self.classes) < 2:
            raise ValueError(f"Dataset classes must be a tuple of at least two classes (a "
                             f"classification task), got {self.classes!r}")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise ValueError(f"Dataset y must hold class indices in 0..{len(self.classes) - 1}, "
                             f"got {int(self.y.min())}..{int(self.y.max())}")

    @property
    def n(self) -> int:
        """Number of rows."""
        return self.x.shape[0]

    @property
    def d(self) -> int:
        """Number of features."""
        return self.x.shape[1]

    @property
    def k(self) -> int:
        """Number of classes (of the whole data set, also for a subset lacking some)."""
        return len(self.classes)

    def subset(self, idx) -> "Dataset":
        """The rows ``idx`` (int indices in [-N, N), or a bool mask of length N), with the
        same classes."""
        if isinstance(idx, (list, tuple)) and len(idx) == 0:
            idx = torch.zeros(0, dtype=torch.long)  # torch.as_tensor([]) is float32
        idx = torch.as_tensor(idx).cpu()
        if idx.dtype == torch.bool:
            if idx.shape != (self.n,):
                raise ValueError(f"subset: a bool mask must have shape [{self.n}], "
                                 f"got {tuple(idx.shape)}")
        elif idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"subset: idx must hold integer indices or a bool mask, "
                            f"got {idx.dtype}")
        else:
            if idx.dim() != 1:
                raise ValueError(f"subset: idx must be 1-D, got shape {tuple(idx.shape)}")
            idx = idx.long()  # torch reads a uint8 index tensor as a mask
            if idx.numel() and not (-self.n <= int(idx.min()) and int(idx.max()) < self.n):
                bad = int(idx[(idx < -self.n) | (idx >= self.n)][0])
                raise IndexError(f"subset: index {bad} is out of range for a data set of "
                                 f"{self.n} rows")
        return Dataset(self.x[idx].contiguous(), self.y[idx].contiguous(), self.classes,
                       self.name)

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, n={self.n}, d={self.d}, k={self.k})"


def _remap_labels(labels: np.ndarray) -> Tuple[np.ndarray, tuple]:
    """(int64 indices into the sorted distinct labels, those labels as a tuple)."""
    classes, y = np.unique(labels, return_inverse=True)
    return y.reshape(-1).astype(np.int64), tuple(classes.tolist())


def _integral_labels(labels: np.ndarray) -> np.ndarray:
    """Float labels that are whole numbers as int64 (labels of other dtypes unchanged)."""
    if labels.dtype.kind == "f":
        return labels.astype(np.int64)
    return labels


def _make_dataset(x: np.ndarray, labels: np.ndarray, name: str) -> Dataset:
    y, classes = _remap_labels(_integral_labels(labels))
    if len(classes) < 2:  # said here, in terms of y (Dataset would name its classes tuple)
        raise ValueError(f"y holds one label ({classes[0]!r}) on every row; a classification "
                         f"data set needs at least two classes")
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return Dataset(x_t, torch.from_numpy(y), classes, name)


def _check_features(x) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[N, d]`` array with N >= 1 and d >= 1, all finite."""
    if isinstance(x, Tensor):
        x_np = tensor_to_numpy(x)
    else:
        try:
            x_np = np.asarray(x)
        except ValueError as exc:  # nested lists of unequal lengths
            raise ValueError(f"x must be a rectangular [N, d] array of numbers ({exc})") \
                from None
    if x_np.dtype.kind not in "biuf":
        raise TypeError(f"x must hold numbers, got dtype {x_np.dtype}")
    if x_np.ndim != 2:
        raise ValueError(f"x must be 2-D [N, d], got shape {x_np.shape}")
    if x_np.shape[0] == 0:
        raise ValueError("x has no rows")
    if x_np.shape[1] == 0:
        raise ValueError(f"x has no features (shape {x_np.shape}, d = 0)")
    x32 = np.ascontiguousarray(x_np, dtype=np.float32)
    if not np.isfinite(x32).all():
        row, col = np.argwhere(~np.isfinite(x32))[0]
        raise ValueError(f"x must be finite (in float32), got {x_np[row, col]} at row {row}, "
                         f"column {col}")
    return x32


def _unmasked(value, name: str):
    """``value``'s data when it is a numpy masked array with nothing masked; np.asarray
    would drop a mask silently, so masked entries are refused."""
    if not isinstance(value, np.ma.MaskedArray):
        return value
    masked = int(np.ma.getmaskarray(value).sum())
    if masked:
        raise ValueError(f"{name} is a masked array with {masked} masked entries; oni does "
                         f"not read masks: fill them ({name}.filled(value)) or drop their rows "
                         f"first")
    return np.ma.getdata(value)


def from_arrays(x, y, *, name: str = "arrays") -> Dataset:
    """A :class:`Dataset` from arrays in memory.

    Args:
        x: ``[N, d]`` numeric features (numpy array, tensor or nested lists); finite.
        y: ``[N]`` labels: integers, whole-number floats, strings or bools; remapped to
            ``0..k-1`` in sorted order, the original labels kept in ``classes``.
        name: the data set's name.

    Raises:
        TypeError: non-numeric features.
        ValueError: wrong shapes (d = 0 included), non-finite features, fractional labels,
            a single label on every row, masked entries (numpy masked arrays).
    """
    x32 = _check_features(_unmasked(x, "x"))
    y = _unmasked(y, "y")
    y_np = tensor_to_numpy(y) if isinstance(y, Tensor) else np.asarray(y)
    if y_np.ndim != 1 or y_np.shape[0] != x32.shape[0]:
        raise ValueError(f"y must be 1-D with one label per row of x ([{x32.shape[0]}]), "
                         f"got shape {y_np.shape}")
    if y_np.dtype.kind == "f":
        # whole numbers that an int64 holds exactly (beyond 2**63 the cast would wrap)
        bad = np.flatnonzero(~np.isfinite(y_np) | (y_np != np.round(y_np))
                             | (np.abs(y_np) >= 2.0 ** 63))
        if bad.size:
            raise ValueError(f"y must hold whole-number labels within int64, got "
                             f"{y_np[bad[0]]} at row {bad[0]}")
    elif y_np.dtype.kind not in "biuUS":
        raise TypeError(f"y must hold integer, whole-number float, string or bool labels, "
                        f"got dtype {y_np.dtype}")
    return _make_dataset(x32, y_np, name)


# ----------------------------------------------------------------------------- text parsing

_NEWLINE_TO_COMMA = bytes.maketrans(b"\n", b",")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # np.load's test for an .npz: a zip entry or end
_UTF8_BOM = b"\xef\xbb\xbf"  # some editors (Excel, Notepad) start UTF-8 text with it
# a CR that ends no line: CRs before a newline are line ends (CRLF; CRCRLF from Windows
# text-mode writes of csv's own CRLF), deleted before parsing
_LONE_CR = re.compile(rb"\r(?!\r*\n)")


def _complete_lines(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """Blocks of whole lines (each ending in a newline) from ``read(size)``; blank lines at
    the end of the stream are dropped, blank lines before the last record are kept (and
    reported by the parser)."""
    rest = b""
    while True:
        data = read(_BLOCK_BYTES)
        if not data:
            break
        data = rest + data
        cut = data.rfind(b"\n") + 1
        content = len(data[:cut].rstrip())
        if content == 0:  # only blank lines so far: they may turn out to be trailing
            rest = data
            continue
        end = data.index(b"\n", content) + 1  # the newline closing the last non-blank line
        yield data[:end]
        rest = data[end:]
    if rest.strip():
        yield rest.rstrip() + b"\n"


class _TableParser:
    """Comma-separated numbers, one record per line, all lines with the same field count.

    Fed blocks of whole lines; keeps the line count for messages. Values come out as the
    first column in float64 (labels must be checked exactly) and the rest in float32 (uint8
    for single-digit fields).
    """

    def __init__(self, source: str, min_fields: int, what: str):
        self.source = source  # the file as named in messages
        self.min_fields = min_fields
        self.what = what  # what a record holds, for messages
        self.lines = 0  # lines parsed so far
        self.n_fields: Optional[int] = None
        self.first_line = 1  # the line that set n_fields
        self.first_col: List[np.ndarray] = []
        self.rest: List[np.ndarray] = []

    def error(self, line: int, message: str) -> DataError:
        return DataError(f"{self.source}, line {line}: {message}")

    def feed(self, block: bytes) -> None:
        first = self.lines + 1  # line number of the block's first line
        if first == 1 and block.startswith(_UTF8_BOM):
            block = block[len(_UTF8_BOM):]
        if b"\r" in block:
            lone = _LONE_CR.search(block)
            if lone:
                self._raise_lone_cr(block, first, lone.start())
        text = block.translate(None, b'"\r')  # quoted labels ("13"), CRLF line ends
        lines = text.split(b"\n")[:-1]
        if self.n_fields is None:
            if not lines[0].strip():
                raise self.error(first, "empty line (records must start on line 1)")
            self.n_fields = lines[0].count(b",") + 1
            self.first_line = first
            if self.n_fields < self.min_fields:
                raise self.error(first, f"{self.n_fields} field(s), expected "
                                 f"{self.what} (at least {self.min_fields} comma-separated "
                                 f"fields)")
        values = self._single_digit_fast_path(lines)
        if values is None:
            self._check_field_counts(text, first)
            values = self._parse_numbers(text, first, len(lines))
        self.first_col.append(values[0])
        self.rest.append(values[1])
        self.lines += len(lines)

    def _raise_lone_cr(self, block: bytes, first: int, at: int) -> None:
        # deleting it, as for CRLF, would join the lines around it into one record
        raise self.error(first + block.count(b"\n", 0, at), "a carriage return (\\r) not "
                         "followed by a newline: CR-only line endings (old Mac text)? records "
                         "must end in \\n or \\r\\n (convert with: tr '\\r' '\\n')")

    def _check_field_counts(self, text: bytes, first: int) -> None:
        """Raises for the first empty line or line with another number of fields."""
        buf = np.frombuffer(text, np.uint8)
        ends = np.flatnonzero(buf == ord("\n"))
        starts = np.concatenate(([0], ends[:-1] + 1))
        fields = np.add.reduceat(buf == ord(","), starts, dtype=np.int64) + 1
        for i in np.flatnonzero((fields != self.n_fields) | (ends == starts)).tolist()[:1]:
            if not text[starts[i]:ends[i]].strip():
                raise self.error(first + i, "empty line (records must be on consecutive "
                                 "lines)")
            raise self.error(first + i, f"{int(fields[i])} fields, expected {self.n_fields} "
                             f"like line {self.first_line} (ragged rows: every record must "
                             f"hold {self.what})")

    def _single_digit_fast_path(self, lines: List[bytes]):
        """Binary (or single-digit) features without a float parse: after the first comma,
        a line is ``d,d,...,d``, so the lines' tails joined by commas form a fixed-width
        byte matrix whose even columns are the digits and odd columns the commas. Returns
        None when the block does not have that layout (the general parser takes it and
        reports what is wrong)."""
        width = 2 * (self.n_fields - 1)  # the tail's bytes plus the joining comma
        if width == 0:
            return None
        cuts = [line.find(b",") for line in lines]
        tails = [line[c + 1:] for line, c in zip(lines, cuts)]
        if -1 in cuts or any(len(tail) != width - 1 for tail in tails):
            return None
        body = np.frombuffer(b",".join(tails) + b",", np.uint8).reshape(len(lines), width)
        digits = body[:, 0::2] - np.uint8(ord("0"))  # non-digits wrap around to > 9
        if digits.max() > 9 or not np.all(body[:, 1::2] == ord(",")):
            return None
        labels = _fromstring(b",".join(line[:c] for line, c in zip(lines, cuts)))
        if labels is None or labels.size != len(lines) or not np.isfinite(labels).all():
            return None
        return labels, digits

    def _parse_numbers(self, text: bytes, first: int, n_lines: int):
        values = _fromstring(text[:-1].translate(_NEWLINE_TO_COMMA))
        if values is None or values.size != n_lines * self.n_fields:
            self._raise_bad_field(text, first)
            # a mismatch the field-by-field check could not pin on one field
            raise self.error(first, f"the {n_lines} lines from here do not parse as "
                             f"{n_lines} x {self.n_fields} numbers")
        values = values.reshape(n_lines, self.n_fields)
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            features = values[:, 1:].astype(np.float32)
        # finite in float64 is not enough: the features are kept as float32
        bad = np.argwhere(~np.isfinite(np.hstack([values[:, :1], features])))
        if bad.size:
            row, col = (int(v) for v in bad[0])
            raise self.error(first + row, f"field {col + 1} is {values[row, col]}, "
                             f"expected a finite number" + (" within float32's range"
                                                            if col else ""))
        return values[:, 0].copy(), features

    def _raise_bad_field(self, text: bytes, first: int) -> None:
        """Finds the first field that is not a number, line by line, and raises for it."""
        for i, line in enumerate(text.split(b"\n")[:-1]):
            if not line.strip():
                raise self.error(first + i, "empty line (records must be on consecutive "
                                 "lines)")
            for j, field in enumerate(line.split(b",")):
                token = field.strip()
                if not token:
                    what = "missing label" if j == 0 and self.min_fields >= 2 else "empty field"
                    raise self.error(first + i, f"{what}: field {j + 1} is empty")
                try:
                    float(token)
                except ValueError:
                    hint = (" (a header line? these files have none)" if first + i == 1
                            else "")
                    raise self.error(first + i, f"field {j + 1} is "
                                     f"{token.decode('latin-1')!r}, not a number{hint}") \
                        from None
                if _fromstring(token) is None:  # float() is laxer than numpy (e.g. '1_0')
                    raise self.error(first + i, f"field {j + 1} is "
                                     f"{token.decode('latin-1')!r}, not a plain number")

    def finish(self) -> Tuple[np.ndarray, np.ndarray]:
        """(first column float64 [N], other columns [N, fields - 1] float32 or uint8)."""
        if self.n_fields is None:
            raise DataError(f"{self.source}, line 1: the file is empty (no records)")
        first = np.concatenate(self.first_col)
        # uint8 digits from the fast path stay uint8 (4x less memory) unless a block needed
        # the general parser; the data set converts to float32 once
        rest = np.concatenate(self.rest) if len(self.rest) > 1 else self.rest[0]
        return first, rest


def _fromstring(text: bytes) -> Optional[np.ndarray]:
    """Comma-separated numbers as float64, or None when some field is not a number."""
    # numpy reads a field of blanks (" ") as -1 where it refuses an empty one: refuse both
    squeezed = text.translate(None, b" \t\v\f")
    if b",," in squeezed or squeezed.startswith(b",") or squeezed.endswith(b","):
        return None
    try:
        with warnings.catch_warnings():
            # older numpy warns and returns what it read instead of raising at a bad field
            warnings.simplefilter("error", DeprecationWarning)
            return np.fromstring(text, dtype=np.float64, sep=",")
    except (ValueError, DeprecationWarning):
        return None


def _parse_stream(read: Callable[[int], bytes], source: str, min_fields: int, what: str,
                  on_read_error: Optional[Callable[[BaseException, int], DataError]] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    parser = _TableParser(source, min_fields, what)
    blocks = _complete_lines(read)
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            break
        except _ARCHIVE_ERRORS as exc:
            if on_read_error is None:
                raise
            raise on_read_error(exc, parser.lines) from exc
        parser.feed(block)
    return parser.finish()


_EXACT_LABEL_LIMIT = 2.0 ** 53  # float64 (the parser's type) holds every integer below it


def _check_labels(labels: np.ndarray, features: Optional[np.ndarray], source: str,
                  where: str = "field 1", hint: str = "; the label column looks out of "
                  "place (Shokri-format files put the integer class label first)") -> None:
    """Labels must be whole numbers below 2**53 in magnitude, more than one class, and (for
    label-first files whose features are 0/1) not a feature column with the real labels at
    the end of the line. ``hint`` is added when several labels are fractional."""
    if features is not None and features.shape[1] >= 2:
        last = features[:, -1]
        looks_like_feature = np.isin(labels, (0.0, 1.0)).all()
        last_is_label = (last == np.round(last)).all() and not np.isin(last, (0.0, 1.0)).all()
        if looks_like_feature and last_is_label and np.isin(features[:, :-1], (0.0, 1.0)).all():
            row = int(np.flatnonzero(~np.isin(last, (0.0, 1.0)))[0])
            raise DataError(
                f"{source}, line {row + 1}: the label column looks out of place: "
                f"field 1 holds only 0/1 like the features, while the last field (field "
                f"{features.shape[1] + 1}) holds integers such as {last[row]:g}, so the "
                f"labels seem to be in the last column; Shokri-format files put the label "
                f"first (reorder the columns, or use from_arrays)")
    fractional = np.flatnonzero(labels != np.round(labels))
    if fractional.size:
        row = int(fractional[0])
        # one stray value is a typo; a column of them is a feature column
        why = (f"; {fractional.size} of {labels.size} labels are not whole numbers{hint}"
               if fractional.size > 1 else "")
        raise DataError(f"{source}, line {row + 1}: the label ({where}) is "
                        f"{float(labels[row])!r}, not a whole number{why}")
    huge = np.flatnonzero(np.abs(labels) >= 2.0 ** 63)  # the int64 cast would wrap
    if huge.size:
        row = int(huge[0])
        raise DataError(f"{source}, line {row + 1}: the label ({where}) is {labels[row]:g}, "
                        f"beyond the int64 range of class labels")
    # 2**53 + 1 parses as 2**53: neighbouring labels would merge into one class
    inexact = np.flatnonzero(np.abs(labels) >= _EXACT_LABEL_LIMIT)
    if inexact.size:
        row = int(inexact[0])
        raise DataError(f"{source}, line {row + 1}: the label ({where}) is about "
                        f"{labels[row]:.6g}, not below 2**53 = 9007199254740992 in magnitude: "
                        f"labels are parsed as float64, which cannot tell such integers apart "
                        f"(renumber the classes, or use from_arrays with int64 labels)")
    if np.unique(labels).size < 2:
        raise DataError(f"{source}, line 1: every record has the label {labels[0]:g} "
                        f"({where}); a classification data set needs at least two classes")


# ----------------------------------------------------------------------------- archives

_ARCHIVE_ERRORS = (EOFError, OSError, tarfile.TarError, zlib.error, lzma.LZMAError)


def _is_archive(path: Path) -> bool:
    """A tar archive, compressed (gzip, bzip2, xz) or not, judged by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(262)
    return (any(head.startswith(magic) for magic, _, _ in _COMPRESSIONS)
            or head[257:262] == b"ustar")


_COMPRESSIONS = ((b"\x1f\x8b", "gzip", gzip.open), (b"BZh", "bzip2", bz2.open),
                 (b"\xfd7zXZ\x00", "xz", lzma.open))


def _compressed_non_tar(path: Path) -> Optional[str]:
    """The compression ("gzip", "bzip2", "xz") of a file that decompresses fine but holds no
    tar archive (a compressed CSV), else None (corrupt or truncated data included)."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name, opener in _COMPRESSIONS:
        if head.startswith(magic):
            try:
                with opener(path, "rb") as stream:
                    block = stream.read(tarfile.BLOCKSIZE)
            except _ARCHIVE_ERRORS:
                return None
            try:
                tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.EOFHeaderError:  # zero blocks: an (empty) tar archive
                return None
            except tarfile.HeaderError:
                return name
            return None
    return None


def _is_hidden(name: str) -> bool:
    return Path(name).name.startswith(".")  # macOS '._*' forks and the like


def _archive_members(path: Path) -> Iterator[Tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The regular, non-hidden files of a tar archive in one streaming pass (each archive is
    decompressed once); a truncated or corrupt archive raises a DataError."""
    try:
        archive = tarfile.open(path, "r|*")
    except _ARCHIVE_ERRORS as exc:
        compression = _compressed_non_tar(path)
        if compression:
            raise DataError(f"{path}, line 1: {compression}-compressed, but not a tar archive "
                            f"(a compressed CSV? decompress it first)") from exc
        raise DataError(f"{path}, line 1: not a readable tar archive (truncated or "
                        f"corrupt?): {exc}") from exc
    with archive:
        last = None
        while True:
            try:
                member = archive.next()
            except _ARCHIVE_ERRORS as exc:
                where = f"after member {last!r}" if last else "in its first header"
                raise DataError(f"{path}, line 1: the archive is truncated or corrupt "
                                f"{where} ({type(exc).__name__}: {exc})") from exc
            if member is None:
                return
            if member.isfile() and not _is_hidden(member.name):
                last = member.name
                yield archive, member


def _first_member_name(path: Path) -> Optional[str]:
    for _, member in _archive_members(path):
        return member.name
    return None


def _archive_read_error(path: Path, member: str) -> Callable[[BaseException, int], DataError]:
    def make(exc: BaseException, lines: int) -> DataError:
        return DataError(f"{path}, line {lines + 1}: the archive is truncated or corrupt: "
                         f"reading member {member!r} failed after line {lines} "
                         f"({type(exc).__name__}: {exc})")
    return make


def _parse_member(archive: tarfile.TarFile, path: Path, member: tarfile.TarInfo,
                  min_fields: int, what: str) -> Tuple[np.ndarray, np.ndarray]:
    stream = archive.extractfile(member)
    return _parse_stream(stream.read, f"{path}:{member.name}", min_fields, what,
                         on_read_error=_archive_read_error(path, member.name))


def _parse_file(path: Path, min_fields: int, what: str) -> Tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        head = f.read(8)
        # numpy's files are binary: named as such, not as a text line that fails to parse
        if head.startswith((*_ZIP_MAGIC, np.lib.format.MAGIC_PREFIX)):
            how = ("a .npy array, not a text file of records (a data set .npz holds x "
                   "and y: np.savez(path, x=x, y=y))"
                   if head.startswith(np.lib.format.MAGIC_PREFIX) else
                   "a zip archive (an .npz?), not a text file of records: read an .npz as "
                   "format 'npz' (load_npz)")
            raise DataError(f"{path}, line 1: {how}")
        f.seek(0)
        return _parse_stream(f.read, str(path), min_fields, what)


# ----------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/oni``, else ``~/.cache/oni``: where caches go when the source's
    directory is not writable."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "oni"


def _writable_dir(directory: Path) -> bool:
    # Root passes os.access on any directory: also honour the permission bits, so a data
    # directory made read-only on purpose stays clean.
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return os.access(directory, os.W_OK) and bool(mode & 0o222)


def _cache_dirs(source: Path, cache_dir: Optional[PathLike]) -> List[Path]:
    if cache_dir is not None:
        return [Path(cache_dir)]
    beside = source.parent if source.is_file() else source
    dirs = [beside] if _writable_dir(beside) else []
    return dirs + [default_cache_dir()]


def _cache_key(kind: str, sources: Sequence[Path], member: Optional[str]) -> str:
    stats = []
    for src in sources:
        st = src.stat()
        # size and mtime alone miss a same-size replacement whose mtime was restored
        # (os.utime, cp -p, rsync -t, coarse clocks): a new inode or any write or utime
        # (which sets ctime) changes the key too
        stats.append([str(src.resolve()), st.st_size, st.st_mtime_ns, st.st_ino,
                      st.st_ctime_ns])
    blob = json.dumps({"version": _CACHE_VERSION, "kind": kind, "sources": stats,
                       "member": member}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _checksum(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _arrays_for_npz(dataset: Dataset) -> Dict[str, np.ndarray]:
    x = dataset.x.numpy()
    x8 = x.astype(np.uint8)
    # binary/small-count data stored as uint8: 4x smaller, exact
    x_store = x8 if np.array_equal(x8, x) else x
    classes = np.asarray(dataset.classes)
    if classes.dtype.kind == "f" and all(isinstance(c, int) for c in dataset.classes):
        # uint64 labels beyond int64: numpy picks float64, which merges neighbours
        classes = np.array(dataset.classes, dtype=np.uint64)
    return {"x": x_store, "y": dataset.y.numpy(), "classes": classes,
            "name": np.asarray(dataset.name)}


def _atomic_savez(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """``np.savez`` to a temporary file beside ``path``, then ``os.replace``: a reader never
    sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_cache(path: Path, dataset: Dataset, key: str) -> None:
    arrays = _arrays_for_npz(dataset)
    meta = {"version": _CACHE_VERSION, "key": key, "x_crc32": _checksum(arrays["x"]),
            "y_crc32": _checksum(arrays["y"]), "n": dataset.n, "d": dataset.d,
            "k": dataset.k}
    arrays["meta"] = np.asarray(json.dumps(meta))
    _atomic_savez(path, arrays)


def _read_cache(path: Path, key: str) -> Tuple[Optional[Dataset], str]:
    """(the cached data set, "") or (None, why the file is not to be trusted)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta.get("version") != _CACHE_VERSION or meta.get("key") != key:
                return None, "written for another source or version"
            x, y, classes = npz["x"], npz["y"], npz["classes"]
            name = str(npz["name"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    if _checksum(x) != meta.get("x_crc32") or _checksum(y) != meta.get("y_crc32"):
        return None, "checksum mismatch"
    if x.shape != (meta.get("n"), meta.get("d")) or classes.shape != (meta.get("k"),):
        return None, "shape mismatch"
    try:
        return Dataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y),
                       tuple(classes.tolist()), name), ""
    except (TypeError, ValueError) as exc:
        return None, f"invalid contents: {exc}"


def _cached(kind: str, sources: Sequence[Path], member: Optional[str], name: str,
            cache_dir: Optional[PathLike], parse: Callable[[], Dataset]) -> Dataset:
    """``parse()`` once per source version; later calls load the checksummed cache."""
    key = _cache_key(kind, sources, member)
    file_name = f"{name}.oni-{key[:16]}.npz"
    dirs = _cache_dirs(sources[0], cache_dir)
    for directory in dirs:
        path = directory / file_name
        if path.is_file():
            dataset, why = _read_cache(path, key)
            if dataset is not None:
                return dataset
            warnings.warn(f"ignoring the cache file {path} ({why}); parsing "
                          f"{sources[0]} again", stacklevel=3)
    dataset = parse()
    failures = []
    for directory in dirs:
        try:
            _write_cache(directory / file_name, dataset, key)
            break
        except OSError as exc:
            failures.append(f"{directory}: {exc}")
    else:
        warnings.warn(f"could not cache {sources[0]} ({'; '.join(failures)}); it will be "
                      f"parsed again next time", stacklevel=3)
    return dataset


# ----------------------------------------------------------------------------- loaders

def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".csv",
                   ".txt", ".npz"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not (path.is_file() or path.is_dir()):
        # a FIFO would block until a writer comes, and a pipe's data cannot be read twice
        # (the cache key hashes the file before it is parsed)
        raise DataError(f"{path}: not a regular file or directory (a pipe, socket or "
                        f"device); save the data to a file first")
    return path


def _shokri_dataset(labels: np.ndarray, features: np.ndarray, source: str,
                    name: str) -> Dataset:
    _check_labels(labels, features, source)
    return _make_dataset(features, labels, name)


def load_shokri_csv(path: PathLike, *, cache_dir: Optional[PathLike] = None,
                    member: Optional[str] = None) -> Dataset:
    """A Shokri-format CSV file: one record per line, ``label,f1,...,fd``, no header.

    Lines may end in LF, CRLF or CRCRLF; a UTF-8 byte-order mark and quoted labels are read.

    Args:
        path: the text file (``dataset_purchase``, ``bangkok``) or a tar archive holding it
            (``dataset_location.tgz``; gzip, bzip2, xz or none).
        cache_dir: where the parsed ``.npz`` cache goes; default beside the source when
            that directory is writable, else :func:`default_cache_dir`.
        member: the archive member to read, when the archive holds more than one file.

    Returns:
        The data set, labels remapped to ``0..k-1`` (``classes`` holds the file's labels).

    Raises:
        FileNotFoundError: no such path.
        TypeError / ValueError: ``member`` not a str, or given for a file that is not an
            archive.
        DataError: an empty file, ragged rows, a field that is not a number, a missing
            label, a label that is not a whole number, sits in the wrong column or reaches
            2**53 in magnitude, a single class, CR-only line endings, a compressed file that
            holds no tar archive, a truncated archive; the message names the file and the
            line.
    """
    path = _existing(path)
    what = "a label followed by the features"
    if path.is_dir():
        raise DataError(f"{path}, line 1: a directory, expected a Shokri-format CSV file "
                        f"(or a tar archive holding one)")
    if member is not None and not isinstance(member, str):
        raise TypeError(f"load_shokri_csv: member must be a str (an archive member's name), "
                        f"got {type(member).__name__}")
    name = _stem(path)
    if not _is_archive(path):
        if member is not None:  # silently reading the whole file would ignore the request
            raise ValueError(f"load_shokri_csv: member={member!r} picks a file inside a tar "
                             f"archive, but {path} is not a tar archive (leave member out)")

        def parse() -> Dataset:
            labels, features = _parse_file(path, 2, what)
            return _shokri_dataset(labels, features, str(path), name)
        return _cached("shokri", [path], None, name, cache_dir, parse)

    def parse_archive() -> Dataset:
        parsed, names = None, []
        for archive, info in _archive_members(path):
            names.append(info.name)
            if member is not None and info.name != member:
                continue
            if parsed is not None:
                raise DataError(f"{path}, line 1: the archive holds more than one file "
                                f"({', '.join(names)}); pass member= to choose one")
            parsed = (info.name, _parse_member(archive, path, info, 2, what))
        if parsed is None:
            wanted = f"no member {member!r}" if member is not None else "no file"
            raise DataError(f"{path}, line 1: {wanted} in the archive (it holds {names})")
        source, (labels, features) = f"{path}:{parsed[0]}", parsed[1]
        return _shokri_dataset(labels, features, source, name)
    return _cached("shokri", [path], member, name, cache_dir, parse_archive)


def _texas_dataset(feats: Tuple[np.ndarray, np.ndarray], labels: Tuple[np.ndarray, np.ndarray],
                   feats_source: str, labels_source: str, name: str) -> Dataset:
    first, rest = feats
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
        first = first.astype(np.float32)
    # the parser checks a line's first field as a Shokri label, finite in float64 only;
    # here it is a feature, kept as float32 like the others
    if not np.isfinite(first).all():
        row = int(np.argmax(~np.isfinite(first)))
        raise DataError(f"{feats_source}, line {row + 1}: field 1 is {feats[0][row]}, "
                        f"expected a finite number within float32's range")
    features = np.concatenate([first[:, None], rest], axis=1)
    label_values = labels[0]
    if labels[1].shape[1] != 0:
        raise DataError(f"{labels_source}, line 1: {labels[1].shape[1] + 1} fields, expected "
                        f"one label per line")
    if len(label_values) != len(features):
        short, long_ = ((labels_source, feats_source) if len(label_values) < len(features)
                        else (feats_source, labels_source))
        line = min(len(label_values), len(features)) + 1
        raise DataError(f"{short}, line {line}: ends after {line - 1} records, but "
                        f"{long_} has {max(len(label_values), len(features))} "
                        f"(feats and labels must have one line per record)")
    _check_labels(label_values, None, labels_source, where="the line's only field", hint="")
    return _make_dataset(features, label_values, name)


def load_texas(path: PathLike, *, cache_dir: Optional[PathLike] = None) -> Dataset:
    """Texas100 in its distribution layout: ``feats`` (``f1,...,fd`` per line) and
    ``labels`` (one label per line, same order).

    Args:
        path: a directory holding ``feats`` and ``labels`` (``texas/100``), or a tar
            archive holding one of each (``dataset_texas.tgz``).
        cache_dir: as for :func:`load_shokri_csv`.

    Raises:
        FileNotFoundError: no such path, or a directory without ``feats`` and ``labels``.
        DataError: as for :func:`load_shokri_csv`, and feats/labels of different lengths.
    """
    path = _existing(path)
    name = _stem(path)
    if path.is_dir():
        feats, labels = path / "feats", path / "labels"
        for f in (feats, labels):
            if not f.is_file():
                raise FileNotFoundError(f"{path}: no {f.name!r} file (a Texas100 directory "
                                        f"holds 'feats' and 'labels')")
        if name.isdigit():  # texas/100 -> texas100
            name = path.resolve().parent.name + name

        def parse() -> Dataset:
            return _texas_dataset(_parse_file(feats, 1, "the features"),
                                  _parse_file(labels, 1, "one label"),
                                  str(feats), str(labels), name)
        return _cached("texas", [feats, labels], None, name, cache_dir, parse)

    if not _is_archive(path):
        raise DataError(f"{path}, line 1: expected a Texas100 directory or tar archive "
                        f"(with 'feats' and 'labels'), got a plain file")
    def parse_archive() -> Dataset:
        parsed: Dict[str, Tuple[str, Tuple[np.ndarray, np.ndarray]]] = {}
        for archive, info in _archive_members(path):
            role = Path(info.name).name
            if role not in ("feats", "labels"):
                continue
            if role in parsed:
                raise DataError(f"{path}, line 1: more than one {role!r} file in the archive "
                                f"({parsed[role][0]}, {info.name})")
            spec = (1, "the features") if role == "feats" else (1, "one label")
            parsed[role] = (info.name, _parse_member(archive, path, info, *spec))
        missing = [role for role in ("feats", "labels") if role not in parsed]
        if missing:
            raise DataError(f"{path}, line 1: no {' or '.join(repr(m) for m in missing)} file "
                            f"in the archive (Texas100 has 'feats' and 'labels')")
        return _texas_dataset(parsed["feats"][1], parsed["labels"][1],
                              f"{path}:{parsed['feats'][0]}", f"{path}:{parsed['labels'][0]}",
                              name)
    return _cached("texas", [path], None, name, cache_dir, parse_archive)


_NPZ_ARRAYS = ("x", "y", "classes", "name")  # the arrays load_npz reads


def _check_is_zip(path: Path) -> None:
    """A DataError saying what ``path`` is when it is not a zip archive (an .npz): np.load
    returns a bare array for a .npy file and calls any other file pickled data."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        return
    if not head:
        what = "the file is empty"
    elif head.startswith(np.lib.format.MAGIC_PREFIX):
        what = ("a single .npy array; a data set .npz holds x and y, as np.savez(path, x=x, "
                "y=y) writes")
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head.removeprefix(_UTF8_BOM)):
        what = ("it starts like text: a CSV? read it as format 'shokri' (load_shokri_csv, "
                "or load_dataset, which picks the format from the file)")
    else:
        what = "it does not start with a zip header"
    raise DataError(f"{path}: not an .npz archive ({what})")


def _npz_headers(path: Path) -> Dict[str, Tuple[tuple, np.dtype]]:
    """The shape and dtype each array load_npz reads claims in its .npy header, checked
    against the data its zip member holds before numpy allocates the array: a corrupt or
    crafted header claiming more would end in a raw MemoryError."""
    headers = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key not in _NPZ_ARRAYS:
                continue
            with zf.open(info) as member:
                try:
                    version = np.lib.format.read_magic(member)
                except ValueError:  # np.load would hand back its raw bytes
                    raise DataError(f"{path}: member {info.filename!r} is not a .npy array") \
                        from None
                if version not in ((1, 0), (2, 0)):
                    continue  # newer layouts: numpy's reader judges them
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
                data_bytes = info.file_size - member.tell()
            headers[key] = (shape, dtype)
            claimed = math.prod(shape) * dtype.itemsize
            if not dtype.hasobject and claimed > data_bytes:
                raise DataError(f"{path}: array {key!r} claims shape {shape} of {dtype} "
                                f"({claimed:,} bytes), but its member holds {data_bytes:,} "
                                f"bytes of data (a corrupt or hand-edited .npy header)")
    return headers


def _classes_problem(classes: np.ndarray) -> str:
    """Why ``classes`` cannot be a data set's classes (sorted original labels, each once:
    class i is the i-th smallest), or "" when it can."""
    if classes.dtype.kind not in "biufUS":
        return f"must hold numbers, strings or bools, got dtype {classes.dtype}"
    if classes.dtype.kind == "f" and np.isnan(classes).any():
        return f"holds NaN at index {int(np.flatnonzero(np.isnan(classes))[0])}"
    out_of_order = np.flatnonzero(classes[1:] <= classes[:-1])
    if out_of_order.size:
        i = int(out_of_order[0])
        a, b = classes[i].item(), classes[i + 1].item()
        relation = "a duplicate" if a == b else "out of order"
        return (f"must be sorted and distinct, but classes[{i}] = {a!r} and classes[{i + 1}] "
                f"= {b!r} are {relation} (class i is the i-th smallest original label)")
    return ""


def load_npz(path: PathLike) -> Dataset:
    """A ``.npz`` file with arrays ``x`` ``[N, d]`` (numeric) and ``y`` ``[N]``.

    With a ``classes`` array, ``y`` must already hold indices ``0..len(classes)-1`` and
    ``classes[i]`` is the original label of class ``i`` (what :func:`save_npz` writes);
    without it, ``y`` holds labels that are remapped like any loader's. A ``name`` array
    (0-d string) names the data set; the file's stem otherwise.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a readable ``.npz`` (a ``.npy`` or text file, a directory), an array
            header claiming more data than the file holds, a missing array, bad shapes or
            values, ``classes`` not sorted and distinct, fewer than two classes; the
            message names the file and the array.
    """
    path = _existing(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory, expected an .npz file")
    headers: Dict[str, Tuple[tuple, np.dtype]] = {}
    arrays: Dict[str, np.ndarray] = {}
    key = None
    try:
        _check_is_zip(path)
        headers = _npz_headers(path)
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                if key in _NPZ_ARRAYS:
                    arrays[key] = npz[key]
    except DataError:
        raise
    except MemoryError as exc:
        shape, dtype = headers.get(key, ("unknown", "unknown dtype"))
        raise DataError(f"{path}: array {key!r} of shape {shape} ({dtype}) does not fit in "
                        f"memory") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") \
            from exc
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: no array {key!r} (expected x [N, d] and y [N], "
                            f"optionally classes)")
    x, y = arrays["x"], arrays["y"]
    name = str(arrays["name"]) if "name" in arrays else _stem(path)
    if "classes" not in arrays:
        try:
            return from_arrays(x, y, name=name)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: {exc}") from exc
    classes = arrays["classes"]
    if classes.ndim != 1 or classes.size < 2:
        raise DataError(f"{path}: array 'classes' must be 1-D with at least two classes, got "
                        f"shape {classes.shape}")
    problem = _classes_problem(classes)
    if problem:
        raise DataError(f"{path}: array 'classes' {problem}")
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise DataError(f"{path}: array 'y' must hold integer class indices [N] when "
                        f"'classes' is given, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= classes.size):
        row = int(np.flatnonzero((y < 0) | (y >= classes.size))[0])
        raise DataError(f"{path}: array 'y' row {row} is {y[row]}, not a class index in "
                        f"0..{classes.size - 1} (len(classes) = {classes.size})")
    try:
        x32 = _check_features(x)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: array {exc}") from exc
    if y.shape != (x32.shape[0],):
        raise DataError(f"{path}: array 'y' must hold one class index per row of 'x' "
                        f"([{x32.shape[0]}]), got shape {y.shape}")
    return Dataset(torch.from_numpy(x32), torch.from_numpy(y.astype(np.int64)),
                   tuple(classes.tolist()), name)


def save_npz(dataset: Dataset, path: PathLike) -> None:
    """Writes ``dataset`` as a ``.npz`` that :func:`load_npz` reads back identically
    (``x`` stored as uint8 when that is exact); atomic (temporary file + ``os.replace``).

    Raises:
        TypeError: ``dataset`` is not a :class:`Dataset`.
        ValueError: ``dataset.classes`` not sorted and distinct (load_npz would refuse it).
        IsADirectoryError: ``path`` is a directory.
        FileExistsError: ``path`` exists and is not a data set ``.npz`` (an earlier save):
            another file there is never overwritten.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"save_npz: dataset must be a Dataset, got {type(dataset).__name__}")
    path = Path(path)
    arrays = _arrays_for_npz(dataset)
    problem = _classes_problem(arrays["classes"])
    if problem:  # a file load_npz would refuse
        raise ValueError(f"save_npz: dataset.classes {problem}")
    _check_overwritable(path)
    _atomic_savez(path, arrays)


def _check_overwritable(path: Path) -> None:
    """save_npz replaces only a data set .npz (an earlier save): any other file at ``path``
    may be the user's own (the source CSV, notes), which ``os.replace`` would destroy."""
    if path.is_symlink():  # os.replace would replace the link, not write its target
        raise FileExistsError(f"save_npz: {path} is a symbolic link; give the path of the "
                              f"file it points to")
    if path.is_dir():
        raise IsADirectoryError(f"save_npz: {path} is a directory; path must name the .npz "
                                f"file to write")
    if not os.path.lexists(path):
        return
    try:
        load_npz(path)
    except (DataError, OSError) as exc:
        why = str(exc).removeprefix(f"{path}: ")
        raise FileExistsError(f"save_npz: refusing to overwrite {path}: it is not a data set "
                              f".npz that load_npz reads ({why}); delete it first or choose "
                              f"another path") from None


def load_dataset(path: PathLike, *, format: str = "auto",
                 cache_dir: Optional[PathLike] = None) -> Dataset:
    """Any supported file.

    Args:
        path: a file, directory or archive.
        format: ``"shokri"``, ``"texas"``, ``"npz"``, or ``"auto"``: a directory is Texas100;
            a ``.npz`` (or any zip) is npz, as is a ``.npy`` (refused with load_npz's message);
            a tar archive whose first file is ``feats`` or ``labels`` is Texas100; anything
            else is a Shokri-format CSV.
        cache_dir: for the text formats, see :func:`load_shokri_csv`.
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    path = _existing(path)
    if format == "auto":
        if path.is_dir():
            format = "texas"
        elif path.suffix.lower() in (".npz", ".npy") or zipfile.is_zipfile(path):
            format = "npz"
        elif _is_archive(path):  # judged by its first file, not to decompress it all
            first = _first_member_name(path)
            format = "texas" if first and Path(first).name in ("feats", "labels") else "shokri"
        else:
            format = "shokri"
    if format == "npz":
        return load_npz(path)
    if format == "texas":
        return load_texas(path, cache_dir=cache_dir)
    return load_shokri_csv(path, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- synthetic

# the synthetic generator (see synthetic_purchase)
_SYNTHETIC_DENSITY = 0.1
_SYNTHETIC_HOT_FRACTION = 0.1
_SYNTHETIC_P_HOT = 0.45
_SYNTHETIC_AMBIGUOUS = 0.2


def synthetic_purchase(n: int = 20_000, *, d: int = 600, k: int = 100,
                       seed: int = 0) -> Dataset:
    """A seeded synthetic data set with Purchase100's shape: ``d`` binary features, ``k``
    classes, about 10% ones per row. The embedded default for demos and tests.

    The generator: each class has a prototype in which a random tenth of the features are
    "hot" (on with probability 0.45) and the rest are on with the probability that makes the
    mean density 0.1. A row draws its label uniformly, then its features independently
    around its class's prototype, except that a fifth of the rows are drawn around a
    uniformly random class's prototype instead (ambiguous records: Purchase100's classes are
    clusters of shopping histories with fuzzy borders). Those rows cap the test accuracy
    near 0.8 while a large MLP still fits every training row, so the paper's undefended
    model overfits the way it does on the real data. (Signal strength alone cannot give both
    ends of the range: without ambiguous rows, hot probability 0.35 gave test accuracy 0.83
    at 20,000 training rows, and 0.30 gave 0.34 at 5,000.)

    Measured on this generator (``seed=0``; train on the first ``n_train`` rows of
    ``synthetic_purchase(n_train + 10_000)``, test on the last 10,000; the paper's MLP
    ``600-1024-512-256-128-100`` with ReLU, PyTorch's default init under
    ``torch.manual_seed(0)``, Adam lr 1e-3, batch 128, 2-core CPU):

    ========  ======  =========  ========  =====
    n_train   epochs  train acc  test acc  gap
    ========  ======  =========  ========  =====
    5,000     10      0.996      0.505     0.49
    5,000     100     1.000      0.516     0.48
    20,000    10      1.000      0.687     0.31
    20,000    100     1.000      0.690     0.31
    ========  ======  =========  ========  =====

    ``n=197_324`` gives Purchase100's size, for which ``make_splits`` picks the paper's
    sizes; the default (20,000 rows) gets the proportional split (4,444 training rows).

    Args:
        n: number of rows.
        d: number of features (600 as Purchase100).
        k: number of classes (100 as Purchase100).
        seed: everything (prototypes, labels, features) follows from it.

    Returns:
        A :class:`Dataset` named ``"synthetic-purchase"`` with ``classes = (0, ..., k-1)``.
    """
    n = _check_int(n, "n", 1, MAX_SIZE)
    d = _check_int(d, "d", 1, MAX_SIZE)
    k = _check_int(k, "k", 2, MAX_SIZE)
    seed = check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_hot = max(1, round(_SYNTHETIC_HOT_FRACTION * d))
    hot_share = n_hot / d
    # cold features fill the density up to _SYNTHETIC_DENSITY (none left for tiny d)
    p_cold = max(0.0, (_SYNTHETIC_DENSITY - hot_share * _SYNTHETIC_P_HOT) / (1 - hot_share)) \
        if hot_share < 1 else 0.0
    hot = torch.rand((k, d), generator=gen).argsort(dim=1)[:, :n_hot]
    prototypes = torch.full((k, d), p_cold).scatter_(1, hot, _SYNTHETIC_P_HOT)
    y = torch.randint(k, (n,), generator=gen)
    ambiguous = torch.rand(n, generator=gen) < _SYNTHETIC_AMBIGUOUS
    source = torch.where(ambiguous, torch.randint(k, (n,), generator=gen), y)
    x = torch.bernoulli(prototypes[source], generator=gen)
    return Dataset(x.contiguous(), y, tuple(range(k)), "synthetic-purchase")


# ----------------------------------------------------------------------------- splits

#: the paper's Table 1 sizes (rows): target training set, test set, the adversary's known
#: members, and the attack's evaluation set (half members, half non-members)
SPLIT_PRESETS: Dict[str, Dict[str, int]] = {
    "purchase100": {"train": 20_000, "test": 20_000, "known": 10_000, "target": 10_000},
    "texas100": {"train": 10_000, "test": 10_000, "known": 5_000, "target": 5_000},
}
_SPLIT_KEYS = ("train", "test", "known", "target", "shadow_pool")
_PROPORTIONAL_UNITS = 9  # N // 9 rows per unit: Purchase100's 2:2:1:1 and a pool >= 2 train


@dataclass(frozen=True, eq=False)
class Splits:
    """Who is in which set: int64 index tensors into one :class:`Dataset`.

    Exact definitions (all sets drawn from one seeded permutation of the rows):

    * ``train``: the target model's training set. The target model's **members** are
      exactly these rows; every other row of the data set is a non-member.
    * ``test``: held-out rows for the target's test accuracy; disjoint from ``train``,
      ``target`` and ``shadow_pool``; never used by an attack.
    * ``known``: the part of the training data the adversary holds (labelled members):
      a subset of ``train``.
    * ``target``: the rows the attack is scored on, shuffled; ``target_member[i]`` says
      whether ``target[i]`` is a member. Equal numbers of each (from :func:`make_splits`;
      :meth:`check` does not require it of hand-made splits): the members are drawn from
      ``train`` minus ``known`` (the adversary never holds the rows it is scored on), the
      non-members from rows outside ``train``, ``test`` and ``shadow_pool``.
    * ``shadow_pool``: the adversary's population data for shadow models and LiRA reference
      models: disjoint from ``train`` (so all non-members of the target), ``test`` and
      ``target``. Online LiRA adds the ``target`` rows itself.

    Rows left over when explicit sizes do not use the whole data set are in no set.

    Attributes:
        train, test, known, target, shadow_pool: int64 ``[n_set]`` row indices.
        target_member: bool ``[len(target)]``, aligned with ``target``.
        preset: the size rule used (``"purchase100"``, ``"texas100"``, ``"proportional"``
            or ``"custom"``).
        seed: the permutation's seed.
    """

    train: Tensor
    test: Tensor
    known: Tensor
    target: Tensor
    target_member: Tensor
    shadow_pool: Tensor
    preset: str = "custom"
    seed: int = 0

    def sizes(self) -> Dict[str, int]:
        """Rows per set, and the target's members and non-members."""
        members = int(self.target_member.sum())
        return {"train": len(self.train), "test": len(self.test), "known": len(self.known),
                "target": len(self.target), "target_members": members,
                "target_nonmembers": len(self.target) - members,
                "shadow_pool": len(self.shadow_pool)}

    def __repr__(self) -> str:
        return f"Splits(preset={self.preset!r}, seed={self.seed}, {self.sizes()})"

    def check(self, n_rows: int) -> None:
        """Raises TypeError/ValueError naming the field when these splits break the
        definitions above for a data set of ``n_rows`` rows: index fields that are not 1-D
        int64 or out of range, a row listed twice in one set, sets that must be disjoint and
        overlap (a shadow pool holding members would train "non-member" shadows on them),
        ``known`` outside ``train``, or ``target_member`` not saying which target rows are in
        ``train`` (every score would be judged against wrong labels). ``test`` is held to its
        definition too, although no attack reads it. ``target``'s balance is not: hand-made
        splits may score any mix of members and non-members (AUC, TPR at FPR and balanced
        accuracy do not depend on it; plain accuracy then weighs each side by its share)."""
        for key in ("train", "test", "known", "target", "shadow_pool"):
            idx = getattr(self, key)
            if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
                got = (f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor)
                       else type(idx).__name__)
                raise TypeError(f"splits.{key} must be a 1-D int64 tensor of row indices, "
                                f"got {got}")
            if len(idx) and int(idx.min()) < 0:
                raise ValueError(f"splits.{key} holds the negative index {int(idx.min())}: "
                                 f"row indices are in [0, {n_rows})")
            if len(idx) and int(idx.max()) >= n_rows:
                raise ValueError(f"splits.{key} indexes rows up to {int(idx.max())} but data "
                                 f"has {n_rows} rows: the splits belong to another data set")
            if len(torch.unique(idx)) != len(idx):
                raise ValueError(f"splits.{key} lists a row more than once (row "
                                 f"{_first_repeat(idx)}): each set holds distinct rows")
        member = self.target_member
        if not isinstance(member, Tensor) or member.dtype != torch.bool or \
                member.shape != self.target.shape:
            got = (f"{member.dtype} {tuple(member.shape)}" if isinstance(member, Tensor)
                   else type(member).__name__)
            raise TypeError(f"splits.target_member must be a bool tensor shaped like "
                            f"splits.target {tuple(self.target.shape)}, got {got}")
        for a, b in (("test", "train"), ("test", "target"), ("test", "shadow_pool"),
                     ("shadow_pool", "train"), ("shadow_pool", "target")):
            shared = getattr(self, a)[torch.isin(getattr(self, a), getattr(self, b))]
            if len(shared):
                raise ValueError(f"splits.{a} and splits.{b} share {len(shared)} rows (e.g. "
                                 f"row {int(shared[0])}); they must be disjoint")
        outside = self.known[~torch.isin(self.known, self.train)]
        if len(outside):
            raise ValueError(f"splits.known holds {len(outside)} rows outside splits.train "
                             f"(e.g. row {int(outside[0])}): the adversary's known members "
                             f"are training rows")
        wrong = torch.isin(self.target, self.train) != member
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0])
            raise ValueError(f"splits.target_member[{i}] is {bool(member[i])} but row "
                             f"{int(self.target[i])} is {'not ' if member[i] else ''}in "
                             f"splits.train ({int(wrong.sum())} entries disagree): "
                             f"target_member says which target rows are members")
        held = self.target[torch.isin(self.target, self.known)]
        if len(held):
            raise ValueError(f"splits.target and splits.known share {len(held)} rows (e.g. "
                             f"row {int(held[0])}): the adversary never holds the rows it is "
                             f"scored on")


def _first_repeat(idx: Tensor) -> int:
    values, counts = torch.unique(idx, return_counts=True)
    return int(values[counts > 1][0])


def _auto_preset(dataset: Dataset) -> str:
    if dataset.k == 100 and dataset.d == 600:
        candidate = "purchase100"
    elif dataset.k == 100 and dataset.d in (6169, 6170):
        candidate = "texas100"
    else:
        return "proportional"
    sizes = SPLIT_PRESETS[candidate]
    needed = sizes["train"] + sizes["test"] + sizes["target"] // 2 + 2 * sizes["train"]
    return candidate if dataset.n >= needed else "proportional"


def _proportional_sizes(n: int) -> Dict[str, int]:
    unit = (n // _PROPORTIONAL_UNITS) // 2 * 2  # even: the target splits in halves
    if unit < 2:
        raise ValueError(f"make_splits: the data set has {n} rows; the proportional split "
                         f"needs at least {2 * _PROPORTIONAL_UNITS}")
    return {"train": 2 * unit, "test": 2 * unit, "known": unit, "target": unit}


def make_splits(dataset: Dataset, *, preset: str = "auto",
                sizes: Optional[Dict[str, int]] = None, seed: int = 0) -> Splits:
    """The paper's Train / Test / Known / Target sets and the adversary's shadow pool.

    Size rules (``preset``):

    * ``"purchase100"``: train 20,000, test 20,000, known 10,000, target 10,000 (Table 1).
    * ``"texas100"``: train 10,000, test 10,000, known 5,000, target 5,000 (Table 1).
    * ``"proportional"``: Purchase100's 2 : 2 : 1 : 1 scaled to the data set: with
      ``u = N // 9`` rounded down to even, train = test = 2u, known = target = u
      (Location30, 5,010 rows: 1,112 / 1,112 / 556 / 556, shadow pool 2,508).
    * ``"auto"``: ``purchase100`` for 600 features and 100 classes, ``texas100`` for 6,169
      (or 6,170) features and 100 classes, when the data set is large enough for the preset
      and its shadow pool; ``proportional`` otherwise.

    The shadow pool is every row not in train, test or the target's non-members, and must
    hold at least twice the training set (so shadow models trained at the target's size can
    each take a random half of it), unless ``sizes`` gives it explicitly.

    Args:
        dataset: the data set to split.
        preset: the size rule above.
        sizes: overrides for any of ``train``, ``test``, ``known``, ``target`` (even),
            ``shadow_pool`` (default: the rest).
        seed: the permutation's seed; the same seed gives the same splits.

    Raises:
        TypeError: ``sizes`` not a mapping, a size not an int.
        ValueError: an unknown preset or size key, bad sizes, or a data set too small for
            them (the message says how many rows they need).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"make_splits: dataset must be a Dataset, got {type(dataset).__name__}")
    presets = ("auto", "proportional", *SPLIT_PRESETS)
    if preset not in presets:
        raise ValueError(f"make_splits: preset must be one of {presets}, got {preset!r}")
    if sizes is not None and not isinstance(sizes, Mapping):
        raise TypeError(f"make_splits: sizes must be a mapping of set names to row counts "
                        f"(e.g. {{'train': 100}}), got {type(sizes).__name__}")
    seed = check_seed(seed)
    n = dataset.n
    rule = _auto_preset(dataset) if preset == "auto" else preset
    chosen = dict(SPLIT_PRESETS[rule]) if rule in SPLIT_PRESETS else _proportional_sizes(n)
    if sizes:
        unknown = set(sizes) - set(_SPLIT_KEYS)
        if unknown:
            raise ValueError(f"make_splits: unknown size keys {sorted(unknown, key=repr)}; "
                             f"known keys are {_SPLIT_KEYS}")
        chosen.update({key: _check_int(value, f"sizes[{key!r}]", 0)
                       for key, value in sizes.items()})
        rule = "custom"
    train, test, known, target = (chosen[key] for key in ("train", "test", "known", "target"))
    if train < 1:
        raise ValueError("make_splits: the training set needs at least one row")
    if target % 2:
        raise ValueError(f"make_splits: target must be even (half members, half "
                         f"non-members), got {target}")
    if known + target // 2 > train:
        raise ValueError(f"make_splits: known ({known}) plus the target's members "
                         f"({target // 2}) must fit in train ({train}): the target's members "
                         f"are training rows the adversary does not hold")
    used = train + test + target // 2
    pool = chosen.get("shadow_pool")
    if pool is None:
        pool = n - used
        if pool < 2 * train:
            raise ValueError(
                f"make_splits: the data set has {n} rows; {rule!r} sizes need train + test + "
                f"target/2 = {used} rows plus a shadow pool of at least 2 x train = "
                f"{2 * train}, i.e. {used + 2 * train} rows (use a smaller preset, "
                f"'proportional', or give sizes)")
    elif used + pool > n:
        raise ValueError(f"make_splits: the data set has {n} rows; the sizes need train + "
                         f"test + target/2 + shadow_pool = {used + pool}")

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    bounds = np.cumsum([0, train, test, target // 2, pool]).tolist()
    train_idx, test_idx, outsiders, pool_idx = (order[lo:hi] for lo, hi in
                                                zip(bounds[:-1], bounds[1:]))
    members = train_idx[known:known + target // 2]
    shuffle = torch.randperm(target, generator=gen)
    target_idx = torch.cat([members, outsiders])[shuffle]
    target_member = (torch.arange(target) < target // 2)[shuffle]
    return Splits(train_idx.clone(), test_idx.clone(), train_idx[:known].clone(), target_idx,
                  target_member, pool_idx.clone(), rule, seed)
