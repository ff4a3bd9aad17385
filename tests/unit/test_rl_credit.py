"""Credit on hand-made steps: the step baseline's advantages, and the ending-aware stop
credit (rewards, prefix texts, clean stops)."""
import pytest
import torch

from posttrain.model.load import load_tokenizer
from posttrain.rl import credit
from posttrain.types import Rollout
from conftest import RL_ARGS


@pytest.fixture
def run_cfg(tiny_cfg):
    """The RL tests' config (test_generate_rl.py's run_cfg without its SFT adapter: the
    credit functions read the config alone, never the run folder)."""
    def make(*overrides):
        return tiny_cfg(*RL_ARGS, *overrides)
    return make


def test_step_baseline_compares_each_reward_with_the_whole_step(run_cfg):
    reward = torch.tensor([1.0, 0.0, 0.5, 0.5])
    lengths = torch.tensor([2, 1, 1, 3])
    group = torch.tensor([0, 0, 1, 1])
    adv, _ = credit.step_advantages(reward, lengths, group, run_cfg("rl.advantage=group"))
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))
    # the step's mean is 0.5: the second group, all at 0.5, gets no push either way, the
    # first keeps its spread; a group all above the step's mean is pushed up as a whole
    cfg = run_cfg("rl.advantage=group_stop", "rl.baseline=step")
    adv, _ = credit.step_advantages(torch.tensor([1.0, 0.8, 0.2, 0.0]), lengths, group, cfg)
    torch.testing.assert_close(adv, torch.tensor([0.5, 0.5, 0.3, -0.3, -0.5, -0.5, -0.5]))


def test_ending_aware_stop_credit_counts_only_clean_stops(run_cfg):
    """With reward.ending, an abrupt sample's reward is the penalty, and the stop credit has
    no counterfactual at a position where the prefix would end mid-sentence."""
    cfg = run_cfg("rl.advantage=group_stop", "reward.ending=-1")
    tok = load_tokenizer(cfg.model)
    texts = ["I lost it. Then I ran", "Short. Done."]
    records = []
    for k, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        body = tok.decode(ids[:-1], skip_special_tokens=True)
        records.append(Rollout(group=k, prompt="", prompt_ids=(1,), completion=body,
                               completion_ids=tuple(ids), logprobs=(0.0,) * len(ids),
                               stop_logprobs=(0.0,) * len(ids), ended_with_eos=True,
                               truncated=False, length_chars=len(body.strip()),
                               length_tokens=len(ids) - 1, target=None))
    reward, stop = credit.step_rewards(records, [10.0, 20.0, 30.0], tok, cfg)
    assert reward[0].item() == -1.0 and reward[1].item() != -1.0     # "...Then I ran": abrupt
    prefixes = credit.prefix_texts(records, tok)
    for k, per in enumerate(prefixes):
        expected = [t.rstrip().endswith(".") for t in per]           # clean stops: after a "."
        assert stop.clean[k].tolist() == expected and any(expected)
        assert stop.counted[k].tolist() == expected
        assert len(stop.reward[k]) == len(records[k].completion_ids)
    # without the rule every position may stop, as before
    _, plain = credit.step_rewards(records, [10.0, 20.0, 30.0], tok, run_cfg("rl.advantage=stop"))
    assert all(c.all() for c in plain.counted)
    assert [c.tolist() for c in plain.clean] == [c.tolist() for c in stop.clean]




TEXTS = ["I (23F) told my bf's mom — naïve me — that café 😀😀 was 'fine'... it wasn't!!  Now?",
         "日本語のテキスト, 中文 and an emoji 🧑‍🚀 at the end.",
         "  leading spaces\n\nnew lines\tand tabs .  , ' s n't"]


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_prefix_texts_decoded_incrementally_equal_decoding_every_prefix(which, tiny_cfg):
    """The stop credit's prefix texts (a few tokens per decode) are decode(ids[:t]) for every
    t, through multi-byte characters split over tokens, spaces and the stop token."""
    from posttrain.config import load_config
    model = tiny_cfg().model if which == "tiny" else load_config("demo").model
    tok = load_tokenizer(model)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        r = Rollout(0, "", (), text, tuple(ids), (0.0,) * len(ids), (), True, False,
                    len(text), len(ids))
        assert credit.prefix_texts([r], tok) == [
            [tok.decode(ids[:t], skip_special_tokens=True) for t in range(len(ids))]]
