"""HyMoERec: sequential recommendation with hybrid mixture-of-experts FFNs.

Modules: ``data`` (readers, named datasets, synthetic data, leave-one-out split),
``models`` (backbone registry; ``sasrec``), ``metrics`` (full-ranking HR/NDCG),
``train`` / ``evaluate`` (command-line entry points; ``evaluate.Recommender``).
"""
__version__ = "0.1.0"
