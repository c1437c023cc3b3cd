"""Reward functions used by the tests through the dotted-path plugin mechanism."""

from __future__ import annotations

import socket
import time
from typing import Any


def free_port() -> int:
    """A TCP port free now, for a launcher's rendezvous (--main_process_port, --master_port): a fixed port may
    be held by another run on the machine or still be in TIME_WAIT from the previous launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_reward(completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """A dense, tie-free signal for a random model: differs for (almost) any two different completions."""
    return [(sum(ids) % 97) / 97 - 1.0 / (1 + len(ids)) for ids in completion_ids]


def hang(completions: list[str], **kwargs: Any) -> list[float]:
    time.sleep(60)
    return [0.0] * len(completions)


def open_r1_style_accuracy(completions, solution, **kwargs):  # noqa: ANN001, ANN201
    """Shaped like open-r1's accuracy_reward: chat-message completions and a ``solution`` column."""
    contents = [completion[0]["content"] for completion in completions]
    return [float(c.strip().endswith(f"\\boxed{{{s}}}")) for c, s in zip(contents, solution)]


def trl_reward_len(completions, **kwargs):  # noqa: ANN001, ANN201
    """TRL's documented standard-format example: prefer completions close to 20 characters."""
    return [-abs(20 - len(completion)) for completion in completions]


def easy_domain_reward(completions, domain, **kwargs):  # noqa: ANN001, ANN201
    """1 for every completion of an 'easy'-domain prompt, 0 otherwise (drives the domain weights)."""
    return [float(d == "easy") for d in domain]


class RunningSumReward:
    """A reward with per-process state (like an episodic memory): the scores depend on the token ids this
    instance has scored before, so a rank resumed with another rank's state scores differently."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        mult = 1 + self.total % 7
        self.total += sum(sum(ids) for ids in completion_ids)
        return [(sum(ids) * mult % 97) / 97 for ids in completion_ids]

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = state["total"]


class ThreadWorld:
    """``size`` simulated data-parallel processes as threads, with rl_small.distributed.World's interface:
    ``sum`` adds the processes' tensors in rank order and ``gather`` concatenates their lists, as gloo would."""

    def __init__(self, rank: int, size: int, shared: dict[str, Any]) -> None:
        self.rank, self.size, self.shared = rank, size, shared

    @staticmethod
    def group(size: int) -> list[ThreadWorld]:
        import threading

        shared = {"barrier": threading.Barrier(size, timeout=30), "slots": [None] * size}
        return [ThreadWorld(r, size, shared) for r in range(size)]

    def _exchange(self, value: Any) -> list[Any]:
        self.shared["slots"][self.rank] = value
        self.shared["barrier"].wait()
        out = list(self.shared["slots"])
        self.shared["barrier"].wait()  # nobody overwrites a slot before everyone has read it
        return out

    def sum(self, values: Any) -> Any:
        parts = self._exchange(values)
        total = parts[0].clone()
        for p in parts[1:]:
            total = total + p
        return total

    def gather(self, objects: list[Any]) -> list[Any]:
        return [o for part in self._exchange(list(objects)) for o in part]

    @staticmethod
    def run(worlds: list[ThreadWorld], fn: Any) -> list[Any]:
        """``fn(world)`` on every simulated process at once; their results in rank order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(worlds)) as ex:
            return [f.result() for f in [ex.submit(fn, w) for w in worlds]]


def half_clipped_loss(logp, old_logp, sampler_logp, advantages, mask, cfg):
    """A policy-loss plug-in (``algo.policy_loss: tests.helpers:half_clipped_loss``): half the clipped
    surrogate, and a metric of its own (1 on every token: its token mean is 1)."""
    from rl_small.losses import clipped_loss

    loss, metrics = clipped_loss(logp, old_logp, sampler_logp, advantages, mask, cfg)
    return 0.5 * loss, {**metrics, "loss/plugin_tokens": mask.new_ones(mask.shape)}


def loss_with_wrong_signature(logp, advantages):
    return logp * advantages, {}
