"""HyMoERec: sequential recommendation with hybrid mixture-of-experts FFNs.

Modules: ``data`` (readers, named datasets, synthetic data, leave-one-out split),
``models`` (backbone registry; ``sasrec``), ``metrics`` (full-ranking HR/NDCG),
``options`` (the command line), ``train`` / ``evaluate`` (command-line entry points;
``evaluate.Recommender``), ``run_folder`` (a training run's files, its lock),
``atomic_write`` (files written whole or not at all).
"""
__version__ = "0.1.0"
