"""The command line of the entry points: the flags that name a run's data, device and
evaluation batch (shared by train.py, evaluate.py and the table runner in experiments/), one
flag per ModelConfig field, train.py's whole parser, and the checks that turn a bad setting
into a usage error (exit 2) before anything is written.

Precedence of train.py's settings: command line > the saved config (``--config``, or the
run's config.json with ``--resume``) > the model's paper defaults > the defaults here.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields
from pathlib import Path

import torch

from hymoe_kernels import backend
from hymoe_kernels.config import HYMOE_DEFAULTS
from hymoe_kernels.layer import EXPERT_INITS
from hymoerec import distributed
from hymoerec.cli import ArgumentParser
from hymoerec.data import DATASETS, FORMATS
from hymoerec.models import MODELS, ConfigError, ModelConfig
from hymoerec.models.base import older_runs_value
from hymoerec.run_folder import CONFIG_FILE
from hymoerec.settings import model_config

# settings a resumed run may change; any other difference from the saved run is refused
RESUMABLE_SETTINGS = ("epochs", "patience", "max_minutes", "threads", "no_progress", "device",
                      "eval_batch_size", "dist_timeout")
# settings that say how to start, not what ran: never saved in config.json
TRANSIENT_SETTINGS = ("config", "resume", "run_dir", "overwrite")
# how training windows are cut: hymoerec.data.training_windows / training_prefixes
TRAIN_SAMPLES = ("windows", "prefixes")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (None / False), whose help explains them, and those
    of on/off flags such as --plain-loss (store_true / store_false)."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and isinstance(action.const, bool)
        if action.default in (None, False) or action.help is None or switch:
            return action.help
        return super()._get_help_string(action)


def add_data_arguments(group) -> None:
    """The flags that name a run's data (read by :func:`hymoerec.settings.load_data`)."""
    group.add_argument("--dataset", default="synthetic", choices=DATASETS,
                       help="named dataset (ml-1m / beauty are downloaded to $HYMOEREC_DATA)")
    group.add_argument("--data-file", help="your own interaction file (overrides --dataset)")
    group.add_argument("--format", default="sequences", choices=FORMATS,
                       help="format of --data-file: 'sequences' = one line 'user item item "
                            "...', 'pairs' = one line 'user item' per interaction (a user's "
                            "lines in time order), 'ml-1m' = ratings.dat, 'amazon' = "
                            "user,item,rating,timestamp CSV (k-core filtered), 'csv'/'tsv' = "
                            "header with named columns, 'parquet' = a Parquet file's named "
                            "columns, 'jsonl' = one JSON object per line with named fields; a "
                            "file ending in .gz is decompressed on the fly")
    group.add_argument("--k-core", type=int, default=5, help="k-core filter of amazon data")
    group.add_argument("--user-col", default="user",
                       help="user column (field) of csv/tsv/parquet/jsonl data")
    group.add_argument("--item-col", default="item",
                       help="item column (field) of csv/tsv/parquet/jsonl data")
    group.add_argument("--time-col", default="timestamp",
                       help="time column (field) of csv/tsv/parquet/jsonl data ('': file order)")
    group.add_argument("--synthetic-users", type=int, default=2000, help="synthetic users")
    group.add_argument("--synthetic-items", type=int, default=400, help="synthetic items")
    group.add_argument("--synthetic-length", type=int, default=15, help="mean sequence length")
    group.add_argument("--synthetic-seed", type=int, default=None,
                       help="seed of the synthetic data (default: --seed)")


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags of ``args`` (parsed by :func:`add_data_arguments`) that differ from their
    defaults, as a command line that names the same data."""
    defaults = argparse.Namespace()
    parser = argparse.ArgumentParser(add_help=False)
    add_data_arguments(parser)
    parser.parse_args([], defaults)
    return [part for name, default in vars(defaults).items()
            if getattr(args, name) != default
            for part in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def add_device_argument(group) -> None:
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: CUDA when available")


def add_eval_batch_size_argument(group) -> None:
    group.add_argument("--eval-batch-size", type=int, default=1024, help="users scored at once")


def add_model_arguments(group) -> None:
    """One flag per ModelConfig field (``--d-model`` for ``d_model``), with the field's
    default and help; data-dependent fields default to None (see
    :func:`hymoerec.settings.data_defaults`)."""
    for f in fields(ModelConfig):
        cli = dict(f.metadata)
        flag = cli.pop("flag", "--" + f.name.replace("_", "-"))
        cli.pop("older_runs", None)
        default = None if cli.pop("data_default", False) else f.default
        if "action" not in cli:
            if f.type in (bool, "bool"):
                cli["action"] = argparse.BooleanOptionalAction
            else:
                cli["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        group.add_argument(flag, dest=f.name, default=default, **cli)


def build_parser() -> argparse.ArgumentParser:
    """train.py's command line."""
    p = ArgumentParser(
        description="Train a sequential recommender with HyMoE (or dense) FFNs; full-ranking "
                    "HR/NDCG@{5,10,20} on a leave-one-out split.",
        epilog="Each --model starts from its paper's configuration (its class's paper_defaults, "
               "e.g. mamba4rec: 1 layer, dense FFN); --config and flags override it.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", help=f"JSON config saved by an earlier run ({CONFIG_FILE}); "
                                    "flags given on the command line override it")
    add_data_arguments(p.add_argument_group("data"))
    g = p.add_argument_group("model")
    g.add_argument("--model", default="sasrec", choices=sorted(MODELS), help="backbone")
    add_model_arguments(g)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None,
                   help="maximum epochs (default 200; 20 on synthetic data)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="next-item targets per step, over whole training windows (default "
                        "2048, RecBole's batch of 2048 one-target prefixes; 256 on synthetic "
                        "data)")
    g.add_argument("--train-samples", default="windows", choices=TRAIN_SAMPLES,
                   help="'windows': each training sequence cut into windows of --max-len + 1 "
                        "items, every position a target; 'prefixes': every prefix its own "
                        "window with one target, its last item (as BSARec / FMLP-Rec train)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--lr-decay-patience", type=int, default=0,
                   help="multiply the learning rate by --lr-decay-factor after each run of "
                        "this many epochs without a better validation NDCG@10 (0: constant)")
    g.add_argument("--lr-decay-factor", type=float, default=0.5,
                   help="learning-rate factor of each --lr-decay-patience decay, in (0, 1)")
    g.add_argument("--patience", type=int, default=10,
                   help="stop after this many epochs without a better validation NDCG@10")
    g.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no new epoch after this many minutes of this invocation's "
                        "training (0: no limit)")
    g.add_argument("--seed", type=int, default=2024,
                   help="seed of initialisation, batching, dropout and synthetic data")
    add_device_argument(g)
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    g.add_argument("--exclude-history", action="store_true",
                   help="remove each user's earlier items from the ranking (S3-Rec protocol); "
                        "default keeps them (RecBole protocol)")
    add_eval_batch_size_argument(g)
    g.add_argument("--run-dir", help="output folder (default runs/<data>-<model>-<ffn>-s<seed>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last checkpoint (only "
                        f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_SETTINGS)} "
                        "may differ from the saved run)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --run-dir that already holds files, replacing "
                        "an earlier run's files there")
    g.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bar (there is none either when stdout or stderr is "
                        "not a terminal, e.g. redirected to a file; the per-epoch line is "
                        "printed always)")
    g = p.add_argument_group("starting from a trained run")
    g.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from this finished run's best checkpoint (same data and "
                        f"backbone; its {CONFIG_FILE} gives the defaults) with a fresh "
                        "optimizer; with --ffn hymoe a dense run's FFNs are upcycled: each "
                        "becomes the shared expert of a HyMoE layer whose warm-up starts at 0, "
                        "so training starts from exactly the dense model")
    g.add_argument("--expert-init", default=HYMOE_DEFAULTS.expert_init, choices=EXPERT_INITS,
                   help="upcycled experts: copies of the dense FFN, copies with --drop-ratio "
                        "of their hidden units re-drawn (Drop-Upcycling), or fresh")
    g.add_argument("--drop-ratio", type=float, default=HYMOE_DEFAULTS.drop_ratio,
                   help="share of each expert's hidden units re-drawn by --expert-init drop")
    distributed.add_arguments(g)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """train.py's settings, resolved in the order of the module docstring. Every setting is
    checked here, so a bad one is a usage error (exit 2) before anything is written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    saved = args.config
    if args.resume:
        if not args.run_dir:
            parser.error("--resume needs --run-dir")
        saved = saved or str(Path(args.run_dir) / CONFIG_FILE)
    elif args.init_from:
        source = Path(args.init_from)
        if not source.exists():
            parser.error(f"--init-from {args.init_from}: no such run folder or checkpoint")
        saved = saved or str((source if source.is_dir() else source.parent) / CONFIG_FILE)
    config = {}
    if saved:
        try:
            with open(saved, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            parser.error(f"cannot read config {saved}: {err}")
        if not isinstance(config, dict):
            parser.error(f"config {saved} is not a JSON object of settings")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            parser.error(f"config {saved} has unknown keys {unknown}")
        for transient in TRANSIENT_SETTINGS:
            config.pop(transient, None)
        if args.resume or args.init_from:  # a run's own config.json: a model setting it
            for f in fields(ModelConfig):   # lacks did not exist then, and the run trained
                config.setdefault(f.name, older_runs_value(f))   # the model of that time
        if not args.resume:  # how the saved run itself started is not inherited
            for name in ("init_from", "expert_init", "drop_ratio"):
                config.pop(name, None)
        parser.set_defaults(**config)
        args = parser.parse_args(argv)
    # precedence: command line > saved config > the model's paper defaults > shared defaults
    parser.set_defaults(**{**MODELS[args.model].paper_defaults, **config})
    args = parser.parse_args(argv)
    for name in ("data_file", "init_from"):  # absolute: the run works from any folder
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    if not 0.0 <= args.drop_ratio <= 1.0:
        parser.error(f"--drop-ratio must be in [0, 1], got {args.drop_ratio}")
    synthetic_data = args.dataset == "synthetic" and not args.data_file
    if args.epochs is None:
        args.epochs = 20 if synthetic_data else 200
    if args.batch_size is None:
        args.batch_size = 256 if synthetic_data else 2048
    check_training_settings(parser, args)
    try:  # model settings that ModelConfig or the backbone rejects, e.g. --d-model 63
        MODELS[args.model].check_config(model_config(args))
    except ConfigError as err:
        parser.error(f"--{err.setting.replace('_', '-')}: {err}")
    if args.resume:
        changed = changed_settings(config, vars(args))
        if changed:
            parser.error(f"--resume: {', '.join(changed)} differ from the saved run in "
                         f"{args.run_dir} (only {', '.join(RESUMABLE_SETTINGS)} may change)")
    return args


def check_training_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2) for a training or device setting out of its range."""
    for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr_decay_patience < 0:
        parser.error(f"--lr-decay-patience must be >= 0 (0: constant), got "
                     f"{args.lr_decay_patience}")
    if not 0.0 < args.lr_decay_factor < 1.0:
        parser.error(f"--lr-decay-factor must be in (0, 1), got {args.lr_decay_factor}")
    for name, least in (("synthetic_users", 2), ("synthetic_items", 2), ("synthetic_length", 5)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, got "
                         f"{getattr(args, name)}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    for name in ("weight_decay", "max_minutes"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    if args.backend == "triton" and on_cpu and not backend.INTERPRETING:
        parser.error("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 to run the "
                     "kernels on the CPU under Triton's interpreter); use --backend torch")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'name: saved -> current' for every setting of ``saved`` (a run's config) that
    ``current`` holds differently, except RESUMABLE_SETTINGS and TRANSIENT_SETTINGS."""
    def normal(name, value):
        return str(Path(value).resolve()) if name == "data_file" and value else value

    return [f"{name} {saved[name]!r} -> {current.get(name)!r}" for name in saved
            if name not in RESUMABLE_SETTINGS + TRANSIENT_SETTINGS
            and normal(name, saved[name]) != normal(name, current.get(name))]
