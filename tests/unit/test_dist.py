"""The accelerator: DeepSpeed is refused with the reason and what to launch instead, and the
process group gets the configured timeout."""
from datetime import timedelta
from types import SimpleNamespace

import accelerate
import pytest

from posttrain.config import ConfigError, load_config
from posttrain.train import dist


class FakeAccelerator:
    made = []

    def __init__(self, engine: str, **kwargs):
        self.distributed_type = SimpleNamespace(value=engine)
        FakeAccelerator.made.append(kwargs)


@pytest.mark.parametrize("engine", ["DEEPSPEED", "NO"])
def test_deepspeed_is_refused_naming_what_to_launch_instead(engine, monkeypatch):
    monkeypatch.setattr(accelerate, "Accelerator", lambda **k: FakeAccelerator(engine, **k))
    cfg = load_config("demo", ("timeout_minutes=7",))
    if engine == "DEEPSPEED":
        with pytest.raises(ConfigError, match="DeepSpeed is not supported.*accelerate-config ddp"):
            dist.setup_accelerator(cfg)
        return
    acc, _ = dist.setup_accelerator(cfg)
    (handler,) = FakeAccelerator.made[-1]["kwargs_handlers"]
    assert handler.timeout == timedelta(minutes=7)


def test_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="timeout_minutes=0.0 must be > 0"):
        load_config("demo", ("timeout_minutes=0",))
