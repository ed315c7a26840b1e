"""Where the recommender tests find the repository and the data never committed into it
(``../shared/data`` next to the repository; tests that need a file skip when it is absent)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
