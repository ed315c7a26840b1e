"""Multi-process training with torch.distributed (DistributedDataParallel).

``torchrun --nproc_per_node N hymoerec/train.py ...`` starts N copies of the trainer; each
reads RANK / WORLD_SIZE / LOCAL_RANK from the environment torchrun sets and joins one
process group (gloo on the CPU, nccl on CUDA, one GPU per process: cuda:LOCAL_RANK).
Without those variables everything here is a no-op and training is single-process.

The scheme, chosen so that N processes train the same model as one process:

* every rank builds the same global batches (same data, same ``--seed`` generator, advanced
  once per epoch and checkpointed) and takes its share of each (:func:`rank_share`);
* each rank's loss is scaled by ``N * own real positions / all ranks' real positions``, so
  DDP's gradient average equals the gradient of the single-process mean over the global
  batch's real positions (the HyMoE load-balance term is weighted the same way: it becomes
  the real-position-weighted mean of the ranks' per-shard terms);
* every rank runs exactly one training forward per step (a rank whose share is empty runs
  a zero-weight stand-in window), so HyMoE's ``step`` buffers, and with them the alpha
  warm-up, advance identically everywhere; DDP's per-forward buffer broadcast is therefore
  switched off and the counters are instead checked for agreement after every epoch;
* dropout: rank 0 keeps the single-process random stream, rank r > 0 is reseeded from
  (seed, r); every rank's generator state is checkpointed, so ``--resume`` continues exactly;
* evaluation users are split across ranks and the per-user ranks summed over ranks, so all
  ranks compute exactly the single-process metrics (and make the same early-stopping call).

A collective that fails (a rank died) or waits longer than ``--dist-timeout`` seconds
(a rank hangs) raises :class:`DistributedError` naming the rank and the operation.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

DEFAULT_TIMEOUT_S = 1800.0  # PyTorch's own default process-group timeout
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """A collective operation failed or timed out; the message names this rank."""


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_arguments(group) -> None:
    """The distributed flags (an argparse group)."""
    group.add_argument("--dist-timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S,
                       help="under torchrun: seconds a process waits for the others at a "
                            "collective before it exits with an error (a hung or dead rank); "
                            "must exceed the longest rank-0-only pause (checkpoint writing, "
                            "the first download of a named dataset)")


def rank_share(batch: Sequence[int], rank: int, world_size: int) -> tuple[list[int], bool]:
    """This rank's windows of a global batch: every world_size-th index starting at rank (so
    the first len(batch) % world_size ranks take one more, and length-sorted batches spread
    evenly). Returns (indices, stand_in): when the share is empty, ``[batch[0]]`` and True
    (the caller trains on it with weight 0, to keep the ranks' step counts equal)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1={world_size - 1}, got {rank}")
    if not batch:
        raise ValueError("batch must hold at least one window index")
    share = list(batch[rank::world_size])
    return (share, False) if share else ([batch[0]], True)


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed of rank r's dropout stream (r > 0) from epoch ``epoch`` on: a SeedSequence hash
    of (seed, rank, epoch)."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0] >> 1)


def digest(value) -> float:
    """A 52-bit hash of ``value``'s JSON (keys sorted), exact as a float64: equal on every
    process for equal values (unlike ``hash``, which Python salts per process)."""
    text = json.dumps(value, sort_keys=True, default=str).encode()
    return float(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 12)


def is_communication_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the process group (a dead or hung peer), not from the
    computation: torch's DistError family, or gloo's plain RuntimeErrors."""
    if isinstance(err, DistributedError):
        return False
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(
        word in text for word in ("gloo", "nccl", "timed out", "connection", "by peer"))


class _LossForward(nn.Module):
    """``model.loss`` as ``forward``, so DistributedDataParallel's hooks run around it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.loss(inputs, targets)


class DistContext:
    """This process's place in the job: ``rank`` / ``world_size`` / ``device`` and the
    collectives the trainer uses. ``enabled`` is False for a plain single-process run, where
    every method reduces to the single-process behaviour without communication."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, enabled: bool = False):
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.timeout_s, self.enabled = timeout_s, enabled

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, checkpoints, plots and prints (rank 0)."""
        return self.rank == 0

    # ---------------------------------------------------------------- collectives
    @contextmanager
    def guard(self, operation: str) -> Iterator[None]:
        """Turn a failed collective inside the block into a DistributedError."""
        try:
            yield
        except RuntimeError as err:
            if not self.enabled or not is_communication_error(err):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {operation} failed - another rank "
                f"died or did not arrive within --dist-timeout {self.timeout_s:g}s "
                f"(see that rank's output for the cause). {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}") from None

    def all_reduce(self, values: Tensor, operation: str,
                   op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
        """``values`` reduced over ranks (a new tensor on ``values``' device)."""
        if not self.enabled:
            return values
        buffer = values.to(self.device, copy=True)
        with self.guard(operation):
            dist.all_reduce(buffer, op=op)
        return buffer.to(values.device)

    def barrier(self, operation: str) -> None:
        if self.enabled:
            with self.guard(operation):
                dist.barrier()

    @contextmanager
    def main_first(self, operation: str) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. downloads a dataset into the shared cache),
        the other ranks after it, so they never race on the same files."""
        if not self.is_main:
            self.barrier(operation)
        yield
        if self.is_main:
            self.barrier(operation)

    def from_main(self, value, what: str):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        with self.guard(f"receiving rank 0's {what}"):
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def check_same(self, values: Sequence[float], what: str) -> None:
        """Raise DistributedError unless every rank holds the same ``values``."""
        if not self.enabled or not values:
            return
        local = torch.tensor(list(values), dtype=torch.float64)
        high = self.all_reduce(local, f"comparing {what}", dist.ReduceOp.MAX)
        low = -self.all_reduce(-local, f"comparing {what}", dist.ReduceOp.MAX)
        if not torch.equal(high, low):
            raise DistributedError(f"rank {self.rank}: {what} differ across ranks "
                                   f"(this rank {local.tolist()}, min {low.tolist()}, "
                                   f"max {high.tolist()})")

    # ------------------------------------------------------------------- training
    def join_training(self, model: nn.Module, seed: int, agreed: Sequence) -> Callable:
        """Start this process's part in training ``model``: check that every rank holds the
        same ``agreed`` values (JSON-able: e.g. the data's item ids and the run's flags,
        compared by :func:`digest`), give it its own dropout stream (:meth:`seed_dropout`)
        and return the loss callable to train with (:meth:`train_loss`)."""
        self.check_same([digest(value) for value in agreed], "data and flags")
        train_loss = self.train_loss(model)
        self.seed_dropout(seed)
        return train_loss

    def share(self, batch: Sequence[int]) -> tuple[list[int], bool]:
        """:func:`rank_share` of this rank (the whole batch in one process)."""
        return rank_share(batch, self.rank, self.world_size)

    def train_loss(self, model: nn.Module):
        """The callable ``(inputs, targets) -> (task loss, aux loss)`` to train with:
        ``model.loss`` in one process, a DistributedDataParallel wrapper of it otherwise.
        Buffers are not broadcast per forward (see the module docstring)."""
        if not self.enabled:
            return model.loss
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # torch >= 2.13 renamed broadcast_buffers (per forward) to forward_sync_buffers
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        with self.guard("wrapping the model in DistributedDataParallel"):
            return DistributedDataParallel(_LossForward(model), device_ids=device_ids,
                                           **no_buffer_sync)

    def backward(self, loss: Tensor, n_real: int) -> None:
        """Backward of this rank's ``loss`` (a mean over its ``n_real`` real positions;
        0 for a stand-in), weighted so that DDP's gradient average is the gradient of the
        mean over all ranks' real positions. Gradient all-reduce failures become
        DistributedError."""
        if not self.enabled:
            loss.backward()
            return
        total = int(self.all_reduce(torch.tensor([n_real], dtype=torch.int64),
                                    "summing the batch's real positions")[0])
        with self.guard("the gradient all-reduce"):
            (loss * (self.world_size * n_real / total)).backward()

    def sum_over_ranks(self, *values: float | Tensor) -> list[float | Tensor]:
        """Each value (a number or a float tensor) summed over ranks, as float64 on the CPU."""
        if not self.enabled:
            return list(values)
        flat = torch.cat([torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values])
        summed = self.all_reduce(flat, "summing epoch statistics")
        out, start = [], 0
        for v in values:
            n = torch.as_tensor(v).numel()
            part = summed[start:start + n]
            out.append(part.reshape(v.shape) if isinstance(v, Tensor) else float(part[0]))
            start += n
        return out

    def sum_ranks_array(self, ranks: np.ndarray) -> np.ndarray:
        """An int64 numpy array summed over ranks (each rank filled in its own users)."""
        if not self.enabled:
            return ranks
        return self.all_reduce(torch.from_numpy(ranks), "summing evaluation ranks").numpy()

    @property
    def eval_shard(self) -> tuple[int, int]:
        """(index, count) of this rank's evaluation users in ``evaluate_ranking``."""
        return self.rank, self.world_size

    # ------------------------------------------------------------------ random state
    def seed_dropout(self, seed: int) -> None:
        """Give rank r > 0 its own random stream (rank 0 keeps the single-process one)."""
        if self.enabled and self.rank > 0:
            torch.manual_seed(rank_seed(seed, self.rank))

    def rng_state(self) -> dict:
        """``{"rng_ranks": [per-rank generator states]}`` for the checkpoint (a collective:
        every rank must call it); empty in one process."""
        if not self.enabled:
            return {}
        own = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
               else torch.empty(0, dtype=torch.uint8)}
        gathered: list = [None] * self.world_size
        with self.guard("gathering random states"):
            dist.all_gather_object(gathered, own)
        return {"rng_ranks": gathered}

    def restore_rng(self, states: list | None, seed: int, epoch: int) -> None:
        """Set this rank's generators from a checkpoint's ``rng_ranks``; a checkpoint of a
        different number of processes reseeds ranks > 0 from (seed, rank, epoch) instead."""
        if not self.enabled:
            return
        if states and len(states) == self.world_size:
            torch.set_rng_state(states[self.rank]["cpu"])
            if self.device.type == "cuda" and states[self.rank]["cuda"].numel():
                torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)
        elif self.rank > 0:  # rank 0 keeps the checkpoint's single-process state
            torch.manual_seed(rank_seed(seed, self.rank, epoch))


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise DistributedError(f"environment variable {name}={os.environ[name]!r} is not an "
                               f"integer") from None


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """The DistContext of this process. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set)
    joins the process group (once per process) with backend nccl for a CUDA ``device``, gloo
    otherwise, binds CUDA processes to cuda:LOCAL_RANK and silences stdout on ranks > 0;
    otherwise returns the single-process context on ``device``."""
    if not launched_by_torchrun():
        return DistContext(device=device, timeout_s=timeout_s)
    if timeout_s <= 0:
        raise DistributedError(f"--dist-timeout must be > 0 seconds, got {timeout_s:g}")
    rank, world_size, local_rank = (_env_int(name) for name in LAUNCH_VARIABLES)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: LOCAL_RANK={local_rank} but only "
                                   f"{torch.cuda.device_count()} CUDA devices are visible; "
                                   f"use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
        if rank > 0:
            sys.stdout = open(os.devnull, "w", encoding="utf-8")
    elif dist.get_backend() != backend:
        raise DistributedError(f"rank {rank}: the process group already uses "
                               f"{dist.get_backend()}, but device {device} needs {backend}")
    return DistContext(rank, world_size, device, timeout_s, enabled=True)


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistContext", "DistributedError", "setup", "shutdown", "rank_share", "rank_seed", "digest",
           "add_arguments", "launched_by_torchrun", "DEFAULT_TIMEOUT_S"]
