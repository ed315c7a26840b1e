"""Readers, named-dataset caching, the synthetic generator, the split and batching."""
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hymoerec import data as D
from shared_data import SHARED_DATA


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def as_ids(data):
    """Per-user original item ids, keyed by original user id."""
    return {u: [data.item_ids[i] for i in seq] for u, seq in zip(data.user_ids, data.sequences)}


def test_sequences_reader_remaps_items_from_one(tmp_path):
    path = write(tmp_path, "s.txt", "1 10 20 30\n\n2 20 40\n")
    data = D.read_sequences(path)
    assert as_ids(data) == {"1": ["10", "20", "30"], "2": ["20", "40"]}
    assert data.n_items == 4 and data.item_ids[0] == "<pad>"
    assert sorted(np.concatenate(data.sequences).tolist()) == [1, 2, 2, 3, 4]


@pytest.mark.parametrize("text, message", [("1 10 20\n2\n", "line 2"),
                                           ("1 10\n2 5\n1 20\n",
                                            r"line 3: user '1' appears on more than one line "
                                            r"\(first on line 1\).* 'pairs' format")])
def test_sequences_reader_names_file_and_line(tmp_path, text, message):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(D.DataFormatError, match=message) as err:
        D.read_sequences(path)
    assert "bad.txt" in str(err.value)


def test_pairs_reader_keeps_file_order_and_first_appearance(tmp_path):
    # interleaved users, blank lines (also whitespace-only), tabs, a CRLF line ending
    path = write(tmp_path, "p.txt", "7 b\n\n3 a\n7\ta\r\n   \n3 c\n7 d\n")
    data = D.read_file(path, "pairs")
    assert as_ids(data) == {"7": ["b", "a", "d"], "3": ["a", "c"]}
    assert data.user_ids == ["7", "3"] and data.item_ids == ["<pad>", "b", "a", "d", "c"]
    assert data.n_interactions == 5


@pytest.mark.parametrize("text, message", [("1 10\n1 20 5\n", "p.txt, line 2: expected 'user "
                                                                 "item', got 3 fields: '1 20 5'"),
                                           ("1 10\n\n2\n", "p.txt, line 3: expected 'user item', "
                                                            "got 1 fields")])
def test_pairs_reader_rejects_other_than_two_columns(tmp_path, text, message):
    with pytest.raises(D.DataFormatError, match=message):
        D.read_pairs(write(tmp_path, "p.txt", text))


def test_pairs_is_a_listed_format():
    assert "pairs" in D.FORMATS


def test_ml1m_reader_orders_by_time_ties_in_file_order(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::5::3::300\n1::6::4::100\n1::7::1::200\n"
                                          "1::8::5::200\n2::5::2::50\n")
    assert as_ids(D.read_ml1m(path)) == {"1": ["6", "7", "8", "5"], "2": ["5"]}


@pytest.mark.parametrize("line, message", [("1::5::3\n", "line 2: expected"),
                                           ("1::5::3::soon\n", "line 2: Timestamp 'soon'")])
def test_ml1m_reader_rejects_malformed_lines(tmp_path, line, message):
    path = write(tmp_path, "ratings.dat", "1::5::3::300\n" + line)
    with pytest.raises(D.DataFormatError, match=message):
        D.read_ml1m(path)


def test_amazon_reader_applies_k_core_until_stable(tmp_path):
    # k=2: user c has one rating -> dropped; then item z has one rating left -> dropped,
    # which leaves user b with one rating -> dropped too.
    rows = ["user,item,rating,timestamp", "a,x,5,1", "a,y,4,2", "d,x,3,3", "d,y,5,4",
            "b,z,1,5", "b,x,2,6", "c,z,3,7"]
    path = write(tmp_path, "ratings.csv", "\n".join(rows) + "\n")
    data = D.read_amazon(path, k_core=2)
    assert as_ids(data) == {"a": ["x", "y"], "d": ["x", "y"]}
    assert D.read_amazon(path, k_core=1).n_interactions == 7


def test_amazon_reader_rejects_bad_rows(tmp_path):
    path = write(tmp_path, "ratings.csv", "a,x,5,1\na,y,4\n")
    with pytest.raises(D.DataFormatError, match="ratings.csv, line 2: expected 4 fields"):
        D.read_amazon(path)


def test_table_reader_uses_named_columns(tmp_path):
    path = write(tmp_path, "log.tsv", "when\titem_id\tuid\n3\tb\tu1\n1\ta\tu1\n2\tc\tu2\n")
    data = D.read_file(path, "tsv", user_col="uid", item_col="item_id", time_col="when")
    assert as_ids(data) == {"u1": ["a", "b"], "u2": ["c"]}
    with pytest.raises(D.DataFormatError, match="log.tsv, line 1: no column 'user'"):
        D.read_file(path, "tsv")
    bad = write(tmp_path, "bad.csv", "user,item,timestamp\nu,a,1\nu,b\n")
    with pytest.raises(D.DataFormatError, match="bad.csv, line 3"):
        D.read_file(bad, "csv")


def test_read_file_missing_and_unknown_format(tmp_path):
    with pytest.raises(D.DataFormatError, match="data file .*nothere.txt does not exist"):
        D.read_file(tmp_path / "nothere.txt", "sequences")
    with pytest.raises(D.DataFormatError, match=f"data file {tmp_path} is a directory"):
        D.read_file(tmp_path, "pairs")
    path = write(tmp_path, "s.txt", "1 2 3\n")
    with pytest.raises(ValueError, match="format must be one of"):
        D.read_file(path, "xlsx")


@pytest.mark.parametrize("fmt", ["sequences", "pairs", "ml-1m", "amazon"])
@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_empty_or_blank_only_file_is_named(tmp_path, fmt, text):
    path = write(tmp_path, "empty.txt", text)
    with pytest.raises(D.DataFormatError, match=r"empty.txt: no interactions \(the file is empty"):
        D.read_file(path, fmt)
    if fmt == "amazon":   # a header line alone holds no interactions either
        with pytest.raises(D.DataFormatError, match="only a header line"):
            D.read_file(write(tmp_path, "h.csv", "user,item,rating,timestamp\n"), fmt)


@pytest.mark.parametrize("fmt, text", [("sequences", "1 10 20\n2 5 6\n"), ("pairs", "1 10\n2 20\n"),
                                       ("amazon", "a,x,5,1\nb,y,4,2\n"),
                                       ("csv", "user,item,timestamp\na,x,1\nb,y,2\n")])
def test_undecodable_bytes_name_file_and_line(tmp_path, fmt, text):
    lines = text.encode().split(b"\n")
    lines[1] = lines[1][:2] + b"\xff\xfe" + lines[1][2:]     # not UTF-8, on line 2
    path = tmp_path / "latin.txt"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(D.DataFormatError, match=r"latin.txt, line 2: byte 3 of the line "
                                                r"\(b'\\xff'\) is not utf-8 text"):
        D.read_file(path, fmt, k_core=1)


def test_utf8_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("user,item,timestamp\nu,é,1\n".encode("utf-8-sig"))
    assert as_ids(D.read_file(path, "csv")) == {"u": ["é"]}


def test_csv_with_only_a_header_or_an_oversized_field(tmp_path):
    with pytest.raises(D.DataFormatError, match="h.csv: only a header line, no interactions"):
        D.read_file(write(tmp_path, "h.csv", "user,item,timestamp\n\n"), "csv")
    with pytest.raises(D.DataFormatError, match="e.csv: empty file, expected a header"):
        D.read_file(write(tmp_path, "e.csv", "\n"), "csv")
    big = write(tmp_path, "big.csv", f"user,item,timestamp\nu,a,1\nu,{'x' * 200_000},2\n")
    with pytest.raises(D.DataFormatError, match="big.csv, line 3: field larger than field limit"):
        D.read_table(big)      # Python's csv module has a field size limit
    assert D.read_file(big, "csv").item_ids == ["<pad>", "a", "x" * 200_000]   # arrow has none


def test_timestamps_must_be_finite(tmp_path):
    with pytest.raises(D.DataFormatError, match="line 2: Timestamp 'nan' is not a finite"):
        D.read_ml1m(write(tmp_path, "ratings.dat", "1::5::3::300\n1::6::3::nan\n"))


def test_k_core_filter_that_leaves_nothing_says_so(tmp_path):
    path = write(tmp_path, "r.csv", "a,x,5,1\nb,y,4,2\n")
    with pytest.raises(D.DataFormatError, match=r"r.csv: no interactions left after the 5-core "
                                                r"filter \(2 read"):
        D.read_amazon(path)


def test_fetch_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    monkeypatch.setenv("HYMOEREC_DATA", str(tmp_path))
    with pytest.raises(D.DataFormatError, match=f"put it at {tmp_path / 'ml-1m.zip'}"):
        D.load_dataset("ml-1m")
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_garbage_ml1m_zip_in_the_cache_says_to_delete_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HYMOEREC_DATA", str(tmp_path))
    (tmp_path / "ml-1m.zip").write_bytes(b"<html>captive portal</html>")
    with pytest.warns(UserWarning), pytest.raises(
            D.DataFormatError, match=f"{tmp_path / 'ml-1m.zip'} is not the MovieLens-1M archive"
                                     f".*delete it"):
        D.load_dataset("ml-1m")
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as archive:   # a zip without ratings.dat
        archive.writestr("ml-1m/users.dat", "1::F::1::10::48067\n")
    with pytest.warns(UserWarning), pytest.raises(D.DataFormatError, match="ratings.dat"):
        D.load_dataset("ml-1m")


def test_damaged_prepared_file_says_to_delete_it(tmp_path):
    path = tmp_path / "ml-1m.prepared.npz"
    path.write_bytes(b"not an npz")
    with pytest.raises(D.DataFormatError, match="ml-1m.prepared.npz is damaged .*delete it"):
        D.load_prepared(path)


def test_unwritable_dataset_cache_names_hymoerec_data(tmp_path, monkeypatch):
    blocker = write(tmp_path, "a-file", "")
    monkeypatch.setenv("HYMOEREC_DATA", str(blocker / "cache"))   # a folder under a file
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(D.NotWritableError, match=r"dataset cache \(\$HYMOEREC_DATA\) "
                                                 r".*a-file/cache is not writable .*; set "
                                                 r"HYMOEREC_DATA to a writable folder"):
        D.load_dataset("beauty")


def test_check_writable_creates_the_folder_or_says_why_not(tmp_path):
    assert D.check_writable(tmp_path / "new" / "run", "run folder") == tmp_path / "new" / "run"
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    blocker = write(tmp_path, "f", "")
    with pytest.raises(D.NotWritableError, match=r"run folder .*/f is not writable \(it is a file"):
        D.check_writable(blocker, "run folder")
    with pytest.raises(D.DataFormatError, match=r"run folder .*f/x is not writable \(Not a "
                                                r"directory\); pass --run-dir"):
        D.check_writable(blocker / "x", "run folder", "pass --run-dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(D.NotWritableError, match="Permission denied"):
        D.check_writable(folder, "run folder")


def test_manually_placed_ml1m_zip_is_prepared_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HYMOEREC_DATA", str(tmp_path))
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as archive:
        archive.writestr("ml-1m/ratings.dat", "1::5::3::2\n1::6::3::1\n2::5::4::9\n")
    with pytest.warns(UserWarning, match="differs from the published"):
        data = D.load_dataset("ml-1m")
    assert as_ids(data) == {"1": ["6", "5"], "2": ["5"]} and data.name == "ml-1m"
    (tmp_path / "ml-1m-ratings.dat").unlink()
    with pytest.warns(UserWarning):
        again = D.load_dataset("ml-1m")  # from the prepared .npz, not the raw file
    assert as_ids(again) == as_ids(data) and again.item_ids == data.item_ids


def test_synthetic_is_seeded_and_long_tailed():
    a, b = D.synthetic(300, 100, 12, seed=3), D.synthetic(300, 100, 12, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert not all(np.array_equal(x, y) for x, y in
                   zip(a.sequences, D.synthetic(300, 100, 12, seed=4).sequences))
    items = np.concatenate(a.sequences)
    assert items.min() >= 1 and items.max() <= 100 and min(map(len, a.sequences)) >= 5
    counts = np.sort(np.bincount(items, minlength=101)[1:])[::-1]
    assert counts[:20].sum() > 0.5 * counts.sum()  # top 20% of items: most interactions


def test_segments_are_views_of_one_buffer():
    seqs = D.Segments.from_arrays([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4])])
    assert len(seqs) == 3 and seqs.lengths.tolist() == [3, 0, 1]
    assert [s.tolist() for s in seqs] == [[1, 2, 3], [], [4]] and seqs[-1].tolist() == [4]
    assert np.shares_memory(seqs[0], seqs.values)
    tail = seqs[1:]
    assert isinstance(tail, D.Segments) and [s.tolist() for s in tail] == [[], [4]]
    assert [s.tolist() for s in seqs.take(np.array([2, 0]))] == [[4], [1, 2, 3]]
    assert seqs.concatenated().tolist() == [1, 2, 3, 4]
    overlapping = D.Segments(np.arange(5), np.array([0, 2]), np.array([3, 5]))
    assert overlapping.concatenated().tolist() == [0, 1, 2, 2, 3, 4]
    with pytest.raises(ValueError, match="lengths sum to 3"):
        D.Segments.from_lengths(np.arange(4), np.array([1, 2]))


def loop_windows(train, max_len):
    """The windows as the former per-sequence loop cut them (the definition)."""
    windows = []
    for seq in train:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            windows.append(seq[start:end])
            end = start + 1
    return windows


@pytest.mark.parametrize("max_len", [1, 2, 3, 7, 50])
def test_vectorised_split_and_windows_match_their_definition(max_len):
    rng = np.random.default_rng(max_len)
    sequences = [rng.integers(1, 30, size=n) for n in rng.integers(0, 40, size=200)]
    data = D.SequenceData(sequences, ["<pad>"] + [str(i) for i in range(1, 30)],
                          [str(u) for u in range(200)])
    split = D.leave_one_out(data)
    long = [u for u, s in enumerate(sequences) if len(s) >= 3]
    assert split.eval_users.tolist() == long
    assert [t.tolist() for t in split.train] == [(s[:-2] if len(s) >= 3 else s).tolist()
                                                 for s in sequences]
    assert split.test_target.tolist() == [sequences[u][-1] for u in long]
    assert [h.tolist() for h in split.history("valid")] == [sequences[u][:-2].tolist() for u in long]
    windows = D.training_windows(split.train, max_len)
    assert [w.tolist() for w in windows] == [w.tolist() for w in loop_windows(split.train, max_len)]
    assert all(np.shares_memory(w, data.sequences.values) for w in windows if len(w))
    counts = np.bincount(np.concatenate([s for s in split.train]), minlength=30)
    assert split.train_item_counts().tolist() == counts.tolist()
    # the same batches from Segments as from the list of the same windows
    listed = [w.copy() for w in windows]
    assert (D.bucketed_batches(windows, 64, torch.Generator().manual_seed(2))
            == D.bucketed_batches(listed, 64, torch.Generator().manual_seed(2)))


def test_choice_draws_what_generator_choice_draws():
    p = np.random.default_rng(0).random(1000)
    p /= p.sum()
    cdf = D.cumulative(p)
    for size in [7, (50, 3), 1]:
        a, b = np.random.default_rng(9), np.random.default_rng(9)
        assert np.array_equal(D.choice(a, cdf, size), b.choice(1000, size=size, p=p))
        assert a.bit_generator.state == b.bit_generator.state


def test_synthetic_with_a_million_items():
    """A large catalog costs no more per user (the per-user draws search one cumulative
    distribution): 30 users over 10^6 items."""
    data = D.synthetic(30, 1_000_000, 12, seed=1)
    assert data.n_items == 1_000_000 and data.n_users == 30
    assert data.sequences.values.max() <= 1_000_000 and data.sequences.values.min() >= 1


def test_leave_one_out_split():
    data = D.SequenceData([np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([2, 5, 1])],
                          ["<pad>"] + [str(i) for i in range(1, 7)], ["a", "b", "c"])
    split = D.leave_one_out(data)
    assert [s.tolist() for s in split.train] == [[1, 2], [5, 6], [2]]
    assert split.eval_users.tolist() == [0, 2]
    assert split.valid_target.tolist() == [3, 5] and split.test_target.tolist() == [4, 1]
    assert [h.tolist() for h in split.history("valid")] == [[1, 2], [2]]
    assert [h.tolist() for h in split.history("test")] == [[1, 2, 3], [2, 5]]
    assert split.train_item_counts().tolist() == [0, 1, 2, 0, 0, 1, 1]


def test_training_windows_predict_every_next_item_once():
    seq = np.arange(1, 13)
    windows = D.training_windows([seq, np.array([7])], max_len=4)
    assert all(len(w) <= 5 for w in windows)
    targets = sorted(np.concatenate([w[1:] for w in windows]).tolist())
    assert targets == list(range(2, 13))
    assert windows[0].tolist() == [8, 9, 10, 11, 12]  # most recent window first, full context


def test_batches_cover_each_window_once_and_pad_right():
    windows = [np.arange(1, n + 2) for n in [1, 5, 2, 7, 3, 3, 1]]    # n targets each
    batches = D.bucketed_batches(windows, 3, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(7))
    # at most 3 targets a batch; the 5- and 7-target windows are batches of their own
    assert all(sum(len(windows[i]) - 1 for i in b) <= 3 or len(b) == 1 for b in batches)
    assert [1] in batches and [3] in batches
    inputs, targets = D.collate_windows([windows[1], windows[0]])
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [1, 0, 0, 0, 0]]
    assert targets.tolist() == [[2, 3, 4, 5, 6], [2, 0, 0, 0, 0]]


def beauty_file():
    """$HYMOEREC_BEAUTY_FILE, else ../shared/data/beauty.txt next to the repository."""
    env = os.environ.get("HYMOEREC_BEAUTY_FILE")
    return Path(env) if env else SHARED_DATA / "beauty.txt"


@pytest.mark.skipif(not beauty_file().is_file(),
                    reason=f"Beauty file absent ({beauty_file()}; set HYMOEREC_BEAUTY_FILE)")
def test_beauty_file_statistics():
    data = D.read_sequences(beauty_file())
    assert (data.n_users, data.n_items, data.n_interactions) == (22363, 12101, 198502)


def ml1m_pairs_file():
    """../shared/data/ml-1m.txt next to the repository: SASRec's preprocessed MovieLens-1M,
    one 'user item' line per interaction."""
    return SHARED_DATA / "ml-1m.txt"


@pytest.mark.skipif(not ml1m_pairs_file().is_file(),
                    reason=f"MovieLens-1M pairs file absent ({ml1m_pairs_file()})")
def test_ml1m_pairs_file_statistics():
    data = D.read_file(ml1m_pairs_file(), "pairs")
    assert (data.n_users, data.n_items, data.n_interactions) == (6040, 3416, 999611)
    assert min(map(len, data.sequences)) >= 5     # 5-core


def test_manually_placed_beauty_csv_is_k_core_filtered(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYMOEREC_DATA", str(tmp_path))
    rows = [f"u{u},i{i},5,{u * 10 + i}" for u in range(3) for i in range(3)] + ["lone,i0,1,99"]
    (tmp_path / "ratings_Beauty.csv").write_text("\n".join(rows) + "\n")
    data = D.load_dataset("beauty", k_core=3)
    assert (data.n_users, data.n_items, data.n_interactions) == (3, 3, 9)
    assert "sha256" in capsys.readouterr().out       # no pinned checksum: the used one is shown
    assert D.load_dataset("beauty", k_core=1).n_users == 4   # its own prepared cache


def test_batches_fill_up_to_the_target_budget():
    windows = [np.arange(1, 2 + n) for n in np.random.default_rng(0).integers(1, 9, 500)]
    batches = D.bucketed_batches(windows, 64, torch.Generator().manual_seed(1))
    sizes = [sum(len(windows[i]) - 1 for i in b) for b in batches]
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert max(sizes) <= 64
    assert sum(sizes) / len(sizes) > 56       # greedy cuts leave little of the budget unused


def test_training_prefixes_pair_each_target_with_the_context_windows_give_it():
    rng = np.random.default_rng(3)
    train = [rng.integers(1, 50, size=n) for n in (1, 2, 5, 9, 13)]
    max_len = 4
    prefixes = D.training_prefixes(train, max_len)
    assert len(prefixes) == sum(len(s) - 1 for s in train)
    # (context, target) pairs of the prefixes, one target each ...
    inputs, targets = D.collate_windows([prefixes[i] for i in range(len(prefixes))], True)
    assert ((targets > 0).sum(1) == 1).all()
    from_prefixes = sorted((tuple(row[:col + 1].tolist()), int(t[col]))
                           for row, t in zip(inputs, targets) for col in [int((t > 0).nonzero())])
    # ... are those of predicting every next item from at most max_len predecessors
    expected = sorted((tuple(s[max(0, t - max_len):t].tolist()), int(s[t]))
                      for s in train for t in range(1, len(s)))
    assert from_prefixes == expected
    batches = D.bucketed_batches(prefixes, 3, torch.Generator().manual_seed(0), True)
    assert sorted(i for b in batches for i in b) == list(range(len(prefixes)))
    assert max(len(b) for b in batches) == 3
