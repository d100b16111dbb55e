"""`ldtok.config_cli`: flags generated from a config dataclass, parsed back through `from_dict`'s validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from ldtok.config import ConfigError, check_range, from_dict
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.data import DataConfig
from ldtok.evaluation import EvalOptions


@dataclass
class Inner:
    """A nested section.

    Args:
        depth (`int`, defaults to 2): how deep it goes.
    """

    depth: int = 2

    def __post_init__(self):
        check_range(self, "depth", ge=1)


@dataclass
class Toy:
    """A config with one field of every kind.

    Args:
        name (`str`): what it is called. A second sentence that help leaves out.
        mode (`"fast"` or `"slow"`, defaults to `"fast"`): how it runs.
        verbose (`bool`, defaults to `True`): talk while running.
        sizes (`list[int]`, defaults to `[1, 2]`): the sizes.
        label (`str`, *optional*): a label.
        rate (`float`, defaults to 0.5): a rate in 100% units.
        inner (`Inner`): the nested section.
    """

    name: str
    mode: Literal["fast", "slow"] = "fast"
    verbose: bool = True
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    label: str | None = None
    rate: float = 0.5
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        check_range(self, "rate", ge=0)


def parser_for(**kwargs) -> ArgumentParser:
    parser = ArgumentParser(prog="toy")
    add_config_arguments(parser, Toy, positional=("name",), **kwargs)
    return parser


def test_defaults_come_from_the_dataclass_and_round_trip():
    args = parser_for().parse_args(["x"])
    assert config_from_args(Toy, args, positional=("name",)) == Toy(name="x")


def test_every_kind_of_flag_parses_into_the_dataclass():
    argv = ["x", "--mode", "slow", "--no-verbose", "--sizes", "3,4,5", "--label", "L", "--rate", "2",
            "--inner-depth", "7"]
    config = config_from_args(Toy, parser_for().parse_args(argv), positional=("name",))
    assert config == Toy(name="x", mode="slow", verbose=False, sizes=[3, 4, 5], label="L", rate=2.0, inner=Inner(7))
    for sizes, expected in ((["none"], []), (["6", "7"], [6, 7]), (["6,7", "--sizes", "8"], [6, 7, 8])):
        args = parser_for().parse_args(["x", "--sizes", *sizes])
        assert config_from_args(Toy, args, positional=("name",)).sizes == expected


def test_rename_exclude_prefix_and_overrides():
    selection = {"prefix": "toy", "rename": {"mode": "speed"}, "exclude": ("rate", "inner.depth")}
    parser = parser_for(**selection)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--speed", "--toy-verbose", "--no-toy-verbose", "--toy-sizes", "--toy-label"} <= flags
    assert not {"--toy-rate", "--toy-inner-depth", "--rate", "--mode", "--toy-mode"} & flags
    args = parser.parse_args(["n", "--speed", "slow"])
    assert args.toy_name == "n" and args.speed == "slow"  # the attribute follows the flag
    config = config_from_args(Toy, args, positional=("name",), **selection, overrides={"rate": 3.0})
    assert config == Toy(name="n", mode="slow", rate=3.0)


def test_a_field_without_default_is_a_required_flag_unless_positional(capsys):
    parser = ArgumentParser(prog="toy")
    add_config_arguments(parser, Toy)
    assert config_from_args(Toy, parser.parse_args(["--name", "n"])) == Toy(name="n")
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "the following arguments are required: --name" in capsys.readouterr().err


def test_help_states_the_docstring_description_and_the_default():
    text = parser_for().format_help()
    assert "how it runs (default: fast)" in text
    assert "a rate in 100% units (default: 0.5)" in text
    assert "what it is called" in text and "A second sentence" not in text
    assert "{fast,slow}" in text


def test_dataclass_validation_is_one_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match=r"^--rate: must be >= 0, got -1\.0$"):
        config_from_args(Toy, parser_for().parse_args(["x", "--rate", "-1"]), positional=("name",))
    with pytest.raises(ConfigError, match=r"^--inner-depth: must be >= 1, got 0$"):
        config_from_args(Toy, parser_for().parse_args(["x", "--inner-depth", "0"]), positional=("name",))
    # the same check as YAML's: from_dict names the dotted key there
    with pytest.raises(ConfigError, match=r"^inner\.depth: must be >= 1, got 0$"):
        from_dict(Toy, {"name": "x", "inner": {"depth": 0}})


def test_usage_errors_are_one_line_exit_2(capsys):
    for argv in (["x", "--mode", "medium"], ["x", "--sizes", "1,b"], [], ["x", "--bogus"], ["x", "--sizes"]):
        with pytest.raises(SystemExit) as exit_info:
            parser_for().parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        parser_for().parse_args(["x", "--mode", "medium"])
    assert "invalid choice: 'medium' (choose from 'fast', 'slow')" in capsys.readouterr().err


def test_eval_options_and_data_config_flags_are_generated():
    parser = ArgumentParser(prog="t")
    add_config_arguments(parser, EvalOptions)
    assert config_from_args(EvalOptions, parser.parse_args([])) == EvalOptions()
    args = parser.parse_args(["--perceptual", "stlpips-alex,lpips-vgg", "--fid", "off", "--no-latent-tools"])
    options = config_from_args(EvalOptions, args)
    assert options.perceptual == ["stlpips-alex", "lpips-vgg"] and options.fid == "off" and not options.latent_tools
    with pytest.raises(ConfigError, match="--perceptual: unknown network.*'lpips-foo'.*allowed: lpips-vgg"):
        config_from_args(EvalOptions, parser.parse_args(["--perceptual", "lpips-foo"]))

    from ldtok.commands.data_args import add_data_arguments, data_config_from_args

    parser = ArgumentParser(prog="t")
    add_data_arguments(parser, split_default="train", split_help="the split", verb="encode")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(["--data-source", "folder", "--data-path", "/x", "--max-samples", "5", "--streaming"])
    config = data_config_from_args(args, split=args.split, resolution=32, channels=1)
    assert config == DataConfig(source="folder", path="/x", split="train", max_samples=5, streaming=True,
                                resolution=32, channels=1, crop="center", flip=False)
    with pytest.raises(ConfigError, match="^--max-samples: must be >= 0, got -1$"):
        data_config_from_args(parser.parse_args(["--max-samples", "-1"]), split="train", resolution=32)
