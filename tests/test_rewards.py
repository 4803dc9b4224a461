"""Reward loading: math, zeros, user functions by import path, post-process hooks, and errors."""

import asyncio
import sys
import textwrap

import numpy as np
import pytest

from opd_core.algorithm.rewards import RewardError, load_function, load_reward_fn
from opd_core.config import RewardConfig


def sample(response_text, label="42", prompt="1+41?"):
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "response_text": response_text,
        "label": label,
        "response_ids": list(response_text.encode()),
    }


SAMPLES = [
    sample("Answer: \\boxed{42}"),
    sample("Answer: 41"),
    sample("no idea"),
    sample("Answer: 7", label="7"),
]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A real importable module of user reward functions on sys.path."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def length_reward(samples):
                return [float(len(s["response_ids"])) for s in samples]

            async def async_reward(samples):
                return [0.5 for _ in samples]

            def numpy_reward(samples):
                return np.arange(len(samples), dtype=np.float32)

            def too_few(samples):
                return [1.0] * (len(samples) - 1)

            def not_a_list(samples):
                return 3.0

            def with_nan(samples):
                return [float("nan")] * len(samples)

            def with_text(samples):
                return ["good"] * len(samples)

            def double(samples, rewards):
                return [2 * r for r in rewards]

            def drop_one(samples, rewards):
                return rewards[:-1]

            NOT_CALLABLE = 3
            """
        )
    )
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_math_reward_scores_with_the_verifier():
    assert load_reward_fn(RewardConfig(type="math"))(SAMPLES) == [1.0, 0.0, 0.0, 1.0]


def test_none_reward_is_zero():
    assert load_reward_fn(RewardConfig(type="none"))(SAMPLES) == [0.0, 0.0, 0.0, 0.0]
    assert load_reward_fn(RewardConfig(type="none"))([]) == []


@pytest.mark.parametrize("path", ["my_rewards:length_reward", "my_rewards.length_reward"])
def test_user_function_by_import_path(user_module, path):
    rewards = load_reward_fn(RewardConfig(type=path))(SAMPLES)
    assert rewards == [float(len(s["response_ids"])) for s in SAMPLES]


def test_user_function_from_file_path(user_module):
    fn = load_function(f"{user_module / 'my_rewards.py'}:length_reward")
    assert fn([sample("abc")]) == [3.0]


def test_custom_rm_path_takes_precedence_over_type(user_module):
    reward_fn = load_reward_fn(RewardConfig(type="math", custom_rm_path="my_rewards:length_reward"))
    assert reward_fn([sample("Answer: 42")]) == [10.0]


def test_async_and_numpy_results(user_module):
    assert load_reward_fn(RewardConfig(type="my_rewards:async_reward"))(SAMPLES[:2]) == [0.5, 0.5]
    reward_fn = load_reward_fn(RewardConfig(type="my_rewards:async_reward"))

    async def from_async_code():  # e.g. a notebook cell: an event loop is already running
        return reward_fn(SAMPLES[:3])

    assert asyncio.run(from_async_code()) == [0.5, 0.5, 0.5]
    assert load_reward_fn(RewardConfig(type="my_rewards:numpy_reward"))(SAMPLES[:3]) == [
        0.0,
        1.0,
        2.0,
    ]


def test_post_process_hook(user_module):
    reward_fn = load_reward_fn(
        RewardConfig(type="math", custom_reward_post_process_path="my_rewards:double")
    )
    assert reward_fn(SAMPLES) == [2.0, 0.0, 0.0, 2.0]


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("broken_rewards:fn", "ModuleNotFoundError"),
        ("my_rewards:missing", "has no attribute 'missing'"),
        ("my_rewards:NOT_CALLABLE", "not a function"),
        ("/no/such/file.py:fn", "no such file"),
        ("maths", "expected 'math', 'none'"),
    ],
)
def test_bad_import_path_names_the_path(user_module, path, message):
    with pytest.raises(RewardError) as err:
        load_reward_fn(RewardConfig(type=path))
    assert message in str(err.value)
    if path != "maths":
        assert repr(path) in str(err.value)


def test_bad_post_process_path_is_named(user_module):
    with pytest.raises(RewardError, match="custom_reward_post_process_path 'my_rewards:nope'"):
        load_reward_fn(RewardConfig(type="none", custom_reward_post_process_path="my_rewards:nope"))


@pytest.mark.parametrize(
    "path, message",
    [
        ("my_rewards:too_few", "returned 3 rewards for 4 samples"),
        ("my_rewards:not_a_list", "returned a float"),
        ("my_rewards:with_nan", "reward 0 is nan, not finite"),
        ("my_rewards:with_text", "reward 0 is 'good', not a number"),
    ],
)
def test_wrong_rewards_are_rejected(user_module, path, message):
    reward_fn = load_reward_fn(RewardConfig(type=path))
    with pytest.raises(RewardError, match=message) as err:
        reward_fn(SAMPLES)
    assert path in str(err.value)


def test_post_process_returning_wrong_count_is_rejected(user_module):
    reward_fn = load_reward_fn(
        RewardConfig(type="math", custom_reward_post_process_path="my_rewards:drop_one")
    )
    with pytest.raises(RewardError, match="'my_rewards:drop_one' returned 3 rewards for 4 samples"):
        reward_fn(SAMPLES)


def test_rewards_are_plain_floats():
    rewards = load_reward_fn(RewardConfig(type="math"))(SAMPLES)
    assert all(type(r) is float for r in rewards)
    assert np.asarray(rewards).dtype == np.float64
