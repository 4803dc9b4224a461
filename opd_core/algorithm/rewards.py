"""Rewards for a batch of rollouts: the math verifier, zero (pure distillation), or a user function.

    reward_fn = load_reward_fn(cfg.reward)
    sample = {"prompt": messages, "response_text": "...", "label": "42", "response_ids": [...]}
    rewards = reward_fn([sample, ...])

`reward.type` picks the function: `math` scores 1.0/0.0 with `opd_core.verifier`, `none` gives
zeros (pure distillation: the OPD penalty is the only signal), anything else is an import path.
`reward.custom_rm_path` (slime's flag) takes precedence over `type` when set. An import path
is `package.module:function`, `package.module.function`, or `path/to/file.py:function`.

A user reward function takes the whole batch, `(samples: list[dict]) -> list[float]` (it may be
`async`); a post-process hook `reward.custom_reward_post_process_path` is called as
`(samples, rewards) -> rewards`, e.g. to shape or rescale rewards by group. The result is
checked: one finite number per sample, or a RewardError that names the function.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from opd_core.config import RewardConfig
from opd_core.verifier import is_correct

__all__ = [
    "RewardError",
    "RewardFn",
    "load_function",
    "load_reward_fn",
    "math_reward",
    "zero_reward",
]


class RewardError(ValueError):
    """A reward function cannot be loaded, or did not return one reward per sample."""


class RewardFn(Protocol):
    def __call__(self, samples: list[dict[str, Any]]) -> list[float]: ...


def math_reward(samples: list[dict[str, Any]]) -> list[float]:
    """1.0 when the response's final answer equals the label (see opd_core.verifier), else 0.0."""
    return [
        1.0 if is_correct(sample.get("response_text"), sample.get("label")) else 0.0
        for sample in samples
    ]


def zero_reward(samples: list[dict[str, Any]]) -> list[float]:
    """Pure distillation: no task reward, the OPD penalty alone trains the student."""
    return [0.0] * len(samples)


def load_function(path: str, what: str = "function") -> Callable:
    """Import `module:function`, `module.function` or `file.py:function`; errors name the path."""
    if ":" in path:
        module_name, _, attr = path.rpartition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RewardError(
            f"{what} {path!r}: not an import path (expected 'package.module:function')"
        )
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise FileNotFoundError(f"no such file {file}")
            spec = importlib.util.spec_from_file_location(f"opd_user_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code, reported with its cause
        raise RewardError(
            f"{what} {path!r}: cannot import {module_name!r}: {type(err).__name__}: {err}"
        ) from err
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise RewardError(
            f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}"
        ) from None
    if not callable(fn):
        raise RewardError(f"{what} {path!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _call(fn: Callable, *args: Any) -> Any:
    result = fn(*args)
    if not inspect.isawaitable(result):
        return result
    # slime-style `async def` reward functions. asyncio.run refuses to start inside a running
    # loop (a notebook, async code calling the trainer), so there the coroutine gets its own
    # loop on a helper thread.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(result))
    with ThreadPoolExecutor(1, thread_name_prefix="opd-reward") as pool:
        return pool.submit(asyncio.run, _await(result)).result()


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _check_rewards(rewards: Any, num_samples: int, name: str) -> list[float]:
    if hasattr(rewards, "tolist"):  # numpy array or torch tensor
        rewards = rewards.tolist()
    if not isinstance(rewards, Sequence) or isinstance(rewards, (str, bytes)):
        raise RewardError(
            f"reward function {name!r} returned a {type(rewards).__name__}, "
            "expected a list of floats"
        )
    if len(rewards) != num_samples:
        raise RewardError(
            f"reward function {name!r} returned {len(rewards)} rewards for {num_samples} samples"
        )
    checked = []
    for index, value in enumerate(rewards):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward function {name!r}: reward {index} is {value!r}, not a number"
            ) from None
        if not math.isfinite(number):
            raise RewardError(f"reward function {name!r}: reward {index} is {number}, not finite")
        checked.append(number)
    return checked


class LoadedReward:
    """The configured reward function, its post-process hook, and the checks on what they return."""

    def __init__(
        self,
        fn: Callable,
        name: str,
        post_process: Callable | None = None,
        post_process_name: str | None = None,
    ):
        self.fn, self.name = fn, name
        self.post_process, self.post_process_name = post_process, post_process_name

    def __call__(self, samples: list[dict[str, Any]]) -> list[float]:
        rewards = _check_rewards(_call(self.fn, samples), len(samples), self.name)
        if self.post_process is not None:
            rewards = _check_rewards(
                _call(self.post_process, samples, rewards), len(samples), self.post_process_name
            )
        return rewards

    def __repr__(self) -> str:
        hook = f", post_process={self.post_process_name!r}" if self.post_process else ""
        return f"LoadedReward({self.name!r}{hook})"


def load_reward_fn(cfg: RewardConfig) -> LoadedReward:
    """The reward function of `cfg` (see the module docstring); import errors surface here."""
    if cfg.custom_rm_path:
        fn, name = load_function(cfg.custom_rm_path, "reward.custom_rm_path"), cfg.custom_rm_path
    elif cfg.type == "math":
        fn, name = math_reward, "math"
    elif cfg.type == "none":
        fn, name = zero_reward, "none"
    elif ":" not in cfg.type and "." not in cfg.type:
        raise RewardError(
            f"reward.type {cfg.type!r}: expected 'math', 'none' or an import path "
            "'package.module:function'"
        )
    else:
        fn, name = load_function(cfg.type, "reward.type"), cfg.type
    post_path = cfg.custom_reward_post_process_path
    post = load_function(post_path, "reward.custom_reward_post_process_path") if post_path else None
    return LoadedReward(fn, name, post, post_path)
