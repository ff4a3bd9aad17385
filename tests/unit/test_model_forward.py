"""The forward pass on the tiny model: no attention across packed examples, logits only at
completion positions, and the shared prompt pass (policy_logprobs) equal to the plain one."""
import pytest
import torch

from posttrain import sft
from posttrain.model.forward import completion_logits, grouped_completion_logits, policy_logprobs
from posttrain.model.load import autocast, bf16_supported, compute_dtype, load_base_model
from posttrain.data import collate, load_rows, tokenize_rows
from posttrain.types import Example
from conftest import _tiny


def test_no_attention_across_examples(tiny_cfg):
    """Each example's loss is the same alone, in a padded batch, and packed in one row."""
    cfg = tiny_cfg()
    tok, model = _tiny(cfg)
    rows = load_rows("sample", "train", cfg.data)[:3]
    ex, _ = tokenize_rows(rows, tok, cfg.data)
    alone = [sft.completion_loss(model, collate([e], tok.pad_token_id), "sum") for e in ex]
    for packed in (False, True):
        batch = collate(ex, tok.pad_token_id, packed=packed)
        logits = completion_logits(model, batch)
        per_token = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
        per_example = torch.zeros(len(ex)).index_add(0, batch.example_index, per_token)
        torch.testing.assert_close(per_example, torch.stack(alone), rtol=1e-4, atol=1e-4)


def test_logits_only_at_completion_positions(tiny_cfg):
    cfg = tiny_cfg()
    tok, model = _tiny(cfg)
    batch = collate([Example((3, 4, 5, 6), (7, 8, tok.eos_token_id))], tok.pad_token_id)
    logits = completion_logits(model, batch)
    assert logits.shape == (3, model.config.vocab_size)
    full = model(input_ids=batch.input_ids).logits[0, 3:6]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def _plain_logprobs(model, records, groups, stop_id):
    """The plain twin of policy_logprobs: each sample with its own prompt, the LM head at
    every position, a full log-softmax, then the rows and columns picked."""
    tokens, stops = [], []
    for i in (i for g in groups for i in g):
        p, c = list(records[i].prompt_ids), list(records[i].completion_ids)
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
        rows = logp[len(p) - 1:len(p) - 1 + len(c)]
        tokens.append(rows.gather(-1, torch.tensor(c)[:, None])[:, 0])
        stops.append(rows[:, stop_id])
    return torch.cat(tokens), torch.cat(stops)


def test_shared_prompt_pass_gives_the_same_logprobs_and_gradients(tiny_model_dir):
    """Each prompt run once for its group, and each sample with its own copy of the prompt,
    give the log-probs and gradients of the plain way (the LM head at every position, a
    full log-softmax)."""
    from posttrain.config import ModelConfig
    model = load_base_model(ModelConfig(name=str(tiny_model_dir), precision="fp32"),
                                     torch.device("cpu"))
    params = [p.requires_grad_() for p in model.parameters()]
    records = [Example(tuple(p), tuple(c)) for p, c in (
        ([5, 6, 7, 8, 9], [1, 2, 3]), ([5, 6, 7, 8, 9], [4]),
        ([10, 11], [7, 7, 7, 7, 1]), ([10, 11], [2, 3]))]
    groups = [[0, 1], [2, 3]]
    plain, plain_stop = _plain_logprobs(model, records, groups, 1)
    plain_grads = torch.autograd.grad(plain.sum(), params)
    for share in (True, False):
        lp = policy_logprobs(model, records, groups, 0, torch.device("cpu"),
                                      share).tokens
        torch.testing.assert_close(lp.detach(), plain.detach(), rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(lp.sum(), params), plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        lp_t, lp_s = policy_logprobs(model, records, groups, 0, torch.device("cpu"),
                                              share, stop_id=1)
        torch.testing.assert_close(lp_t.detach(), lp.detach())
        torch.testing.assert_close(lp_s.detach(), plain_stop.detach(), rtol=1e-5, atol=1e-5)


def test_grouped_logprobs_equal_the_interleaved_logits_exactly(tiny_model_dir):
    """The shared-prompt path reduces each part (first tokens, the rest) to log-probs before
    putting them in order: bit for bit what the interleaved (N, V) logits give."""
    from posttrain import objectives as O
    from posttrain.config import ModelConfig
    model = load_base_model(ModelConfig(name=str(tiny_model_dir), precision="fp32"),
                                     torch.device("cpu"))
    records = [Example(tuple(p), tuple(c)) for p, c in (
        ([5, 6, 7, 8, 9], [1, 2, 3]), ([5, 6, 7, 8, 9], [4]),
        ([10, 11], [7, 7, 7, 7, 1]), ([10, 11], [2, 3]))]
    groups = [[0, 1], [2, 3]]
    logits = grouped_completion_logits(
        model, [records[g[0]].prompt_ids for g in groups],
        [[records[i].completion_ids for i in g] for g in groups], 0, torch.device("cpu"))
    targets = torch.tensor([t for g in groups for i in g for t in records[i].completion_ids])
    got = policy_logprobs(model, records, groups, 0, torch.device("cpu"), True)
    assert torch.equal(got.tokens, O.gather_logprobs(logits, targets)) and got.stop is None
    got = policy_logprobs(model, records, groups, 0, torch.device("cpu"), True,
                                   stop_id=1)
    want = O.target_and_stop_logprobs(logits, targets, 1)
    assert torch.equal(got.tokens, want[0]) and torch.equal(got.stop, want[1])


def test_length_chunks_split_by_length_at_the_least_padding():
    from posttrain.model.forward import length_chunks
    lengths = [5, 90, 6, 88, 7, 91, 4, 5]
    chunks = length_chunks(lengths, call_cost=20)
    assert sorted(i for c in chunks for i in c) == list(range(8))
    assert [sorted(lengths[i] for i in c) for c in chunks] == [[88, 90, 91], [4, 5, 5, 6, 7]]
    assert length_chunks(lengths, call_cost=10 ** 6) == [[5, 1, 3, 4, 2, 0, 7, 6]]
    assert len(length_chunks(lengths, call_cost=0)) == len(set(lengths))


def _policy_and_grads(model, records, groups):
    params = [p for p in model.parameters() if p.requires_grad]
    lp = policy_logprobs(model, records, groups, 0, torch.device("cpu"), True,
                                  stop_id=1)
    grads = torch.autograd.grad((lp.tokens + 0.5 * lp.stop).sum(), params)
    return lp.tokens.detach(), lp.stop.detach(), grads


def test_length_chunked_and_gqa_passes_give_the_plain_numbers(tiny_model_dir, monkeypatch):
    """Completions in passes of similar length (length_chunks; here no cost per pass, so a
    pass per length) and grouped-query heads handed to SDPA whole (model.gqa_attention)
    give the one-pass (a huge cost per pass), repeated-heads log-probs and gradients (fp32:
    to float rounding)."""
    from posttrain.config import ModelConfig
    from posttrain.model import forward
    records = [Example(tuple(p), tuple(c)) for p, c in (
        ([5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9]), ([5, 6, 7, 8, 9], [4]),
        ([5, 6, 7, 8, 9], [3, 3, 3, 3, 3, 3, 3, 3]), ([10, 11], [7, 7, 1]),
        ([10, 11], [2, 3, 4, 5, 6, 7, 8, 9, 9, 9]), ([10, 11], [2]))]
    groups = [[0, 1, 2], [3, 4, 5]]
    out = {}
    for gqa in (True, False):
        model = load_base_model(ModelConfig(name=str(tiny_model_dir), precision="fp32",
                                                     gqa_attention=gqa), torch.device("cpu"))
        assert (model.config._attn_implementation == "posttrain_sdpa_gqa") == gqa
        for p in model.parameters():
            p.requires_grad_()
        for chunked in (True, False):
            monkeypatch.setattr(forward, "CALL_COST", 0 if chunked else 10 ** 9)
            out[gqa, chunked] = _policy_and_grads(model, records, groups)
    want = out[False, False]
    for key, got in out.items():
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gqa_attention_output_is_sdpa_bit_for_bit(tiny_model_dir):
    """The grouped-query call gives transformers' sdpa attention output exactly, with
    left padding, in a prompt pass and in a pass against its cache."""
    from posttrain.config import ModelConfig
    model = load_base_model(ModelConfig(name=str(tiny_model_dir), precision="fp32"),
                                     torch.device("cpu"))
    ids, mask = _left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    outs = {}
    for impl in ("posttrain_sdpa_gqa", "sdpa"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            more = model(input_ids=torch.tensor([[3, 4], [5, 6]]),
                         attention_mask=torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1),
                         cache=out.cache, use_cache=True)
        outs[impl] = (out.logits, more.logits)
    assert all(torch.equal(a, b) for a, b in zip(outs["sdpa"], outs["posttrain_sdpa_gqa"]))


def _left_pad(prompts):
    from posttrain.model.forward import left_pad
    return left_pad(prompts, 0, torch.device("cpu"))


def test_fp32_cached_attention_under_bf16_stays_within_rounding(tiny_model_dir):
    """Under bf16 autocast, completion passes whose attention runs in fp32
    (model.fp32_cached_attention) give the bf16 kernel's log-probs to within bf16 rounding
    (stated tolerance: 0.05 nats per token, mean under 0.01), and both are near fp32."""
    from posttrain.config import ModelConfig
    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16")
    records = [Example(tuple(range(5, 40)), tuple(c)) for c in
               ([1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 5], [3, 3, 3])]
    groups = [[0, 1, 2]]
    got = {}
    for name, kw in (("fp32", dict(precision="fp32")),
                     ("bf16", dict(precision="bf16", fp32_cached_attention=False)),
                     ("mixed", dict(precision="bf16"))):
        cfg = ModelConfig(name=str(tiny_model_dir), **kw)
        model = load_base_model(cfg, torch.device("cpu"))
        with torch.no_grad(), autocast(torch.device("cpu"),
                                                compute_dtype(cfg, torch.device("cpu"))):
            got[name] = policy_logprobs(model, records, groups, 0,
                                                 torch.device("cpu"), True).tokens
    for name in ("bf16", "mixed"):
        diff = (got[name] - got["fp32"]).abs()
        assert diff.max() < 0.05 and diff.mean() < 0.01, name
    assert not torch.equal(got["mixed"], got["bf16"])           # the switch does act


def _no_prompt_grad_reference(model, records, groups, params):
    """The log-probs (sum + 0.5 * EOS's) and their gradient with no gradient through the
    prompt's keys and values, the plain way: each sample alone, its prompt + completion in
    one pass, the k and v projections' outputs detached at the prompt's positions but its
    last. (Equal to the no-grad prompt pass for a model with nothing trained between the k
    and v projections and the cache, as here; a k-norm would need its own detach.)"""
    import torch.nn.functional as F
    cut = {}

    def hook(module, args, out):
        n = cut["n"]
        return torch.cat([out[:, :n].detach(), out[:, n:]], 1)
    handles = [m.register_forward_hook(hook) for name, m in model.named_modules()
               if name.endswith(("k_proj", "v_proj"))]
    lps, stops = [], []
    try:
        for i in (i for g in groups for i in g):
            p, c = list(records[i].prompt_ids), list(records[i].completion_ids)
            cut["n"] = len(p) - 1
            logits = model(input_ids=torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:]
            logp = F.log_softmax(logits.float(), -1)
            lps.append(logp.gather(1, torch.tensor(c)[:, None])[:, 0])
            stops.append(logp[:, 1])
    finally:
        for h in handles:
            h.remove()
    lp, stop = torch.cat(lps), torch.cat(stops)
    total = (lp + 0.5 * stop).sum()
    return lp.detach(), stop.detach(), torch.autograd.grad(total, params)


@pytest.mark.parametrize("chunked", [True, False])
def test_no_prompt_grad_gives_the_same_logprobs_and_the_completion_only_gradient(
        tiny_model_dir, chunked, monkeypatch):
    """rl.prompt_grad=false: the same log-probs (fp32: to rounding) and the gradient that
    flows through the completion positions alone, which the plain per-sample pass with the
    prompt's keys and values detached gives; and not the full gradient. A batch of 1-token
    prompts (nothing to cache) too."""
    from posttrain.config import ModelConfig
    from posttrain.model import forward
    monkeypatch.setattr(forward, "CALL_COST", 0 if chunked else 10 ** 9)  # per length, or one
    passes = []
    real = forward._completion_pass
    monkeypatch.setattr(forward, "_completion_pass",
                        lambda *a, **k: passes.append(a[2]) or real(*a, **k))
    model = load_base_model(ModelConfig(name=str(tiny_model_dir), precision="fp32"),
                                     torch.device("cpu"))
    params = [p.requires_grad_() for p in model.parameters()]
    records = [Example(tuple(p), tuple(c)) for p, c in (
        ([5, 6, 7, 8, 9], [1, 2, 3]), ([5, 6, 7, 8, 9], [4]),
        ([10, 11], [7, 7, 7, 7, 1]), ([10, 11], [2, 3]),
        ([12], [3, 4, 5]), ([12], [6]))]
    for groups in ([[0, 1], [2, 3], [4, 5]], [[4, 5]]):
        passes.clear()
        lp = policy_logprobs(model, records, groups, 0, torch.device("cpu"), True,
                                      stop_id=1, prompt_grad=False)
        assert len(passes) == (len({len(records[i].completion_ids) for g in groups for i in g})
                               if chunked else 1)
        grads = torch.autograd.grad((lp.tokens + 0.5 * lp.stop).sum(), params)
        want_lp, want_stop, want = _no_prompt_grad_reference(model, records, groups, params)
        torch.testing.assert_close(lp.tokens.detach(), want_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp.stop.detach(), want_stop, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        full = _policy_and_grads(model, records, groups)
        torch.testing.assert_close(full[0], want_lp, rtol=1e-5, atol=1e-5)
        if len(groups) > 1:   # prompts longer than one token: a different gradient
            assert max((a - b).abs().max().item() for a, b in zip(grads, full[2])) > 1e-3
        else:                 # nothing before the last prompt token: the same gradient
            for a, b in zip(grads, full[2]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shared prompt"):
        policy_logprobs(model, records, [[0, 1]], 0, torch.device("cpu"), False,
                                 prompt_grad=False)

