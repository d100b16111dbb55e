"""`ldtok encode` against the per-image loop users write without it: images/s, and peak memory at 1x and Kx the data
(`eval/bench_encode.py`; benchmark code and its naive baseline live beside the library, not in it).

Two *sides*, per (model, side, dataset size), on the same image folder:

- **ldtok**: the encode engine `ldtok encode` runs, `ldtok.encoding.encode_dataset`, called in this process with
  the command's usual options: batch `batch_size` (32), `dtype="fp16"` storage, one process, `num_workers` (0 by
  default, see *Peak memory*), `samples_per_shard` (see *Sizes*). Its images/s is the `EncodeResult`'s own rate: its
  encoding loop (reading and decoding the files, the encoder, writing shards), not the model loading, the dataset
  scan or the final statistics. `e2e` rates divide by the whole call's wall time instead.
- **naive**: the loop of diffusers' example scripts and of feature-extraction scripts that keep everything in memory:
  `from_pretrained` the diffusers model (`AutoencoderKL` or `VQModel`, per `config.json`), then for each file: PIL
  open, `.convert("RGB")`, torchvision `Resize` + `CenterCrop` + `ToTensor` + `Normalize([0.5], [0.5])`,
  `vae.encode(x[None])` (batch 1, fp32, under `torch.no_grad()`, on CUDA when there is one, as `ldtok encode` is),
  append the latents, moved to the CPU, to a Python list (KL: `latent_dist.sample() * scaling_factor`; VQ: the
  diffusers quantizer's indices, which ignore ldtok's l2-normalized codebooks: other codes, the same compute); at the
  end `torch.save(torch.cat(latents))`. It runs in a fresh Python process per case (`_bench_encode_naive.py`); its
  images/s covers the loop and the save. VQ-VAE-2 has no diffusers class, hence no naive side.

Sizes: `1x` is the first `num_images` image files of the source folder (sorted by name; by default the training crops
of `ldtok.data.default_dataset`); `Kx` (`scale`) is a folder in which each of them appears K times (hard links, symbolic
links across file systems), so the work per image is the same and only the count changes. `ldtok encode` holds one
shard's latents in memory before writing it, so its memory depends on `--samples-per-shard`, not on the dataset
size; with shards larger than the 1x dataset the 1x run never fills one, and 1x -> Kx would measure the buffer
filling up (about +50 MiB for 1024-sample shards of the demo KL, 256 -> 2560 images at 64 px, and no more at 5120).
By default the shards therefore hold `min(1024, num_images)` samples (rounded down to a multiple of the batch).

Peak memory: `ru_maxrss`, which includes the interpreter and the libraries each side imports (ldtok also imports
`datasets` and `accelerate`), so compare the growth from 1x to Kx: that is what holding every latent costs. The naive
side's is its own process's, from `os.wait4`. The ldtok side's is the `EncodeResult`'s `peak_memory_mib`, this
process's high-water mark when the case ends: the cases run 1x before Kx, so the Kx figure minus the 1x one is how far
encoding the larger dataset raised it (0 when it needed no more memory than the 1x run). With `num_workers > 0` the
DataLoader workers are separate processes whose memory is not counted; the default 0 keeps ldtok in one process, as
the naive loop is.

Threads: one intra-op thread by default (`torch.set_num_threads` for the in-process cases, `OMP_NUM_THREADS` for
the naive processes). On a small shared machine torch's default (one per core) fights
the other processes, and the batch-1 loop, with its many small parallel regions, suffers most: 256 images at 64 px
took 142 s in one run and 7 s in the next (2 threads, 2 busy cores), against 2.3 s with one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from _bench_encode_report import format_table, write_report  # noqa: F401  (re-exported for bench_encode.py)

import ldtok
from ldtok.config import check_choice, check_range, invalid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NAIVE_CLASSES = ("AutoencoderKL", "VQModel")
DEFAULT_SAMPLES_PER_SHARD = 1024  # `ldtok encode`'s
# `EncodeConfig` fields of each setting: `equal` is fp32 and NCHW like the naive loop; `defaults` the command's own
SETTINGS = {"equal": {"autocast": "no", "channels_last": False}, "defaults": {}}


@dataclass
class EncodeBenchConfig:
    """What `run_benchmark` measures.

    Args:
        models (`list[str]`): tokenizer directories with a diffusers `AutoencoderKL` or `VQModel` `config.json`.
        resolution (`int`, defaults to 64): side of the square images fed to the encoder.
        num_images (`int`, defaults to 256): images of the `1x` dataset.
        scale (`int`, defaults to 10): the large dataset is `scale` times the `1x` one.
        batch_size (`int`, defaults to 32): `ldtok encode --batch-size` (the naive loop encodes one image at a time).
        dtype (`"fp16"`, `"bf16"` or `"fp32"`, defaults to `"fp16"`): `ldtok encode --dtype` (KL latents' storage).
        num_workers (`int`, defaults to 0): `ldtok encode --num-workers` (see the module docstring on memory).
        samples_per_shard (`int`, *optional*): `ldtok encode --samples-per-shard`, a multiple of `batch_size`;
            `min(1024, num_images)` rounded down to a multiple of the batch if `None` (module docstring, *Sizes*).
        threads (`int`, *optional*, defaults to 1): `OMP_NUM_THREADS` of both sides' processes (module docstring);
            torch's default (one per core) when `None`.
        source_dir (`str`, *optional*): folder of images to draw from; the default dataset's training crops if `None`.
        settings (`list[str]`, defaults to `["equal", "defaults"]`): `ldtok encode`'s options, one row each:
            `equal` (`--autocast no --no-channels-last`: fp32 and NCHW like the naive loop, so the ratio is batching,
            decoding in workers and the background writer alone) and `defaults` (the command's own defaults:
            autocast auto, channels-last).
    """

    models: list[str]
    resolution: int = 64
    num_images: int = 256
    scale: int = 10
    batch_size: int = 32
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    num_workers: int = 0
    samples_per_shard: int | None = None
    threads: int | None = 1
    source_dir: str | None = None
    settings: list[str] = field(default_factory=lambda: ["equal", "defaults"])

    def __post_init__(self):
        for setting in self.settings:
            if setting not in SETTINGS:
                raise invalid("settings", f"unknown choice {setting!r} (allowed: {', '.join(SETTINGS)})")
        check_choice(self, "dtype", ("fp16", "bf16", "fp32"))
        for name in ("resolution", "num_images", "batch_size", "threads"):
            check_range(self, name, gt=0)
        check_range(self, "scale", ge=2)  # the large dataset is `scale` x the 1x one
        check_range(self, "num_workers", ge=0)
        if self.samples_per_shard is None:
            B = self.batch_size
            self.samples_per_shard = max(1, min(DEFAULT_SAMPLES_PER_SHARD, self.num_images) // B) * B
        check_range(self, "samples_per_shard", gt=0)
        if self.samples_per_shard % self.batch_size:
            raise invalid("samples_per_shard", f"must be a positive multiple of batch_size ({self.batch_size}), "
                                               f"got {self.samples_per_shard}")
        if not self.models:
            raise invalid("models", "give at least one model directory")
        for model in self.models:
            class_name = model_class(model)  # FileNotFoundError without a config.json
            if class_name not in NAIVE_CLASSES:
                raise invalid("models", f"{model} is a {class_name!r}: the naive loop needs a diffusers class "
                                        f"({', '.join(NAIVE_CLASSES)})")


def model_class(model: str | os.PathLike) -> str | None:
    """The `_class_name` of a model directory's `config.json` (`FileNotFoundError` if it has none)."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
    return json.loads(config.read_text()).get("_class_name")


# ------------------------------------------------------------------------------------------------ data


def source_images(source_dir: str | os.PathLike | None) -> list[Path]:
    """The image files of `source_dir` (not recursive), sorted by name; the default dataset's crops if `None`."""
    if source_dir is None:
        from ldtok.data.default_dataset import default_dataset_dir

        source_dir = default_dataset_dir() / "train"
    source_dir = Path(source_dir).expanduser()
    if not source_dir.is_dir():
        raise FileNotFoundError(f"image source {source_dir} is not a folder")
    return sorted(p for p in source_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def link_images(files: list[Path], dest: str | os.PathLike, *, repeats: int = 1) -> int:
    """Fill the new folder `dest` with `repeats` links to each of `files` (`r<repeat>_<name>`), flat, so the
    `imagefolder` builder sees one split without labels. Returns the number of files made."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    for r in range(repeats):
        for f in files:
            target = dest / f"r{r:03d}_{f.name}"
            try:
                os.link(f, target)
            except OSError:  # another file system (EXDEV), or one without hard links
                os.symlink(f.resolve(), target)
    return repeats * len(files)


# ------------------------------------------------------------------------------------------------ processes


@dataclass
class CaseResult:
    """One side on one dataset size.

    Args:
        images (`int`): images encoded.
        images_per_s (`float`): over the side's timed section (see the module docstring).
        e2e_images_per_s (`float`): `images` over the process's wall time (start-up, model loading included).
        seconds (`float`): the timed section.
        wall_seconds (`float`): the whole process.
        peak_memory_mib (`float`): `ru_maxrss` of the process (the largest of it and its reaped children).
        output_mib (`float`): size of what it wrote (shards and manifest, or the saved tensor).
    """

    images: int
    images_per_s: float
    e2e_images_per_s: float
    seconds: float
    wall_seconds: float
    peak_memory_mib: float
    output_mib: float


@dataclass
class ProcessRun:
    """A finished child process: its combined stdout and stderr, wall time and `ru_maxrss` in MiB."""

    output: str
    wall_seconds: float
    peak_memory_mib: float


def run_process(command: list[str], *, env: dict[str, str], log_path: Path) -> ProcessRun:
    """Run `command`, output to `log_path`; its own peak memory from `wait4` (`RuntimeError` if it fails)."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)  # reaps it: this child's rusage, not all children's
        except BaseException:  # e.g. Ctrl-C: do not leave the child running
            process.kill()
            process.wait()
            raise
        wall = time.perf_counter() - t0
    process.returncode = os.waitstatus_to_exitcode(status)
    output = log_path.read_text(errors="replace")
    if process.returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{tail}")
    peak = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 2**10  # bytes / KiB
    return ProcessRun(output=output, wall_seconds=wall, peak_memory_mib=peak)


def child_env(config: EncodeBenchConfig, work: Path) -> dict[str, str]:
    """The children's environment: offline, this checkout's `ldtok` first on the path, the thread count."""
    package_root = str(Path(ldtok.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "hf-cache"),
           "PYTHONPATH": os.pathsep.join(p for p in [package_root, os.environ.get("PYTHONPATH")] if p)}
    if config.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(config.threads)
    return env


def _size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """`threads` intra-op threads for the block (torch's setting unchanged when `None`)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_config(config: EncodeBenchConfig, *, model: str, images: Path, out: Path, work: Path,
                  setting: str = "defaults"):
    """The `EncodeConfig` of the ldtok side: `ldtok encode --data-source folder --data-path IMAGES ...`."""
    from ldtok.data import DataConfig
    from ldtok.encoding import EncodeConfig

    data = DataConfig(source="folder", path=str(images), cache_dir=str(work / "hf-cache"))
    return EncodeConfig(model=model, out=str(out), data=data, resolution=config.resolution,
                        batch_size=config.batch_size, samples_per_shard=config.samples_per_shard, dtype=config.dtype,
                        num_workers=config.num_workers, no_progress=True, **SETTINGS[setting])  # fmt: skip


def ldtok_case(config: EncodeBenchConfig, *, model: str, images: Path, count: int, work: Path,
               setting: str = "defaults", keep_output: bool = False) -> CaseResult:
    """`encode_dataset` under `setting` on the folder `images` (`count` files), in this process; its shards are
    deleted afterwards unless `keep_output` (then they are in `work / "ldtok-shards"`)."""
    from ldtok.encoding import encode_dataset

    out = work / "ldtok-shards"
    if out.exists():
        shutil.rmtree(out)
    with torch_threads(config.threads):
        t0 = time.perf_counter()
        result = encode_dataset(encode_config(config, model=model, images=images, out=out, work=work,
                                              setting=setting), log=lambda message: None)
        wall = time.perf_counter() - t0
    assert (result.encoded, result.skipped) == (count, 0), (
        f"encode_dataset encoded {result.encoded} ({result.skipped} skipped) of {count} images")
    assert result.totals["num_samples"] == count and result.images_per_s > 0, result
    case = CaseResult(images=result.encoded, images_per_s=result.images_per_s, e2e_images_per_s=result.encoded / wall,
                      seconds=result.seconds, wall_seconds=wall, peak_memory_mib=result.peak_memory_mib,
                      output_mib=_size_mib(out))  # fmt: skip
    if not keep_output:
        shutil.rmtree(out)
    return case


def naive_case(config: EncodeBenchConfig, *, model: str, images: Path, count: int, work: Path) -> CaseResult:
    """The naive loop (`naive_encode`) on the folder `images` in a fresh process; its output deleted afterwards."""
    out, result_path = work / "naive-latents.pt", work / "naive-result.json"
    script = Path(__file__).resolve().parent / "_bench_encode_naive.py"
    command = [sys.executable, str(script), "--model", model, "--images", str(images),
               "--resolution", str(config.resolution), "--out", str(out), "--result", str(result_path)]
    run = run_process(command, env=child_env(config, work), log_path=work / "naive.log")
    measured = json.loads(result_path.read_text())
    assert measured["images"] == count, f"the naive loop encoded {measured['images']} of {count} images"
    assert config.threads is None or measured["threads"] == config.threads, (
        f"the naive loop ran {measured['threads']} threads, not {config.threads}")
    result = CaseResult(images=count, images_per_s=count / measured["seconds"],
                        e2e_images_per_s=count / run.wall_seconds, seconds=measured["seconds"],
                        wall_seconds=run.wall_seconds, peak_memory_mib=run.peak_memory_mib,
                        output_mib=_size_mib(out))  # fmt: skip
    out.unlink()
    result_path.unlink()
    return result


# ------------------------------------------------------------------------------------------------ benchmark


@dataclass
class Row:
    """One side on one model: `name` (e.g. `"ldtok encode demo-kl/final"`), `side` (`"ldtok"` or `"naive"`), its
    result on the `1x` (`small`) and `Kx` (`large`) datasets, and `ratio`: its images/s on `Kx` over the naive
    loop's."""

    name: str
    side: str
    model: str
    small: CaseResult
    large: CaseResult
    ratio: float
    setting: str = "defaults"

    @property
    def growth_mib(self) -> float:
        """Peak memory on `Kx` minus on `1x`."""
        return self.large.peak_memory_mib - self.small.peak_memory_mib

    @property
    def growth_bytes_per_image(self) -> float:
        """`growth_mib` per image added from `1x` to `Kx`, in bytes."""
        return self.growth_mib * 2**20 / (self.large.images - self.small.images)


def model_label(model: str) -> str:
    """A short name: the directory's last two path components (`runs/kl/final` -> `kl/final`)."""
    return "/".join(Path(model).expanduser().resolve().parts[-2:])


def run_benchmark(config: EncodeBenchConfig, *, work_dir: str | Path | None = None,
                  log: Callable[[str], None] = lambda message: None) -> list[Row]:
    """Measure both sides on every model at `1x` and `scale`x, in a temporary folder inside `work_dir`."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the in-process side, as the naive children: offline
        os.environ.setdefault(key, "1")
    files = source_images(config.source_dir)
    N, K = config.num_images, config.scale
    if len(files) < N:
        raise ValueError(f"the image source has {len(files)} images, fewer than num_images={N}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ldtok-bench-encode-", dir=work_dir) as tmp:
        work = Path(tmp)
        sizes = {"small": (work / "images-1x", link_images(files[:N], work / "images-1x")),
                 "large": (work / f"images-{K}x", link_images(files[:N], work / f"images-{K}x", repeats=K))}
        for model in config.models:
            model = str(Path(model).expanduser().resolve())
            sides = {f"ldtok ({setting})": partial(ldtok_case, setting=setting) for setting in config.settings}
            sides["naive"] = naive_case
            results: dict[str, dict[str, CaseResult]] = {side: {} for side in sides}
            for size, (images, count) in sizes.items():
                for side, case in sides.items():
                    log(f"{model_label(model)}: {side}, {count} images ...")
                    results[side][size] = result = case(config, model=model, images=images, count=count, work=work)
                    log(f"  {result.images_per_s:.1f} img/s, peak {result.peak_memory_mib:.0f} MiB")
            naive_rate = results["naive"]["large"].images_per_s
            for side, r in results.items():
                label = "naive loop" if side == "naive" else f"ldtok encode, {side[7:-1]}"
                rows.append(Row(name=f"{label} {model_label(model)}", side=side.split()[0], model=model,
                                small=r["small"], large=r["large"], ratio=r["large"].images_per_s / naive_rate,
                                setting=side[7:-1] if side != "naive" else "baseline"))
    return rows


__all__ = [
    "CaseResult", "EncodeBenchConfig", "Row", "encode_config", "format_table", "ldtok_case", "link_images",
    "naive_case", "run_benchmark", "run_process", "source_images", "write_report",
]
