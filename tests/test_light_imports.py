"""Importing the library loads nothing a user did not ask for: no LPIPS unless a perceptual network is built."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_evaluation_training_and_encode_does_not_import_lpips():
    code = ("import sys; import ldtok, ldtok.evaluation, ldtok.evaluation.report, ldtok.training, "
            "ldtok.commands.encode, ldtok.commands.eval, ldtok.data, ldtok.cli; "
            "loaded = sorted(m for m in sys.modules if 'lpips' in m); assert not loaded, loaded")
    env = {"PYTHONPATH": str(ROOT / "tokenizers"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_building_a_perceptual_network_is_what_imports_lpips():
    # the check above can fail: asking for LPIPS does import it
    code = ("import sys; from ldtok.perceptual import build_perceptual\n"
            "try:\n    build_perceptual('lpips-vgg', random_init=True)\nexcept RuntimeError:\n    pass\n"
            "assert 'lpips' in sys.modules")
    env = {"PYTHONPATH": str(ROOT / "tokenizers"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_a_usage_error_of_one_subcommand_imports_no_other_subcommand():
    code = ("import sys\nfrom ldtok.cli import main\ntry:\n    main(['keys', '--config', 'nope'])\n"
            "except SystemExit as e:\n    assert e.code == 2\n"
            "loaded = [m for m in ('torch', 'ldtok.commands.encode', 'ldtok.commands.eval') if m in sys.modules]\n"
            "assert not loaded, loaded")
    env = {"PYTHONPATH": str(ROOT / "tokenizers"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
