"""Grouped-query attention handed to the SDPA kernel whole (fast.gqa_attention).

transformers' `sdpa` attention repeats every key/value head for the query heads that share
it before calling the kernel, except on CUDA without a mask: on a CPU, with the padding
masks every batch here has, each layer copies the keys and values num_heads/num_kv_heads
times (and the RL step's completion pass runs against a cache already repeated for every
sample), then sums the gradients back. `enable_gqa=True` gives the kernel the grouped heads
as they are: the same attention output, bit for bit (a test checks), without the copies.
Registered under its own name with transformers' attention and mask interfaces, so it is
`sdpa` in everything else (the mask it is given, the kernel it runs).

With `fp32_cached` (model.fp32_cached_attention), under bf16 autocast a pass of a few
queries against a longer cache (RL's completion passes) runs the kernel in fp32 (autocast
would cast the queries and keys, fp32 after the rotary embedding, and the values to bf16):
on the 2-core Xeon the fp32 kernel was 27-35% faster for those shapes (not for a prompt
pass, which stays as autocast runs it), and it rounds less.
"""
from __future__ import annotations

import torch

NAME = "posttrain_sdpa_gqa"
FP32_CACHED = "posttrain_fp32_cached_attention"   # the model config's flag


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa_attention_forward, with grouped heads passed to the kernel as they
    are (enable_gqa). Cases that function treats specially go to it unchanged: no grouping,
    one query (decoding), a position bias, softcapping, or causal without a mask over a
    longer cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_length > 1 and attention_mask is None and causal
    plain = (getattr(module, "num_key_value_groups", 1) == 1 or q_length == 1
             or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
             or kwargs.get("output_attentions", False) or (causal and kv_length != q_length))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    device = query.device.type
    if getattr(module.config, FP32_CACHED, False) and 2 * q_length <= kv_length and \
            torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)      # what autocast's kernel would return
        with torch.autocast(device, enabled=False):
            out = torch.nn.functional.scaled_dot_product_attention(
                query.float(), key.float(), value.float(), attn_mask=attention_mask,
                dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True)
        return out.to(dtype).transpose(1, 2).contiguous(), None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention (and sdpa's mask function under its name); returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_gqa_attention(model, fp32_cached: bool = False) -> bool:
    """Switch a loaded model from `sdpa` to the grouped-query kernel call (with passes
    against a longer cache in fp32 when `fp32_cached`); False (and the model unchanged)
    when it runs another attention or has no grouped heads."""
    config = model.config
    setattr(config, FP32_CACHED, fp32_cached)
    heads, kv = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads",
                                                                   None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not kv or kv == heads:
        return False
    model.set_attn_implementation(register())
    return True
