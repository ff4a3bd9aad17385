import math

import pytest
import torch

from posttrain import rewards
from posttrain.config import ConfigError, RewardConfig, load_config

SET = torch.tensor([100.0, 140.0, 180.0])   # mean 140, std sqrt(1600*2/3)


def test_zscore_is_one_minus_abs_z_and_peaks_at_the_mean():
    std = math.sqrt(3200 / 3)
    r = rewards.compute([140.0, 100.0, 180.0 + std], SET, RewardConfig())
    torch.testing.assert_close(r, torch.tensor([1.0, 1 - 40 / std, 1 - (40 + std) / std]))
    # centred on a target instead of the set's mean
    r = rewards.compute([120.0], SET, RewardConfig(target=120.0))
    assert r.item() == pytest.approx(1.0)


def test_log_zscore_is_symmetric_in_ratio():
    r = rewards.compute([70.0, 280.0], torch.tensor([70.0, 140.0, 280.0]),
                        RewardConfig(name="log_zscore", target=math.sqrt(71 * 281) - 1))
    assert r[0].item() == pytest.approx(r[1].item(), abs=1e-6)   # half and double: same reward


def test_target_length_reward():
    cfg = RewardConfig(name="target_length", target=120.0, width=60.0)
    r = rewards.compute([120.0, 90.0, 180.0, 240.0], SET, cfg)
    torch.testing.assert_close(r, torch.tensor([1.0, 0.5, 0.0, -1.0]))
    assert rewards.compute(
        [120.0 + 40.0], SET, RewardConfig(name="target_length", target=120.0)
    ).item() == pytest.approx(
        1 - 40 / math.sqrt(3200 / 3), rel=1e-5
    )  # width defaults to the set's std
    with pytest.raises(ConfigError, match="reward.target"):
        load_config(None, ("reward.name=target_length",))


def test_per_sample_targets_centre_each_reward():
    cfg = RewardConfig(name="target_length", width=50.0)
    r = rewards.compute([80, 140, 260], [100, 200], cfg, targets=[80, 100, 200])
    assert r.tolist() == pytest.approx([1.0, 1 - 40 / 50, 1 - 60 / 50])
    z = rewards.compute([80, 140], [100, 200], RewardConfig(name="zscore"), targets=[80, 200])
    assert z.tolist() == pytest.approx([1.0, 1 - 60 / 50])   # set std 50


# hand-made completions: (text, truncated at the token limit, abrupt?)
ENDINGS = [("I lost my keys.", False, False), ("I lost my keys and then", False, True),
           ("so yeah...", False, True), ("so yeah\u2026", False, True),
           ("All done.", True, True), ("", False, True), ('He said "fine."', False, False),
           ("she said no!", False, False), ("(long story)", False, False)]


def test_the_ending_rule_penalises_abrupt_completions_in_place_of_their_length_reward():
    lengths = [140.0] * len(ENDINGS)            # all at the set's mean: length reward 1
    abrupt = [rewards.is_abrupt(t, cut) for t, cut, _ in ENDINGS]
    assert abrupt == [a for _, _, a in ENDINGS]
    r = rewards.compute(lengths, SET, RewardConfig(ending=-1.0), abrupt=abrupt)
    assert r.tolist() == [-1.0 if a else 1.0 for a in abrupt]
    # off (the reference recipe's default): the length alone, whatever the ending
    assert rewards.compute(lengths, SET, RewardConfig(), abrupt=abrupt).tolist() == [1.0] * len(
        ENDINGS
    )
    # a clean ending keeps its length reward, however far from the centre
    far = rewards.compute([40.0, 40.0], SET, RewardConfig(ending=-0.5), abrupt=[False, True])
    assert far.tolist() == pytest.approx([1 - 100 / math.sqrt(3200 / 3), -0.5])


def test_the_ending_key_is_checked_and_off_by_default_in_the_seed_configs():
    assert RewardConfig().ending is None
    assert load_config("tldr-llama-3.2-1b", ()).reward.ending is None
    assert load_config(None, ("reward.ending=-1",)).reward.ending == -1.0
    with pytest.raises(ConfigError, match="reward.ending"):
        load_config(None, ("reward.ending=abc",))
