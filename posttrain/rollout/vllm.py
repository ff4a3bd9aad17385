"""Optional vLLM backend for the generation stage (`generate.backend: vllm`, CUDA only).

vLLM draws the completions (base model + the SFT adapter as a LoRA request); the behaviour
log-probs the RL stage needs (log pi_sft of each sampled token and of the stop token) are
then computed by one teacher-forced forward of our own SFT policy, so they are exactly what
the RL forward computes (vLLM's kernels round differently, which would put the PPO ratio
off 1 at step 0). Install with `pip install -e ".[vllm]"` (vllm 0.30.0) on a CUDA machine.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from posttrain.model.forward import policy_logprobs
from posttrain.rollout.collect import rollouts_of
from posttrain.types import Example, Sample


class BackendError(RuntimeError):
    """The requested generation backend cannot run here; the message says why."""


def check_available(device: torch.device) -> None:
    if device.type != "cuda":
        raise BackendError("generate.backend=vllm needs a CUDA device; use generate.backend=hf "
                           "(the default) on CPU")
    if importlib.util.find_spec("vllm") is None:
        raise BackendError("generate.backend=vllm needs the vllm package: pip install "
                           "'posttrain[vllm]' (vllm 0.30.0; or use generate.backend=hf, the "
                           "default)")


def engine_args(model_path: str, lora_rank: int, seed: int, max_len: int, four_bit: bool,
                bf16: bool) -> dict:
    """vLLM's engine settings: the base model with room for the SFT adapter, in bf16 where
    the GPU has it, else fp16 (vLLM's attention kernels take no fp32; the samples' log-probs
    are scored by posttrain's own policy anyway); a 4-bit policy (model.load_in_4bit) is
    sampled from bitsandbytes 4-bit weights too, not from the unquantised base."""
    args = dict(model=model_path, enable_lora=True, max_lora_rank=max(lora_rank, 8),
                dtype="bfloat16" if bf16 else "float16", seed=seed, max_model_len=max_len,
                gpu_memory_utilization=0.5)
    if four_bit:
        args["quantization"] = "bitsandbytes"
    return args


class VLLMSampler:
    """One vLLM engine for the whole stage, serving the base model with the SFT adapter."""

    def __init__(self, model_path: str, adapter: Path, lora_rank: int, seed: int,
                 max_len: int, four_bit: bool):
        from vllm import LLM  # optional extra (CUDA only)
        from vllm.lora.request import LoRARequest  # optional extra (CUDA only)

        self.llm = LLM(**engine_args(model_path, lora_rank, seed, max_len, four_bit,
                                     torch.cuda.is_bf16_supported()))
        self.lora = LoRARequest("sft", 1, str(adapter))

    def sample(self, prompts: list[list[int]], group: int, max_new_tokens: int, eos_id: int,
               temperature: float, top_p: float, seed: int) -> list[tuple[int, list[int], bool]]:
        """(prompt index, completion token ids ending with EOS when it stopped, ended)."""
        from vllm import SamplingParams  # optional extra (CUDA only)
        from vllm.inputs import TokensPrompt  # optional extra (CUDA only)

        params = SamplingParams(n=group, temperature=temperature, top_p=top_p,
                                max_tokens=max_new_tokens, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 params, lora_request=self.lora, use_tqdm=False)
        return rows_of(outs, eos_id)

    def rollouts(self, policy, tokenizer, texts, prompts, cfg, seed: int, targets=None):
        """Sample a batch with vLLM, score it under `policy` (our SFT model), and return
        the Rollouts the HF backend would give for it."""
        g = cfg.generate
        rows = self.sample(prompts, g.samples_per_prompt, g.max_new_tokens,
                           tokenizer.eos_token_id, g.temperature, g.top_p, seed)
        device = next(policy.parameters()).device
        scores = score(policy, rows, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id,
                       device, g.samples_per_prompt)
        samples = [Sample(k, tuple(ids), tuple(lp), tuple(ls), ended)
                   for (k, ids, ended), (lp, ls) in zip(rows, scores)]
        return rollouts_of(samples, tokenizer, texts, prompts, targets)


def rows_of(outs, eos_id: int) -> list[tuple[int, list[int], bool]]:
    """vLLM RequestOutputs -> (prompt index, token ids ending with EOS if it stopped, ended)."""
    rows = []
    for k, out in enumerate(outs):
        for c in out.outputs:
            ids = list(c.token_ids)
            ended = c.finish_reason == "stop"
            if ended and (not ids or ids[-1] != eos_id):
                ids.append(eos_id)        # vLLM may leave the stop token out
            rows.append((k, ids, ended))
    return rows


@torch.no_grad()
def score(policy, rows, prompts: list[list[int]], pad_id: int, eos_id: int, device,
          group: int, batch: int = 8) -> list[tuple[list[float], list[float]]]:
    """log pi(token) and log pi(EOS) at every completion position, under `policy`."""
    records = [Example(tuple(prompts[k]), tuple(ids)) for k, ids, _ in rows]
    out = []
    for s in range(0, len(records), group * batch):
        groups = [list(range(i, min(i + group, len(records))))
                  for i in range(s, min(s + group * batch, len(records)), group)]
        lp, lp_stop = policy_logprobs(policy, records, groups, pad_id, device, True, eos_id)
        sizes = [len(records[i].completion_ids) for g in groups for i in g]
        out += list(zip([x.tolist() for x in lp.float().split(sizes)],
                        [x.tolist() for x in lp_stop.float().split(sizes)]))
    return out
