"""The parts bench/peers.py runs in child processes: TRL's GRPOTrainer doing posttrain's online
RL work, posttrain's own run timed round by round, and the shared evaluator; and what TRL's
run shares with posttrain's (the reward, each round's prompts, the step counts).

The TRL run reads trl 1.16 (`pip install --no-deps "trl==1.16.*"`, the `bench` extra):
GRPOConfig's fields, GRPOTrainer's `_generate` (timed here: a round's sampling) and the
reward-function call `reward(prompts=, completions=, completion_ids=, **columns)`.

Equal work, and how:
  starting policy  the base model with the SFT adapter merged (peft merge_and_unload), a fresh
                   LoRA of lora.rank / lora.alpha / lora.target_modules with rl.lora_dropout
                   (posttrain's RL adapter takes its dropout from rl.lora_dropout, not
                   lora.dropout). LoRA is additive, so base + SFT adapter + this LoRA, which
                   is how the shared evaluator loads it, is the same policy.
  prompts          the rounds' draws of posttrain.rl.train.sample_round (the same seeded
                   stream, the same pool), fed in that order with shuffle_dataset=False, so
                   generation r holds round r's prompts, each num_generations times.
  steps            one generation of prompts_per_iteration x G completions per round, split
                   into micro-batches of posttrain's size (whole prompt groups of
                   rl.batch_size), rl.grad_accum of them per optimizer step, rl.ppo_epochs
                   passes (num_iterations): posttrain's steps per round.
  reward           posttrain.rewards.compute with posttrain's ending rule (is_abrupt), its
                   length statistics from the first call (the SFT policy's first round).
  schedule         lr rl.max_lr, linear warmup of int(rl.warmup_ratio x steps) steps, then
                   cosine to rl.min_lr (the same transformers function posttrain calls);
                   AdamW with rl.weight_decay, clipping at rl.max_grad_norm; beta rl.beta
                   (TRL's k3 KL to the adapter-free model, i.e. the SFT policy) and clipping
                   epsilon rl.clip_eps, the two coefficients of posttrain's loss.
The GRPO objective itself is TRL's own (its defaults: advantages normalised within each
prompt's group, the "dapo" token-level loss; no stop credit, no step baseline): what is
compared is two implementations of online RL at the same work, not one loss. Not equal
either: the sampled tokens and the LoRA initialisation (each draws its own); the samples in
a micro-batch (posttrain: whole prompt groups, reshuffled each pass; TRL: one shuffle of the
round, the same split each pass); the precision (posttrain: model.precision, sampling from a
merged copy; TRL: bf16 autocast or fp32, as the sweep found faster); TRL's extra no-grad
forward for the old policy's log-probs (posttrain records them while sampling); and beta
under rl.kl_control=adaptive_token (posttrain steers it; TRL's stays at rl.beta).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from common import peak_memory_mib

PIP = 'pip install --no-deps "trl==1.16.*"'   # or: pip install -e ".[bench]"


def prompts_hash(texts: list[str]) -> str:
    """A short fingerprint of one round's prompts, in draw order."""
    return hashlib.sha1("\x1e".join(texts).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- shared with posttrain

def load_cfg(config: str, overrides: tuple):
    """posttrain's config: a bundled name, a YAML file, or `defaults` (no file)."""
    from posttrain.config import load_config
    return load_config(None if config == "defaults" else config, tuple(overrides))


def config_text(cfg) -> str:
    """The resolved config a part was made with, its folder left out."""
    from posttrain.config import to_yaml
    return to_yaml(dataclasses.replace(cfg, out_dir="."))


class PosttrainReward:
    """posttrain's configured reward (reward.*) as a TRL reward function. It reads what
    posttrain's sampler records: the completion decoded without its EOS, its length
    (stripped chars, or tokens without EOS), and whether it stopped by itself (its last
    token is EOS) or hit the token limit (abrupt, like an ending without closing
    punctuation). The length statistics are those of the first call, which is the first
    generation batch: the SFT policy's samples, as posttrain's first round."""

    __name__ = "posttrain_reward"   # TRL names the reward's metrics after it

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.set_lengths: list | None = None
        self.calls: list[dict] = []   # per call: the round's mean length and abrupt share

    def scored(self, completion_ids) -> tuple[list, list, list]:
        """(texts, lengths, abrupt flags) of the completions, as posttrain's Rollouts."""
        from posttrain.rewards import is_abrupt
        eos = self.tokenizer.eos_token_id
        texts, lengths, abrupt = [], [], []
        for ids in completion_ids:
            ids = list(ids)
            ended = bool(ids) and ids[-1] == eos
            body = ids[:-1] if ended else ids
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            texts.append(text)
            lengths.append(len(text.strip()) if self.cfg.reward.unit == "chars" else len(body))
            abrupt.append(is_abrupt(text, not ended))
        return texts, lengths, abrupt

    def __call__(self, prompts=None, completions=None, completion_ids=None, **_) -> list:
        from posttrain import rewards
        if completion_ids is None:
            raise SystemExit("TRL passed no completion_ids to the reward; this bench reads "
                             f"trl 1.16 ({PIP})")
        texts, lengths, abrupt = self.scored(completion_ids)
        if self.set_lengths is None:
            self.set_lengths = lengths
        self.calls.append({"len_mean": sum(len(t.strip()) for t in texts) / len(texts),
                           "abrupt": sum(abrupt) / len(abrupt)})
        return rewards.compute(lengths, self.set_lengths, self.cfg.reward, None,
                               abrupt).tolist()


def round_prompts(cfg, tokenizer) -> list[list[tuple[str, list]]]:
    """The (text, token ids) of the prompts each online round of posttrain draws, in order:
    posttrain.rl.train.round_draws, from the same pool, as sample_round takes them."""
    from posttrain.rl.train import round_draws
    from posttrain.rollout.prompts import train_prompt_pool
    texts, ids = train_prompt_pool(tokenizer, cfg)
    return [[(texts[i], list(ids[i])) for i in round_draws(cfg, len(ids), it)]
            for it in range(cfg.rl.iterations)]


def step_shape(cfg) -> dict:
    """posttrain's optimizer steps of a round, in TRL's terms; refuses shapes TRL cannot
    take step for step."""
    from posttrain.rl.plan import steps_per_round
    G, P, ga = cfg.generate.samples_per_prompt, cfg.rl.prompts_per_iteration, cfg.rl.grad_accum
    per_micro = max(1, cfg.rl.batch_size // G)          # whole prompt groups, as posttrain's plan
    if P % per_micro or (P // per_micro) % ga:
        raise SystemExit(
            f"rl.prompts_per_iteration={P} is not a whole number of steps of rl.grad_accum={ga}"
            f" micro-batches of {per_micro} prompt groups (rl.batch_size={cfg.rl.batch_size} //"
            f" generate.samples_per_prompt={G}): TRL could not take posttrain's steps")
    spr = steps_per_round(cfg)
    total = cfg.rl.iterations * spr
    if cfg.rl.max_steps > 0:
        total = min(total, cfg.rl.max_steps)
    return {"micro_batch": per_micro * G, "micro_per_round": P // per_micro,
            "steps_per_round": spr, "total_steps": total}


TRL_MICRO = 8   # TRL's samples per forward: at the demo's 16, its fp32 step ran out of 24 GiB


def trl_settings(cfg, bf16: bool, use_cpu: bool) -> dict:
    """GRPOConfig's arguments for posttrain's work (output_dir and seed are set per run).
    TRL's micro-batch is at most TRL_MICRO samples, with the accumulation that keeps each
    optimizer step on posttrain's rl.batch_size x rl.grad_accum samples."""
    s, rl, g = step_shape(cfg), cfg.rl, cfg.generate
    micro = max(m for m in range(1, min(s["micro_batch"], TRL_MICRO) + 1)
                if s["micro_batch"] % m == 0)
    k = s["micro_batch"] // micro
    return dict(
        num_generations=g.samples_per_prompt, max_completion_length=g.max_new_tokens,
        temperature=g.temperature, top_p=g.top_p, shuffle_dataset=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=rl.grad_accum * k,
        steps_per_generation=s["micro_per_round"] * k, num_iterations=rl.ppo_epochs,
        max_steps=s["total_steps"], learning_rate=rl.max_lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": rl.min_lr},
        warmup_steps=int(rl.warmup_ratio * s["total_steps"]), weight_decay=rl.weight_decay,
        max_grad_norm=rl.max_grad_norm, beta=rl.beta, epsilon=rl.clip_eps,
        # speed, not the work: TRL's fastest on CPU (posttrain recomputes nothing either)
        gradient_checkpointing=False, bf16=bf16, use_cpu=use_cpu,
        # posttrain's checkpoints fall between its timed rounds; TRL's would fall inside
        save_strategy="no")


def non_default(settings: dict) -> dict:
    """The settings that differ from GRPOConfig's defaults (bf16 unset means on)."""
    from trl import GRPOConfig
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    defaults["bf16"] = True
    return {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}


# ---------------------------------------------------------------- the TRL run (a child process)

def _policy(cfg, device):
    """(tokenizer, the SFT policy as one plain model: base + SFT adapter merged)."""
    from posttrain.model.adapters import load_adapter
    from posttrain.model.load import load_base_model, load_tokenizer
    sft = cfg.run_dir / "sft" / "adapter"
    tokenizer = load_tokenizer(cfg.model, str(sft))
    # TRL's own model: fp32 weights, transformers' own attention (posttrain's CPU fast
    # paths, bf16 matmul weights and grouped-query SDPA, are not TRL's)
    plain = dataclasses.replace(cfg.model, frozen_dtype="fp32", gqa_attention=False)
    model = load_adapter(load_base_model(plain, device), sft)
    model = model.merge_and_unload()
    # stop where posttrain's sampler stops: at the tokenizer's EOS only (TRL would also stop
    # at every other EOS id the model's generation config declares)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return tokenizer, model


def _dataset(cfg, tokenizer):
    """The rounds' prompts in posttrain's order, and each round's fingerprint. A prompt that
    posttrain truncated (data.overlong=truncate) is fed as its truncated ids decoded: TRL
    tokenizes text, so those few may re-tokenize differently (counted)."""
    from datasets import Dataset
    rows, hashes, retokenized = {"prompt": [], "round": []}, [], 0
    for r, draws in enumerate(round_prompts(cfg, tokenizer)):
        for text, ids in draws:
            same = tokenizer(text)["input_ids"] == ids
            retokenized += not same
            rows["prompt"].append(text if same else tokenizer.decode(ids))
            rows["round"].append(r)
        hashes.append(prompts_hash([t for t, _ in draws]))
    return Dataset.from_dict(rows), hashes, retokenized


def _clock(trainer, G: int):
    """Time every generation (`_generate`: tokenize, sample, decode) and every optimizer step
    of `trainer`; returns (generations, step end times)."""
    from transformers import TrainerCallback
    gens, ends = [], []
    if not hasattr(trainer, "_generate"):
        raise SystemExit(f"GRPOTrainer has no _generate to time; this bench reads trl 1.16 ({PIP})")
    real = trainer._generate

    def timed(prompts):
        t0 = time.perf_counter()
        out = real(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        gens.append({"start": t0, "seconds": time.perf_counter() - t0, "prompts": prompts[::G],
                     "samples": len(completion_ids),
                     "prompt_tokens": sum(len(p) for p in prompt_ids),
                     "new_tokens": sum(len(c) for c in completion_ids)})
        return out

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer._generate = timed
    trainer.add_callback(Steps())
    return gens, ends


def _rounds(gens, ends, calls, fed, hashes, shape, passes) -> list[dict]:
    """One row per round: generation start to its last optimizer step's end."""
    rows = []
    spr = shape["steps_per_round"]
    for r, g in enumerate(gens):
        end = ends[min(len(ends), (r + 1) * spr) - 1]
        seconds = end - g["start"]
        rows.append({"round": r + 1, "seconds": seconds, "sample_seconds": g["seconds"],
                     "train_seconds": seconds - g["seconds"], "samples": g["samples"],
                     "new_tokens": g["new_tokens"],
                     "train_tokens": (g["prompt_tokens"] + g["new_tokens"]) * passes,
                     "prompts_hash": hashes[r] if g["prompts"] == fed[r] else "not as fed",
                     **(calls[r] if r < len(calls) else {})})
    return rows


def run_trl(cfg, folder: Path, bf16: bool) -> dict:
    """Train TRL's LoRA on posttrain's online work; its adapter goes to `folder`/adapter."""
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.model.adapters import save_adapter
    from posttrain.model.load import resolve_device
    t_start = time.perf_counter()
    device = resolve_device(cfg.model)
    tokenizer, model = _policy(cfg, device)
    data, hashes, retokenized = _dataset(cfg, tokenizer)
    shape, settings = step_shape(cfg), trl_settings(cfg, bf16, device.type == "cpu")
    args = GRPOConfig(output_dir=str(folder / "trainer"), seed=cfg.seed, **settings)
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.rl.lora_dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    reward = PosttrainReward(cfg, tokenizer)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora)
    G = cfg.generate.samples_per_prompt
    gens, ends = _clock(trainer, G)
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    save_adapter(trainer.model, tokenizer, folder / "adapter")
    P = cfg.rl.prompts_per_iteration
    fed = [data["prompt"][r * P:(r + 1) * P] for r in range(len(gens))]
    return {"rounds": _rounds(gens, ends, reward.calls, fed, hashes, shape, cfg.rl.ppo_epochs),
            "steps": len(ends), "steps_per_round": shape["steps_per_round"],
            "peak_mib": peak_memory_mib(),
            "train_seconds_total": train_wall, "wall_seconds": time.perf_counter() - t_start,
            "adapter": str(folder / "adapter"), "bf16": bf16,
            "settings": non_default(settings), "retokenized_prompts": retokenized}


# ---------------------------------------------------------------- posttrain's run and the evaluator

def child_posttrain(cfg) -> dict:
    """`posttrain rl` through the stage registry, each round timed; figures per round."""
    from posttrain.metrics import read_metrics
    from posttrain.rl import train
    from posttrain.stages import STAGES
    caught, real_rounds = [], train.online_rounds

    def timed_rounds(*a, **k):   # a round's wall time: sampling, scoring, steps, checkpoint
        rounds = real_rounds(*a, **k)
        while True:
            t0 = time.perf_counter()
            rnd = next(rounds, None)
            if rnd is None:
                return
            yield rnd
            caught.append({"rollouts": rnd.rollouts, "seconds": time.perf_counter() - t0})

    train.online_rounds = timed_rounds
    t0 = time.perf_counter()
    STAGES["rl"].run(cfg)
    wall = time.perf_counter() - t0
    logged = [r for r in read_metrics(cfg.run_dir, "rl") if "round" in r]
    rows, before = [], 0
    for c, m in zip(caught, logged):
        rs = c["rollouts"]
        first = {r.group: r.prompt for r in reversed(rs)}
        new = m["sampled_tokens"] - before
        before = m["sampled_tokens"]
        train = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rs) * cfg.rl.ppo_epochs
        rows.append({"round": m["round"], "seconds": c["seconds"],
                     "sample_seconds": m["sample_seconds"],
                     "train_seconds": c["seconds"] - m["sample_seconds"], "samples": len(rs),
                     "new_tokens": new, "train_tokens": train,
                     "prompts_hash": prompts_hash([first[g] for g in sorted(first)]),
                     "len_mean": m["round_len_mean"], "abrupt": m["round_abrupt"]})
    return {"rounds": rows, "steps_per_round": step_shape(cfg)["steps_per_round"],
            "peak_mib": peak_memory_mib(),
            "wall_seconds": wall, "adapter": str(cfg.run_dir / "rl" / "adapter")}


def _check_loaded(model, adapter: Path) -> None:
    """The RL adapter in `model` holds exactly the saved tensors of `adapter`."""
    import torch
    from safetensors.torch import load_file
    saved = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".rl.weight")
        if name not in params or not torch.equal(params[name].detach().cpu(), value):
            raise SystemExit(f"{adapter}: {key} did not load as the RL adapter's {name}")


def fingerprint(adapter: Path) -> str:
    """A short fingerprint of a saved adapter's weights."""
    data = (Path(adapter) / "adapter_model.safetensors").read_bytes()
    return hashlib.sha1(data).hexdigest()[:10]


def child_eval(cfg, policies: dict) -> dict:
    """SFT and every policy (name -> RL adapter, on top of the SFT adapter) sampled by
    posttrain's evaluation code on the same held-out prompts with the same seeds."""
    import torch

    from posttrain.evaluate.report import sample_rows
    from posttrain.evaluate.run import held_out_prompts, sample_model, kl_to_sft
    from posttrain.io import atomic_write_text
    from posttrain.model.adapters import load_policy, sampler, sft_only
    from posttrain.model.load import sampling_setup

    class Bar:
        def update(self, n):
            pass

    device, dtype, tok = sampling_setup(cfg)
    rows, ids = held_out_prompts(cfg, tok)
    texts, bs = [r["prompt"] for r in rows], cfg.eval.batch_size or cfg.generate.batch_size
    recs, kl = [], {}
    with torch.no_grad():
        for k, (name, adapter) in enumerate(policies.items()):
            model = load_policy(cfg, device, cfg.run_dir / "sft" / "adapter", rl=adapter).eval()
            _check_loaded(model, adapter)
            if k == 0:  # the SFT policy: base + SFT adapter, the start of both
                with sft_only(model), sampler(model, cfg.model, device, dtype) as policy:
                    recs += [("sft", r) for r in sample_model(cfg, policy, tok, "sft", texts,
                                                               ids, device, Bar())]
            part = f"{name}-{fingerprint(adapter)}"   # finished batches kept per adapter
            with sampler(model, cfg.model, device, dtype) as policy:
                got = sample_model(cfg, policy, tok, part, texts, ids, device, Bar())
            recs += [(name, r) for r in got]
            cut = cfg.eval.kl_prompts   # the KL on the first eval.kl_prompts prompts, as eval's
            scored = [r for r in got if cut is None or r.group < cut]
            kl[name] = kl_to_sft(model, scored, tok.pad_token_id, device, dtype, bs)
            del model
    samples = sample_rows(cfg, recs, [r["completion"].strip() for r in rows])
    atomic_write_text(cfg.run_dir / "samples.jsonl",
                      "".join(json.dumps(s) + "\n" for s in samples))
    return {"policies": eval_figures(cfg, samples, kl, list(policies)), "prompts": len(rows),
            "samples_per_prompt": cfg.eval.samples_per_prompt,
            "adapters": {n: fingerprint(a) for n, a in policies.items()}}


def eval_figures(cfg, samples: list[dict], kl: dict, names: list) -> dict:
    """Per policy: n, length mean and variance, abrupt rate, ROUGE-L; for the RL policies the
    SFT/policy variance ratio with its bootstrap interval, the mean change and the KL."""
    from posttrain import seeds
    from posttrain.evaluate.stats import bootstrap_ratio, summarize
    out, lengths = {}, {}
    for name in ["sft", *names]:
        mine = [s for s in samples if s["model"] == name]
        m = summarize(mine)
        lengths[name] = [s["length_chars"] for s in mine]
        out[name] = {"n": m["n"], "mean": m["length_chars"]["mean"],
                     "var": m["length_chars"]["var"], "abrupt_rate": m["abrupt_rate"],
                     "rougeL": m["rougeL"], "eos_rate": m["eos_rate"],
                     "truncation_rate": m["truncation_rate"]}
    sft = out["sft"]
    for name in names:
        o = out[name]
        o["variance_ratio"] = sft["var"] / max(o["var"], 1e-9)
        o["variance_ratio_ci95"] = list(bootstrap_ratio(lengths["sft"], lengths[name],
                                                        cfg.eval.bootstrap,
                                                        seeds.bootstrap(cfg.seed)))
        o["mean_change"] = o["mean"] / sft["mean"] - 1
        o.update(kl[name])
    for name, figs in relative_ratios(samples, names, cfg.eval.bootstrap,
                                      seeds.bootstrap(cfg.seed)).items():
        out[name].update(figs)
    return out


def relative_ratios(samples: list[dict], names: list, n_boot: int, boot_seed: int) -> dict:
    """Per RL policy: the SFT/policy ratio of var / mean^2 (the squared coefficient of
    variation) with its bootstrap interval: the spread cut with the change of mean taken
    out, since a policy that makes every summary 20% shorter cuts the variance 1.56x by
    that alone."""
    from posttrain.evaluate.stats import bootstrap_ratio, relative_variance
    lengths = {n: [s["length_chars"] for s in samples if s["model"] == n]
               for n in ("sft", *names)}
    return {n: {"relative_ratio": relative_variance(lengths["sft"])
                / max(relative_variance(lengths[n]), 1e-12),
                "relative_ratio_ci95": list(bootstrap_ratio(lengths["sft"], lengths[n], n_boot,
                                                            boot_seed, relative=True))}
            for n in names}


def child(args) -> None:
    """One part in this process; its result to <dir>/result.json (written last)."""
    from posttrain.io import atomic_write_json
    folder = Path(args.dir)
    cfg = load_cfg(args.config, tuple(args.overrides) + (f"seed={args.seed}", f"out_dir={folder}"))
    if args.child == "posttrain":
        result = child_posttrain(cfg)
    elif args.child == "trl":
        result = run_trl(cfg, folder, args.bf16 == "on")
    else:
        result = child_eval(cfg, dict(p.split("=", 1) for p in args.policy))
    result.update(kind=args.child, seed=int(args.seed), config=config_text(cfg))
    atomic_write_json(folder / "result.json", result)
