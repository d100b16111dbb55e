"""The shared training loop (`ldtok.training.loop`) in-process, on a toy task: schedule, logging, checkpoints, and an
exact resume; and the base config every trainer's `train` section shares."""

import json
from dataclasses import fields

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ldtok.config import ConfigError, load_config
from ldtok.priors import PriorTrainConfig
from ldtok.training import Task, TrainConfig, TrainingLoop, TrainLoopConfig, learning_rate


class Regression(Task):
    """Least squares on fixed data: one linear model, one optimizer, the step through the prepared model."""

    name = "toy"

    def __init__(self, loop: TrainingLoop, loader: DataLoader):
        self.loop = loop
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=loop.tc.lr)
        self.model, self.optimizer, self.loader = loop.accelerator.prepare(model, optimizer, loader)
        self.trained, self.weights = [self.model], {"model": loop.accelerator.unwrap_model(self.model)}
        self.optimizers = [(self.optimizer, loop.tc.lr)]
        self.calls = []

    def step(self, batch, step):
        x, y = batch
        self.calls.append((step, self.optimizer.param_groups[0]["lr"]))
        loss = (self.model(x) - y).pow(2).mean()
        self.loop.update(loss, self.optimizer, self.model)
        return {"loss": loss.detach()}


def run(out, *, max_steps: int, resume=None) -> Regression:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    tc = TrainLoopConfig(max_steps=max_steps, batch_size=4, lr=0.1, warmup_steps=2, checkpoint_every=2,
                         log_every=1, report_to="none", mixed_precision="no", adam_betas=[0.9, 0.999])
    loop = TrainingLoop(tc, output_dir=out, config={"train": {"max_steps": max_steps}}, resume=resume)
    task = Regression(loop, DataLoader(data, batch_size=4, shuffle=True, drop_last=True))
    loop.resume(task)
    loop.fit(task, task.loader)
    return task


def test_the_loop_schedules_logs_checkpoints_and_resumes_exactly(tmp_path):
    first = run(tmp_path / "a", max_steps=4)
    assert first.calls == [(s, learning_rate(s, base=0.1, warmup_steps=2, max_steps=4, schedule="constant"))
                           for s in range(4)]
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == [1, 2, 3, 4] and all("loss" in e for e in logged)
    resumed = run(tmp_path / "a", max_steps=6, resume="latest")
    assert [s for s, _ in resumed.calls] == [4, 5]  # steps 5 and 6 only, the second epoch's batches 2 and 3
    straight = run(tmp_path / "b", max_steps=6)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(Exception, match="already holds checkpoints"):
        run(tmp_path / "b", max_steps=6)


def test_both_train_sections_share_one_base_and_validate_alike():
    base = {f.name for f in fields(TrainLoopConfig)}
    assert base <= {f.name for f in fields(TrainConfig)} and base <= {f.name for f in fields(PriorTrainConfig)}
    assert PriorTrainConfig().checkpoint_every == 0 and TrainConfig().checkpoint_every == 1000
    for cls in (TrainConfig, PriorTrainConfig):
        with pytest.raises(ConfigError, match=r"train\.lr_schedule: expected one of 'constant', 'cosine'"):
            load_config(_wrap(cls), None, ["train.lr_schedule=linear"])
        with pytest.raises(ConfigError, match=r"train\.ema_decay: must be < 1, got 1\.0"):
            load_config(_wrap(cls), None, ["train.ema_decay=1.0"])
        with pytest.raises(ConfigError, match=r"train\.batch_size: must be > 0, got 0"):
            load_config(_wrap(cls), None, ["train.batch_size=0"])


def _wrap(cls):
    from dataclasses import field, make_dataclass

    return make_dataclass(f"Run{cls.__name__}", [("train", cls, field(default_factory=cls))])
