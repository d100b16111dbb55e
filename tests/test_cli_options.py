"""The flags of `ldtok decode` and `ldtok verify` come from their options dataclasses (one flag per field, the
dataclass's defaults), a `no_x` bool field is `--no-x/--x`, and `ldtok verify --max-problems` caps the printed list."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from ldtok.cli import main as ldtok
from ldtok.commands import decode as decode_command
from ldtok.commands import verify as verify_command
from ldtok.config import ConfigError
from ldtok.config_cli import add_config_arguments, config_from_args


def _parser(module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser


@pytest.mark.parametrize("module, cls", [(decode_command, decode_command.DecodeOptions),
                                         (verify_command, verify_command.VerifyOptions)])
def test_flags_are_the_options_fields_with_their_defaults(module, cls):
    parser = _parser(module)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(cls)}
    required = {"out": "o"} if cls is decode_command.DecodeOptions else {}
    args = parser.parse_args(["shards-dir", *(x for k, v in required.items() for x in (f"--{k}", v))])
    assert config_from_args(cls, args, positional=("shards",)) == cls(shards="shards-dir", **required)


def test_decode_flags_parse_into_decode_options():
    args = _parser(decode_command).parse_args(["s", "--out", "o", "--limit", "3", "--grid", "--batch-size", "2",
                                               "--sample", "--seed", "7", "--no-force"])
    options = config_from_args(decode_command.DecodeOptions, args, positional=("shards",))
    assert (options.limit, options.grid, options.batch_size, options.sample, options.seed, options.force) == (
        3, True, 2, True, 7, False)
    with pytest.raises(ConfigError, match=r"^--grid-size: must be > 0, got 0$"):
        config_from_args(decode_command.DecodeOptions, _parser(decode_command).parse_args(
            ["s", "--out", "o", "--grid-size", "0"]), positional=("shards",))


@dataclass
class _Quiet:
    """A negative bool field.

    Args:
        no_progress (`bool`, defaults to `False`): no progress bar.
    """

    no_progress: bool = False


def test_a_no_x_bool_field_is_no_x_and_x():
    parser = add_config_arguments(argparse.ArgumentParser(), _Quiet)
    assert [a.option_strings for a in parser._actions if a.dest == "no_progress"] == [["--no-progress", "--progress"]]
    assert "--no-no-progress" not in parser.format_help()
    assert config_from_args(_Quiet, parser.parse_args([])).no_progress is False
    assert config_from_args(_Quiet, parser.parse_args(["--no-progress"])).no_progress is True
    assert config_from_args(_Quiet, parser.parse_args(["--no-progress", "--progress"])).no_progress is False


def test_verify_max_problems_caps_the_list_not_the_count(tmp_path, capsys):
    assert ldtok(["verify", str(tmp_path / "nope")]) == 1
    full = capsys.readouterr().out.splitlines()
    assert full[0].startswith("problem: index.json") and full[-1].endswith("FAILED (1 problems); 0 samples in 0 "
                                                                             "shards, 0.0 MiB")
    assert ldtok(["verify", str(tmp_path / "nope"), "--max-problems", "0"]) == 1
    capped = capsys.readouterr().out.splitlines()
    assert capped == ["... and 1 more problems", full[-1]]
