"""Throughput, peak memory and model FLOPs utilisation of each stage, with the naive RL
baseline and every setting that changes speed switched in turn. (The exact fast paths,
which are always on since 40584b2, were switched off one by one here before; their
figures are in docs/speed.md.)

    python bench/throughput.py [--config demo] [--steps 3] [--warmup 1] [--only sft,generate,rl]
                               [--cases rl/ours,rl/naive] [--out FILE] [key=value ...]

Uses the SFT adapter in the config's run directory when there is one (run `posttrain sft`
first for realistic sample lengths), else a fresh LoRA. Every case runs in its own process,
so the peak resident memory it reports (CPU: ru_maxrss; CUDA: max allocated) is its own.
Each case times `--warmup` steps it throws away, then `--steps` steps, and reports medians:

  sft/*       one optimizer step (sft.grad_accum micro-batches of sft.batch_size)
  generate/*  one batch of generate.batch_size prompts x generate.samples_per_prompt samples;
              the timed batches hold the same prompts in every case (sorted by length when
              generate.group_by_length, else in data order) and tokens/s is their total
              new tokens over their total time
  rl/*        one optimizer step of offline RL (rl.grad_accum x rl.batch_size samples, drawn
              once from the SFT policy and shared by every case)

Cases: `ours` is the config as given. `rl/naive` is the plainer way the settings allow: a
reference forward on every step (the SFT policy: the same weights with the RL adapter off,
the FLOPs a separate copy would run), every sample with its own copy of its prompt, fp32
frozen weights, repeated key/value heads. Every other case switches one setting from its
default, `*/bf16-weights` and `rl/no-prompt-grad` one that is off by default
(model.frozen_dtype=compute: frozen base weights stored in bf16; rl.prompt_grad=false, a
cheaper gradient, not the same one: no backward through the prompt, so its MFU, counted
with the same model FLOPs as the others, is not the work it did; with
rl.share_prompt=true, which it needs, so on CUDA it also shares the prompt where `ours`
does not).
Tokens/s counts the same tokens for every case of a stage (RL and SFT: prompt +
completion of each sample; generate: new tokens), so two cases' ratio is their speed
ratio. RL and SFT cases time the same steps (the same samples in the same order), so
`paired` is the median over steps of ours' time over the case's, step by step: steady
where the tokens/s medians move with each step's length mix.

Model FLOPs per token: 2 x N (N = parameters outside the embedding) for every token a
forward pass needs once (a shared prompt counts once), plus 2 x d x V for every position
whose logits are used; training doubles both (the backward to the activations; the LoRA
weight gradients are left out, as is attention's T^2 term). MFU divides the achieved model
FLOP/s by the measured peak of a dense matmul of the same dtype on the same device. Wasted
work (a reference forward, logits nobody uses) is not counted, so it shows as lower MFU.
Writes the table as JSON to --out (default: <out_dir>/bench/throughput.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import machine, machine_line, peak_memory_mib

CASES = {  # name -> config overrides
    "sft/ours": (),
    "sft/random-batches": ("sft.batching=random",),
    "sft/fp32": ("model.precision=fp32",),
    "sft/fp32-weights": ("model.frozen_dtype=fp32",),
    "sft/repeated-kv-heads": ("model.gqa_attention=false",),
    "sft/bf16-weights": ("model.frozen_dtype=compute",),
    "generate/ours": (),
    "generate/unmerged": ("model.merged_sampling=false",),
    "generate/unsorted": ("generate.group_by_length=false",),
    "generate/hf-generate": (),
    "generate/hf-generate-merged": (),
    "rl/ours": (),
    "rl/naive": ("fast.recorded_reference=false", "rl.share_prompt=false",
                 "model.frozen_dtype=fp32", "model.gqa_attention=false"),
    "rl/reference-forward": ("fast.recorded_reference=false",),
    "rl/per-sample-prompt": ("rl.share_prompt=false",),
    "rl/fp32": ("model.precision=fp32",),
    "rl/repeated-kv-heads": ("model.gqa_attention=false",),
    "rl/bf16-cached-attention": ("model.fp32_cached_attention=false",),
    "rl/fp32-weights": ("model.frozen_dtype=fp32",),
    "rl/bf16-weights": ("model.frozen_dtype=compute",),
    "rl/no-prompt-grad": ("rl.prompt_grad=false", "rl.share_prompt=true"),
}


# ---------------------------------------------------------------- measuring

def matmul_peak(device, dtype, n: int = 2048, reps: int = 5) -> float:
    """Median FLOP/s of an n x n x n matmul in `dtype` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[1:])


def model_dims(model) -> tuple[int, int, int]:
    """(N parameters outside the embedding, hidden size d, vocab V)."""
    body = sum(p.numel() for n, p in model.named_parameters()
               if "embed_tokens" not in n and "lm_head" not in n and "lora_" not in n)
    return body, model.config.hidden_size, model.config.vocab_size


def timed(fn, warmup: int, steps: int, device) -> list[tuple[float, object]]:
    out = []
    for k in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        value = fn(k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= warmup:
            out.append((time.perf_counter() - t, value))
    return out


# ---------------------------------------------------------------- the cases

def _sft_adapter(cfg, work: Path) -> Path:
    """The run's SFT adapter, or a fresh LoRA saved once in the bench folder."""
    from posttrain.model.adapters import add_lora, save_adapter
    from posttrain.model.load import load_base_model, load_tokenizer, resolve_device
    path = cfg.run_dir / "sft" / "adapter"
    if path.is_dir():
        return path
    path = work / "fresh-adapter"
    if not path.is_dir():
        device = resolve_device(cfg.model)
        model = add_lora(load_base_model(cfg.model, device), cfg.lora)
        save_adapter(model, load_tokenizer(cfg.model), path)
    return path


def prepare(cfg, work: Path, n_samples: int) -> None:
    """Sample the offline RL steps' records once from the SFT policy (shared by rl/*)."""
    from posttrain.model.adapters import load_policy, sampler
    from posttrain.model.load import compute_dtype, load_tokenizer, resolve_device
    from posttrain.rollout import collect as C
    from posttrain.rollout.prompts import prompt_pool
    adapter = _sft_adapter(cfg, work)
    device = resolve_device(cfg.model)
    dtype = compute_dtype(cfg.model, device)
    tok = load_tokenizer(cfg.model, str(adapter))
    texts, ids = prompt_pool(cfg.data.train, cfg.data.train_split, tok, cfg)
    G = cfg.generate.samples_per_prompt
    n_prompts = -(-n_samples // G)
    model = load_policy(cfg, device, adapter).eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    jobs = C.make_jobs(texts[:n_prompts], ids[:n_prompts], cfg.generate.batch_size, tok, cfg)
    with torch.no_grad(), sampler(model, cfg.model, device, dtype) as policy:
        records = C.collect(jobs, C.hf_draw(policy, tok, G, cfg.generate.max_new_tokens,
                                            1.0, 1.0), lambda job: gen)
    (work / "records.json").write_text(json.dumps([r.to_row() for r in records]))


def sft_step(cfg, n_steps):
    """One SFT optimizer step as a function of its index, and the device and dtype."""
    from posttrain import sft
    from posttrain.model.adapters import add_lora
    from posttrain.model.load import load_base_model, load_tokenizer
    from posttrain.data import collate
    from posttrain.train.dist import setup_accelerator
    from posttrain.train.loop import build_optimizer
    acc, dtype = setup_accelerator(cfg)
    tok = load_tokenizer(cfg.model)
    train, _ = sft.load_examples(cfg, sft.load_split_rows(cfg), tok, log=lambda *a: None)
    model = add_lora(load_base_model(cfg.model, acc.device), cfg.lora)
    N, d, V = model_dims(model)
    plan = sft.micro_batches(train, cfg)
    optimizer = build_optimizer(model, cfg.sft)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    ga = cfg.sft.grad_accum

    def step(k):
        tokens = flops = 0
        chunk = plan[k * ga:(k + 1) * ga]
        targets = sum(len(train[i].completion_ids) for ids in chunk for i in ids)
        for ids in chunk:
            batch = collate([train[i] for i in ids], tok.pad_token_id,
                            packed=cfg.sft.batching == "packed").to(acc.device)
            with acc.autocast():
                loss = sft.completion_loss(model, batch, "sum")
            acc.backward(loss / targets)
            n = sum(len(train[i]) for i in ids)
            c = sum(len(train[i].completion_ids) for i in ids)
            tokens += n
            flops += 2 * (2 * N * n + 2 * d * V * c)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens, flops

    if len(plan) < n_steps * ga:
        raise SystemExit(f"sft: only {len(plan)} micro-batches for {n_steps} steps")
    return step, acc.device, dtype


def run_sft(cfg, work, warmup, steps):
    step, device, dtype = sft_step(cfg, warmup + steps)
    return timed(step, warmup, steps, device), device, dtype


def run_generate(cfg, work, warmup, steps, case):
    from posttrain.model.adapters import load_policy, sampler
    from posttrain.model.load import autocast, compute_dtype, load_tokenizer, resolve_device
    from posttrain.rollout.collect import sample_rollouts
    from posttrain.rollout.prompts import prompt_pool
    adapter = _sft_adapter(cfg, work)
    device = resolve_device(cfg.model)
    dtype = compute_dtype(cfg.model, device)
    tok = load_tokenizer(cfg.model, str(adapter))
    texts, ids = prompt_pool(cfg.data.train, cfg.data.train_split, tok, cfg)
    model = load_policy(cfg, device, adapter).eval()
    N, d, V = model_dims(model)
    g, B = cfg.generate, cfg.generate.batch_size
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    timed_idx = list(range(steps * B))      # the same prompts for every case
    if g.group_by_length and not case.startswith("generate/hf-generate"):
        timed_idx.sort(key=lambda i: len(ids[i]))
    order = list(range(steps * B, (steps + warmup) * B)) + timed_idx   # warm-up first
    if len(ids) < len(order):
        raise SystemExit(f"generate: only {len(ids)} prompts for {len(order)}")
    batches = [order[i:i + B] for i in range(0, len(order), B)]
    if case.startswith("generate/hf-generate"):
        if case.endswith("merged"):
            model = model.merge_and_unload().to(dtype)
        tok.padding_side = "left"

        def step(k):  # prompts in data order (unsorted), padded, each repeated G times
            batch = tok.pad({"input_ids": [ids[i] for i in batches[k]]},
                            return_tensors="pt").to(device)
            torch.manual_seed(cfg.seed + k)
            with torch.no_grad(), autocast(device, dtype):
                out = model.generate(**batch, do_sample=True, temperature=g.temperature,
                                     top_p=g.top_p, top_k=0, max_new_tokens=g.max_new_tokens,
                                     num_return_sequences=g.samples_per_prompt,
                                     pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            ended = (new == tok.eos_token_id).int().cumsum(-1)   # count up to the first EOS
            n = int(((ended == 0) | ((ended == 1) & (new == tok.eos_token_id))).sum())
            prompt = sum(len(ids[i]) for i in batches[k])
            return n, 2 * N * (prompt + n) + 2 * d * V * n

        return timed(step, warmup, steps, device), device, dtype

    def step(k):
        with torch.no_grad(), sampler(model, cfg.model, device, dtype) as policy:
            recs = sample_rollouts(policy, tok, [texts[i] for i in batches[k]],
                                   [ids[i] for i in batches[k]], g.samples_per_prompt,
                                   g.max_new_tokens, gen, g.temperature, g.top_p)
        n = sum(len(r.completion_ids) for r in recs)
        prompt = sum(len(ids[i]) for i in batches[k])
        return n, 2 * N * (prompt + n) + 2 * d * V * n

    return timed(step, warmup, steps, device), device, dtype


def rl_step(cfg, work, case, n_steps):
    """One offline RL optimizer step (posttrain.rl.train.train_step) as a function of its
    index (the policy it trains as its `model` attribute), and the device and dtype."""
    import dataclasses
    import shutil

    from posttrain.model.adapters import RL, load_policy
    from posttrain.model.load import load_tokenizer
    from posttrain.rl.credit import step_rewards
    from posttrain.rl.plan import step_plan
    from posttrain.rl.train import Round, train_step
    from posttrain.train.dist import setup_accelerator
    from posttrain.train.loop import TrainLoop
    from posttrain.types import Rollout
    adapter = _sft_adapter(cfg, work)
    acc, dtype = setup_accelerator(cfg)
    tok = load_tokenizer(cfg.model, str(adapter))
    records = [Rollout.from_row(r) for r in json.loads((work / "records.json").read_text())]
    reward, credit = step_rewards(records, [r.length(cfg.reward.unit) for r in records],
                                  tok, cfg)
    plan = step_plan(records, cfg, epochs=1.0)
    if len(plan) < n_steps:
        raise SystemExit(f"rl: only {len(plan)} steps of samples for {n_steps}")
    model = load_policy(cfg, acc.device, adapter, rl="new")
    N, d, V = model_dims(model)
    # the loop's metrics and (never written) checkpoints go to a folder of the bench's own
    cfg = dataclasses.replace(cfg, out_dir=str(work / ("run-" + case.replace("/", "-"))))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    loop = TrainLoop(cfg, "rl", cfg.rl, model, len(plan), acc, adapter=RL)
    loop.model.train()
    rnd = Round(0, records, reward, credit, plan, None, {})

    def step(k):
        train_step(loop, rnd, plan[k], tok, cfg, cfg.rl.beta)
        groups = plan[k].groups
        prompt_once = sum(len(records[g[0]].prompt_ids) for g in groups)
        comp = sum(len(records[i].completion_ids) for g in groups for i in g)
        tokens = sum(len(records[i].prompt_ids) + len(records[i].completion_ids)
                     for g in groups for i in g)
        return tokens, 2 * (2 * N * (prompt_once + comp) + 2 * d * V * comp)

    step.model = loop.unwrapped
    return step, acc.device, dtype


def run_rl(cfg, work, warmup, steps, case):
    step, device, dtype = rl_step(cfg, work, case, warmup + steps)
    return timed(step, warmup, steps, device), device, dtype


def child(args, overrides) -> None:
    from posttrain.config import load_config
    cfg = load_config(args.config, tuple(overrides) + CASES.get(args.case, ()))
    work = Path(args.work)
    torch.manual_seed(cfg.seed)
    if args.case == "prepare":
        plan_samples = (args.warmup + args.steps) * cfg.rl.batch_size * cfg.rl.grad_accum
        prepare(cfg, work, plan_samples)
        return
    if args.case == "peak":
        from posttrain.model.load import bf16_supported, resolve_device
        device = resolve_device(cfg.model)
        out = {"fp32": matmul_peak(device, torch.float32)}
        if bf16_supported(device):
            out["bf16"] = matmul_peak(device, torch.bfloat16)
        print("RESULT " + json.dumps(out))
        return
    stage = args.case.split("/")[0]
    fn = {"sft": run_sft, "generate": run_generate, "rl": run_rl}[stage]
    extra = () if stage == "sft" else (args.case,)
    rows, device, dtype = fn(cfg, work, args.warmup, args.steps, *extra)
    if stage == "generate":  # batches differ between cases: totals over the same prompts
        total = sum(t for t, _ in rows)
        rate, flop_rate = sum(v[0] for _, v in rows) / total, sum(v[1] for _, v in rows) / total
    else:
        rate = statistics.median(v[0] / t for t, v in rows)
        flop_rate = statistics.median(v[1] / t for t, v in rows)
    print("RESULT " + json.dumps({
        "tokens_per_s": rate, "flops_per_s": flop_rate,
        "step_seconds": statistics.median(t for t, _ in rows),
        "tokens_per_step": statistics.median(v[0] for _, v in rows),
        "step_times": [t for t, _ in rows], "step_tokens": [v[0] for _, v in rows],
        "peak_mib": peak_memory_mib(device), "dtype": str(dtype).replace("torch.", ""),
        "device": str(device)}))


# ---------------------------------------------------------------- the parent

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="sft,generate,rl", help="stages to run")
    ap.add_argument("--cases", default=None, help="comma-separated case names (see CASES)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.case:
        child(args, args.overrides)
        return
    from posttrain.config import load_config
    cfg = load_config(args.config, tuple(args.overrides))
    work = cfg.run_dir / "bench"
    work.mkdir(parents=True, exist_ok=True)
    stages = args.only.split(",")
    names = args.cases.split(",") if args.cases else [c for c in CASES
                                                      if c.split("/")[0] in stages]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    def spawn(case):
        cmd = [sys.executable, __file__, "--case", case, "--work", str(work), "--config",
               args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
               *args.overrides]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, TQDM_DISABLE="1"))
        if done.returncode != 0:
            raise SystemExit(f"{case} failed:\n{done.stderr[-4000:]}")
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        return json.loads(line[-1][7:]) if line else None

    print(f"bench: {args.config}, {args.warmup} warm-up + {args.steps} timed steps per case, "
          f"on {machine_line()}", flush=True)
    peak = spawn("peak")
    if any(c.startswith("rl/") for c in names):
        spawn("prepare")
    results = {}
    for case in names:
        r = spawn(case)
        r["mfu"] = r["flops_per_s"] / peak["bf16" if r["dtype"] == "bfloat16" else "fp32"]
        results[case] = r
        print(f"  {case:28} {r['tokens_per_s']:9.1f} tok/s  {r['peak_mib']:7.0f} MiB  "
              f"MFU {100 * r['mfu']:5.2f}%", flush=True)
    for stage in ("sft", "generate", "rl"):
        base = results.get(f"{stage}/ours")
        for case, r in results.items():
            if base and case.startswith(stage + "/"):
                r["speed_vs_ours"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["memory_vs_ours"] = r["peak_mib"] / base["peak_mib"]
                if stage != "generate" and r["step_tokens"] == base["step_tokens"]:
                    # the same steps in both: the median of step-by-step time ratios
                    r["paired_vs_ours"] = statistics.median(
                        b / t for b, t in zip(base["step_times"], r["step_times"]))
    print("\nmatmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))
    print(f"{'case':28} {'tokens/s':>9} {'vs ours':>8} {'paired':>7} {'step s':>7} "
          f"{'peak MiB':>9} {'vs ours':>8} {'MFU':>6}")
    for case, r in results.items():
        paired = f"{r['paired_vs_ours']:7.2f}" if "paired_vs_ours" in r else f"{'-':>7}"
        print(f"{case:28} {r['tokens_per_s']:9.1f} {r.get('speed_vs_ours', 1):8.2f} {paired} "
              f"{r['step_seconds']:7.2f} {r['peak_mib']:9.0f} {r.get('memory_vs_ours', 1):8.2f} "
              f"{100 * r['mfu']:5.2f}%")
    if "rl/ours" in results and "rl/naive" in results:
        o, n = results["rl/ours"], results["rl/naive"]
        print(f"\nRL step, ours vs naive: {o['tokens_per_s'] / n['tokens_per_s']:.2f}x tokens/s, "
              f"peak memory {o['peak_mib']:.0f} vs {n['peak_mib']:.0f} MiB")
    from posttrain.io import atomic_write_json
    out = Path(args.out) if args.out else work / "throughput.json"
    atomic_write_json(out, {"config": args.config, "overrides": args.overrides,
                            "machine": machine(),
                            "warmup": args.warmup, "steps": args.steps, "peak_flops": peak,
                            "cases": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
