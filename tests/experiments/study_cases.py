"""What the tests of the study scripts share: the repository root they run in, and a tiny
interaction file."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_sequences(path: Path, users: int, items: int, length: int, stride: int) -> Path:
    """A 'sequences' file at ``path``: user u{u} has ``length`` items i{(u * stride + j) %
    items}, j = 0..length-1. Returns ``path``."""
    path.write_text("".join(f"u{u} " + " ".join(f"i{(u * stride + j) % items}"
                                                for j in range(length)) + "\n"
                            for u in range(users)))
    return path
