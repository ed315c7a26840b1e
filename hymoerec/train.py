"""Train a sequential recommender (default: SASRec with HyMoE FFNs) and report full-ranking
test metrics.

    python hymoerec/train.py                       # synthetic data, a 1-3 minute CPU run
    python hymoerec/train.py --data-file beauty.txt --format sequences
    python hymoerec/train.py --dataset ml-1m --ffn dense
    python hymoerec/train.py --resume --run-dir runs/X   # continue a killed run
    torchrun --nproc_per_node 2 hymoerec/train.py ...   # 2 processes (DDP; gloo / nccl)

The settings come from :mod:`hymoerec.options`; under torchrun every process runs the same
Trainer and :class:`hymoerec.distributed.DistContext` makes them train one model.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor
from tqdm import tqdm

from hymoe_kernels.cross_entropy import NonFiniteScoresError
from hymoerec import distributed
from hymoerec.checkpoint import CheckpointError, load_checkpoint, load_model_state
from hymoerec.cli import fail, interactive
from hymoerec.data import (DataFormatError, bucketed_batches, collate_windows, leave_one_out,
                           training_prefixes, training_windows)
from hymoerec.metrics import evaluate_ranking, format_metrics, head_items
from hymoerec.models import build_model
from hymoerec.models.upcycling import upcycle_to_hymoe
from hymoerec.options import TRANSIENT_SETTINGS, changed_settings, parse_args
from hymoerec.run_folder import RunFolder, RunFolderError, checkpoint_path, git_commit
from hymoerec.settings import data_defaults, load_data, model_config, pick_device

CHECKPOINT_KEYS = ("model", "config", "item_ids", "optimizer", "epoch", "step", "best_metric",
                   "best_epoch", "bad_epochs", "rng_torch", "rng_batches")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the model diverged); the message says where and why."""


def routing_stats(model) -> dict:
    """alpha and expert load fraction (E,) of every HyMoE layer after the last forward."""
    layers = model.hymoe_layers()
    return {"alpha": [layer.stats()["alpha"] for layer in layers],
            "expert_load": [layer.stats()["load"] for layer in layers]}


class Trainer:
    """Owns data, model, optimizer and the run folder (whose lock it holds from the end of
    ``__init__`` until ``close()``); ``fit()`` trains with early stopping and returns the
    summary dict (also written to the run folder)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.dist = distributed.setup(pick_device(args.device), args.dist_timeout)
        self.device = self.dist.device  # cuda:LOCAL_RANK under torchrun
        run_dir = self.dist.from_main(Path(args.run_dir or Path("runs") / (
            f"{Path(args.data_file).stem if args.data_file else args.dataset}-{args.model}-"
            f"{args.ffn}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")), "run folder")
        self.folder = RunFolder(run_dir, writes=self.dist.is_main)
        self.folder.check(args.resume, args.overwrite, args.init_from)

        torch.manual_seed(args.seed)
        with self.dist.main_first("loading the data"):  # one download into the shared cache
            self.data = load_data(args)
        if self.data.n_items < 2:
            raise DataFormatError(f"{self.data.describe()}: ranking needs at least 2 items "
                                  f"(with one, every metric is 1.0 whatever the model)")
        for name, value in data_defaults(self.data).items():
            if getattr(args, name) is None:  # not set by a flag, a config or the model's paper
                setattr(args, name, value)
        self.split = leave_one_out(self.data)
        self.last_target_only = args.train_samples == "prefixes"
        self.windows = (training_prefixes if self.last_target_only else training_windows)(
            self.split.train, args.max_len)
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
        self.train_loss = self.dist.join_training(
            self.model, args.seed, [len(self.windows), self.data.item_ids, vars(args)])
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
        self.folder.prepare(args.resume, args.overwrite, args.init_from)

    def close(self) -> None:
        """Release the run folder's lock (held from the end of __init__)."""
        self.folder.close()

    # --------------------------------------------------------------------- training
    def fit(self) -> dict:
        args = self.args
        if args.resume:
            self.restore()
        # the settings that run: on resume, the saved ones with the changes allowed
        self.folder.write_config({k: v for k, v in vars(args).items()
                                  if k not in TRANSIENT_SETTINGS})
        print(f"{self.data.describe()}; {len(self.windows)} training windows; "
              f"{sum(p.numel() for p in self.model.parameters())} parameters; device "
              f"{self.device}; run dir {self.folder.path}", flush=True)
        started = time.perf_counter()
        while (self.epoch < args.epochs and self.bad_epochs < args.patience
               and not self.out_of_time(started)):
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
                self.folder.save_best({"model": self.model.state_dict(), "config": vars(args),
                                       "item_ids": self.data.item_ids, "epoch": self.epoch})
            else:
                self.bad_epochs += 1
                self.decay_lr_on_plateau()
            record["lr"] = self.optimizer.param_groups[0]["lr"]  # for the next epoch
            state = self.state()  # on every process: it gathers every rank's generators
            self.folder.append_log(record)
            self.folder.save_last(state)
            print(f"epoch {self.epoch}: loss {record['loss']:.4f} aux {record['aux_loss']:.4f} "
                  f"valid HR@10 {valid['HR@10']:.4f} NDCG@10 {valid['NDCG@10']:.4f} "
                  f"({record['seconds']:.1f}s){' *' if self.best_epoch == self.epoch else ''}",
                  flush=True)
        return self.finish()

    def out_of_time(self, started: float) -> bool:
        """--max-minutes: whether this invocation's training time since ``started`` is up
        (rank 0's clock decides for every process)."""
        if not self.args.max_minutes:
            return False
        elapsed = self.dist.from_main(time.perf_counter() - started, "elapsed time")
        return elapsed >= 60 * self.args.max_minutes

    def train_epoch(self, max_steps: int | None = None) -> dict:
        """One pass over the training windows in shuffled, length-bucketed batches; returns
        the epoch's mean loss, aux loss, alpha and expert load. ``max_steps``: only the
        epoch's first max_steps batches (a partial epoch, to time steps where a whole epoch
        is too long, as benchmarks/bench_large_catalog.py does)."""
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None: the whole epoch), got {max_steps}")
        self.model.train()
        batches = bucketed_batches(self.windows, self.args.batch_size, self.batch_rng,
                                   self.last_target_only)[:max_steps]
        loss_sum = aux_sum = 0.0
        n_targets = 0
        load_sum = None
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}", unit="batch", leave=False,
                   disable=self.args.no_progress or not self.dist.is_main or not interactive(),
                   dynamic_ncols=True)
        for batch in bar:
            batch, stand_in = self.dist.share(batch)  # this process's windows of the batch
            inputs, targets = collate_windows([self.windows[i] for i in batch],
                                              self.last_target_only)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            task_loss, aux_loss = self.train_loss(inputs, targets)
            count = 0 if stand_in else int((targets > 0).sum())
            self.optimizer.zero_grad(set_to_none=True)
            self.dist.backward(task_loss + aux_loss, count)  # weighted by the share's targets
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
        loss_sum, aux_sum, n_targets, load_sum = self.dist.sum_over_ranks(
            loss_sum, aux_sum, n_targets, load_sum)
        self.dist.check_same([float(layer.step) for layer in self.model.hymoe_layers()],
                             "HyMoE warm-up steps")
        stats = routing_stats(self.model)
        return {"loss": loss_sum / n_targets, "aux_loss": aux_sum / n_targets,
                "alpha": stats["alpha"],
                "expert_load": (load_sum / n_targets).tolist() if stats["expert_load"] else []}

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

    def diverged_hint(self) -> str:
        return (f"the likely cause is a learning rate too high (--lr {self.args.lr}) or a "
                f"load-balance weight too large (--lb-weight {self.args.lb_weight}). Nothing "
                f"of this epoch was saved: {self.folder.last_path} and {self.folder.best_path} "
                f"keep the last good epoch's")

    def decay_lr_on_plateau(self) -> None:
        """--lr-decay-patience P: after every P-th epoch in a row without a better validation
        NDCG@10, multiply the learning rate by --lr-decay-factor (the optimizer's state, and
        so the checkpoint, keeps the current rate)."""
        patience = self.args.lr_decay_patience
        if patience and self.bad_epochs % patience == 0:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.args.lr_decay_factor

    def evaluate(self, stage: str, exclude_history: bool | None = None) -> dict:
        self.model.eval()
        try:
            return evaluate_ranking(
                self.model.rank_next, self.split.history(stage), self.split.targets(stage),
                self.head, self.args.max_len,
                self.args.exclude_history if exclude_history is None else exclude_history,
                self.args.eval_batch_size, self.device,
                shard=self.dist.eval_shard, combine=self.dist.sum_ranks_array)
        except NonFiniteScoresError as err:
            raise TrainingError(f"{stage} evaluation after epoch {self.epoch}: {err}; "
                                f"{self.diverged_hint()}") from None

    def finish(self) -> dict:
        self.dist.barrier("waiting for rank 0's checkpoint")
        best = load_checkpoint(self.folder.best_path)
        load_model_state(self.model, best["model"], self.folder.best_path)
        test = self.evaluate("test")
        summary = {
            "data": self.data.describe(), "n_users": self.data.n_users,
            "n_items": self.data.n_items, "n_interactions": self.data.n_interactions,
            "config": {k: v for k, v in vars(self.args).items()
                       if k not in TRANSIENT_SETTINGS or k == "run_dir"},
            "commit": self.commits[0], "commits": self.commits,
            "torch": torch.__version__, "device": str(self.device),
            "threads": torch.get_num_threads(),
            "started_from": (self.folder.log() or [{}])[0].get("started_from"),
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
        self.folder.write_summary(summary)
        # the DDP wrapper holds the process group; dropping it lets distributed.shutdown()
        # free the group's threads now rather than at interpreter exit, and the barrier keeps
        # any process from tearing down while another still works
        self.train_loss = None
        self.dist.barrier("finishing the run")
        return summary

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
                **self.dist.rng_state()}

    def restore(self) -> None:
        last = self.folder.last_path
        state = load_checkpoint(last, CHECKPOINT_KEYS)
        if state["item_ids"] != self.data.item_ids:
            raise CheckpointError(f"checkpoint {last} was trained on different data "
                                  f"(item ids differ from {self.data.describe()})")
        changed = changed_settings(state["config"], vars(self.args))
        if changed:
            raise CheckpointError(f"checkpoint {last} was trained with other settings "
                                  f"than {self.folder.config_path}: {', '.join(changed)}")
        load_model_state(self.model, state["model"], last)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {last}: optimizer state does not fit "
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
        self.dist.restore_rng(state.get("rng_ranks"), self.args.seed, self.epoch)
        self.folder.keep_log_through(self.epoch)  # the log records of the epochs it holds

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


# errors of the user's input (data, folders, checkpoints, the process group): exit code 2,
# like a bad flag
USER_ERRORS = (CheckpointError, DataFormatError, RunFolderError, distributed.DistributedError)


def interrupted(trainer: Trainer | None) -> str:
    """Ctrl-C's one line: where the run stopped and how to go on from there."""
    if trainer is None:
        return "interrupted before training began"
    folder = trainer.folder
    if not folder.last_path.is_file():
        return (f"interrupted before the first epoch was saved; nothing to resume in "
                f"{folder.path} (start again with --overwrite)")
    return (f"interrupted after {trainer.epoch} finished epoch(s); --resume --run-dir "
            f"{folder.path} goes on from the last one saved in {folder.last_path}")


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
        distributed.shutdown()
    print(f"best epoch {summary['best_epoch']} of {summary['epochs_run']}; test metrics "
          f"({'history excluded' if args.exclude_history else 'history kept'}, "
          f"{summary['test']['n_head']} head / {summary['test']['n_tail']} tail users):")
    print(format_metrics(summary["test"]))
    print(f"summary: {trainer.folder.summary_path}")
    return summary


if __name__ == "__main__":
    main()
