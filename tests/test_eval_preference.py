"""Preference evaluation (evaluation/preference.py) against hand computations on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.evaluation.preference import (
    PairScores,
    PreferencePair,
    Reference,
    completion_logps,
    score_pairs,
    sequence_rewards,
    summarize,
)

BETA = 0.25


def _hand_logp(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt), one token at a time: log-softmax of the logits summed by hand, no batching."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    total = 0.0
    for k, token in enumerate(completion):
        row = logits[len(prompt) + k - 1]
        total += float(row[token] - torch.logsumexp(row, dim=0))
    return total


def _pairs() -> list[PreferencePair]:
    # different lengths, so batches pad; no id is the pad id (0 is not used below)
    return [PreferencePair([5, 17, 42, 9], [101, 102, 103], [201, 202], "a:1"),
            PreferencePair([5, 8], [301, 302, 303, 304, 305], [401], "a:2"),
            PreferencePair([5, 17, 42, 9, 77, 78, 79], [501], [601, 602, 603], "a:3")]


@pytest.fixture()
def causal(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _lora(model, seed: int, name: str = "default"):
    """A LoRA whose B is not zero (init_lora_weights=False), so the adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                          adapter_name=name)


def test_completion_logps_matches_a_hand_computation_whatever_the_batching(causal):
    rows = [(p.prompt_ids, ids) for p in _pairs() for ids in (p.chosen_ids, p.rejected_ids)]
    for batch_size in (1, 2, 6):
        got = completion_logps(causal, rows, pad_token_id=0, batch_size=batch_size)
        for (prompt, completion), (logp, n) in zip(rows, got):
            assert n == len(completion)
            assert logp == pytest.approx(_hand_logp(causal, prompt, completion), abs=1e-4)


def test_implicit_reward_is_beta_times_policy_minus_adapter_disabled_base(tiny_llama, causal):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()  # an independent copy
    policy = _lora(causal, seed=1)
    pairs = _pairs()
    scores = score_pairs(policy, pairs, 0, reference=Reference("adapter_disabled"), batch_size=2)
    per_pair = [s.scores(BETA) for s in scores]
    for pair, s in zip(pairs, per_pair):
        chosen = BETA * (_hand_logp(policy, pair.prompt_ids, pair.chosen_ids)
                         - _hand_logp(base, pair.prompt_ids, pair.chosen_ids))
        rejected = BETA * (_hand_logp(policy, pair.prompt_ids, pair.rejected_ids)
                           - _hand_logp(base, pair.prompt_ids, pair.rejected_ids))
        assert s["reward_chosen"] == pytest.approx(chosen, abs=1e-4)
        assert s["reward_rejected"] == pytest.approx(rejected, abs=1e-4)
        assert s["reward_margin"] == pytest.approx(chosen - rejected, abs=1e-4)
        assert abs(chosen) > 1e-3  # the adapter does change the model, so the check above is not 0 == 0
        mean_c = _hand_logp(policy, pair.prompt_ids, pair.chosen_ids) / len(pair.chosen_ids)
        mean_r = _hand_logp(policy, pair.prompt_ids, pair.rejected_ids) / len(pair.rejected_ids)
        assert s["logp_margin"] == pytest.approx(mean_c - mean_r, abs=1e-4)
    assert policy.active_adapter == "default"  # the adapter is back on after the reference pass
    summary = summarize(per_pair)
    expected = sum(1.0 if s["reward_margin"] > 0 else 0.0 for s in per_pair) / 3
    assert summary["reward_accuracy"] == pytest.approx(expected)
    assert summary["reward_margin"] == pytest.approx(sum(s["reward_margin"] for s in per_pair) / 3)


def test_init_from_reference_is_the_starting_adapter_not_the_bare_base(tiny_llama, causal, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = _lora(causal, seed=2)
    start.save_pretrained(tmp_path / "sft")
    sft_copy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                         tmp_path / "sft").eval()
    torch.manual_seed(3)
    for name, p in start.named_parameters():  # "DPO" moves the adapter on from where SFT left it
        if "lora_" in name:
            p.data += 0.05 * torch.randn_like(p)
    pair = _pairs()[0]
    ref = Reference("init_adapter", adapter=tmp_path / "sft")
    s = score_pairs(start, [pair], 0, reference=ref)[0].scores(BETA)
    expected = BETA * (_hand_logp(start, pair.prompt_ids, pair.chosen_ids)
                       - _hand_logp(sft_copy, pair.prompt_ids, pair.chosen_ids))
    assert s["reward_chosen"] == pytest.approx(expected, abs=1e-4)
    assert start.active_adapter == "default"


def test_a_model_without_reference_has_zero_implicit_reward_and_ties(causal):
    scores = score_pairs(causal, _pairs(), 0, reference=Reference("none"))
    summary = summarize([s.scores(BETA) for s in scores])
    assert summary["reward_margin"] == 0.0 and summary["reward_accuracy"] == 0.5
    assert "logp_accuracy" in summary  # the reference-free preference is still defined


def test_reward_model_scores_match_the_value_head_on_the_last_token(tiny_llama):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32).eval()
    rm.config.pad_token_id = 0
    rows = [p.prompt_ids + ids for p in _pairs() for ids in (p.chosen_ids, p.rejected_ids)]
    got = sequence_rewards(rm, rows, pad_token_id=0, batch_size=4)
    for ids, value in zip(rows, got):
        with torch.no_grad():
            hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        assert value == pytest.approx(float(hidden @ rm.score.weight[0].detach()), abs=1e-4)
    scores = score_pairs(None, _pairs(), 0, reward_model=rm)
    first = scores[0].scores(BETA)
    assert first["rm_margin"] == pytest.approx(got[0] - got[1], abs=1e-6)
    assert "logp_margin" not in first and "reward_margin" not in first


def test_accuracy_counts_ties_as_half_and_margins_are_means():
    per_pair = [PairScores(1, 1, -1.0, -2.0).scores(BETA), PairScores(1, 1, -2.0, -2.0).scores(BETA),
                PairScores(2, 1, -6.0, -1.0).scores(BETA)]
    summary = summarize(per_pair)
    assert summary["logp_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert summary["logp_margin"] == pytest.approx((1.0 + 0.0 - 2.0) / 3)
    assert not math.isnan(summary["logp_chosen"])
