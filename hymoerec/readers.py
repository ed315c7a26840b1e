"""Columnar readers: every format of :data:`hymoerec.data.FORMATS` parsed by pyarrow, grouped
and numbered with numpy, into the same :class:`~hymoerec.data.SequenceData` as the
line-by-line reference readers of :mod:`hymoerec.data` (same ids, same order).

How a file is read:

* in chunks of whole lines (``CHUNK_BYTES`` of the decompressed text; a ``.gz`` file is
  decompressed by arrow's stream), or by ``pyarrow.csv``'s streaming reader, or row group by
  row group (Parquet), so only one chunk of text or rows is held at a time;
* each chunk's users and items are dictionary-encoded (ids numbered by first appearance in
  the chunk), and the chunks' dictionaries are unified at the end, which numbers every id by
  its first appearance in the file; what is kept per interaction is an int32 code per
  column (and a float64 time where the format has one);
* rows are grouped by user with a stable sort on (user, time) in numpy: users in the order
  of their earliest interaction (ties: file order), items numbered 1..n by first appearance
  in that grouped order, as the reference does;
* the result is one int64 buffer plus offsets (:class:`~hymoerec.data.Segments`).

Exactness. The columnar path only accepts what it can vouch for gives the reference's
result: text that is valid UTF-8 (latin-1 for ml-1m), whitespace split as Python's
``str.split`` splits it, numbers that arrow's cast parses (a subset of what ``float``
accepts, with the same values). Anything else -- a malformed line, a number written as
``float`` alone reads it (`` 12``, ``1_000``), a row of blank fields, a user on two lines --
is handed to the reference reader of the format, which raises the exact one-line error of
the first malformed line, or reads the file with a warning that it was read line by line.
Parquet and JSON lines have no reference reader: their errors name the row group and row,
or the line and its byte offset.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .data import (DataFormatError, Segments, SequenceData, _is_number, is_gzip,
                   reference_reader)

CHUNK_BYTES = 1 << 23
UTF8_BOM = b"\xef\xbb\xbf"
# ids read as integers: the canonical text of an int64 (no "+", no leading zero, no "-0"),
# short enough never to overflow
INTEGER_TEXT = r"^(0|-?[1-9][0-9]{0,17})$"


class _Unsure(Exception):
    """The columnar path met input it cannot vouch for (args[0] says what); the reference
    reader reads the file instead."""


def read_columnar(path, fmt: str, k_core: int = 5, user_col: str = "user",
                  item_col: str = "item", time_col: str | None = "timestamp") -> SequenceData:
    """``path`` in format ``fmt`` (see :func:`hymoerec.data.read_file`), read by the
    columnar reader of the format; a file it cannot vouch for is read by the reference
    reader (module docstring). While it reads, arrow's default memory pool is its system
    (malloc) pool, so this is not to run beside other threads that use arrow."""
    readers = {
        "sequences": lambda: _read_sequences(path),
        "pairs": lambda: _read_pairs(path),
        "ml-1m": lambda: _read_ml1m(path),
        "amazon": lambda: _read_amazon(path, k_core),
        "csv": lambda: _read_table(path, ",", user_col, item_col, time_col),
        "tsv": lambda: _read_table(path, "\t", user_col, item_col, time_col),
        "parquet": lambda: _read_parquet(path, user_col, item_col, time_col),
        "jsonl": lambda: _read_jsonl(path, user_col, item_col, time_col),
    }
    pool = pa.default_memory_pool()
    # arrow allocates from malloc while reading, like numpy: chunk buffers it frees are
    # reused for numpy's arrays instead of staying in a pool of arrow's own
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        return readers[fmt]()
    except _Unsure as doubt:
        reference = reference_reader(fmt, k_core, user_col, item_col, time_col)
        if reference is None:       # jsonl: no line-by-line reader to hand the file to
            raise DataFormatError(f"cannot read data file {path}: {doubt.args[0]}") from None
        data = reference(path)
        warnings.warn(f"{path}: read line by line by the reference reader, which is slower "
                      f"({doubt.args[0]})", stacklevel=3)
        return data
    finally:
        pa.set_memory_pool(pool)


# ------------------------------------------------------------------------- text chunks

def _text_chunks(path, strip_bom: bool = True):
    """(byte offset, chunk, share) of the decompressed bytes of ``path`` in chunks of whole
    lines: each chunk ends with b"\\n" except possibly the last; a UTF-8 byte-order mark at
    the start is dropped when ``strip_bom``. ``share``: the fraction of the file on disk
    (compressed, for .gz) read so far, an estimate of the fraction of the data read that
    sizes the columns (:class:`_Column`). A file that cannot be opened or decompressed is
    left to the reference reader, which names the reason."""
    try:
        with pa.OSFile(str(path)) as raw:
            size = max(raw.size(), 1)
            stream = pa.CompressedInputStream(raw, "gzip") if is_gzip(path) else raw
            carry, offset = b"", 0
            while block := stream.read(CHUNK_BYTES):
                if offset == 0 and not carry and strip_bom and block.startswith(UTF8_BOM):
                    block, offset = block[len(UTF8_BOM):], len(UTF8_BOM)
                text = carry + block
                cut = text.rfind(b"\n") + 1
                carry = text[cut:]
                if cut:
                    yield offset, text[:cut], min(1.0, raw.tell() / size)
                    offset += cut
            if carry:
                yield offset, carry, 1.0
    except (OSError, pa.ArrowException) as err:
        raise _Unsure(f"arrow cannot read it: {' '.join(str(err).split())}") from None


def _lines(chunk: bytes) -> pa.StringArray:
    """The lines of ``chunk`` as an arrow string array, each with its terminator; lines end
    where Python's text files (newline="") end them: at "\\n", "\\r\\n" and a lone "\\r".
    Not yet checked to be UTF-8."""
    buf = np.frombuffer(chunk, dtype=np.uint8)
    lone_cr = buf == 13
    lone_cr[:-1] &= buf[1:] != 10
    ends = np.flatnonzero((buf == 10) | lone_cr) + 1
    if not len(ends) or ends[-1] != len(buf):  # a last line without terminator
        ends = np.append(ends, len(buf))
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    return pa.StringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(chunk))


def _check_utf8(lines: pa.Array) -> None:
    try:
        lines.validate(full=True)
    except pa.ArrowInvalid:
        raise _Unsure("bytes that are not UTF-8") from None


def _tokens(lines: pa.StringArray, chunk: bytes) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """(all tokens (T,), first token's position (n,) int64, tokens per line (n,) int64) of
    the lines that have tokens (blank lines dropped), split at whitespace exactly as
    ``str.split()`` splits: each line trimmed, then split at its inner runs of whitespace,
    by arrow's Unicode kernels, or by its faster ASCII ones when the chunk holds no byte
    where the two differ (non-ASCII bytes and the separators \\x1c..\\x1f)."""
    buf = np.frombuffer(chunk, dtype=np.uint8)
    if (buf >= 0x80).any() or ((buf >= 0x1C) & (buf <= 0x1F)).any():
        trim, split = pc.utf8_trim_whitespace, pc.utf8_split_whitespace
    else:
        trim, split = pc.ascii_trim_whitespace, pc.ascii_split_whitespace
    lines = trim(lines)
    tokens = split(lines)
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    flat = tokens.flatten()
    blank = pc.binary_length(lines).to_numpy() == 0  # a blank line splits into one ""
    if not blank.any():
        return flat, offsets[:-1] - offsets[0], np.diff(offsets)
    real = np.ones(len(flat), dtype=bool)
    real[offsets[:-1][blank] - offsets[0]] = False
    counts = np.diff(offsets)[~blank]
    return flat.filter(pa.array(real)), np.cumsum(counts) - counts, counts


# ------------------------------------------------------------------- ids and grouping

class _Column:
    """A numpy column filled chunk by chunk into one buffer, sized on the first chunk from
    the share of the file that chunk is (with 5% to spare), so the finished column is
    not held twice: a large buffer is mapped by malloc on its own, its pages become memory
    only when written, and the unused tail is given back when it is shrunk to size
    (realloc remaps it). Only an estimate that falls short grows the buffer, which numpy
    fills with zeros up to the new capacity."""

    def __init__(self, dtype):
        self.data = np.empty(0, dtype=dtype)
        self.size = 0

    def append(self, values: np.ndarray, share: float | None = None) -> None:
        """Append values (n,); ``share``: the fraction of the file read so far, if known."""
        end = self.size + len(values)
        if end > len(self.data):
            estimate = int(end / share * 1.05) + 4096 if self.size == 0 and share else 0
            self.data.resize(max(end, 2 * len(self.data), estimate, 1 << 16), refcheck=False)
        self.data[self.size:end] = values
        self.size = end

    def finish(self) -> np.ndarray:
        """The (size,) column; the object is not to be used afterwards."""
        self.data.resize(self.size, refcheck=False)
        return self.data


class _Ids:
    """One id column of a file read in chunks, numbered 0.. by first appearance in the file.

    While every id is an integer (an integer column, or the text of one: the canonical
    int64 text :data:`INTEGER_TEXT`), the column holds the raw int64 ids and numbers them at
    the end: arrow's hash ``unique`` lists them in order of first appearance, and slices of
    the column are looked up in that list and overwritten by their numbers, so nothing of
    the column's size is allocated twice. Any other id turns the column to strings: what
    was read so far is numbered, and from then on each chunk's ids are dictionary-encoded
    (codes into the chunk's own dictionary), and whenever the pending chunks' dictionaries
    hold three times as many ids as the running one, they are merged into it
    (:meth:`_merge`), translating their codes in place."""

    def __init__(self):
        self.codes = _Column(np.int64)
        self.raw = True          # the column holds raw integer ids, not codes
        self.dictionary: pa.Array = pa.array([], pa.int64())
        self.pending: list[tuple[int, int, pa.Array]] = []   # (start, end, dictionary)
        self.pending_size = 0

    def __len__(self) -> int:
        return self.codes.size

    def add(self, ids: pa.Array, share: float | None = None) -> None:
        """Append one chunk's ids (string or integer array, no nulls); ``share``: the
        fraction of the file read so far, if known (it sizes the column)."""
        if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type)):
            ids = ids.cast(pa.string())
        if self.raw:
            if pa.types.is_integer(ids.type):
                self.codes.append(ids.cast(pa.int64()).to_numpy(), share)
                return
            if pc.all(pc.match_substring_regex(ids, INTEGER_TEXT)).as_py():
                self.codes.append(pc.cast(ids, pa.int64()).to_numpy(), share)
                return
            self._number_raw()
        encoded = pc.dictionary_encode(ids.cast(pa.string()))
        start = self.codes.size
        self.codes.append(encoded.indices.to_numpy(), share)
        self.pending.append((start, self.codes.size, encoded.dictionary))
        self.pending_size += len(encoded.dictionary)
        if self.pending_size >= 3 * len(self.dictionary):
            self._merge()

    def _number_raw(self) -> None:
        """Replace the raw integer ids read so far by their numbers; strings from now on.
        Ids within a range of at most half the column's length are numbered through a
        lookup table over that range (about twice as fast as hashing them all again),
        others by one dictionary encoding of the whole column (int32 codes: 4 bytes an id
        more for a moment)."""
        raw = self.codes.data[:self.codes.size]
        low, high = (int(raw.min()), int(raw.max())) if len(raw) else (0, -1)
        if high - low < len(raw) // 2:
            present = pc.unique(pa.array(raw))   # in order of first appearance
            table = np.empty(high - low + 1, dtype=np.int64)
            table[present.to_numpy() - low] = np.arange(len(present))
            for start in range(0, len(raw), 1 << 20):
                part = raw[start:start + (1 << 20)]
                part[:] = table[part - low]
        else:
            encoded = pc.dictionary_encode(pa.array(raw))
            present = encoded.dictionary
            raw[:] = encoded.indices.to_numpy()
        self.dictionary = present.cast(pa.string())
        self.raw = False

    def _merge(self) -> None:
        """The pending dictionaries merged into the running one: one dictionary encoding of
        the running dictionary followed by the pending ones numbers each id by its first
        appearance there, so the running dictionary's ids keep their codes (it has no
        duplicates) and new ids follow in file order; each pending chunk's codes are
        translated through its dictionary's slice of the encoding."""
        if not self.pending:
            return
        encoded = pc.dictionary_encode(
            pa.concat_arrays([self.dictionary] + [d for _, _, d in self.pending]))
        file_codes = encoded.indices.to_numpy()
        offset = len(self.dictionary)
        codes = self.codes.data
        for start, end, dictionary in self.pending:
            transpose = file_codes[offset:offset + len(dictionary)]  # chunk code -> file code
            codes[start:end] = transpose[codes[start:end]]
            offset += len(dictionary)
        self.dictionary = encoded.dictionary
        self.pending, self.pending_size = [], 0

    def unify(self) -> tuple[np.ndarray, pa.Array]:
        """(codes (N,) int64, string dictionary): the codes 0-based into one dictionary of
        all ids in order of first appearance. The object is not to be used afterwards."""
        if self.raw:
            self._number_raw()
        else:
            self._merge()
        return self.codes.finish(), self.dictionary


def _first_appearance(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rank (size,) int64, present (K,) int64): the codes 0..size-1 present in ``codes``
    in order of first appearance, and rank[present[j]] = j (other entries undefined)."""
    present = pc.unique(pa.array(codes)).to_numpy()
    rank = np.empty(size, dtype=np.int64)
    rank[present] = np.arange(len(present))
    return rank, present


def _group(users: _Ids, items: _Ids, times: np.ndarray | None, name: str) -> SequenceData:
    """:func:`_grouped` of the interactions of two id columns read in chunks."""
    user_codes, user_dict = users.unify()
    item_codes, item_dict = items.unify()
    return _grouped(user_codes, user_dict, item_codes, item_dict, times, name)


def _grouped(users: np.ndarray, user_dict: pa.Array, items: np.ndarray, item_dict: pa.Array,
             times: np.ndarray | None, name: str) -> SequenceData:
    """SequenceData of interactions in file order -- user and item codes (N,) int64 into
    their dictionaries, times (N,) (None: file order) -- grouped as the reference groups
    them: rows stably sorted by time, users in order of first appearance in that order,
    each user's items in it, items numbered 1..n by first appearance in the grouped order."""
    if times is not None:
        order = np.argsort(times, kind="stable")
        users, items = users[order], items[order]
        del order
    user_rank, user_present = _first_appearance(users, len(user_dict))
    users = user_rank[users]
    order = np.argsort(users, kind="stable")
    lengths = np.bincount(users, minlength=len(user_present))
    items = items[order]
    del order, users
    item_rank, item_present = _first_appearance(items, len(item_dict))
    values = item_rank[items]
    values += 1
    return SequenceData(Segments.from_lengths(values, lengths),
                        ["<pad>"] + item_dict.take(pa.array(item_present)).to_pylist(),
                        user_dict.take(pa.array(user_present)).to_pylist(), name)


def _floats(values: pa.Array, what: str) -> np.ndarray:
    """(n,) float64 of a string (or numeric) column, all finite, else _Unsure."""
    try:
        numbers = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        raise _Unsure(f"a {what} that arrow does not read as a number") from None
    if not np.isfinite(numbers).all():
        raise _Unsure(f"a {what} that is not a finite number")
    return numbers


# ------------------------------------------------------------------- the text formats

def _read_sequences(path) -> SequenceData:
    """``user item item ...`` per line (see :func:`hymoerec.data.read_sequences`)."""
    users, items, lengths = [], _Ids(), []
    for _, chunk, share in _text_chunks(path):
        lines = _lines(chunk)
        _check_utf8(lines)
        tokens, firsts, counts = _tokens(lines, chunk)
        if (counts == 1).any():
            raise _Unsure("a line with a user and no item")
        is_item = np.ones(len(tokens), dtype=bool)
        is_item[firsts] = False
        users.append(tokens.take(pa.array(firsts)))
        items.add(tokens.filter(pa.array(is_item)), share)
        lengths.append(counts - 1)
    users = pa.chunked_array(users, pa.string())
    if not len(users):
        raise _Unsure("no interactions")
    if pc.count_distinct(users).as_py() != len(users):
        raise _Unsure("a user on more than one line")
    values, item_dict = items.unify()
    values += 1
    return SequenceData(Segments.from_lengths(values, np.concatenate(lengths)),
                        ["<pad>"] + item_dict.to_pylist(), users.to_pylist(), Path(path).name)


def _read_pairs(path) -> SequenceData:
    """``user item`` per line (see :func:`hymoerec.data.read_pairs`)."""
    users, items = _Ids(), _Ids()
    for _, chunk, share in _text_chunks(path):
        lines = _lines(chunk)
        _check_utf8(lines)
        tokens, _, counts = _tokens(lines, chunk)
        if (counts != 2).any():
            raise _Unsure("a line with other than two fields")
        users.add(tokens.take(pa.array(np.arange(0, len(tokens), 2))), share)
        items.add(tokens.take(pa.array(np.arange(1, len(tokens), 2))), share)
    if not len(users):
        raise _Unsure("no interactions")
    return _group(users, items, None, Path(path).name)


def _read_ml1m(path) -> SequenceData:
    """MovieLens ``UserID::MovieID::Rating::Timestamp`` in latin-1 (see
    :func:`hymoerec.data.read_ml1m`)."""
    users, items, times = _Ids(), _Ids(), _Column(np.float64)
    for _, chunk, share in _text_chunks(path, strip_bom=False):
        if (np.frombuffer(chunk, dtype=np.uint8) >= 0x80).any():
            chunk = chunk.decode("latin-1").encode("utf-8")
        lines = pc.utf8_rtrim(_lines(chunk), characters="\r\n")
        blank = pc.or_(pc.equal(pc.binary_length(lines), 0), pc.utf8_is_space(lines))
        fields = pc.split_pattern(lines.filter(pc.invert(blank)), "::")
        if pc.any(pc.not_equal(pc.list_value_length(fields), 4)).as_py():
            raise _Unsure("a line with other than four '::' fields")
        flat = fields.flatten()
        column = [flat.take(pa.array(np.arange(j, len(flat), 4))) for j in range(4)]
        _floats(column[2], "Rating")
        users.add(column[0], share)
        items.add(column[1], share)
        times.append(_floats(column[3], "Timestamp"), share)
    if not len(users):
        raise _Unsure("no interactions")
    return _group(users, items, times.finish(), Path(path).name)


# ------------------------------------------------------------------------- CSV / TSV

def _skip_blank_row(row) -> str:
    """pyarrow.csv's handler of a row with another number of fields than the header: a
    whitespace-only line is skipped (as the reference skips it), any other is an error."""
    return "skip" if not row.text.strip() else "error"


def _csv_reader(path, delimiter: str, columns: list[str] | None, block_size: int = CHUNK_BYTES):
    """pyarrow.csv's streaming reader of ``path`` with Python csv's quoting (quoted
    delimiters, doubled quotes and newlines inside quotes), every selected column as strings;
    ``columns`` None: all of them, named "f0", "f1", ... (no header line)."""
    stream = pa.input_stream(str(path), compression="gzip" if is_gzip(path) else None)
    read = pacsv.ReadOptions(use_threads=False, block_size=block_size,
                             autogenerate_column_names=columns is None)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                               invalid_row_handler=_skip_blank_row)
    convert = (pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                    include_columns=columns) if columns is not None else
               pacsv.ConvertOptions(column_types={f"f{j}": pa.string() for j in range(4)}))
    return pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)


def _read_table(path, delimiter: str, user_col: str, item_col: str,
                time_col: str | None) -> SequenceData:
    """A CSV/TSV file with a header naming its columns (see
    :func:`hymoerec.data.read_table`)."""
    try:
        with _csv_reader(path, delimiter, [], block_size=1 << 20) as probe:
            header = probe.schema.names
        # the reference strips the header's names and takes a name's first column
        stripped = [name.strip() for name in header]
        columns = []
        for col in (user_col, item_col, time_col):
            if col is None:
                continue
            if col not in stripped or header.count(header[stripped.index(col)]) > 1:
                raise _Unsure(f"no single column {col!r} in the header")
            columns.append(header[stripped.index(col)])
        users, items, times = _Ids(), _Ids(), _Column(np.float64)
        with _csv_reader(path, delimiter, columns) as reader:
            for batch in reader:
                user, item = batch.column(0), batch.column(1)
                if time_col is None and pc.any(pc.and_(_blank(user), _blank(item))).as_py():
                    raise _Unsure("a row of blank fields")
                users.add(user)
                items.add(item)
                if time_col is not None:
                    times.append(_floats(batch.column(2), time_col))
    except (OSError, pa.ArrowException) as err:
        raise _Unsure(f"a row pyarrow.csv does not take: {err}") from None
    if not len(users):
        raise _Unsure("no interactions")
    return _group(users, items, times.finish() if time_col is not None else None,
                  Path(path).name)


def _blank(values: pa.Array) -> pa.BooleanArray:
    """Whether each string is empty or whitespace only."""
    return pc.or_(pc.equal(pc.binary_length(values), 0), pc.utf8_is_space(values))


def _first_line(path) -> bytes:
    """The first line of the (decompressed) file, without its terminator and byte-order mark."""
    for _, chunk, _ in _text_chunks(path):
        return chunk.split(b"\n", 1)[0].split(b"\r", 1)[0]
    return b""


def _read_amazon(path, k_core: int) -> SequenceData:
    """Amazon ``user,item,rating,timestamp`` CSV, k-core filtered (see
    :func:`hymoerec.data.read_amazon`)."""
    users, items, times = _Ids(), _Ids(), _Column(np.float64)
    try:
        with _csv_reader(path, ",", None) as reader:
            if len(reader.schema.names) != 4:
                raise _Unsure("a first row of other than four fields")
            for batch in reader:
                if not len(users) and batch.num_rows:
                    stamp = batch.column(3)[0].as_py()
                    if not _is_number(stamp):
                        # a header: the reference takes line 1 as one when its timestamp
                        # field is not a number
                        line = _first_line(path)
                        if not line.strip() or b'"' in line:
                            raise _Unsure("a first row that may or may not be a header")
                        batch = batch.slice(1)
                _floats(batch.column(2), "rating")
                times.append(_floats(batch.column(3), "timestamp"))
                users.add(batch.column(0))
                items.add(batch.column(1))
    except (OSError, pa.ArrowException) as err:
        raise _Unsure(f"a row pyarrow.csv does not take: {err}") from None
    n_rows = len(users)
    if not n_rows:
        raise _Unsure("no interactions")
    user_codes, user_dict = users.unify()
    item_codes, item_dict = items.unify()
    kept = k_core_mask(user_codes, item_codes, k_core)
    if not kept.any():
        raise DataFormatError(f"{path}: no interactions left after the {k_core}-core filter "
                              f"({n_rows} read; a smaller --k-core keeps more)")
    return _grouped(user_codes[kept], user_dict, item_codes[kept], item_dict,
                    times.finish()[kept], Path(path).name)


def k_core_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: the interactions (user and item codes (N,) int64) that the k-core
    filter keeps (:func:`hymoerec.data.k_core_filter`: repeatedly drop those of users and
    items with fewer than k until every remaining user and item has at least k)."""
    kept = np.ones(len(users), dtype=bool)
    if k <= 1:
        return kept
    while True:
        user_counts = np.bincount(users[kept], minlength=users.max() + 1)
        item_counts = np.bincount(items[kept], minlength=items.max() + 1)
        still = kept & (user_counts[users] >= k) & (item_counts[items] >= k)
        if still.sum() == kept.sum():
            return kept
        kept = still


# --------------------------------------------------------------------------- Parquet

def _read_parquet(path, user_col: str, item_col: str, time_col: str | None) -> SequenceData:
    """A Parquet file, row group by row group: ``user_col`` / ``item_col`` string or
    integer ids, ``time_col`` integer, float, timestamp or date (None: file order). Times
    are compared exactly in their own type. A missing column, a column of another type, a
    null value and a damaged file are DataFormatErrors naming the column, row group and row.
    A .gz file is decompressed to a temporary file first (Parquet needs to seek)."""
    if is_gzip(path):
        with tempfile.TemporaryFile() as plain:
            try:
                with pa.input_stream(str(path), compression="gzip") as stream:
                    shutil.copyfileobj(stream, plain)
            except (OSError, pa.ArrowException) as err:
                raise DataFormatError(f"cannot read data file {path}: {err}") from None
            plain.seek(0)
            return _read_parquet_file(plain, path, user_col, item_col, time_col)
    return _read_parquet_file(str(path), path, user_col, item_col, time_col)


def _read_parquet_file(source, path, user_col, item_col, time_col) -> SequenceData:
    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as err:
        raise DataFormatError(f"{path}: not a readable Parquet file ({err})") from None
    schema = parquet.schema_arrow
    roles = [("user", user_col), ("item", item_col)] + ([("time", time_col)] if time_col else [])
    for role, col in roles:
        if col not in schema.names:
            raise DataFormatError(f"{path}: no column {col!r} for the {role} (columns: "
                                  f"{schema.names})")
        kind = schema.field(col).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        ok = (pa.types.is_string(kind) or pa.types.is_large_string(kind)
              or pa.types.is_integer(kind)) if role != "time" else (
            pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_timestamp(kind) or pa.types.is_date(kind))
        if not ok:
            wanted = "strings or integers" if role != "time" else "numbers, timestamps or dates"
            raise DataFormatError(f"{path}: column {col!r} ({role}) holds {kind}, expected "
                                  f"{wanted}")
    users, items, times = _Ids(), _Ids(), []
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=[col for _, col in roles])
        except (OSError, pa.ArrowException) as err:
            raise DataFormatError(f"{path}, row group {group}: cannot be read ({err})") from None
        for role, col in roles:
            column = table.column(col)
            if column.null_count:
                row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise DataFormatError(f"{path}, row group {group}, row {row}: {col} ({role}) "
                                      f"is null")
        share = (group + 1) / parquet.num_row_groups
        users.add(_dense(table.column(user_col)), share)
        items.add(_dense(table.column(item_col)), share)
        if time_col:
            times.append(_parquet_times(_dense(table.column(time_col)), path, group, time_col))
    if not len(users):
        raise DataFormatError(f"{path}: no interactions (no rows)")
    return _group(users, items, np.concatenate(times) if time_col else None, Path(path).name)


def _dense(column: pa.ChunkedArray) -> pa.Array:
    """One plain array of a column (dictionary-encoded columns decoded)."""
    array = column.combine_chunks()
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _parquet_times(column: pa.Array, path, group: int, col: str) -> np.ndarray:
    """(n,) int64 or float64 times of a row group, in their own order: timestamps and
    dates as their integer counts; a NaN or infinite float is an error naming the row."""
    if pa.types.is_floating(column.type):
        times = column.cast(pa.float64()).to_numpy()
        bad = np.flatnonzero(~np.isfinite(times))
        if len(bad):
            raise DataFormatError(f"{path}, row group {group}, row {int(bad[0])}: {col} "
                                  f"{times[bad[0]]} is not a finite number")
        return times
    if pa.types.is_date(column.type) or pa.types.is_timestamp(column.type):
        column = column.view(pa.int32() if pa.types.is_date32(column.type) else pa.int64())
    return column.cast(pa.int64()).to_numpy()


# ------------------------------------------------------------------------ JSON lines

def _read_jsonl(path, user_col: str, item_col: str, time_col: str | None) -> SequenceData:
    """One JSON object per line, e.g. Amazon Reviews 2023 (``user_id``, ``parent_asin``,
    ``timestamp``): ``user_col`` / ``item_col`` strings or integers, ``time_col`` a number
    (None: file order); other fields are skipped unparsed. Blank lines are skipped. A line
    that is not such an object is a DataFormatError naming the line and its byte offset."""
    fields = [user_col, item_col] + ([time_col] if time_col else [])
    schemas = _jsonl_schemas(user_col, item_col, time_col)
    users, items, times = _Ids(), _Ids(), _Column(np.float64)
    line_no = 1
    for offset, chunk, share in _text_chunks(path):
        table = None
        for schema in schemas:
            try:
                table = pajson.read_json(
                    pa.BufferReader(chunk),
                    read_options=pajson.ReadOptions(use_threads=False, block_size=len(chunk) + 1),
                    parse_options=pajson.ParseOptions(explicit_schema=schema,
                                                      unexpected_field_behavior="ignore"))
            except pa.ArrowInvalid:
                continue
            schemas.remove(schema)
            schemas.insert(0, schema)  # the next chunk most likely has the same types
            break
        if (table is None or any(table.column(f).null_count for f in fields)
                or (time_col and not np.isfinite(table.column(time_col).to_numpy()).all())):
            # arrow gave up, or met a missing value or a non-finite time: read the chunk
            # line by line, which names the first bad line, or gives the values (e.g. ids
            # of mixed types)
            user, item, stamp = _jsonl_lines(chunk, path, line_no, offset, user_col, item_col,
                                             time_col)
        else:
            user = table.column(user_col).combine_chunks()
            item = table.column(item_col).combine_chunks()
            stamp = table.column(time_col).to_numpy() if time_col else None
        users.add(user, share)
        items.add(item, share)
        if time_col:
            times.append(stamp, share)
        line_no += chunk.count(b"\n")
    if not len(users):
        raise DataFormatError(f"{path}: no interactions (the file is empty or holds only "
                              f"blank lines)")
    return _group(users, items, times.finish() if time_col else None, Path(path).name)


def _jsonl_schemas(user_col, item_col, time_col) -> list[pa.Schema]:
    """The schemas arrow's JSON reader is tried with: ids as strings or integers."""
    return [pa.schema([(user_col, user_type), (item_col, item_type)]
                      + ([(time_col, pa.float64())] if time_col else []))
            for user_type in (pa.string(), pa.int64()) for item_type in (pa.string(), pa.int64())]


def _jsonl_lines(chunk: bytes, path, line_no: int, offset: int, user_col: str, item_col: str,
                 time_col: str | None) -> tuple[pa.Array, pa.Array, np.ndarray | None]:
    """(users, items, times) of a chunk read line by line with Python's json (ids as
    strings), or the DataFormatError of its first bad line: "<file>, line N (byte B):
    <what>". ``line_no`` / ``offset``: the chunk's first line number and byte offset."""
    users, items, times = [], [], []
    for raw in chunk.split(b"\n"):
        where = f"{path}, line {line_no} (byte {offset})"
        line_no, offset = line_no + 1, offset + len(raw) + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{where}: byte {err.start + 1} of the line "
                                  f"({raw[err.start:err.start + 1]!r}) is not utf-8 text; "
                                  f"save the file as UTF-8") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got "
                                  f"{type(record).__name__}")
        for role, col, out in (("user", user_col, users), ("item", item_col, items)):
            value = record.get(col)
            if col not in record:
                raise DataFormatError(f"{where}: no field {col!r} for the {role}")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataFormatError(f"{where}: {col} ({role}) is {value!r}, expected a "
                                      f"string or an integer")
            out.append(str(value))
        if time_col:
            if time_col not in record:
                raise DataFormatError(f"{where}: no field {time_col!r} for the time")
            value = record[time_col]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataFormatError(f"{where}: {time_col} {value!r} is not a number")
            if not math.isfinite(value):
                raise DataFormatError(f"{where}: {time_col} {value!r} is not a finite number")
            times.append(float(value))
    return (pa.array(users, pa.string()), pa.array(items, pa.string()),
            np.array(times, dtype=np.float64) if time_col else None)
