"""Run the Triton kernels in the interpreter when there is no GPU (must precede triton's
import). Under CI (CI=true) hypothesis draws the same examples every run, so a red CI always
reproduces; local runs draw new ones."""
import os

import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
