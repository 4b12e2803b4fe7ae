"""Next-token choice (edge_agent/runtime/sampling.py): bias and penalties as OpenAI defines them."""

from __future__ import annotations

from collections import Counter

import numpy as np

from edge_agent.runtime.sampling import SamplingConfig, adjusted, choose_token

RNG = np.random.default_rng(0)
LOGITS = np.array([3.0, 2.0, 1.0, 0.0], dtype=np.float32)


def test_greedy_takes_the_largest_logit() -> None:
    assert choose_token(LOGITS, SamplingConfig(temperature=0.0), RNG) == 0


def test_logit_bias_is_added_before_the_choice() -> None:
    cfg = SamplingConfig(temperature=0.0, logit_bias=((3, 100.0),))
    assert choose_token(LOGITS, cfg, RNG) == 3
    assert adjusted(LOGITS, cfg, {})[3] == 100.0
    banned = SamplingConfig(temperature=1.0, logit_bias=((0, -100.0), (1, -100.0), (2, -100.0)))
    assert {choose_token(LOGITS, banned, np.random.default_rng(i)) for i in range(50)} == {3}


def test_penalties_follow_openais_formula() -> None:
    cfg = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25)
    out = adjusted(LOGITS, cfg, Counter({0: 4, 2: 1}))
    # logits[j] -= frequency * count[j] + presence * (count[j] > 0)
    assert out.tolist() == [3.0 - 0.25 * 4 - 0.5, 2.0, 1.0 - 0.25 - 0.5, 0.0]
    assert LOGITS.tolist() == [3.0, 2.0, 1.0, 0.0]  # the model's row is left alone


def test_a_repeated_token_loses_to_the_next_under_a_frequency_penalty() -> None:
    cfg = SamplingConfig(temperature=0.0, frequency_penalty=2.0)
    assert choose_token(LOGITS, cfg, RNG, Counter({0: 1})) == 1
    assert choose_token(LOGITS, cfg, RNG, Counter()) == 0


def test_no_adjustment_keeps_the_fast_path() -> None:
    assert not SamplingConfig().adjusts
    assert SamplingConfig(presence_penalty=0.1).adjusts and SamplingConfig(logit_bias=((1, 1.0),)).adjusts


def test_any_positive_temperature_samples_without_nan() -> None:
    """The schema takes any temperature above 0: one as small as a subnormal float is all but
    greedy (it made the probabilities NaN, a 500), and a large one all but uniform."""
    for tiny in (1e-310, 5e-324, 1e-30):
        for top_k in (0, 2):
            cfg = SamplingConfig(temperature=tiny, top_k=top_k, top_p=0.9)
            assert {choose_token(LOGITS, cfg, np.random.default_rng(i)) for i in range(20)} == {0}
    tied = np.array([1.0, 5.0, 5.0, -2.0], dtype=np.float32)
    picked = {
        choose_token(tied, SamplingConfig(temperature=1e-310), np.random.default_rng(i)) for i in range(40)
    }
    assert picked == {1, 2}
    hot = Counter(
        choose_token(LOGITS, SamplingConfig(temperature=1e300), np.random.default_rng(i)) for i in range(400)
    )
    assert set(hot) == {0, 1, 2, 3}
