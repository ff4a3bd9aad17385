"""The sampler: draws follow the distribution, and the merged sampling copy is the same
policy as the adapters it merges (and leaves the trained model as it was)."""
import pytest
import torch

from posttrain.model.adapters import load_policy, sampler, sft_only
from posttrain.rollout import hf as sampling


def test_draw_follows_the_probabilities_and_skips_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sampling._draw(probs, g)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[0] == 0 and freq[2] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    # seeded: the same generator state gives the same draws
    assert torch.equal(sampling._draw(probs[:50], torch.Generator().manual_seed(3)),
                       sampling._draw(probs[:50], torch.Generator().manual_seed(3)))


@pytest.fixture
def two_adapter_policy(tiny_cfg):
    from posttrain import sft
    cfg = tiny_cfg("sft.max_steps=1", "data.max_train_rows=4")
    sft.run(cfg)
    model = load_policy(cfg, torch.device("cpu"), cfg.run_dir / "sft" / "adapter",
                                 rl="new", with_base=True).eval()   # the SFT adapter kept
    with torch.no_grad():  # give the RL adapter a visible effect
        for name, p in model.named_parameters():
            if ".rl." in name and "lora_B" in name:
                p.normal_(0, 0.05)
    return cfg, model


def test_merged_copy_is_the_same_policy(two_adapter_policy):
    cfg, model = two_adapter_policy
    x = torch.tensor([[5, 9, 30, 41, 7, 100]])
    cpu = torch.device("cpu")
    with torch.no_grad():
        want = {"rl": model(input_ids=x).logits}
        with sft_only(model):
            want["sft"] = model(input_ids=x).logits
        with model.disable_adapter():
            want["base"] = model(input_ids=x).logits
        assert (want["rl"] - want["sft"]).abs().max() > 1e-3
        assert (want["sft"] - want["base"]).abs().max() > 1e-3
        got = {}
        with sampler(model, cfg.model, cpu, torch.float32) as m:
            got["rl"] = m(input_ids=x).logits
        with sft_only(model), sampler(model, cfg.model, cpu, torch.float32) as m:
            got["sft"] = m(input_ids=x).logits
        with model.disable_adapter(), sampler(model, cfg.model, cpu, torch.float32) as m:
            got["base"] = m(input_ids=x).logits
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
        # the trained model is untouched: still two adapters, same outputs
        torch.testing.assert_close(model(input_ids=x).logits, want["rl"])
    assert any(".rl." in n for n, _ in model.named_parameters())
