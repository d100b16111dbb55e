"""Latent atlas, traversals, arithmetic and anomaly ROC-AUC: the numbers, and that the pictures reach report.html."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from ldtok.data import DataConfig, build_dataset
from ldtok.evaluation import EvalOptions, evaluate_tokenizer
from ldtok.evaluation.report import write_report
from ldtok.latent_tools import (
    anomaly_scores,
    labels_from_folders,
    latent_arithmetic,
    latent_atlas,
    latent_traversals,
    read_anomaly_labels,
    roc_auc,
)
from ldtok.latent_tools.traversal import rank_channels
from ldtok.losses import LossConfig, build_loss
from ldtok.models import ModelConfig, build_model
from ldtok.training import AutoencoderStep

NO_NETS = dict(perceptual=[], fid="off", progress=False)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def mlp(latent=2, side=28, deterministic=False, hidden=(32,), logits=True):
    torch.manual_seed(0)
    return build_model(ModelConfig(type="mlp", in_channels=1, sample_size=side, block_out_channels=list(hidden),
                                   latent_channels=latent, deterministic=deterministic), decoder_logits=logits).eval()


def sgd_update(loss, optimizer, module):
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ ROC-AUC


def test_roc_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, 60)
        scores = np.round(rng.normal(size=60) + labels, 1)  # rounded: many ties
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and roc_auc([1, 1], [0, 1]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 2], [1, 1])


def test_labels_from_a_csv_and_from_folders(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("id,label\na.png,0\nb.png,anomalous\nc.png,1\nd.png,normal\n")
    assert read_anomaly_labels(path) == {"a.png": 0, "b.png": 1, "c.png": 1, "d.png": 0}
    path.write_text("id,label\na.png,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        read_anomaly_labels(path)
    assert labels_from_folders(["normal/a.png", "anomalous/b.png"]) == {"normal/a.png": 0, "anomalous/b.png": 1}
    assert labels_from_folders(["normal/a.png", "normal/b.png"]) is None  # one class: nothing to rank
    assert labels_from_folders(["train/0", "train/1"]) is None


def _stripes(n, *, horizontal, rng, side=16):
    t = np.arange(side) / side
    waves = [np.sin(2 * np.pi * k * t) for k in (1, 2)]
    images = []
    for _ in range(n):
        a, b = rng.uniform(-1, 1, 2)
        profile = 0.5 + 0.25 * (a * waves[0] + b * waves[1])
        img = np.tile(profile[:, None], (1, side)) if horizontal else np.tile(profile[None, :], (side, 1))
        images.append(Image.fromarray(np.round(255 * img).astype(np.uint8)))
    return images


def test_anomaly_auroc_on_a_synthetic_set_is_high_and_equals_sklearn(tmp_path, accelerator):
    # normal = horizontal stripes (a 2-D family), anomalous = vertical ones; a linear AE trained on normal images
    rng = np.random.default_rng(0)
    for cls, horizontal, n in (("normal", True, 24), ("anomalous", False, 8)):
        (tmp_path / "set" / cls).mkdir(parents=True)
        for i, img in enumerate(_stripes(n, horizontal=horizontal, rng=rng)):
            img.save(tmp_path / "set" / cls / f"{i:02d}.png")
    train = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1)[None]
                         for im in _stripes(64, horizontal=True, rng=rng)])
    model = mlp(latent=2, side=16, deterministic=True, hidden=(), logits=False)
    model.train()
    loss_fn = build_loss(LossConfig(reconstruction="l2", perceptual="none", perceptual_weight=0, disc_weight=0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ae_step = AutoencoderStep(model=model, loss_fn=loss_fn)
    for step in range(300):
        sgd_update(ae_step.generator(train, step=step).loss, opt, model)
    data = DataConfig(source="folder", path=str(tmp_path / "set"), resolution=16, channels=1, crop="center")
    result = evaluate_tokenizer(model, build_dataset(data, train=False), accelerator=accelerator,
                                options=EvalOptions(**NO_NETS))
    auroc = result.value("val/anomaly_auroc")
    labels = {r["id"]: int(r["id"].startswith("anomalous/")) for r in result.per_image}
    ids = sorted(labels)
    mse = {r["id"]: r["mse"] for r in result.per_image}
    assert auroc == pytest.approx(roc_auc_score([labels[i] for i in ids], [mse[i] for i in ids]), abs=1e-12)
    assert auroc > 0.9
    paths = write_report(result, tmp_path / "report", model={"path": "synthetic"}, dataset={"source": "folder"})
    html = paths["html"].read_text()
    assert 'alt="anomaly_scores"' in html and 'data-key="val/anomaly_auroc"' in html
    assert Image.open(paths["anomaly_scores"]).size == (480, 240)

    # the same labels from a CSV file (here: swapped, so the AUROC flips)
    csv = tmp_path / "labels.csv"
    csv.write_text("id,label\n" + "".join(f"{i},{1 - labels[i]}\n" for i in ids))
    flipped = evaluate_tokenizer(model, build_dataset(data, train=False), accelerator=accelerator,
                                 options=EvalOptions(**NO_NETS, anomaly_labels=str(csv), latent_tools=False))
    assert flipped.value("val/anomaly_auroc") == pytest.approx(1 - auroc)
    with pytest.raises(ValueError, match="not evaluated"):
        anomaly_scores(result.per_image[:3], labels)


# ------------------------------------------------------------------------------------------ pictures


def test_atlas_decodes_the_prior_quantile_grid():
    model = mlp()
    x = torch.zeros(1, 1, 28, 28)
    atlas = latent_atlas(model, x, size=5, lo=0.1, hi=0.9)
    q = norm.ppf(np.linspace(0.1, 0.9, 5))
    z = atlas.latents.view(5, 5, 2).numpy()
    np.testing.assert_allclose(z[0, :, 0], q, rtol=1e-5)  # first coordinate along the row
    np.testing.assert_allclose(z[:, 0, 1], q[::-1], rtol=1e-5)  # second from top (high) to bottom (low)
    assert atlas.image.size == (5 * 30 + 2, 5 * 30 + 2)
    with pytest.raises(ValueError, match="2-D latent"):
        latent_atlas(mlp(latent=3), x)


def test_traversals_vary_one_channel_at_a_time_ranked_by_kl():
    model = mlp(latent=4)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    kl = [0.1, 3.0, 0.0, 1.0]
    assert rank_channels(kl, torch.zeros(3, 4, 1, 1)) == [1, 3, 0, 2]
    pic = latent_traversals(model, x, kl_per_channel=kl, channels=2, steps=5, span=2.0)
    z = pic.latents.view(2, 5, 4)
    mu = model.encode_posterior(x[:1]).mean.flatten()
    for row, c in enumerate([1, 3]):
        others = [k for k in range(4) if k != c]
        torch.testing.assert_close(z[row][:, others], mu[others].expand(5, 3))
        torch.testing.assert_close(z[row][:, c] - mu[c], torch.linspace(-2, 2, 5))
    assert "1 (KL 3)" in pic.caption


def test_arithmetic_uses_group_means_when_labels_exist():
    model = mlp(latent=3)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    pic = latent_arithmetic(model, x, labels=labels)
    mu = model.encode_posterior(x).mean
    a, b, c = (mu[labels == k].mean(0) for k in range(3))
    torch.testing.assert_close(pic.latents, torch.stack([a, b, c, a - b + c]))
    assert "mean(label 0) - mean(label 1) + mean(label 2)" in pic.caption
    unlabelled = latent_arithmetic(model, x)
    torch.testing.assert_close(unlabelled.latents[3], mu[0] - mu[1] + mu[2])


def test_latent_pictures_are_written_and_appear_in_report_html(tmp_path, accelerator):
    data = DataConfig(source="digits", split="validation", resolution=28, channels=1, label_column="label",
                      max_samples=40)
    result = evaluate_tokenizer(mlp(), build_dataset(data, train=False), accelerator=accelerator,
                                options=EvalOptions(**NO_NETS))
    paths = write_report(result, tmp_path, model={"path": "mlp"}, dataset={"source": "digits"})
    html = paths["html"].read_text()
    for name in ("latent_atlas", "latent_traversals", "latent_arithmetic", "reconstructions"):
        assert (tmp_path / f"{name}.png").is_file(), name
        assert f'alt="{name}"' in html, name
    assert "mean(label" in result.pictures["latent_arithmetic"].caption  # digits carry labels
    assert "val/anomaly_auroc" not in {m.key for m in result.metrics}  # no labels for it: not run, not faked
