"""Train a sequential recommender (default: SASRec with HyMoE FFNs) and report full-ranking
test metrics.

    python hymoerec/train.py                       # synthetic data, a 1-3 minute CPU run
    python hymoerec/train.py --data-file beauty.txt --format sequences
    python hymoerec/train.py --dataset ml-1m --ffn dense
    python hymoerec/train.py --resume --run-dir runs/X   # continue a killed run
    torchrun --nproc_per_node 2 hymoerec/train.py ...   # 2 processes (DDP; gloo / nccl)
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from hymoe_kernels import backend
from hymoe_kernels.layer import EXPERT_INITS
from hymoerec import distributed  # multi-process hooks are marked "# distributed"
from hymoerec.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint,
                                 load_model_state, save_checkpoint)
from hymoerec.cli import ArgumentParser, fail, interactive
from hymoerec.data import (DATASETS, FORMATS, DataFormatError, bucketed_batches, collate_windows,
                           leave_one_out, training_windows)
from hymoerec.metrics import NonFiniteScoresError, evaluate_ranking, format_metrics, head_items
from hymoerec.models import MODELS, ConfigError, ModelConfig, build_model
from hymoerec.models.upcycle import upcycle_to_hymoe
from hymoerec.run_folder import (RunFolderError, check_run_folder, prepare_run_folder, read_log,
                                 write_json, write_text_atomically)
from hymoerec.settings import add_model_arguments, data_defaults, load_data, model_config, pick_device

CHECKPOINT_KEYS = ("model", "config", "item_ids", "optimizer", "epoch", "step", "best_metric",
                   "best_epoch", "bad_epochs", "rng_torch", "rng_batches")
# settings a resumed run may change; any other difference from the saved run is refused
RESUMABLE_SETTINGS = ("epochs", "patience", "max_minutes", "threads", "no_progress", "device",
                      "eval_batch_size", "dist_timeout")
# settings that say how to start, not what ran: never saved in config.json
TRANSIENT_SETTINGS = ("config", "resume", "run_dir", "overwrite")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the model diverged); the message says where and why."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (None / False), whose help explains them, and those
    of on/off flags such as --plain-loss (store_true / store_false)."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and isinstance(action.const, bool)
        if action.default in (None, False) or action.help is None or switch:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Train a sequential recommender with HyMoE (or dense) FFNs; full-ranking "
                    "HR/NDCG@{5,10,20} on a leave-one-out split.",
        epilog="Each --model starts from its paper's configuration (its class's paper_defaults, "
               "e.g. mamba4rec: 1 layer, dense FFN); --config and flags override it.",
        formatter_class=HelpFormatter)
    p.add_argument("--config", help="JSON config saved by an earlier run (config.json); "
                                    "flags given on the command line override it")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="named dataset (ml-1m / beauty are downloaded to $HYMOEREC_DATA)")
    g.add_argument("--data-file", help="your own interaction file (overrides --dataset)")
    g.add_argument("--format", default="sequences", choices=FORMATS,
                   help="format of --data-file: 'sequences' = one line 'user item item ...', "
                        "'pairs' = one line 'user item' per interaction (a user's lines in time "
                        "order), 'ml-1m' = ratings.dat, 'amazon' = user,item,rating,timestamp CSV "
                        "(k-core filtered), 'csv'/'tsv' = header with named columns, 'parquet' "
                        "= a Parquet file's named columns, 'jsonl' = one JSON object per line "
                        "with named fields; a file ending in .gz is decompressed on the fly")
    g.add_argument("--k-core", type=int, default=5, help="k-core filter of amazon data")
    g.add_argument("--user-col", default="user",
                   help="user column (field) of csv/tsv/parquet/jsonl data")
    g.add_argument("--item-col", default="item",
                   help="item column (field) of csv/tsv/parquet/jsonl data")
    g.add_argument("--time-col", default="timestamp",
                   help="time column (field) of csv/tsv/parquet/jsonl data ('': file order)")
    g.add_argument("--synthetic-users", type=int, default=2000, help="synthetic users")
    g.add_argument("--synthetic-items", type=int, default=400, help="synthetic items")
    g.add_argument("--synthetic-length", type=int, default=15, help="mean sequence length")
    g.add_argument("--synthetic-seed", type=int, default=None,
                   help="seed of the synthetic data (default: --seed)")
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
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    g.add_argument("--exclude-history", action="store_true",
                   help="remove each user's earlier items from the ranking (S3-Rec protocol); "
                        "default keeps them (RecBole protocol)")
    g.add_argument("--eval-batch-size", type=int, default=1024, help="users scored at once")
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
                        "backbone; its config.json gives the defaults) with a fresh optimizer; "
                        "with --ffn hymoe a dense run's FFNs are upcycled: each becomes the "
                        "shared expert of a HyMoE layer whose warm-up starts at 0, so training "
                        "starts from exactly the dense model")
    g.add_argument("--expert-init", default="copy", choices=EXPERT_INITS,
                   help="upcycled experts: copies of the dense FFN, copies with --drop-ratio "
                        "of their hidden units re-drawn (Drop-Upcycling), or fresh")
    g.add_argument("--drop-ratio", type=float, default=0.5,
                   help="share of each expert's hidden units re-drawn by --expert-init drop")
    distributed.add_arguments(g)  # distributed
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over the saved config (``--config``, or the run's config.json with
    ``--resume``) over the model's paper defaults over the shared defaults. Every setting is
    checked here, so a bad one is a usage error (exit 2) before anything is written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    saved = args.config
    if args.resume:
        if not args.run_dir:
            parser.error("--resume needs --run-dir")
        saved = saved or str(Path(args.run_dir) / "config.json")
    elif args.init_from:
        source = Path(args.init_from)
        if not source.exists():
            parser.error(f"--init-from {args.init_from}: no such run folder or checkpoint")
        saved = saved or str((source if source.is_dir() else source.parent) / "config.json")
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
            for f in fields(ModelConfig):   # lacks did not exist then: it ran ModelConfig's
                config.setdefault(f.name, f.default)   # default
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


def git_commit() -> str | None:
    """HEAD of the repository holding this file, with '-dirty' if it has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hymoerec", "hymoe_kernels"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty.strip() else "")


def routing_stats(model) -> dict:
    """alpha and expert load fraction (E,) of every HyMoE layer after the last forward."""
    layers = model.hymoe_layers()
    return {"alpha": [layer.stats()["alpha"] for layer in layers],
            "expert_load": [layer.stats()["load"] for layer in layers]}


class Trainer:
    """Owns data, model, optimizer and the run folder (whose lock it holds from the end of
    ``__init__`` until ``close()``); ``fit()`` trains with early stopping and returns the
    summary dict (also written to summary.json)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = pick_device(args.device)
        self.dist = distributed.setup(self.device, args.dist_timeout)  # distributed
        self.device = self.dist.device  # distributed: cuda:LOCAL_RANK under torchrun
        self.run_dir = self.dist.from_main(Path(args.run_dir or Path("runs") / (  # distributed
            f"{Path(args.data_file).stem if args.data_file else args.dataset}-{args.model}-"
            f"{args.ffn}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")), "run folder")
        self.last_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        self.log_path = self.run_dir / "log.jsonl"
        if self.dist.is_main:  # distributed: only rank 0 writes files
            check_run_folder(self.run_dir, args.resume, args.overwrite, args.init_from)

        torch.manual_seed(args.seed)
        with self.dist.main_first("loading the data"):  # distributed: one download
            self.data = load_data(args)
        if self.data.n_items < 2:
            raise DataFormatError(f"{self.data.describe()}: ranking needs at least 2 items "
                                  f"(with one, every metric is 1.0 whatever the model)")
        for name, value in data_defaults(self.data).items():
            if getattr(args, name) is None:  # not set by a flag, a config or the model's paper
                setattr(args, name, value)
        self.split = leave_one_out(self.data)
        self.windows = training_windows(self.split.train, args.max_len)
        if not self.windows:
            raise DataFormatError(f"{self.data.describe()}: no training sequence has 2 or more "
                                  f"items")
        if len(self.split.eval_users) == 0:
            raise DataFormatError(f"{self.data.describe()}: no user has the 3 items a "
                                  f"leave-one-out split needs")
        self.head = head_items(self.split.train_item_counts())
        self.config = model_config(args)
        self.started_from = None  # {"run", "epoch", "upcycled"} with --init-from
        if args.init_from and not args.resume:
            self.model = self.model_from_run(Path(args.init_from)).to(self.device)
        else:
            self.model = build_model(args.model, self.data.n_items, self.config).to(self.device)
        # distributed: same data and flags everywhere; DDP wrapper; per-rank dropout stream
        self.dist.check_same([len(self.windows), distributed.digest(self.data.item_ids),
                              distributed.digest(vars(args))], "data and flags")
        self.train_loss = self.dist.train_loss(self.model)
        self.dist.seed_dropout(args.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr,
                                          weight_decay=args.weight_decay)
        self.batch_rng = torch.Generator().manual_seed(args.seed)
        self.epoch, self.step = 0, 0
        self.best_metric, self.best_epoch, self.bad_epochs = -math.inf, 0, 0
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0
        self.commits = [git_commit()]  # code of this process (and of earlier ones on resume)
        # last, once everything the run reads (the --init-from run too) has been read: lock
        # the folder for the life of the run and clear it for --overwrite
        self.folder_lock = (prepare_run_folder(self.run_dir, args.resume, args.overwrite,
                                               args.init_from) if self.dist.is_main else None)

    def close(self) -> None:
        """Release the run folder's lock (held from the end of __init__)."""
        if self.folder_lock is not None:
            self.folder_lock.release()

    def model_from_run(self, source: Path) -> torch.nn.Module:
        """--init-from: the best model of run ``source`` (a run folder or a checkpoint),
        upcycled to HyMoE when it is dense and this run's --ffn is hymoe. Raises
        CheckpointError when it was trained on other data, another backbone, or settings
        this run cannot start from."""
        best = checkpoint_path(source)
        state = load_checkpoint(best, ("model", "config", "item_ids", "epoch"))
        if state["item_ids"] != self.data.item_ids:
            raise CheckpointError(f"--init-from {best} was trained on different data (its item "
                                  f"ids differ from {self.data.describe()})")
        if state["config"].get("model") != self.args.model:
            raise CheckpointError(f"--init-from {best} is a {state['config'].get('model')} "
                                  f"model, this run trains --model {self.args.model}")
        source_config = model_config(argparse.Namespace(**state["config"]))
        model = build_model(self.args.model, self.data.n_items, source_config)
        load_model_state(model, state["model"], best)
        upcycled = []
        if source_config.ffn == "dense" and self.config.ffn == "hymoe":
            try:
                upcycled = upcycle_to_hymoe(model, self.config, expert_init=self.args.expert_init,
                                            drop_ratio=self.args.drop_ratio)
            except ValueError as err:
                raise CheckpointError(f"--init-from {best}: {err}") from None
        else:
            differing = [f"{name} {getattr(source_config, name)!r} -> {getattr(self.config, name)!r}"
                         for name in vars(self.config) if name != "backend"
                         and getattr(source_config, name) != getattr(self.config, name)]
            if differing:
                raise CheckpointError(f"--init-from {best}: a {source_config.ffn} model can only "
                                      f"go on as it is (or a dense one be upcycled with --ffn "
                                      f"hymoe); these settings differ: {', '.join(differing)}")
            model.config = self.config
        self.started_from = {"run": str(best), "epoch": state["epoch"], "upcycled": upcycled}
        return model

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "config": vars(self.args),
                "item_ids": self.data.item_ids, "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "step": self.step, "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
                "commits": self.commits,
                "rng_torch": torch.get_rng_state(), "rng_batches": self.batch_rng.get_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **self.dist.rng_state()}  # distributed: every rank's generators

    def restore(self) -> None:
        state = load_checkpoint(self.last_path, CHECKPOINT_KEYS)
        if state["item_ids"] != self.data.item_ids:
            raise CheckpointError(f"checkpoint {self.last_path} was trained on different data "
                                  f"(item ids differ from {self.data.describe()})")
        changed = changed_settings(state["config"], vars(self.args))
        if changed:
            raise CheckpointError(f"checkpoint {self.last_path} was trained with other settings "
                                  f"than {self.run_dir / 'config.json'}: {', '.join(changed)}")
        load_model_state(self.model, state["model"], self.last_path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {self.last_path}: optimizer state does not fit "
                                  f"({err})") from None
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.train_cpu_seconds = state.get("train_cpu_seconds", 0.0)
        self.commits = state.get("commits", []) + self.commits
        torch.set_rng_state(state["rng_torch"])
        self.batch_rng.set_state(state["rng_batches"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.dist.restore_rng(state.get("rng_ranks"), self.args.seed, self.epoch)  # distributed
        # keep only the log records of the epochs the checkpoint holds
        if self.dist.is_main:
            records = [r for r in read_log(self.log_path) if r["epoch"] <= self.epoch]
            write_text_atomically(self.log_path, "".join(json.dumps(r) + "\n" for r in records))

    # --------------------------------------------------------------------- training
    def evaluate(self, stage: str, exclude_history: bool | None = None) -> dict:
        self.model.eval()
        try:
            return evaluate_ranking(
                self.model.rank_next, self.split.history(stage), self.split.targets(stage),
                self.head, self.args.max_len,
                self.args.exclude_history if exclude_history is None else exclude_history,
                self.args.eval_batch_size, self.device,
                shard=self.dist.eval_shard, combine=self.dist.sum_ranks_array)  # distributed
        except NonFiniteScoresError as err:
            raise TrainingError(f"{stage} evaluation after epoch {self.epoch}: {err}; "
                                f"{self.diverged_hint()}") from None

    def diverged_hint(self) -> str:
        return (f"the likely cause is a learning rate too high (--lr {self.args.lr}) or a "
                f"load-balance weight too large (--lb-weight {self.args.lb_weight}). Nothing "
                f"of this epoch was saved: {self.last_path} and {self.best_path} keep the "
                f"last good epoch's")

    def check_finite(self, task_loss: Tensor, aux_loss: Tensor) -> None:
        """TrainingError naming the epoch and step when the loss or a gradient of this step
        is NaN or infinite (checked before the optimizer step, so no weight is touched).
        Under DDP the gradients are averaged over processes, so all of them stop together."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_sq = torch.stack([g.float().square().sum() for g in grads]).sum()
        loss = task_loss + aux_loss
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_sq)):
            what = (f"the loss is {loss.item()}" if not torch.isfinite(loss)
                    else "a gradient is not finite")
            raise TrainingError(f"epoch {self.epoch + 1}, step {self.step + 1}: training "
                                f"diverged ({what}); {self.diverged_hint()}")

    def train_epoch(self, max_steps: int | None = None) -> dict:
        """One pass over the training windows in shuffled, length-bucketed batches; returns
        the epoch's mean loss, aux loss, alpha and expert load. ``max_steps``: only the
        epoch's first max_steps batches (a partial epoch, to time steps where a whole epoch
        is too long, as benchmarks/bench_large_catalog.py does)."""
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None: the whole epoch), got {max_steps}")
        self.model.train()
        batches = bucketed_batches(self.windows, self.args.batch_size, self.batch_rng)[:max_steps]
        loss_sum = aux_sum = 0.0
        n_targets = 0
        load_sum = None
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}", unit="batch", leave=False,
                   disable=self.args.no_progress or not self.dist.is_main or not interactive(),
                   dynamic_ncols=True)
        for batch in bar:
            batch, stand_in = self.dist.share(batch)  # distributed: this rank's share
            inputs, targets = collate_windows([self.windows[i] for i in batch])
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            task_loss, aux_loss = self.train_loss(inputs, targets)
            count = 0 if stand_in else int((targets > 0).sum())
            self.optimizer.zero_grad(set_to_none=True)
            self.dist.backward(task_loss + aux_loss, count)  # distributed: weighted by count
            self.check_finite(task_loss, aux_loss)
            self.optimizer.step()
            self.step += 1
            loss_sum += task_loss.item() * count
            aux_sum += aux_loss.item() * count
            n_targets += count
            load = torch.tensor(routing_stats(self.model)["expert_load"] or [[0.0]])
            load_sum = load * count if load_sum is None else load_sum + load * count
            bar.set_postfix(loss=f"{task_loss.item():.4f}",
                            items_per_s=f"{n_targets / max(bar.format_dict['elapsed'], 1e-9):.0f}")
        # distributed: totals over all ranks; HyMoE warm-up counters must agree
        loss_sum, aux_sum, n_targets, load_sum = self.dist.sum_over_ranks(
            loss_sum, aux_sum, n_targets, load_sum)
        self.dist.check_same([float(layer.step) for layer in self.model.hymoe_layers()],
                             "HyMoE warm-up steps")
        stats = routing_stats(self.model)
        return {"loss": loss_sum / n_targets, "aux_loss": aux_sum / n_targets,
                "alpha": stats["alpha"],
                "expert_load": (load_sum / n_targets).tolist() if stats["expert_load"] else []}

    def fit(self) -> dict:
        args = self.args
        if args.resume:
            self.restore()
        if self.dist.is_main:  # distributed: only rank 0 writes files
            # the settings that run: on resume, the saved ones with the changes allowed
            write_json(self.run_dir / "config.json",
                       {k: v for k, v in vars(args).items() if k not in TRANSIENT_SETTINGS})
        print(f"{self.data.describe()}; {len(self.windows)} training windows; "
              f"{sum(p.numel() for p in self.model.parameters())} parameters; device "
              f"{self.device}; run dir {self.run_dir}", flush=True)
        started = time.perf_counter()
        while (self.epoch < args.epochs and self.bad_epochs < args.patience
               and not (args.max_minutes and self.dist.from_main(  # distributed: rank 0's clock
                   time.perf_counter() - started, "elapsed time") >= 60 * args.max_minutes)):
            wall, cpu = time.perf_counter(), time.process_time()
            record = self.train_epoch()
            record["train_seconds"] = time.perf_counter() - wall
            record["train_cpu_seconds"] = time.process_time() - cpu
            self.train_seconds += record["train_seconds"]
            self.train_cpu_seconds += record["train_cpu_seconds"]
            valid = self.evaluate("valid")
            valid_other = self.evaluate("valid", not args.exclude_history)
            self.epoch += 1
            record = {"epoch": self.epoch, "step": self.step, **record,
                      "valid": {k: v for k, v in valid.items() if "/" not in k},
                      # the same epoch under the protocol not used for early stopping
                      f"valid_history_{'kept' if args.exclude_history else 'excluded'}":
                          {k: v for k, v in valid_other.items() if "/" not in k},
                      "seconds": time.perf_counter() - wall}
            if self.epoch == 1 and self.started_from:
                record["started_from"] = self.started_from
            if valid["NDCG@10"] > self.best_metric:
                self.best_metric, self.best_epoch, self.bad_epochs = valid["NDCG@10"], self.epoch, 0
                if self.dist.is_main:  # distributed
                    save_checkpoint({"model": self.model.state_dict(), "config": vars(args),
                                     "item_ids": self.data.item_ids, "epoch": self.epoch},
                                    self.best_path)
            else:
                self.bad_epochs += 1
                self.decay_lr_on_plateau()
            record["lr"] = self.optimizer.param_groups[0]["lr"]  # for the next epoch
            state = self.state()  # distributed: gathers every rank's generators
            if self.dist.is_main:  # distributed
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                save_checkpoint(state, self.last_path)
            print(f"epoch {self.epoch}: loss {record['loss']:.4f} aux {record['aux_loss']:.4f} "
                  f"valid HR@10 {valid['HR@10']:.4f} NDCG@10 {valid['NDCG@10']:.4f} "
                  f"({record['seconds']:.1f}s){' *' if self.best_epoch == self.epoch else ''}",
                  flush=True)
        return self.finish()

    def decay_lr_on_plateau(self) -> None:
        """--lr-decay-patience P: after every P-th epoch in a row without a better validation
        NDCG@10, multiply the learning rate by --lr-decay-factor (the optimizer's state, and
        so the checkpoint, keeps the current rate)."""
        patience = self.args.lr_decay_patience
        if patience and self.bad_epochs % patience == 0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.args.lr_decay_factor

    def finish(self) -> dict:
        self.dist.barrier("waiting for rank 0's checkpoint")  # distributed
        best = load_checkpoint(self.best_path)
        load_model_state(self.model, best["model"], self.best_path)
        test = self.evaluate("test")
        summary = {
            "data": self.data.describe(), "n_users": self.data.n_users,
            "n_items": self.data.n_items, "n_interactions": self.data.n_interactions,
            "config": {k: v for k, v in vars(self.args).items()
                       if k not in TRANSIENT_SETTINGS or k == "run_dir"},
            "commit": self.commits[0], "commits": self.commits,
            "torch": torch.__version__, "device": str(self.device),
            "threads": torch.get_num_threads(),
            "started_from": (read_log(self.log_path) or [{}])[0].get("started_from"),
            "epochs_run": self.epoch, "best_epoch": self.best_epoch, "steps": self.step,
            "stopped_early": self.bad_epochs >= self.args.patience,
            # False when --max-minutes ended this invocation first: --resume goes on
            "finished": self.bad_epochs >= self.args.patience or self.epoch >= self.args.epochs,
            "train_seconds_per_epoch": self.train_seconds / max(self.epoch, 1),
            "train_cpu_seconds_per_epoch": self.train_cpu_seconds / max(self.epoch, 1),
            "valid": self.evaluate("valid"), "test": test,
            # the best checkpoint under the protocol not used for early stopping
            f"test_history_{'kept' if self.args.exclude_history else 'excluded'}":
                self.evaluate("test", not self.args.exclude_history),
        }
        if self.dist.is_main:  # distributed
            write_json(self.run_dir / "summary.json", summary)
            plot_run(self.log_path, self.run_dir / "curves.png")
        # distributed: the DDP wrapper holds the process group; dropping it lets
        # distributed.shutdown() free the group's threads now rather than at interpreter exit,
        # and the barrier keeps any rank from tearing down while another still works
        self.train_loss = None
        self.dist.barrier("finishing the run")
        return summary


def plot_run(log_path: Path, png_path: Path) -> bool:
    """Learning curves and expert load per epoch as a PNG, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_log(log_path)
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [r["loss"] for r in records], label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for key in ("HR@10", "NDCG@10"):
        axes[1].plot(epochs, [r["valid"][key] for r in records], label=f"valid {key}")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    if records and records[0]["expert_load"]:
        loads = np.array([r["expert_load"] for r in records])        # (epochs, layers, E)
        for layer in range(loads.shape[1]):
            for expert in range(loads.shape[2]):
                axes[2].plot(epochs, loads[:, layer, expert], label=f"layer {layer} expert {expert}")
        axes[2].set_ylabel("fraction of routed slots")
        axes[2].legend(fontsize="small")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True


# errors of the user's input (data, folders, checkpoints): exit code 2, like a bad flag
USER_ERRORS = (CheckpointError, DataFormatError, RunFolderError,
               distributed.DistributedError)  # distributed


def interrupted(trainer: Trainer | None) -> str:
    """Ctrl-C's one line: where the run stopped and how to go on from there."""
    if trainer is None:
        return "interrupted before training began"
    if not trainer.last_path.is_file():
        return (f"interrupted before the first epoch was saved; nothing to resume in "
                f"{trainer.run_dir} (start again with --overwrite)")
    return (f"interrupted after {trainer.epoch} finished epoch(s); --resume --run-dir "
            f"{trainer.run_dir} goes on from the last one saved in {trainer.last_path}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    trainer = None
    try:
        trainer = Trainer(args)
        summary = trainer.fit()
    except TrainingError as err:
        raise fail(str(err), 1) from None
    except USER_ERRORS as err:
        raise fail(str(err), 2) from None
    except KeyboardInterrupt:
        raise fail(interrupted(trainer), 130) from None
    finally:
        if trainer is not None:
            trainer.close()
        distributed.shutdown()  # distributed
    print(f"best epoch {summary['best_epoch']} of {summary['epochs_run']}; test metrics "
          f"({'history excluded' if args.exclude_history else 'history kept'}, "
          f"{summary['test']['n_head']} head / {summary['test']['n_tail']} tail users):")
    print(format_metrics(summary["test"]))
    print(f"summary: {trainer.run_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
