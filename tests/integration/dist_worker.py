"""Run by test_distributed.py under `accelerate launch`: `posttrain run` (SFT, online RL,
then eval, plot and view on the main process) on the tiny model. Each process writes what
it trained on (the micro-batches its share held) and each loop's steps and AdamW step
counts to <out>/rank<R>.json, its final LoRA weights to <out>/rank<R>-<stage>.safetensors.
With STAGE set it runs that stage alone; with DIE_AFTER_CHECKPOINT=N every process stops
(KeyboardInterrupt) right after the checkpoint of step N is written; with SLOW_EVAL=S the
evaluation (main process) first sleeps S seconds (with FAIL_EVAL=1 it fails); with FSDP=1
the accelerator takes accelerate's FSDP2 path (fully_shard per decoder layer), as on a GPU
launch."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from posttrain import pipeline, sft
from posttrain.model.adapters import RL, sharded
from posttrain.train import dist
from posttrain.train.loop import TrainLoop
from posttrain.config import load_config

out = Path(sys.argv[1])
cfg = load_config(None, tuple(sys.argv[2:]))
rank = int(os.environ["RANK"])
seen = {"sft": [], "rl": [], "optimizer_steps": {}, "loop_steps": {}, "sharded": {}}
weights = {}


def recording(original):
    def share(chunk, r, world):  # SFT shares lists of rows; RL, micro-batch numbers
        mine = original(chunk, r, world)
        seen["rl" if isinstance(chunk[0], int) else "sft"].append([m for m, w in mine if w > 0])
        return mine
    return share


def lora(model, adapter):
    from torch.distributed.tensor import DTensor   # FSDP's shards: gathered by every rank
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
            for k, v in state.items()}


dist.rank_share = recording(dist.rank_share)
evaluate_loss = sft.evaluate_loss


def last_eval(model, *a, **k):  # called after training with the trained model
    weights["sft"] = lora(model.module if hasattr(model, "module") else model, "default")
    return evaluate_loss(model, *a, **k)


sft.evaluate_loss = last_eval
finish = TrainLoop.finish


def finish_and_keep(self, *a, **k):  # a loop's end: the RL adapter, the optimizer's steps
    if self.stage == "rl":
        weights["rl"] = lora(self.unwrapped, RL)
    seen["optimizer_steps"][self.stage] = sorted({int(s["step"]) for s in
                                                  self.optimizer.state.values()})
    seen["loop_steps"][self.stage] = self.step
    seen["sharded"][self.stage] = sharded(self.unwrapped)
    return finish(self, *a, **k)


TrainLoop.finish = finish_and_keep
if os.environ.get("NAN_ON_RANK") == str(rank):  # this rank's loss turns NaN at its 3rd call
    real_loss, calls = sft.completion_loss, [0]

    def nan_later(model, batch, *a, **k):
        calls[0] += 1
        loss = real_loss(model, batch, *a, **k)
        return loss * float("nan") if model.training and calls[0] >= 3 else loss

    sft.completion_loss = nan_later
if os.environ.get("DIE_AFTER_CHECKPOINT"):
    save_checkpoint = TrainLoop.save_checkpoint

    def save_then_die(self):
        save_checkpoint(self)
        if self.step == int(os.environ["DIE_AFTER_CHECKPOINT"]):
            raise KeyboardInterrupt

    TrainLoop.save_checkpoint = save_then_die
if os.environ.get("FSDP"):  # accelerate's FSDP2 path, which it takes only for GPU launches
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    real_init = Accelerator.__init__

    def fsdp_init(self, *a, **k):
        real_init(self, *a, **k)
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
        if self.mixed_precision != "no":   # as accelerate sets up a GPU launch's plugin
            self.state.fsdp_plugin.set_mixed_precision(self.mixed_precision)

    Accelerator.__init__ = fsdp_init
if os.environ.get("SLOW_EVAL"):  # the main process's eval takes this many seconds longer
    import time

    from posttrain.evaluate import run as eval_run
    real_eval = eval_run.run

    def slow_eval(*a, **k):
        time.sleep(float(os.environ["SLOW_EVAL"]))
        return real_eval(*a, **k)

    eval_run.run = slow_eval
if os.environ.get("FAIL_EVAL"):  # the evaluation (main process) fails
    from posttrain.evaluate import run as eval_run

    def failing_eval(*a, **k):
        raise RuntimeError("eval failed on purpose")

    eval_run.run = failing_eval
if os.environ.get("STAGE"):
    pipeline.run_stage(cfg, os.environ["STAGE"])
else:
    pipeline.run(cfg)
for stage, w in weights.items():
    save_file(w, str(out / f"rank{rank}-{stage}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps(seen))
