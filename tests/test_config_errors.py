"""Every config error is one line naming the key or flag (and the allowed values of a choice), exit code 2, no
traceback: for `train/*.py` (YAML keys and `key=value` overrides) and every `ldtok` command (flags) alike."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from launch import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tokenizers"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("LDTOK_DEBUG", None)

# (argv after `python`, substrings the one stderr line must hold)
TRAIN_CASES = [
    (["train/vae.py", "loss.kl_weight=-1"], ["loss.kl_weight", ">= 0"]),
    (["train/vae.py", "loss.perceptual=foo"], ["loss.perceptual", "'foo'", "lpips-vgg", "stlpips-alex"]),
    (["train/vae.py", "train.max_steps=0"], ["train.max_steps"]),
    (["train/vae.py", "model.tpye=kl"], ["model.tpye", "type"]),
    (["train/vae.py", "train.batch_size=abc"], ["train.batch_size", "int"]),
    (["train/prior_diffusion.py", "train.bogus=1"], ["train.bogus", "batch_size"]),
    (["train/prior_diffusion.py", "train.batch_size=abc"], ["train.batch_size", "int"]),
    (["train/prior_transformer.py", "train.bogus=1"], ["train.bogus", "batch_size"]),
    (["train/prior_transformer.py", "train.batch_size=abc"], ["train.batch_size", "int"]),
]

CLI = ["-m", "ldtok.cli"]
MODEL = ["--model", "no-such-model", "--out", "no-such-out"]
COMMAND_CASES = [
    ([*CLI, "info", "--bogus"], ["--bogus"]),
    ([*CLI, "keys", "--config", "nope"], ["--config", "'nope'", "train", "prior-diffusion", "all"]),
    ([*CLI, "push", "dir-only"], ["repo_id"]),
    ([*CLI, "push", "d", "u/n", "--private=yes"], ["--private"]),
    ([*CLI, "verify"], ["shards"]),
    ([*CLI, "eval", *MODEL, "--fid", "bogus"], ["--fid", "'bogus'", "auto", "off"]),
    ([*CLI, "eval", *MODEL, "--data-source", "ftp"], ["--data-source", "'ftp'", "folder", "webdataset"]),
    ([*CLI, "eval", *MODEL, "--batch-size", "0"], ["--batch-size", "> 0"]),
    ([*CLI, "eval", *MODEL, "--max-samples", "-1"], ["--max-samples", ">= 0"]),
    ([*CLI, "eval", *MODEL, "--perceptual", "lpips-foo"], ["--perceptual", "lpips-foo", "stlpips-vgg"]),
    ([*CLI, "eval", *MODEL, "--interpolation-steps", "1"], ["--interpolation-steps", ">= 2"]),
    (["eval/reconstruct.py", *MODEL, "--collapse-threshold", "-1"], ["--collapse-threshold", ">= 0"]),
    (["eval/beta_sweep.py", "--betas", "-1"], ["--betas", ">= 0"]),
    (["eval/colour_compare.py", "--model", "a=b", "--data", "d", "--out", "o", "--resolution", "0"],
     ["--resolution", "> 0"]),
    (["eval/ablate_colour.py", "--only", "kl/nope"], ["--only", "kl/nope", "kl/base"]),
    ([*CLI, "encode", *MODEL, "--dtype", "fp7"], ["--dtype", "'fp7'", "fp32"]),
    ([*CLI, "encode", *MODEL, "--data-source", "ftp"], ["--data-source", "'ftp'", "folder"]),
]

# values out of range and unknown choices, checked by the options dataclasses before any file is read (no such
# shards or model exist); these also run under `python -O`, which strips asserts: none may be validated by one
VALUE_CASES = [
    ([*CLI, "encode", *MODEL, "--crop", "square"], ["--crop", "'square'", "center", "resize"]),
    ([*CLI, "encode", *MODEL, "--num-workers", "-1"], ["--num-workers", ">= 0"]),
    ([*CLI, "encode", *MODEL, "--batch-size", "4", "--samples-per-shard", "6"],
     ["--samples-per-shard", "multiple of --batch-size (4)", "6"]),
    ([*CLI, "encode", *MODEL, "--batch-size", "0"], ["--batch-size", "> 0"]),
    ([*CLI, "decode", "no-such-shards", *MODEL, "--batch-size", "0"], ["--batch-size", "> 0"]),
    ([*CLI, "decode", "no-such-shards", *MODEL, "--limit", "-1"], ["--limit", ">= 0"]),
    ([*CLI, "decode", "no-such-shards", *MODEL, "--grid-size", "0"], ["--grid-size", "> 0"]),
    ([*CLI, "verify", "no-such-shards", "--max-problems", "-1"], ["--max-problems", ">= 0"]),
    (["eval/bench.py", "--tasks", "train", "fit"], ["--tasks", "'fit'", "train", "encode"]),
    (["eval/bench.py", "--steps", "0"], ["--steps", "> 0"]),
    (["eval/bench.py", "--preset", "demo-kl", "--resolution", "30"], ["--preset", "not divisible"]),
    (["eval/bench_encode.py", "--model", "m", "--scale", "1"], ["--scale", ">= 2"]),
    (["eval/bench_encode.py", "--model", "m", "--settings", "fast"], ["--settings", "'fast'", "equal", "defaults"]),
    (["eval/_bench_encode_naive.py", "--model", "m", "--images", "i", "--resolution", "0", "--out", "o", "--result",
      "r"], ["--resolution", "> 0"]),
    (["eval/compare_quantizers.py", "--variants", "vq", "pq"], ["--variants", "'pq'", "fsq", "lfq-18bit"]),
    (["eval/compare_quantizers.py", "--steps", "0"], ["--steps", "> 0"]),
]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


def _id(value):
    return " ".join(value) if isinstance(value, list) and value and value[0] != "--" else None


@pytest.mark.parametrize("argv, expected", TRAIN_CASES + COMMAND_CASES + VALUE_CASES, ids=_id)
def test_a_config_error_is_one_line_exit_2_naming_the_key(argv, expected):
    check_one_line_exit_2(argv, expected)


@pytest.mark.parametrize("argv, expected", VALUE_CASES, ids=_id)
def test_the_same_errors_under_python_O(argv, expected):
    check_one_line_exit_2(["-O", *argv], expected)


def check_one_line_exit_2(argv: list[str], expected: list[str]) -> None:
    result = run(argv)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    for text in expected:
        assert text in lines[0], (text, lines[0])
