"""The command line (hymoerec/options.py): a saved config under the flags, settings a model
refuses as usage errors, the defaults, and the flags the entry points share."""
import argparse

import pytest

from hymoerec import evaluate, options, settings
from hymoerec.models import ModelConfig
from train_cases import keep_thread_count, run  # noqa: F401 (fixture)


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    run(tmp_path, "a", "--epochs", "1", "--ffn", "dense")
    config = tmp_path / "a" / "config.json"
    args = options.parse_args(["--config", str(config), "--epochs", "4"])
    assert args.ffn == "dense" and args.epochs == 4 and args.synthetic_users == 120
    assert not args.output_head
    assert options.parse_args(["--config", str(config), "--output-head"]).output_head
    with pytest.raises(SystemExit):
        options.parse_args(["--config", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("flags, message", [
    (["--d-model", "63"], "d_model=63 must be divisible by n_heads=2"),
    (["--head-skip", "0.5"], "head_skip=0.5 needs output_head=True"),
    (["--model", "gru4rec", "--ffn", "hymoe"], "GRU4Rec has no position-wise FFN"),
    (["--model", "narm", "--output-head"], "NARM has no output head option"),
])
def test_rejected_model_settings_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, dropout, batch", [
    ([], None, 256),                                                  # synthetic
    (["--dataset", "beauty"], None, 2048),
    (["--dataset", "beauty", "--model", "mamba4rec"], 0.2, 2048),     # its paper's value
    (["--dataset", "beauty", "--dropout", "0.3", "--batch-size", "512"], 0.3, 512),
])
def test_flag_defaults(flags, dropout, batch):
    args = options.parse_args(flags)
    assert (args.max_len, args.dropout, args.batch_size) == (None, dropout, batch)
    assert args.seen_bias is True   # ModelConfig's default (our addition to the paper's model)


def test_a_model_setting_a_saved_run_lacks_takes_the_value_that_run_trained_with():
    """seen_bias defaults on, but a run saved before the setting existed trained without
    the offset, and so is rebuilt without it; an unresolved data default (None) is the
    field's default."""
    assert ModelConfig().seen_bias is True
    assert settings.model_config(argparse.Namespace(d_model=16)).seen_bias is False
    config = settings.model_config(argparse.Namespace(d_model=16, max_len=None, seen_bias=True))
    assert config.seen_bias is True and config.max_len == ModelConfig().max_len


def flag_defaults(parser: argparse.ArgumentParser) -> dict[str, tuple[tuple[str, ...], object]]:
    """dest -> (option strings, default) of every flag of ``parser``."""
    return {a.dest: (tuple(a.option_strings), a.default) for a in parser._actions
            if a.option_strings and a.dest != "help"}


def test_flags_shared_by_train_and_evaluate_have_one_name_and_default():
    train_flags = flag_defaults(options.build_parser())
    evaluate_flags = flag_defaults(evaluate.build_parser())
    shared = set(train_flags) & set(evaluate_flags)
    assert shared == {"device", "eval_batch_size", "exclude_history"}
    assert train_flags["device"] == evaluate_flags["device"] == (("--device",), "auto")
    assert train_flags["eval_batch_size"] == evaluate_flags["eval_batch_size"]


def test_data_flags_name_the_same_data_on_another_command_line():
    parser = argparse.ArgumentParser()
    options.add_data_arguments(parser)
    assert options.data_flags(parser.parse_args([])) == []
    given = ["--data-file", "x.csv", "--format", "csv", "--time-col", "", "--synthetic-seed", "3"]
    parsed = parser.parse_args(given)
    assert options.data_flags(parsed) == given
    assert parser.parse_args(options.data_flags(parsed)) == parsed
