"""Score a saved checkpoint, or recommend items for a history of original item ids.

    python hymoerec/evaluate.py runs/X                     # test metrics of runs/X/best.pt
    python hymoerec/evaluate.py runs/X --exclude-history   # S3-Rec protocol
    python hymoerec/evaluate.py runs/X --recommend 12 40 7 -k 5
    python hymoerec/evaluate.py runs/X --recommend 12 40 7 --json -   # ["3", "9", ...]
    python hymoerec/evaluate.py runs/X --seen-items        # how much of the top 10 was seen

    from hymoerec.evaluate import Recommender
    rec = Recommender.from_checkpoint("runs/X")
    rec.recommend(["12", "40", "7"], k=10)   # -> top-10 original item ids
"""
from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from hymoe_kernels.cross_entropy import NonFiniteScoresError
from hymoerec.checkpoint import CheckpointError, load_checkpoint, load_model_state
from hymoerec.cli import ArgumentParser, fail
from hymoerec.data import DataFormatError, Segments, last_items, leave_one_out, pad_right
from hymoerec.metrics import evaluate_ranking, format_metrics, head_items
from hymoerec.models import build_model
from hymoerec.options import HelpFormatter, add_device_argument, add_eval_batch_size_argument
from hymoerec.run_folder import (BEST_CHECKPOINT, RunFolderError, check_output_path,
                                 checkpoint_path, json_text, write_json)
from hymoerec.settings import load_data, model_config, pick_device


class Recommender:
    """A trained model with its item-id mapping. ``config`` is the run's training config."""

    def __init__(self, model, item_ids: list[str], config: dict, device: torch.device):
        self.model, self.item_ids, self.config, self.device = model.eval(), item_ids, config, device
        self.item_index = {item: i for i, item in enumerate(item_ids) if i > 0}

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "Recommender":
        """Load ``path`` (a .pt file or a run folder, whose best checkpoint is used)."""
        path = checkpoint_path(path)
        state = load_checkpoint(path, ("model", "config", "item_ids"))
        config = state["config"]
        try:
            model = build_model(config["model"], len(state["item_ids"]) - 1,
                                model_config(Namespace(**config)))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path}: config cannot build a model ({err})") from None
        load_model_state(model, state["model"], path)
        target = pick_device(device)
        return cls(model.to(target), state["item_ids"], config, target)

    @torch.no_grad()
    def recommend(self, history: Sequence, k: int = 10, exclude_history: bool = False) -> list[str]:
        """Top-k original item ids (best first) to follow ``history``, a time-ordered
        sequence of original item ids (ints or strings). ``exclude_history`` leaves the
        history's own items out of the result."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        unknown = [item for item in history if str(item) not in self.item_index]
        if unknown:
            raise ValueError(f"history has item ids unknown to the model: {unknown[:10]}")
        if not history:
            raise ValueError("history must contain at least one item")
        items = [self.item_index[str(item)] for item in history][-self.model.config.max_len:]
        excluded = None
        if exclude_history:
            excluded = torch.tensor([[self.item_index[str(item)] for item in history]],
                                    device=self.device)
        scores, top = self.model.top_next(torch.tensor([items], device=self.device),
                                          min(k, len(self.item_ids) - 1), excluded)
        return [self.item_ids[i] for i, score in zip(top[0].tolist(), scores[0].tolist())
                if np.isfinite(score)]


def evaluate_checkpoint(path: str | Path, exclude_history: bool | None = None,
                        device: str = "cpu", batch_size: int = 1024,
                        seen_items_k: int | None = None) -> dict:
    """Validation and test metrics of a checkpoint on the data of its config (re-read and
    re-split exactly as in training), and with ``seen_items_k`` also the test users'
    :func:`seen_items_in_top` of that k as "test_seen_items". A NaN or infinite score
    raises NonFiniteScoresError naming the stage."""
    rec = Recommender.from_checkpoint(path, device)
    args = Namespace(**rec.config)
    data = load_data(args)
    if data.item_ids != rec.item_ids:
        raise CheckpointError(f"checkpoint {checkpoint_path(path)}: its item ids differ from "
                              f"those of {data.describe()}")
    split = leave_one_out(data)
    head = head_items(split.train_item_counts())
    exclude = args.exclude_history if exclude_history is None else exclude_history
    metrics = {}
    for stage in ("valid", "test"):
        try:
            metrics[stage] = evaluate_ranking(rec.model.rank_next, split.history(stage),
                                              split.targets(stage), head, args.max_len, exclude,
                                              batch_size, rec.device)
        except NonFiniteScoresError as err:
            raise NonFiniteScoresError(f"{stage} evaluation of {checkpoint_path(path)}: "
                                       f"{err}") from None
    if seen_items_k is not None:
        metrics["test_seen_items"] = seen_items_in_top(rec, split.history("test"), seen_items_k,
                                                       batch_size)
    return metrics


@torch.no_grad()
def seen_items_in_top(rec: Recommender, histories: Segments, k: int = 10,
                      batch_size: int = 1024) -> dict:
    """How much of each user's top-k list (history kept) goes to items the user has already
    seen, which on data without repeats (ML-1M, Beauty) can never be the answer:
    ``seen_in_input`` / ``seen_in_history``: mean count of the top-k items found in the
    model's input (the last max_len items) / in the whole history; ``last_item_first``: the
    share of users whose most recent item is ranked first. histories: the evaluated users'
    items before their target (``Split.history``)."""
    max_len, n = rec.model.config.max_len, len(histories)
    in_input = in_history = last_first = 0
    for start in range(0, n, batch_size):
        batch = [histories[i] for i in range(start, min(n, start + batch_size))]
        inputs = pad_right(last_items(batch, max_len)).to(rec.device)
        _, top = rec.model.top_next(inputs, k)
        whole = pad_right(batch).to(rec.device)
        in_input += int((top[:, :, None] == inputs[:, None, :]).any(dim=2).sum())
        in_history += int((top[:, :, None] == whole[:, None, :]).any(dim=2).sum())
        last = torch.tensor([h[-1] for h in batch], device=rec.device)
        last_first += int((top[:, 0] == last).sum())
    return {"k": k, "users": n, "seen_in_input": in_input / n, "seen_in_history": in_history / n,
            "last_item_first": last_first / n}


def build_parser() -> argparse.ArgumentParser:
    """evaluate.py's command line (its --device and --eval-batch-size are train.py's)."""
    p = ArgumentParser(description="Evaluate a HyMoERec checkpoint or recommend items.",
                       formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help=f"run folder (uses {BEST_CHECKPOINT}) or checkpoint file")
    p.add_argument("--exclude-history", action=argparse.BooleanOptionalAction, default=None,
                   help="remove users' earlier items from the ranking (default: as trained)")
    p.add_argument("--recommend", nargs="+", metavar="ITEM",
                   help="print the top -k items (ids separated by spaces; see --json) after "
                        "this history of original item ids")
    p.add_argument("-k", type=int, default=10, help="how many items --recommend returns")
    add_device_argument(p)
    add_eval_batch_size_argument(p)
    p.add_argument("--seen-items", action="store_true",
                   help="also report how many of each test user's top -k items (history kept) "
                        "the user has already seen")
    p.add_argument("--json", metavar="PATH",
                   help="also write the result as JSON to PATH ('-': to stdout, in place of "
                        "the text): the metrics, or with --recommend one JSON list of the "
                        "recommended original item ids, best first (unambiguous where ids "
                        "hold spaces). PATH's folder must exist, and PATH may not be a file of "
                        "a run or the checkpoint read")
    return p


def main(argv: list[str] | None = None) -> dict | list[str]:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("eval_batch_size", "k"):
        if getattr(args, name) < 1:
            p.error(f"{'-k' if name == 'k' else '--eval-batch-size'} must be >= 1, got "
                    f"{getattr(args, name)}")
    if args.json not in (None, "-"):
        if not Path(args.json).resolve().parent.is_dir():
            p.error(f"--json: folder {Path(args.json).resolve().parent} does not exist")
        try:
            check_output_path(args.json, "--json", (checkpoint_path(args.checkpoint),))
        except RunFolderError as err:
            p.error(str(err))
    try:
        if args.recommend:
            rec = Recommender.from_checkpoint(args.checkpoint, args.device)
            result = rec.recommend(args.recommend, args.k, bool(args.exclude_history))
        else:
            result = evaluate_checkpoint(args.checkpoint, args.exclude_history, args.device,
                                         args.eval_batch_size, args.k if args.seen_items else None)
    except (CheckpointError, DataFormatError, NonFiniteScoresError, ValueError) as err:
        raise fail(str(err)) from None
    if args.json == "-":
        print(json_text(result), end="")
    elif args.recommend:
        print(" ".join(result))
    else:
        print_metrics(result)
    if args.json not in (None, "-"):
        try:
            write_json(args.json, result)
        except OSError as err:
            raise fail(f"--json: cannot write {args.json} ({err.strerror or err})") from None
    return result


def print_metrics(metrics: dict) -> None:
    """The text of :func:`evaluate_checkpoint`'s metrics: validation, test, and the seen-items
    line when they hold it."""
    for stage in ("valid", "test"):
        print(f"{stage}:\n{format_metrics(metrics[stage])}")
    if "test_seen_items" in metrics:
        seen = metrics["test_seen_items"]
        print(f"test, history kept: of each user's top {seen['k']}, {seen['seen_in_input']:.2f} "
              f"items on average are in the model's input and {seen['seen_in_history']:.2f} in "
              f"the user's history; the most recent item is ranked first for "
              f"{100 * seen['last_item_first']:.1f}% of users")


if __name__ == "__main__":
    main()
