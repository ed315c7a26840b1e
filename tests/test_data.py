"""Readers, named-dataset caching, the synthetic generator, the split and batching."""
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hymoerec import data as D


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
                                           ("1 10\n1 20\n", "line 2: user '1'")])
def test_sequences_reader_names_file_and_line(tmp_path, text, message):
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(D.DataFormatError, match=message) as err:
        D.read_sequences(path)
    assert "bad.txt" in str(err.value)


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
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        D.read_file(tmp_path / "nothere.txt", "sequences")
    path = write(tmp_path, "s.txt", "1 2 3\n")
    with pytest.raises(ValueError, match="format must be one of"):
        D.read_file(path, "parquet")


def test_fetch_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    monkeypatch.setenv("HYMOEREC_DATA", str(tmp_path))
    with pytest.raises(RuntimeError, match=f"put it at {tmp_path / 'ml-1m.zip'}"):
        D.load_dataset("ml-1m")
    assert not list(tmp_path.iterdir())  # no partial file left behind


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
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/beauty.txt"


@pytest.mark.skipif(not beauty_file().is_file(),
                    reason=f"Beauty file absent ({beauty_file()}; set HYMOEREC_BEAUTY_FILE)")
def test_beauty_file_statistics():
    data = D.read_sequences(beauty_file())
    assert (data.n_users, data.n_items, data.n_interactions) == (22363, 12101, 198502)


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
