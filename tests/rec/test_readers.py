"""The columnar readers (hymoerec.readers, behind data.read_file) against the line-by-line
reference readers: the same SequenceData (ids, order) on fixtures of every format, gzip
too, split into many chunks, and the same one-line errors on malformed input."""
import gzip
import json
import random
import string
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hymoerec import data as D
from hymoerec import readers as R
from shared_data import SHARED_DATA

REFERENCE_FORMATS = ("sequences", "pairs", "ml-1m", "amazon", "csv", "tsv")


def as_tuple(data):
    """Everything a SequenceData holds, comparable with ==."""
    return ([s.tolist() for s in data.sequences], data.item_ids, data.user_ids, data.name)


def write(path: Path, text: str, encoding="utf-8") -> Path:
    raw = text.encode(encoding)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def columnar(path, fmt, **kwargs):
    """read_file that fails the test if the columnar reader handed the file to the reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return D.read_file(path, fmt, **kwargs)


# one data set, in every format: interleaved users, time ties, ids that look alike
ROWS = [  # user, item, time
    ("u1", "7", 5), ("u2", "007", 1), ("é", "x y", 3), ("u1", "8", 2), ("u2", "7", 1),
    ("u3", "8", 9), ("é", "7", 3), ("u1", "-0", 2), ("u3", "中", 4), ("u2", "+5", 0),
    ("u3", "12345678901234567890", 4), ("u1", "7", 6),
]


def rows_text(fmt: str, rows=ROWS) -> str:
    """The rows in ``fmt`` (ids with a space are quoted in csv; kept out of the
    whitespace-separated formats)."""
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        body = "".join(f'{u}{sep}"{i}"{sep}{t}\r\n' if " " in i else f"{u}{sep}{i}{sep}{t}\r\n"
                       for u, i, t in rows)
        return f"user{sep}item{sep}timestamp\r\n\r\n" + body + "   \n"
    if fmt == "amazon":
        return "".join(f'{u},"{i}",4.5,{t}\n' for u, i, t in rows)
    if fmt == "ml-1m":  # written as latin-1
        return "".join(f"{u}::{i.replace('中', 'ü')}::3::{t}\r\n" for u, i, t in rows)
    plain = [(u, i.replace(" ", "_"), t) for u, i, t in rows]
    if fmt == "pairs":
        return "\n".join(f"{u}\t {i}" for u, i, _ in plain) + "\n\n"
    if fmt == "jsonl":
        return "".join(json.dumps({"user": u, "item": i, "timestamp": t, "text": "a\nb"}) + "\n"
                       for u, i, t in rows)
    # sequences: one line per user in order of first appearance, items in row order
    users = {}
    for u, i, _ in plain:
        users.setdefault(u, []).append(i)
    return "\ufeff" + "".join(f"{u} " + "\u3000".join(items) + " \r\n\n" for u, items in users.items())


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", REFERENCE_FORMATS)
def test_same_data_as_the_reference(tmp_path, fmt, gz):
    path = write(tmp_path / (f"data.{fmt}" + (".gz" if gz else "")), rows_text(fmt),
                 "latin-1" if fmt == "ml-1m" else "utf-8")
    got = columnar(path, fmt, k_core=1)
    want = D.reference_reader(fmt, k_core=1)(path)
    assert as_tuple(got) == as_tuple(want)
    assert (got.n_users, got.n_interactions) == (4, len(ROWS))


def test_padded_header_names_are_found(tmp_path):
    """The reference strips the header's names; so does the columnar reader."""
    path = write(tmp_path / "p.csv", " user ,item , timestamp\nu,a,2\nu,b,1\n")
    assert as_tuple(columnar(path, "csv")) == as_tuple(D.reference_reader("csv")(path))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_time_ordered_formats_agree(tmp_path, fmt):
    """csv is the reference for the formats without one: the same rows as jsonl and
    Parquet give the same data (times ordered, ties in file order)."""
    want = D.reference_reader("csv")(write(tmp_path / "d.csv", rows_text("csv")))
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"user": [r[0] for r in ROWS], "item": [r[1] for r in ROWS],
                                 "timestamp": [r[2] for r in ROWS]}), path, row_group_size=5)
    else:
        path = write(tmp_path / f"d.{fmt}", rows_text(fmt))
    assert as_tuple(columnar(path, fmt))[:3] == as_tuple(want)[:3]
    # the user order is each user's earliest time: u2 (t=0), u1, é, u3
    assert want.user_ids == ["u2", "u1", "é", "u3"]
    assert [want.item_ids[i] for i in want.sequences[0]] == ["+5", "007", "7"]


def random_rows(n, seed, integer_share):
    rng = random.Random(seed)
    alphabet = string.ascii_letters + "éß中"
    def ident(pool):
        value = rng.randrange(pool)
        return str(value) if rng.random() < integer_share else f"{alphabet[value % len(alphabet)]}{value}"
    return [(ident(40), ident(300), rng.randrange(50)) for _ in range(n)]


@pytest.mark.parametrize("fmt", REFERENCE_FORMATS + ("jsonl",))
@pytest.mark.parametrize("integer_share", [1.0, 0.97], ids=["integers", "mostly-integers"])
def test_many_small_chunks(tmp_path, monkeypatch, fmt, integer_share):
    """Chunks of 256 bytes: ids numbered across chunks (integer ids turned to strings
    part-way), columns sized from the first chunk's share and grown, line ends at chunk
    ends; the same data as the reference (csv's for jsonl)."""
    monkeypatch.setattr(R, "CHUNK_BYTES", 256)
    rows = random_rows(1500, seed=3, integer_share=integer_share)
    path = write(tmp_path / f"d.{fmt}", rows_text(fmt, rows))
    got = columnar(path, fmt, k_core=2)
    if fmt == "jsonl":
        want = D.reference_reader("csv")(write(tmp_path / "d.csv", rows_text("csv", rows)))
    else:
        want = D.reference_reader(fmt, k_core=2)(path)
    assert as_tuple(got)[:3] == as_tuple(want)[:3]


def test_parquet_row_groups_integer_ids_and_timestamps(tmp_path):
    rows = random_rows(700, seed=5, integer_share=1.0)
    want = D.reference_reader("csv")(write(tmp_path / "d.csv", rows_text("csv", rows)))
    table = pa.table({"user": pa.array([int(r[0]) for r in rows]),
                      "item": pa.array([r[1] for r in rows]).dictionary_encode(),
                      "timestamp": pa.array([r[2] for r in rows], pa.timestamp("s"))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=64)
    assert as_tuple(columnar(tmp_path / "d.parquet", "parquet"))[:3] == as_tuple(want)[:3]
    plain = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "d.parquet.gz").write_bytes(gzip.compress(plain))
    assert as_tuple(columnar(tmp_path / "d.parquet.gz", "parquet"))[:3] == as_tuple(want)[:3]
    no_time = columnar(tmp_path / "d.parquet", "parquet", time_col=None)
    assert no_time.user_ids[0] == rows[0][0]      # file order


def test_jsonl_ids_of_mixed_types_and_columns_by_flag(tmp_path):
    lines = [{"user_id": 1, "parent_asin": "B01", "timestamp": 1700000000123, "title": "x"},
             {"user_id": "1", "parent_asin": 5, "timestamp": 1700000000100},
             {"user_id": 2, "parent_asin": "B01", "timestamp": 1.5, "images": [{"a": None}]}]
    path = write(tmp_path / "reviews.jsonl.gz", "\n".join(map(json.dumps, lines)) + "\n\n")
    data = D.read_file(path, "jsonl", user_col="user_id", item_col="parent_asin")
    assert data.user_ids == ["2", "1"] and data.item_ids == ["<pad>", "B01", "5"]
    assert [s.tolist() for s in data.sequences] == [[1], [2, 1]]


@pytest.mark.parametrize("text, message", [
    ('{"user": "a", "item": "x", "timestamp": 1}\n{"user": "a", "item": "y", "timestamp": 2',
     r"r.jsonl, line 2 \(byte 43\): not JSON \(Expecting ',' delimiter at column 42\)"),
    ('{"user": "a", "item": "x", "timestamp": 1}\n\n[1, 2]\n', r"line 3 \(byte 44\): expected a "
                                                               r"JSON object, got list"),
    ('{"user": "a", "timestamp": 1}\n', r"line 1 \(byte 0\): no field 'item' for the item"),
    ('{"user": "a", "item": 1.5, "timestamp": 1}\n', r"item \(item\) is 1.5, expected a string"),
    ('{"user": "a", "item": "x", "timestamp": NaN}\n', r"timestamp nan is not a finite number"),
    ('{"user": "a", "item": "x", "timestamp": "soon"}\n', r"timestamp 'soon' is not a number"),
    ('{"user": "a", "item": null, "timestamp": 3}\n', r"item \(item\) is None"),
])
def test_jsonl_errors_name_line_and_byte_offset(tmp_path, text, message):
    with pytest.raises(D.DataFormatError, match=message) as err:
        D.read_file(write(tmp_path / "r.jsonl", text), "jsonl")
    assert "\n" not in str(err.value)


def test_parquet_errors_name_column_and_row_group(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"user": ["a", "b", "c", None], "item": ["x", "y", "z", "w"],
                             "timestamp": [1, 2, 3, 4]}), path, row_group_size=3)
    with pytest.raises(D.DataFormatError, match=r"p.parquet, row group 1, row 0: user \(user\) is null"):
        D.read_file(path, "parquet")
    with pytest.raises(D.DataFormatError, match=r"p.parquet: no column 'uid' for the user "
                                                r"\(columns: \['user', 'item', 'timestamp'\]\)"):
        D.read_file(path, "parquet", user_col="uid")
    pq.write_table(pa.table({"user": [1.5], "item": ["x"], "timestamp": [1]}), path)
    with pytest.raises(D.DataFormatError, match=r"column 'user' \(user\) holds double, expected "
                                                r"strings or integers"):
        D.read_file(path, "parquet")
    pq.write_table(pa.table({"user": ["a", "a"], "item": ["x", "y"],
                             "timestamp": [1.0, float("nan")]}), path)
    with pytest.raises(D.DataFormatError, match=r"row group 0, row 1: timestamp nan is not a finite"):
        D.read_file(path, "parquet")
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(D.DataFormatError, match=r"p.parquet: not a readable Parquet file"):
        D.read_file(path, "parquet")


MALFORMED = [  # format, file text: the reference raises; read_file must raise the same
    ("sequences", "1 10 20\n2\n"), ("sequences", "1 10\n2 5\n1 20\n"),
    ("sequences", "a b\n\xff\n"), ("sequences", ""), ("sequences", " \n\t\n"),
    ("pairs", "1 10\n1 20 5\n"), ("pairs", "1 10\r2\r"),
    ("ml-1m", "1::5::3::300\n1::5::3\n"), ("ml-1m", "1::5::3::300\n1::6::3::nan\n"),
    ("ml-1m", "1::5::x::300\n"),
    ("amazon", "a,x,5,1\na,y,4\n"), ("amazon", "user,item,rating,timestamp\n"),
    ("amazon", "\nuser,item,rating,timestamp\na,x,5,1\n"), ("amazon", "a,x,5,1\nb,y,4,inf\n"),
    ("csv", "user,item,timestamp\nu,a,1\nu,b\n"), ("csv", "user,item,timestamp\n\n"),
    ("csv", "\n"), ("csv", "when,item,user\n1,a,u\n"), ("csv", "user,item,timestamp\nu,a,soon\n"),
    ("csv", "user,item,timestamp\nu,a,1\nu,\xfe,2\n"), ("tsv", "user\titem\ttimestamp\nu\ta\t1\t9\n"),
    ("amazon", '"us\ner",item,rating,timestamp\na,x,5,1\n'),   # a header on two lines is data
]


@pytest.mark.parametrize("fmt, text", MALFORMED)
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_malformed_input_gives_the_reference_error(tmp_path, fmt, text, gz):
    path = tmp_path / ("bad.txt" + (".gz" if gz else ""))
    raw = text.encode("latin-1")        # \xff, \xfe: bytes that are not UTF-8
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(D.DataFormatError) as want:
        D.reference_reader(fmt, k_core=1)(path)
    with pytest.raises(D.DataFormatError) as got:
        D.read_file(path, fmt, k_core=1)
    assert str(got.value) == str(want.value)
    assert "bad.txt" in str(got.value) and "\n" not in str(got.value)


def test_damaged_gzip_is_named(tmp_path):
    path = tmp_path / "s.txt.gz"
    path.write_bytes(gzip.compress(b"1 2 3\n" * 1000)[:-30])
    with pytest.raises(D.DataFormatError, match="cannot read data file .*s.txt.gz"):
        D.read_file(path, "sequences")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(D.DataFormatError, match="cannot read data file .*s.txt.gz"):
        D.read_file(path, "sequences")
    # JSON lines have no reference reader to name the reason: the columnar reader does
    path = tmp_path / "r.jsonl.gz"
    for raw in (gzip.compress(b'{"user": "a", "item": "b", "timestamp": 1}\n' * 1000)[:-30],
                b"not gzip at all"):
        path.write_bytes(raw)
        with pytest.raises(D.DataFormatError, match=r"cannot read data file .*r.jsonl.gz: "
                                                    r"arrow cannot read it") as err:
            D.read_file(path, "jsonl")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt, text, why", [
    ("csv", "user,item,timestamp\nu,a, 2\nu,b,1_0\n", "not read as a number"),
    ("csv", "user,user,item,timestamp\nu,v,a,2\n", "no single column 'user'"),
    ("csv", "user,item,timestamp\nu,a,2\n,,\n u , v ,1\n", "not read as a number"),
    ("ml-1m", "1::5::3:: 300\n", "not read as a number"),
    ("amazon", "a,x, 5,1\n", "not read as a number"),
])
def test_files_only_the_reference_reads_are_read_with_a_warning(tmp_path, fmt, text, why):
    """Valid files the columnar path cannot vouch for (numbers only Python's float reads,
    blank rows, padded header names) are read by the reference, with a warning."""
    path = write(tmp_path / "odd.txt", text)
    with pytest.warns(UserWarning, match=f"odd.txt: read line by line .*{why}"):
        got = D.read_file(path, fmt, k_core=1)
    assert as_tuple(got) == as_tuple(D.reference_reader(fmt, k_core=1)(path))


@pytest.mark.parametrize("seed", range(3))
def test_whitespace_split_is_pythons(seed):
    """Trimmed arrow split == str.split() on lines mixing every kind of whitespace, in
    the ASCII fast path and the Unicode one, with every line ending text files know."""
    rng = random.Random(seed)
    spaces = [" ", "\t", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000"]
    for pool, letters in ((spaces[:4], "ab7"), (spaces, "ab7é")):
        lines = ["".join(rng.choice(pool) if rng.random() < 0.4 else rng.choice(letters)
                         for _ in range(rng.randrange(12))) for _ in range(300)]
        chunk = "".join(line + rng.choice(["\n", "\r\n", "\r"]) for line in lines).encode()
        tokens, firsts, counts = R._tokens(R._lines(chunk), chunk)
        flat = tokens.to_pylist()
        got = [flat[f:f + c] for f, c in zip(firsts.tolist(), counts.tolist())]
        assert got == [line.split() for line in lines if line.split()]


def test_arrow_numbers_are_a_subset_of_pythons_float():
    """Where arrow's cast reads a number, float() reads the same one (so a time the
    columnar path accepts orders rows as the reference does)."""
    rng = random.Random(0)
    texts = ["".join(rng.choice("0123456789+-.eEinfatyINF _x") for _ in range(rng.randrange(1, 7)))
             for _ in range(20000)]
    for text in texts:
        try:
            got = pc.cast(pa.array([text]), pa.float64()).to_pylist()[0]
        except pa.ArrowInvalid:
            continue
        want = float(text)
        assert got == want or (got != got and want != want), text


def test_integer_looking_ids_keep_their_text():
    """'007', '+5', '-0' and 20-digit ids are not the integers they spell."""
    pattern = R.INTEGER_TEXT
    is_int = pc.match_substring_regex(pa.array(["7", "0", "-12", "007", "+5", "-0", "1" * 19, "1e3"]),
                                      pattern).to_pylist()
    assert is_int == [True, True, True, False, False, False, False, False]


def test_k_core_mask_matches_the_reference_filter():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 400), rng.integers(0, 60, 400)
    rows = [(str(u), str(i), 0.0) for u, i in zip(users, items)]
    kept = R.k_core_mask(users, items, 4)
    assert [rows[j] for j in np.flatnonzero(kept)] == D.k_core_filter(rows, 4)


def shared_file(name):
    return SHARED_DATA / name


@pytest.mark.parametrize("name, fmt", [("beauty.txt", "sequences"), ("ml-1m.txt", "pairs")])
def test_shared_datasets_read_the_same(name, fmt, tmp_path):
    path = shared_file(name)
    if not path.is_file():
        pytest.skip(f"{path} absent (the shared data folder is not next to the repository)")
    want = D.reference_reader(fmt)(path)
    assert as_tuple(columnar(path, fmt)) == as_tuple(want)
    packed = tmp_path / (name + ".gz")
    packed.write_bytes(gzip.compress(path.read_bytes(), 1))
    assert as_tuple(columnar(packed, fmt))[:3] == as_tuple(want)[:3]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_chunk_shares_estimate_the_part_of_the_file_read(tmp_path, monkeypatch, gz):
    """The share that sizes the columns grows to 1 over the chunks, and is 1 for a file of
    one chunk (a tiny .gz file, larger compressed than plain, once sized its columns for
    4 GiB of text)."""
    tiny = write(tmp_path / ("t.txt" + (".gz" if gz else "")), "1 2 3\n")
    assert [share for _, _, share in R._text_chunks(tiny)] == [1.0]
    monkeypatch.setattr(R, "CHUNK_BYTES", 4096)
    rng = random.Random(0)
    text = "".join(f"{u} " + " ".join(str(rng.randrange(10**6)) for _ in range(20)) + "\n"
                   for u in range(3000))
    path = write(tmp_path / ("big.txt" + (".gz" if gz else "")), text)
    chunks = list(R._text_chunks(path))
    shares = [share for _, _, share in chunks]
    assert len(chunks) > 10 and shares == sorted(shares) and shares[-1] == 1.0
    assert 0 < shares[0] < 0.5
    assert b"".join(chunk for _, chunk, _ in chunks) == text.encode()
    assert [offset for offset, _, _ in chunks] == list(np.cumsum([0] + [len(c) for _, c, _ in chunks[:-1]]))
