"""The settings whose fastest value depends on the device, resolved from `auto`.

The config keeps `auto` (it is never changed); `DeviceChoices(cfg, device)` answers, as
properties, what each `auto` field means on that device, and `record()` is what a stage
writes into its environment.json. The CPU choices were measured on 2 cores (docs/speed.md);
the CUDA ones come from docs/speed.md's H200 table (a 1B-shaped model): there plain
fp32 beat bf16 autocast over fp32 weights, each sample with its own prompt beat the shared
prompt pass, and unsorted generation batches beat length-sorted ones; and SDPA's grouped
heads with a mask would run its math kernel there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import Config, ConfigError
from posttrain.model.load import compute_dtype, frozen_storage, gqa_attention


def _on_cpu(value, device: torch.device) -> bool:
    return value if isinstance(value, bool) else device.type == "cpu"


@dataclass(frozen=True)
class DeviceChoices:
    """What each `auto` field of `cfg` resolves to on `device`."""
    cfg: Config
    device: torch.device

    @property
    def precision(self) -> torch.dtype:
        return compute_dtype(self.cfg.model, self.device)

    @property
    def frozen_dtype(self) -> str:
        return frozen_storage(self.cfg.model, self.device)

    @property
    def gqa_attention(self) -> bool:
        return gqa_attention(self.cfg.model, self.device)

    @property
    def share_prompt(self) -> bool:
        """rl.share_prompt: `auto` shares each prompt's pass on CPU, not on CUDA."""
        return _on_cpu(self.cfg.rl.share_prompt, self.device)

    @property
    def group_by_length(self) -> bool:
        """generate.group_by_length: `auto` sorts the drawn prompts on CPU, not on CUDA."""
        return _on_cpu(self.cfg.generate.group_by_length, self.device)

    def check(self) -> None:
        """Settings that cannot run together on this device: a ConfigError naming them."""
        if not self.cfg.rl.prompt_grad and not self.share_prompt:
            raise ConfigError(f"rl.prompt_grad=false needs the shared prompt pass, which "
                              f"rl.share_prompt={self.cfg.rl.share_prompt!r} turns off on "
                              f"{self.device.type}: set rl.share_prompt=true")

    def record(self) -> dict:
        """Each field's configured value and what it resolved to (for environment.json)."""
        c = self.cfg
        return {"device": str(self.device),
                "model.precision": [c.model.precision, str(self.precision).split(".")[-1]],
                "model.frozen_dtype": [c.model.frozen_dtype, self.frozen_dtype],
                "model.gqa_attention": [c.model.gqa_attention, self.gqa_attention],
                "rl.share_prompt": [c.rl.share_prompt, self.share_prompt],
                "generate.group_by_length": [c.generate.group_by_length, self.group_by_length]}
