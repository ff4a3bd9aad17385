"""Per-prompt length targets (rollout.prompts.draw_targets): drawn in range, or fixed."""
import pytest

from posttrain.config import ConfigError, load_config
from posttrain.rollout.prompts import draw_targets
from conftest import CUE


def test_targets_drawn_in_range_or_fixed():
    cue = f'data.length_cue="{CUE}"'
    cfg = load_config(None, (cue, "rl.target_range=[80,200]"))
    t = draw_targets(200, cfg, seed=1)
    assert min(t) >= 80 and max(t) <= 200 and len(set(t)) > 5 and all(x % 10 == 0 for x in t)
    assert t == draw_targets(200, cfg, seed=1)
    fixed = load_config(None, (cue, "rl.target_range=[80,200]", "generate.target=123"))
    assert set(draw_targets(5, fixed, 0)) == {120}
    assert draw_targets(3, load_config(), 0) == [None, None, None]
    with pytest.raises(ConfigError, match="must contain"):
        load_config(None, ("data.length_cue=TLDR",))
