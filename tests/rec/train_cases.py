"""What the end-to-end training tests share: a tiny synthetic run (seconds on one thread)."""
import pytest
import torch

from hymoerec import train

TINY = ["--synthetic-users", "120", "--synthetic-items", "40", "--synthetic-length", "8",
        "--d-model", "16", "--batch-size", "32", "--warmup-steps", "5", "--no-progress",
        "--device", "cpu", "--seed", "7", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """train.main(--threads 1) sets torch's thread count for the process; restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name, *extra):
    """train.main on the tiny synthetic data into tmp_path / name; returns its summary."""
    return train.main(TINY + ["--run-dir", str(tmp_path / name), *extra])
