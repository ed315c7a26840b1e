"""Interaction data: readers, named datasets, the synthetic generator, the leave-one-out
split and length-bucketed batches.

Every reader returns a :class:`SequenceData`: one time-ordered item sequence per user, items
remapped to 1..n_items (0 is padding), with the original item ids kept for translation.
Sequences, training sequences and training windows are :class:`Segments`: views into one
int64 buffer, not one Python object per user.

:func:`read_file` reads with the columnar readers of :mod:`hymoerec.readers` (pyarrow); the
line-by-line readers here (``read_sequences``, ``read_pairs``, ``read_ml1m``, ``read_amazon``,
``read_table``) are the readable reference they are tested against, and the one that reads a
file the columnar reader cannot vouch for (it gives the exact error of a malformed line). A
file whose name ends in ``.gz`` is decompressed on the fly by both.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FORMATS = ("sequences", "pairs", "ml-1m", "amazon", "csv", "tsv", "parquet", "jsonl")
DATASETS = ("synthetic", "ml-1m", "beauty")


class DataFormatError(ValueError):
    """The one error type of user-data problems: malformed content, an empty, missing,
    unreadable or undecodable file, a damaged or undownloadable named dataset, a folder that
    cannot be written. The message is one line naming the file and, where it applies, the
    line; callers print it as it is."""


class NotWritableError(DataFormatError):
    """A folder that must be written (a run folder, the dataset cache) is not writable."""


class Segments(Sequence):
    """A list of int64 arrays kept as views into one buffer: element i is
    ``values[starts[i]:ends[i]]``, a view (no copy). values (N,) int64; starts, ends (n,)
    int64 with 0 <= starts <= ends <= N. Segments may share or skip parts of the buffer
    (training sequences leave out each user's last two items, training windows overlap by
    one item). Indexing with an int gives the array, with a slice (or :meth:`take` with an
    index array) a Segments over the same buffer."""

    __slots__ = ("values", "starts", "ends")

    def __init__(self, values: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.values = np.asarray(values, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        if self.values.ndim != 1 or self.starts.ndim != 1 or self.starts.shape != self.ends.shape:
            raise ValueError(f"Segments takes values (N,) and starts, ends (n,), got shapes "
                             f"{self.values.shape}, {self.starts.shape}, {self.ends.shape}")

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> "Segments":
        """Consecutive segments of ``values`` (N,) with ``lengths`` (n,) summing to N."""
        ends = np.cumsum(lengths, dtype=np.int64)
        if len(ends) and ends[-1] != len(values):
            raise ValueError(f"lengths sum to {ends[-1]}, values hold {len(values)}")
        return cls(values, ends - np.asarray(lengths, dtype=np.int64), ends)

    @classmethod
    def from_arrays(cls, arrays) -> "Segments":
        """The arrays (any iterable of 1-D integer arrays) copied into one buffer."""
        arrays = [np.asarray(a, dtype=np.int64) for a in arrays]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        values = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
        return cls.from_lengths(values, lengths)

    @property
    def lengths(self) -> np.ndarray:
        """(n,) int64 length of every segment."""
        return self.ends - self.starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Segments(self.values, self.starts[index], self.ends[index])
        return self.values[self.starts[index]:self.ends[index]]

    def __iter__(self):
        values = self.values
        for start, end in zip(self.starts.tolist(), self.ends.tolist()):
            yield values[start:end]

    def take(self, indices) -> "Segments":
        """The segments at ``indices`` (an int array or a bool mask), same buffer."""
        return Segments(self.values, self.starts[indices], self.ends[indices])

    def concatenated(self) -> np.ndarray:
        """(sum of lengths,) int64: every segment's values in order, copied."""
        lengths = self.lengths
        shift = np.repeat(self.starts - (np.cumsum(lengths) - lengths), lengths)
        return self.values[shift + np.arange(len(shift))]

    def __repr__(self) -> str:
        return f"Segments({len(self)} segments, {int(self.lengths.sum())} values)"


@dataclass
class SequenceData:
    """Per-user item sequences in time order.

    ``sequences[u]`` is an int64 array of item indices in 1..n_items (0 = padding), a view
    into one buffer (:class:`Segments`; a list of arrays given to the constructor is copied
    into one); ``item_ids[i]`` is the original id (a string) of item index i
    (``item_ids[0]`` = "<pad>"); ``user_ids[u]`` is the original id of user u;
    ``item_index`` maps an original item id to its index (built on first use).
    """
    sequences: Segments
    item_ids: list[str]
    user_ids: list[str]
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.sequences, Segments):
            self.sequences = Segments.from_arrays(self.sequences)

    @cached_property
    def item_index(self) -> dict[str, int]:
        """Original item id -> item index (1..n_items), built on first use."""
        return {item: i for i, item in enumerate(self.item_ids) if i > 0}

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(self.sequences.lengths.sum())

    def describe(self) -> str:
        return (f"{self.name or 'data'}: {self.n_users} users, {self.n_items} items, "
                f"{self.n_interactions} interactions")


def from_user_items(user_items: dict[str, list[str]], name: str) -> SequenceData:
    """Remap original ids: items numbered 1..n in order of first appearance (users in
    insertion order), so the mapping is deterministic for a given file."""
    item_index: dict[str, int] = {}
    sequences = []
    for items in user_items.values():
        seq = np.empty(len(items), dtype=np.int64)
        for j, item in enumerate(items):
            seq[j] = item_index.setdefault(item, len(item_index) + 1)
        sequences.append(seq)
    item_ids = ["<pad>"] + list(item_index)
    return SequenceData(sequences, item_ids, list(user_items), name)


# ----------------------------------------------------------------------------- readers

def read_sequences(path: str | os.PathLike) -> SequenceData:
    """One line per user: ``user item item ...`` (whitespace separated, items in time
    order), the S3-Rec/ICLRec format. Blank lines are skipped."""
    user_items: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    with _reading(path) as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise DataFormatError(f"{path}, line {line_no}: expected 'user item [item ...]', "
                                      f"got {line.strip()!r}")
            if tokens[0] in user_items:
                raise DataFormatError(f"{path}, line {line_no}: user {tokens[0]!r} appears on "
                                      f"more than one line (first on line "
                                      f"{first_line[tokens[0]]}); "
                                      f"this format takes one line per user (the 'pairs' "
                                      f"format one 'user item' line per interaction)")
            user_items[tokens[0]] = tokens[1:]
            first_line[tokens[0]] = line_no
    return _non_empty(from_user_items(user_items, Path(path).name), path)


def read_pairs(path: str | os.PathLike) -> SequenceData:
    """One interaction per line: ``user item`` (whitespace separated), the layout of
    SASRec's data folder. A user's items keep the order of their lines (the file is
    expected in time order), users the order of their first line; lines of different users
    may interleave. Blank lines are skipped; a line with other than two fields is an error."""
    user_items: dict[str, list[str]] = {}
    with _reading(path) as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2:
                raise DataFormatError(f"{path}, line {line_no}: expected 'user item', got "
                                      f"{len(tokens)} fields: {line.strip()!r}")
            user_items.setdefault(tokens[0], []).append(tokens[1])
    return _non_empty(from_user_items(user_items, Path(path).name), path)


def _order_by_time(rows: list[tuple[str, str, float]]) -> dict[str, list[str]]:
    """Group (user, item, time) rows per user, ordered by time; ties keep file order
    (Python's sort is stable)."""
    rows = sorted(rows, key=lambda row: row[2])
    user_items: dict[str, list[str]] = {}
    for user, item, _ in rows:
        user_items.setdefault(user, []).append(item)
    return user_items


def read_ml1m(path: str | os.PathLike) -> SequenceData:
    """MovieLens-1M ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``. Every rating
    is an implicit interaction, ordered by timestamp, ties in file order."""
    rows = []
    with _reading(path, "latin-1") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("::")
            if len(fields) != 4:
                raise DataFormatError(f"{path}, line {line_no}: expected "
                                      f"'UserID::MovieID::Rating::Timestamp', got {line.strip()!r}")
            user, item, rating, stamp = fields
            rows.append((user, item, _number(stamp, path, line_no, "Timestamp")))
            _number(rating, path, line_no, "Rating")
    return _non_empty(from_user_items(_order_by_time(rows), Path(path).name), path)


def read_amazon(path: str | os.PathLike, k_core: int = 5) -> SequenceData:
    """Amazon ratings-only CSV ``user,item,rating,timestamp`` (no header, or a header
    line whose timestamp field is not a number), k-core filtered (every user and every
    item keeps >= k_core interactions; k_core <= 1 disables the filter)."""
    rows = []
    with _reading(path) as f:
        for line_no, fields in _csv_rows(csv.reader(f), path):
            if not fields:
                continue
            if len(fields) != 4:
                raise DataFormatError(f"{path}, line {line_no}: expected 4 fields "
                                      f"'user,item,rating,timestamp', got {len(fields)}")
            if line_no == 1 and not _is_number(fields[3]):
                continue  # header
            user, item, rating, stamp = fields
            _number(rating, path, line_no, "rating")
            rows.append((user, item, _number(stamp, path, line_no, "timestamp")))
    if not rows:
        raise DataFormatError(f"{path}: no interactions (the file is empty, blank or only a "
                              f"header line)")
    kept = k_core_filter(rows, k_core)
    if not kept:
        raise DataFormatError(f"{path}: no interactions left after the {k_core}-core filter "
                              f"({len(rows)} read; a smaller --k-core keeps more)")
    return from_user_items(_order_by_time(kept), Path(path).name)


def read_table(path: str | os.PathLike, user_col: str = "user", item_col: str = "item",
               time_col: str | None = "timestamp", delimiter: str | None = None) -> SequenceData:
    """A CSV/TSV file with a header naming its columns; ``time_col`` orders each user's
    items (ties and ``time_col=None``: file order). The delimiter defaults to a tab for
    ``.tsv`` files and a comma otherwise."""
    if delimiter is None:
        delimiter = "\t" if str(path).removesuffix(GZIP_SUFFIX).endswith(".tsv") else ","
    rows = []
    with _reading(path) as f:
        reader = _csv_rows(csv.reader(f, delimiter=delimiter), path)
        header_line, header = next(((n, fields) for n, fields in reader if fields), (0, None))
        if header is None:
            raise DataFormatError(f"{path}: empty file, expected a header line naming the "
                                  f"columns")
        header = [h.strip() for h in header]
        columns = {}
        for role, col in (("user", user_col), ("item", item_col), ("time", time_col)):
            if col is None:
                continue
            if col not in header:
                raise DataFormatError(f"{path}, line {header_line}: no column {col!r} for the "
                                      f"{role} (header: {header})")
            columns[role] = header.index(col)
        for line_no, fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataFormatError(f"{path}, line {line_no}: expected {len(header)} fields "
                                      f"like the header, got {len(fields)}")
            stamp = (_number(fields[columns["time"]], path, line_no, time_col)
                     if "time" in columns else 0.0)
            rows.append((fields[columns["user"]], fields[columns["item"]], stamp))
    if not rows:
        raise DataFormatError(f"{path}: only a header line, no interactions")
    return from_user_items(_order_by_time(rows), Path(path).name)


def k_core_filter(rows: list[tuple[str, str, float]], k: int) -> list[tuple[str, str, float]]:
    """Repeatedly drop interactions of users and items with fewer than k interactions
    until every remaining user and item has at least k."""
    if k <= 1:
        return rows
    while True:
        users = Counter(row[0] for row in rows)
        items = Counter(row[1] for row in rows)
        kept = [row for row in rows if users[row[0]] >= k and items[row[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def read_file(path: str | os.PathLike, fmt: str, k_core: int = 5, user_col: str = "user",
              item_col: str = "item", time_col: str | None = "timestamp") -> SequenceData:
    """Read ``path`` in format ``fmt`` (one of FORMATS) with the columnar readers of
    :mod:`hymoerec.readers`; the same SequenceData as the reference reader of the format.
    ``user_col`` / ``item_col`` / ``time_col`` name the columns of csv, tsv, parquet and
    jsonl data (``time_col=None``: file order); ``k_core`` filters amazon data. A path
    ending in ``.gz`` is decompressed on the fly. A path that is missing or not a file, and
    malformed content, are DataFormatErrors naming the file (and the line, or the row group
    of a Parquet file)."""
    if Path(path).is_dir():
        raise DataFormatError(f"data file {path} is a directory, not a file")
    if not Path(path).exists():
        raise DataFormatError(f"data file {path} does not exist")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    from .readers import read_columnar  # pyarrow is imported only when a file is read
    return read_columnar(path, fmt, k_core, user_col, item_col, time_col)


def reference_reader(fmt: str, k_core: int = 5, user_col: str = "user", item_col: str = "item",
                     time_col: str | None = "timestamp"):
    """The line-by-line reader of ``fmt`` as a function of the path, with these settings;
    None for parquet and jsonl, which have none."""
    if fmt in ("csv", "tsv"):
        delimiter = "\t" if fmt == "tsv" else ","
        return lambda path: read_table(path, user_col, item_col, time_col, delimiter)
    if fmt == "amazon":
        return lambda path: read_amazon(path, k_core)
    return {"sequences": read_sequences, "pairs": read_pairs, "ml-1m": read_ml1m}.get(fmt)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, path, line_no: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{path}, line {line_no}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataFormatError(f"{path}, line {line_no}: {column} {text!r} is not a finite number")
    return value


def _non_empty(data: SequenceData, path) -> SequenceData:
    if data.n_users == 0:
        raise DataFormatError(f"{path}: no interactions (the file is empty or holds only "
                              f"blank lines)")
    return data


GZIP_SUFFIX = ".gz"


def is_gzip(path) -> bool:
    """Whether ``path`` is read through gzip decompression (its name ends in .gz)."""
    return str(path).endswith(GZIP_SUFFIX)


def _open_binary(path):
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


@contextmanager
def _reading(path, encoding: str = "utf-8-sig"):
    """``path`` opened as text (newline="", as csv wants; a UTF-8 byte-order mark is
    dropped; a .gz file decompressed). Bytes that do not decode, and a file that cannot be
    opened or decompressed, become a DataFormatError naming the file (and the line)."""
    try:
        with (gzip.open(path, "rt", encoding=encoding, newline="") if is_gzip(path)
              else open(path, encoding=encoding, newline="")) as f:
            yield f
    except UnicodeDecodeError:
        raise DataFormatError(_undecodable(path, encoding)) from None
    except (OSError, EOFError, zlib.error) as err:
        reason = getattr(err, "strerror", None) or err
        raise DataFormatError(f"cannot read data file {path}: {reason}") from None


def _undecodable(path, encoding: str) -> str:
    """The message for the first line of ``path`` that does not decode as ``encoding``."""
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as err:
                return (f"{path}, line {line_no}: byte {err.start + 1} of the line "
                        f"({raw[err.start:err.start + 1]!r}) is not "
                        f"{encoding.removesuffix('-sig')} text; save the file as UTF-8")
    return f"{path}: not {encoding} text"


def _csv_rows(reader, path):
    """(line number, fields) of each record of a csv.reader, fields [] for a blank or
    whitespace-only line, with csv's own errors (e.g. a field over csv's size limit) as a
    DataFormatError naming the line."""
    try:
        for fields in reader:
            yield reader.line_num, fields if any(f.strip() for f in fields) else []
    except csv.Error as err:
        raise DataFormatError(f"{path}, line {reader.line_num}: {err}") from None


def check_writable(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """Create folder ``path`` (and its parents) if needed and check that a file can be
    written in it, so that a run does not find out after an epoch. Raises
    NotWritableError "<what> <path> is not writable (<reason>)[; <hint>]". Returns the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        if path.exists() and not path.is_dir():
            reason = "it is a file, not a folder"
        raise NotWritableError(f"{what} {path} is not writable ({reason})"
                               + (f"; {hint}" if hint else "")) from None
    return path


# ----------------------------------------------------------------------- named datasets

@dataclass(frozen=True)
class RemoteFile:
    """A public file: where it comes from, its name in the cache and, where a published
    value could be checked, its checksum (algorithm, hex digest)."""
    url: str
    filename: str
    checksum: tuple[str, str] | None


REMOTE = {
    # GroupLens publishes the MD5 of the zip next to it (ml-1m.zip.md5); the same value is
    # quoted by many download scripts. No published SHA-256 could be checked offline.
    "ml-1m": RemoteFile("https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                        "ml-1m.zip", ("md5", "c4d9eecfca2ab87c1945afe126590906")),
    # McAuley's UCSD Amazon 2014 ratings-only file. No checksum is published with it and
    # none could be verified here (no network), so none is pinned: the SHA-256 of the file
    # actually used is printed and stored next to the prepared data instead.
    "beauty": RemoteFile("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
                         "ratings_Beauty.csv", "ratings_Beauty.csv", None),
}


def cache_dir() -> Path:
    """``$HYMOEREC_DATA``, default ``~/.cache/hymoerec``."""
    return Path(os.environ.get("HYMOEREC_DATA", Path.home() / ".cache" / "hymoerec"))


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CACHE_HINT = "set HYMOEREC_DATA to a writable folder"


def fetch(name: str, root: Path | None = None) -> Path:
    """The raw file of named dataset ``name`` in the cache, downloaded on first use.

    A downloaded file must match the pinned checksum; a file the user placed there by
    hand is accepted, with a warning if it does not match. A cache that cannot be written
    and a failed download are DataFormatErrors (the latter says where to put the file).
    """
    remote = REMOTE[name]
    root = root or cache_dir()
    target = root / remote.filename
    if target.is_file():
        if remote.checksum and file_digest(target, remote.checksum[0]) != remote.checksum[1]:
            warnings.warn(f"{target}: {remote.checksum[0]} differs from the published "
                          f"{remote.checksum[1]}; using the file as placed")
        return target
    check_writable(root, "dataset cache ($HYMOEREC_DATA)", CACHE_HINT)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(remote.url, timeout=60) as response, open(partial, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DataFormatError(f"could not download dataset {name!r} from {remote.url} ({err}). "
                              f"Without network, download that file elsewhere and put it at "
                              f"{target} (or set HYMOEREC_DATA to the folder holding "
                              f"{remote.filename}).") from None
    if remote.checksum:
        got = file_digest(partial, remote.checksum[0])
        if got != remote.checksum[1]:
            partial.unlink()
            raise DataFormatError(f"download of {remote.url} failed its {remote.checksum[0]} "
                                  f"check: expected {remote.checksum[1]}, got {got}")
    os.replace(partial, target)
    return target


ML1M_MEMBER = "ml-1m/ratings.dat"


def load_dataset(name: str, root: Path | None = None, k_core: int = 5) -> SequenceData:
    """Named dataset ``ml-1m`` or ``beauty`` (k_core-filtered): fetched, read and cached
    as a prepared ``.npz`` next to the raw file (prepared once; a read-only cache that
    already holds it is fine). A damaged archive or prepared file is a DataFormatError
    that says to delete it."""
    if name not in REMOTE:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    root = root or cache_dir()
    raw = fetch(name, root)
    prepared = root / (f"{name}.prepared.npz" if name == "ml-1m" else
                       f"{name}-{k_core}core.prepared.npz")
    if prepared.is_file() and prepared.stat().st_mtime >= raw.stat().st_mtime:
        return load_prepared(prepared)
    check_writable(root, "dataset cache ($HYMOEREC_DATA)", CACHE_HINT)
    if name == "ml-1m":
        extracted = root / "ml-1m-ratings.dat"
        try:
            with zipfile.ZipFile(raw) as archive:
                extracted.write_bytes(archive.read(ML1M_MEMBER))
        except (zipfile.BadZipFile, KeyError) as err:
            raise DataFormatError(f"{raw} is not the MovieLens-1M archive ({err}); delete it to "
                                  f"download it again, or put the real {REMOTE[name].url} "
                                  f"there") from None
        data = read_ml1m(extracted)
    else:
        data = read_amazon(raw, k_core)
        print(f"{raw}: sha256 {file_digest(raw, 'sha256')}")
    data.name = name
    save_prepared(data, prepared)
    return data


def save_prepared(data: SequenceData, path: Path) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, items=data.sequences.concatenated(), lengths=data.sequences.lengths,
             item_ids=np.array(data.item_ids), user_ids=np.array(data.user_ids),
             name=np.array(data.name))
    os.replace(tmp, path)


def load_prepared(path: Path) -> SequenceData:
    """A file written by :func:`save_prepared`; a damaged one is a DataFormatError."""
    try:
        with np.load(path) as z:
            return SequenceData(Segments.from_lengths(z["items"], z["lengths"]),
                                z["item_ids"].tolist(), z["user_ids"].tolist(), str(z["name"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DataFormatError(f"{path} is damaged ({err}); delete it and it is prepared "
                              f"again from the raw file") from None


# -------------------------------------------------------------------------- synthetic

def cumulative(p: np.ndarray) -> np.ndarray:
    """(n,) float64 cumulative distribution of probabilities p (n,), normalised to end at
    1 as ``Generator.choice`` normalises it."""
    cdf = np.cumsum(p, dtype=np.float64)
    return cdf / cdf[-1]


def choice(rng: np.random.Generator, cdf: np.ndarray, size) -> np.ndarray:
    """int64 draws of shape ``size`` from the distribution whose :func:`cumulative` is cdf:
    the draws of ``rng.choice(len(cdf), size, p=p)`` (one uniform per draw, searched in the
    cumulative distribution), without recomputing it per call."""
    return cdf.searchsorted(rng.random(size), side="right")


def synthetic(n_users: int = 3000, n_items: int = 500, mean_length: int = 20,
              seed: int = 0) -> SequenceData:
    """Seeded synthetic interactions with two kinds of users and long-tailed popularity.

    * habit users (half): a first-order Markov walk; each item has 3 favourite successors
      (drawn by popularity) followed with probability 0.8, else a popular item;
    * pattern users (half): repeat a personal motif of 3..8 items (a long-range period),
      each step replaced by a popular item with probability 0.15.
    Item popularity is Zipf-like (weight 1/rank^1.1). Lengths are 5 + Poisson(mean - 5).
    Draws by popularity search one precomputed cumulative distribution (what
    ``rng.choice(n, size, p=p)`` does, giving the same draws), so a catalog of a million
    items costs no more per user than one of a hundred.
    """
    for name, value in (("n_users", n_users), ("n_items", n_items)):
        if value < 2:
            raise ValueError(f"{name} must be >= 2, got {value}")
    if mean_length < 5:
        raise ValueError(f"mean_length must be >= 5, got {mean_length}")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    popularity = rng.permutation(popularity / popularity.sum())
    popularity_cdf = cumulative(popularity)
    successors = choice(rng, popularity_cdf, (n_items, 3))
    successor_cdf = cumulative(np.array([0.5, 0.3, 0.2]))
    sequences = []
    for user in range(n_users):
        length = 5 + rng.poisson(mean_length - 5)
        noise = choice(rng, popularity_cdf, length)
        seq = np.empty(length, dtype=np.int64)
        if user % 2 == 0:
            seq[0] = noise[0]
            follow = rng.random(length) < 0.8
            picks = choice(rng, successor_cdf, length)
            for t in range(1, length):
                seq[t] = successors[seq[t - 1], picks[t]] if follow[t] else noise[t]
        else:
            motif = choice(rng, popularity_cdf, rng.integers(3, 9))
            seq[:] = np.resize(motif, length)
            replaced = rng.random(length) < 0.15
            seq[replaced] = noise[replaced]
        sequences.append(seq + 1)
    item_ids = ["<pad>"] + [str(i) for i in range(1, n_items + 1)]
    return SequenceData(sequences, item_ids, [str(u) for u in range(n_users)], "synthetic")


# -------------------------------------------------------------------------- the split

@dataclass
class Split:
    """Leave-one-out split.

    ``train``: per-user training sequences (all but the last two items; users with fewer
    than 3 items are training-only and keep all of theirs), views into the data's buffer.
    ``eval_users``: (n_eval,) int64 indices of users with >= 3 items. ``valid_target`` /
    ``test_target`` (n_eval,) int64: the second-to-last and last item of those users; their
    inputs are the items before the target.
    """
    data: SequenceData
    train: Segments
    eval_users: np.ndarray
    valid_target: np.ndarray
    test_target: np.ndarray

    def history(self, stage: str) -> Segments:
        """Items before the target of every evaluated user, for ``stage`` valid or test."""
        cut = {"valid": 2, "test": 1}[stage]
        users = self.data.sequences.take(self.eval_users)
        return Segments(users.values, users.starts, users.ends - cut)

    def targets(self, stage: str) -> np.ndarray:
        return {"valid": self.valid_target, "test": self.test_target}[stage]

    def train_item_counts(self) -> np.ndarray:
        """(n_items + 1,) int64 frequency of every item in the training sequences."""
        counts = np.bincount(self.train.concatenated(), minlength=self.data.n_items + 1)
        return counts.astype(np.int64)


def leave_one_out(data: SequenceData) -> Split:
    """Last item test, second-to-last validation, the rest training (no item is copied)."""
    sequences = data.sequences
    evaluated = sequences.lengths >= 3
    train = Segments(sequences.values, sequences.starts,
                     np.where(evaluated, sequences.ends - 2, sequences.ends))
    last = sequences.ends[evaluated]
    return Split(data, train, np.flatnonzero(evaluated).astype(np.int64),
                 sequences.values[last - 2], sequences.values[last - 1])


# ------------------------------------------------------------------------------ batches

def training_windows(train: Segments | list[np.ndarray], max_len: int) -> Segments:
    """Cut every training sequence into windows of at most max_len + 1 items so that each
    next item (from the second on) is a target exactly once, predicted from its most recent
    items: window inputs are ``w[:-1]``, targets ``w[1:]``. Windows are cut from the end,
    so the most recent items get the longest context; a sequence's windows come most recent
    first, sequences in order. A sequence of n >= 2 items has ceil((n - 1) / max_len)
    windows, the j-th ending at n - j * max_len; the windows are views into train's buffer
    (a list of arrays is copied into one first)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not isinstance(train, Segments):
        train = Segments.from_arrays(train)
    lengths = train.lengths
    count = np.where(lengths >= 2, (lengths - 2) // max_len + 1, 0)
    owner = np.repeat(np.arange(len(train)), count)
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
    end = lengths[owner] - rank * max_len
    start = np.maximum(end - max_len - 1, 0)
    base = train.starts[owner]
    return Segments(train.values, base + start, base + end)


def training_prefixes(train: Segments | list[np.ndarray], max_len: int) -> Segments:
    """Every prefix of every training sequence as its own window, for training with one
    target per window (its last item): a sequence of n >= 2 items gives n - 1 windows, the
    t-th (t = 1..n-1) ending at item t and holding its at most max_len predecessors, so
    ``w[:-1]`` is the input and ``w[-1]`` the target. Sequences in order, each's prefixes
    shortest first; views into train's buffer (a list of arrays is copied into one first)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not isinstance(train, Segments):
        train = Segments.from_arrays(train)
    count = np.maximum(train.lengths - 1, 0)
    owner = np.repeat(np.arange(len(train)), count)
    end = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count) + 2
    base = train.starts[owner]
    return Segments(train.values, base + np.maximum(end - max_len - 1, 0), base + end)


def pad_right(sequences: list[np.ndarray], length: int | None = None) -> Tensor:
    """(B, L) int64 tensor, sequences left-aligned and padded with 0 on the right
    (L = the longest sequence unless given)."""
    length = length or max(len(s) for s in sequences)
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, :len(seq)] = seq
    return torch.from_numpy(out)


def bucketed_batches(windows: Segments | list[np.ndarray], batch_targets: int,
                     generator: torch.Generator, last_target_only: bool = False) -> list[list[int]]:
    """Window indices grouped into batches of similar length that hold at most
    ``batch_targets`` next-item targets each (a window of n items has n - 1, or 1 with
    ``last_target_only``; a window with more is a batch of its own): shuffle, sort by length within chunks of about 50 batches'
    targets, cut greedily, shuffle the batches. Counting targets, not windows, makes a
    batch of 2048 the same amount of training signal as RecBole's batch of 2048 one-target
    prefixes, whatever the sequence lengths."""
    order = torch.randperm(len(windows), generator=generator).tolist()
    lengths = (windows.lengths if isinstance(windows, Segments)
               else np.fromiter(map(len, windows), dtype=np.int64, count=len(windows)))
    targets = (lengths - 1).tolist()
    size = [1] * len(targets) if last_target_only else targets
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        end, chunk_targets = start, 0
        while end < len(order) and chunk_targets < 50 * batch_targets:
            chunk_targets += size[order[end]]
            end += 1
        batch, batch_count = [], 0
        for i in sorted(order[start:end], key=lambda i: targets[i]):
            if batch and batch_count + size[i] > batch_targets:
                batches.append(batch)
                batch, batch_count = [], 0
            batch.append(i)
            batch_count += size[i]
        batches.append(batch)
        start = end
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def collate_windows(windows: list[np.ndarray], last_target_only: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """(inputs, targets), both (B, L) int64 right-padded with 0: inputs w[:-1], targets w[1:]
    (with ``last_target_only``, 0 (no target) everywhere but at each window's last item)."""
    inputs, targets = pad_right([w[:-1] for w in windows]), pad_right([w[1:] for w in windows])
    if last_target_only:
        last = torch.tensor([len(w) - 2 for w in windows])
        targets = torch.zeros_like(targets).scatter_(1, last[:, None],
                                                     targets.gather(1, last[:, None]))
    return inputs, targets


def last_items(histories: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    """The most recent max_len items of each history."""
    return [h[-max_len:] for h in histories]


__all__ = ["Segments", "SequenceData", "DataFormatError", "NotWritableError", "check_writable",
           "read_sequences", "read_pairs", "read_ml1m", "read_amazon", "read_table", "read_file",
           "reference_reader", "is_gzip", "k_core_filter", "load_dataset", "fetch", "synthetic",
           "leave_one_out", "Split", "training_windows", "training_prefixes", "bucketed_batches", "collate_windows",
           "pad_right", "last_items"]
