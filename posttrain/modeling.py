"""The policy's public entry points in one place (the README documents
`posttrain.modeling.load_policy`): loading, adapters and the forward passes live in
posttrain/model/; this module names them for users."""
from __future__ import annotations

from posttrain.model.adapters import (RL, SFT, add_lora, load_adapter, load_policy,  # noqa: F401
                                      sampler, save_adapter, sft_only)
from posttrain.model.forward import (completion_logits, grouped_completion_logits,  # noqa: F401
                                     policy_logprobs)
from posttrain.model.load import (EMBEDDED, ModelError, autocast, bf16_supported,  # noqa: F401
                                  cache_root, check_context, check_hub, compute_dtype,
                                  embedded_gguf, embedded_model_dir, load_base_model,
                                  load_tokenizer, resolve_device, resolve_model_path)
