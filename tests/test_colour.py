"""Colour fidelity metrics (`ldtok.metrics.colour`) against hand-made shifts and desaturations, and their wiring into
the accumulator, the training validation and the evaluation report."""

import json

import numpy as np
import pytest
import torch
from skimage.color import deltaE_ciede2000, lab2rgb, rgb2lab

from ldtok.metrics import MetricAccumulator, chroma_histogram_picture, colour_metrics, colour_stats
from ldtok.metrics.colour import CHROMA_BINS, COLOUR_KEYS


def _photo_like(seed: int = 0, size: int = 32) -> torch.Tensor:
    """Smooth, moderately saturated colour images `(2, 3, S, S)` in [-1, 1], away from the sRGB gamut's edges (so
    Lab edits stay in gamut)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(2, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (0.25 + 0.5 * x) * 2 - 1


def _edit_lab(x: torch.Tensor, *, chroma_scale: float = 1.0, shift=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Convert to Lab, scale a*/b* by `chroma_scale` and add `shift` to (L*, a*, b*), convert back to [-1, 1]."""
    rgb = ((x + 1) / 2).permute(0, 2, 3, 1).double().numpy()
    lab = rgb2lab(rgb)
    lab[..., 1:] *= chroma_scale
    lab += np.asarray(shift)
    out = np.clip(lab2rgb(lab), 0, 1)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() * 2 - 1


def test_identical_images_have_no_colour_error():
    x = _photo_like()
    c = colour_metrics(x, x.clone())
    assert c.delta_e == 0.0
    assert c.chroma_ratio == 1.0
    assert (c.lab_shift_l, c.lab_shift_a, c.lab_shift_b) == (0.0, 0.0, 0.0)
    assert torch.equal(c.chroma_hist[0], c.chroma_hist[1])
    assert c.chroma_hist[0].sum() == 2 * 32 * 32


def test_half_chroma_gives_ratio_one_half_and_no_hue_shift():
    x = _edit_lab(_photo_like(1), chroma_scale=1.0)  # round-trip the original too: both through 8-bit quantization
    c = colour_metrics(x, _edit_lab(x, chroma_scale=0.5))
    assert c.chroma_ratio == pytest.approx(0.5, abs=0.02)
    assert abs(c.lab_shift_l) < 0.5
    assert c.delta_e > 2.0
    # the reconstruction's histogram moves to lower chroma
    bins = torch.arange(CHROMA_BINS, dtype=torch.float64)
    mean_bin = (c.chroma_hist * bins).sum(dim=1) / c.chroma_hist.sum(dim=1)
    assert mean_bin[1] < 0.6 * mean_bin[0]


def test_oversaturation_gives_ratio_above_one():
    x = _edit_lab(_photo_like(2), chroma_scale=0.5)  # leave room in the gamut
    assert colour_metrics(x, _edit_lab(x, chroma_scale=1.5)).chroma_ratio == pytest.approx(1.5, abs=0.05)


@pytest.mark.parametrize("channel,name", [(0, "lab_shift_l"), (1, "lab_shift_a"), (2, "lab_shift_b")])
def test_pure_lab_shift_shows_in_its_channel_only(channel, name):
    x = _edit_lab(_photo_like(3))
    shift = [0.0, 0.0, 0.0]
    shift[channel] = 6.0
    c = colour_metrics(x, _edit_lab(x, shift=shift))
    values = c.as_dict()
    assert values[name] == pytest.approx(6.0, abs=0.6)
    for other in {"lab_shift_l", "lab_shift_a", "lab_shift_b"} - {name}:
        assert abs(values[other]) < 0.6, (other, values[other])
    assert c.delta_e > 1.5


def test_a_red_bias_is_positive_a_and_a_green_bias_negative():
    x = _photo_like(4)
    red = x.clone()
    red[:, 0] = (red[:, 0] + 0.2).clamp(-1, 1)
    green = x.clone()
    green[:, 1] = (green[:, 1] + 0.2).clamp(-1, 1)
    assert colour_metrics(x, red).lab_shift_a > 3
    assert colour_metrics(x, green).lab_shift_a < -3


def test_delta_e_matches_skimage_per_pixel_mean():
    x, y = _photo_like(5), _photo_like(6)
    stats = colour_stats(x, y)
    q = lambda t: (((t + 1) * 127.5).round().clamp(0, 255) / 255).permute(0, 2, 3, 1).double().numpy()  # noqa: E731
    expected = deltaE_ciede2000(rgb2lab(q(x)), rgb2lab(q(y)), channel_axis=-1).mean(axis=(1, 2))
    np.testing.assert_allclose(stats.delta_e.numpy(), expected, rtol=1e-6)


def test_chroma_ratio_is_a_ratio_of_sums_not_dominated_by_grey_images():
    colourful = _edit_lab(_photo_like(7))
    grey = torch.zeros(2, 3, 32, 32)
    x = torch.cat([colourful, grey])
    y = torch.cat([colourful, grey + 0.02 * torch.tensor([1.0, -1.0, 0.0])[None, :, None, None]])
    # a faint tint of a grey image is a per-image ratio in the hundreds, but moves the set's chroma only a little
    stats = colour_stats(x, y)
    assert (stats.chroma_rec / stats.chroma).max() > 100
    assert 1.0 < colour_metrics(x, y).chroma_ratio < 1.2


def test_accumulator_counts_each_image_once_and_matches_one_batch():
    x = _edit_lab(_photo_like(8))
    y = _edit_lab(x, chroma_scale=0.7, shift=(0, 3, 0))
    acc = MetricAccumulator()
    acc.add_colour(["a", "b"], x, y)
    acc.add_colour(["b"], x[1:], y[1:])  # a sampler's padding repeat
    gathered = acc.gather()
    summary, direct = gathered.colour(), colour_metrics(x, y)
    assert summary.num_images == 2
    assert summary.as_dict() == pytest.approx(direct.as_dict())
    assert torch.equal(summary.chroma_hist, direct.chroma_hist)
    assert MetricAccumulator().gather().colour() is None


def test_chroma_histogram_picture_draws_both():
    x = _edit_lab(_photo_like(9))
    image = chroma_histogram_picture(colour_metrics(x, _edit_lab(x, chroma_scale=0.5)).chroma_hist)
    pixels = np.asarray(image)
    assert image.size == (384, 160)
    assert ((pixels == (170, 170, 170)).all(axis=-1)).sum() > 100  # grey bars: originals
    assert ((pixels == (210, 30, 30)).all(axis=-1)).sum() > 100  # red outlines: reconstructions


class _Tint(torch.nn.Module):
    """A 'model' whose reconstruction halves the chroma of its input (a desaturating tokenizer)."""

    def forward(self, x):
        from ldtok.outputs import AutoencoderOutput

        return AutoencoderOutput(sample=_edit_lab(x, chroma_scale=0.5), posterior=None, quant=None)


def test_validate_reports_colour_metrics():
    from ldtok.validation import validate

    x = _edit_lab(_photo_like(10))
    result = validate(_Tint(), torch.cat([x, x]), device="cpu", batch_size=3)
    assert set(COLOUR_KEYS) <= set(result)
    assert result["chroma_ratio"] == pytest.approx(0.5, abs=0.02)
    assert result["delta_e"] > 2


def test_eval_report_has_colour_metrics_and_histogram_picture(tmp_path):
    from accelerate import Accelerator

    from ldtok.evaluation import EvalOptions, evaluate_tokenizer
    from ldtok.evaluation.report import write_report

    x = _edit_lab(_photo_like(11))
    dataset = [{"pixel_values": x[i], "id": f"img{i}"} for i in range(2)]
    options = EvalOptions(perceptual=[], fid="off", grid_images=2, interpolation_pairs=0, progress=False)
    result = evaluate_tokenizer(_Tint(), dataset, accelerator=Accelerator(cpu=True), options=options)
    assert result.value("val/chroma_ratio") == pytest.approx(0.5, abs=0.02)
    assert result.value("val/delta_e") > 2
    assert "chroma_histogram" in result.pictures
    assert all("delta_e" in row for row in result.per_image)
    paths = write_report(result, tmp_path, model={"path": "tint"}, dataset={"source": "test"})
    report = json.loads(paths["json"].read_text())
    assert report["metrics"]["val/chroma_ratio"] == pytest.approx(0.5, abs=0.02)
    assert report["metrics"]["val/chroma_ratio_median"] == pytest.approx(0.5, abs=0.02)
    assert all(row["chroma_ratio"] == pytest.approx(0.5, abs=0.03) for row in report["per_image"])
    assert {"val/delta_e", "val/lab_shift_l", "val/lab_shift_a", "val/lab_shift_b"} <= set(report["metrics"])
    assert len(report["chroma_histogram"]["originals"]) == CHROMA_BINS
    assert (tmp_path / "chroma_histogram.png").is_file()
    html = paths["html"].read_text()
    assert 'data-key="val/chroma_ratio"' in html and 'alt="chroma_histogram"' in html


def test_default_dataset_v2_adds_every_wheel_photo_and_keeps_v1_buildable():
    from ldtok.data import default_dataset as dd

    assert dd.DATASET_NAME == "default-v2"
    v1, v2 = dd.DATASETS["default-v1"], dd.DATASETS["default-v2"]
    assert set(v1) < set(v2) and {("sklearn", "china.jpg"), ("sklearn", "flower.jpg")} <= set(v2)
    for package, file in v2:
        assert (dd.package_data_dir(package) / file).is_file(), f"{package} does not ship {file}"
    with pytest.raises(ValueError, match="unknown default dataset"):
        dd.default_dataset_dir(name="default-v0")


def test_median_chroma_ratio_reads_the_typical_image_that_the_ratio_of_sums_hides():
    """One vivid image that keeps its colour and four duller ones that turn half grey: the ratio of sums reads the
    vivid one, the median the four; a near-grey image with a faint tint is not counted in the median."""
    vivid = _edit_lab(_photo_like(12), chroma_scale=1.0)[:1]
    dull = _edit_lab(torch.cat([_photo_like(13), _photo_like(14)]), chroma_scale=0.3)
    grey = torch.zeros(1, 3, 32, 32)
    x = torch.cat([vivid, dull, grey])
    tinted = grey + 0.02 * torch.tensor([1.0, -1.0, 0.0])[None, :, None, None]
    y = torch.cat([vivid, _edit_lab(dull, chroma_scale=0.5), tinted])
    c = colour_metrics(x, y)
    assert c.colourful_images == 5
    assert c.chroma_ratio_median == pytest.approx(0.5, abs=0.03)
    assert c.chroma_ratio > 0.7  # the vivid image's chroma dominates the sums
    assert c.as_dict()["chroma_ratio_median"] == c.chroma_ratio_median
    grey_set = colour_metrics(torch.cat([grey, grey]), torch.cat([grey, grey]))
    assert grey_set.chroma_ratio_median is None and "chroma_ratio_median" not in grey_set.as_dict()


def test_eval_report_marks_the_median_chroma_ratio_not_run_on_a_grey_set():
    from accelerate import Accelerator

    from ldtok.evaluation import EvalOptions, evaluate_tokenizer

    grey = torch.zeros(2, 3, 32, 32)
    dataset = [{"pixel_values": grey[i], "id": f"img{i}"} for i in range(2)]
    options = EvalOptions(perceptual=[], fid="off", grid_images=2, interpolation_pairs=0, progress=False)
    result = evaluate_tokenizer(torch.nn.Identity(), dataset, accelerator=Accelerator(cpu=True), options=options)
    assert result.value("val/chroma_ratio_median") is None
    assert all(row["chroma_ratio"] is None for row in result.per_image)
