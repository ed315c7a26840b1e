"""What a run's settings mean, shared by train.py, evaluate.py and the studies in
experiments/: the ModelConfig of a run's settings, the defaults that come from the data, the
data a run's settings name, and the device. (The flags themselves: :mod:`hymoerec.options`.)
"""
from __future__ import annotations

import argparse
import math
from dataclasses import fields

import numpy as np
import torch

from hymoerec.data import SequenceData, load_dataset, read_file, synthetic
from hymoerec.models import ModelConfig
from hymoerec.models.base import older_runs_value


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig fields set in ``args``: a field missing from a config saved before it
    existed gets the value that run trained with (:func:`older_runs_value`), a data-dependent
    one not yet resolved (None) its default."""
    values = {f.name: getattr(args, f.name, older_runs_value(f)) for f in fields(ModelConfig)}
    return ModelConfig(**{name: value for name, value in values.items() if value is not None})


def data_defaults(data: SequenceData) -> dict:
    """The settings whose defaults depend on the data, from its statistics alone (never its
    name), so the same data read from any file or format trains the same model:

    * max_len: enough recent items for 80% of the users' whole sequences, rounded up to a
      multiple of 50, within 50..200 (ML-1M: 200, Beauty: 50);
    * dropout: 0.2 on dense data (at least 1% of all user-item pairs observed, like ML-1M
      and the synthetic data) and 0.5 on sparse data (Amazon's), the SASRec paper's values;
    * mask_prob (bert4rec's Cloze masking): 0.2 on dense data and 0.6 on sparse data, the
      BERT4Rec paper's values for ML-1m and Beauty.
    """
    lengths = data.sequences.lengths
    max_len = int(np.clip(50 * math.ceil(np.percentile(lengths, 80) / 50), 50, 200))
    dense = data.n_interactions / (data.n_users * data.n_items) >= 0.01
    return {"max_len": max_len, "dropout": 0.2 if dense else 0.5,
            "mask_prob": 0.2 if dense else 0.6}


def load_data(args: argparse.Namespace) -> SequenceData:
    """The data a run's settings name: ``--data-file`` in ``--format``, the synthetic data,
    or a named dataset."""
    if args.data_file:
        return read_file(args.data_file, args.format, args.k_core, args.user_col, args.item_col,
                         args.time_col or None)
    if args.dataset == "synthetic":
        return synthetic(args.synthetic_users, args.synthetic_items, args.synthetic_length,
                         seed=args.seed if getattr(args, "synthetic_seed", None) is None
                         else args.synthetic_seed)
    return load_dataset(args.dataset, k_core=args.k_core)


def pick_device(name: str) -> torch.device:
    """The device for ``--device`` auto / cpu / cuda; a CUDA device is also made the current
    one, where Triton launches its kernels."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                              else device.index)
        torch.cuda.set_device(device)
    return device
