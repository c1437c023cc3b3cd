"""Memory-R+ episodic-memory intrinsic rewards ("Reasoning Under 1 Billion", arXiv 2504.02273).

    - {name: episodic_memory, weight: 1.0, mode: exploit_explore, k: 1, encoder: minilm}

Mechanics follow the authors' code (thaihungle/Memory-R, rewards/ir_knn_st.py; docs/METHODS.md §5-6):
- Two memories, of **successful** and of **failed** reasoning. A memory is keyed by the embedding of the
  question; each key holds up to ``per_key`` embeddings of reasoning (the text inside <reasoning> tags, else
  the completion without its final answer). Capacity ``capacity`` keys; when full, the oldest key is evicted
  (first in, first out), and a key's oldest reasoning goes first.
- Each completion is inserted into the memory matching its correctness (the batch's shared ``correct`` column,
  ``rewards.graded``; alone, its own math check against ``answer``) *before* the bonuses are computed, as the
  authors do.
- Lookup: the ``k`` nearest question keys (L2 on unit vectors), and every reasoning stored under them.
- Exploitation (success memory): d = ||e - centroid(retrieved)||, min-max normalised over a sliding window of
  the last ``window`` distances, bonus = 1 - d_norm; 0 while nothing is retrieved.
- Exploration (failure memory): novelty = 1 - max cosine(e, retrieved), min-max normalised over its own
  window, times an annealing factor (x ``anneal_rate`` per call; 1.0 = constant); 0 until the failure
  memory holds ``warmup_keys`` question keys.
The reward returns exploit + explore (per ``mode``); the two parts are logged under ``memory/*``. Its state
(memories, windows, annealing) is saved with checkpoints. kNN is a torch matmul over the key matrix, or
FAISS (``knn: faiss``); ``bench/reward_speed.py --only knn`` measures both.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import torch

from rewards.base import register_reward
from rewards.encoders import Encoder, PolicyEncoder, make_encoder
from rewards.graded import correct_or_grade
from rewards.math import ExtractMode, MathGrader

Mode = Literal["exploit", "explore", "exploit_explore"]


def reasoning_text(completion: str) -> str:
    """The reasoning part of a completion: inside <reasoning>/<think> tags if present, else the text before
    the final answer (last \\boxed / <answer>); the whole completion when that is empty."""
    for tag in ("reasoning", "think"):
        start, end = completion.find(f"<{tag}>"), completion.find(f"</{tag}>")
        if 0 <= start < end:
            return completion[start + len(tag) + 2 : end].strip() or completion
    cut = max(completion.rfind("\\boxed"), completion.rfind("<answer>"))
    head = completion[:cut].strip() if cut > 0 else ""
    return head or completion


class KeyedMemory:
    """Question-keyed store of reasoning embeddings: FIFO over keys, FIFO within a key.

    Keys live in a preallocated (grown by doubling) matrix; an evicted key's row is reused, so an insert
    costs O(d), not a copy of the memory.
    """

    def __init__(self, dim: int, capacity: int, per_key: int) -> None:
        self.dim, self.capacity, self.per_key = dim, capacity, per_key
        self.keys = torch.zeros(min(capacity, 1024), dim)
        self.slot_ids: list[str] = []  # question id of each used row
        self.slot_of: dict[str, int] = {}
        self.order: deque[str] = deque()  # question ids, oldest first
        self.values: dict[str, deque[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.order)

    def num_values(self) -> int:
        return sum(len(v) for v in self.values.values())

    def insert(self, qid: str, key: torch.Tensor, value: torch.Tensor) -> None:
        if qid not in self.values:
            if len(self.order) >= self.capacity:  # evict the oldest question key and its reasoning
                old = self.order.popleft()
                slot = self.slot_of.pop(old)
                del self.values[old]
                self.slot_ids[slot] = qid
            else:
                slot = len(self.slot_ids)
                if slot >= len(self.keys):
                    grown = torch.zeros(min(2 * len(self.keys), self.capacity), self.dim)
                    grown[:slot] = self.keys[:slot]
                    self.keys = grown
                self.slot_ids.append(qid)
            self.keys[slot] = key
            self.slot_of[qid] = slot
            self.order.append(qid)
            self.values[qid] = deque(maxlen=self.per_key)
        self.values[qid].append(value)

    def lookup(self, queries: torch.Tensor, k: int, knn: str = "torch") -> list[torch.Tensor]:
        """For each query row, the reasoning embeddings stored under its k nearest keys ((m, d), m may be 0)."""
        if not self.order:
            return [torch.zeros(0, self.dim) for _ in range(len(queries))]
        idx = knn_search(self.keys[: len(self.slot_ids)], queries, min(k, len(self.order)), knn)
        return [torch.stack([v for j in row for v in self.values[self.slot_ids[j]]]) for row in idx.tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys[: len(self.slot_ids)].clone(), "slot_ids": list(self.slot_ids),
                "order": list(self.order), "values": {q: torch.stack(list(v)) for q, v in self.values.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(state["slot_ids"])
        self.keys = torch.zeros(max(n, min(self.capacity, 1024)), self.dim)
        self.keys[:n] = state["keys"]
        self.slot_ids = list(state["slot_ids"])
        self.slot_of = {q: i for i, q in enumerate(self.slot_ids)}
        self.order = deque(state["order"])
        self.values = {q: deque(list(v), maxlen=self.per_key) for q, v in state["values"].items()}


def knn_search(keys: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "torch") -> torch.Tensor:
    """Indices (Q, k) of the k nearest keys by L2 distance (keys (N, d), queries (Q, d))."""
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatL2(keys.shape[1])
        index.add(keys.numpy())
        return torch.from_numpy(index.search(queries.numpy(), k)[1])
    if backend != "torch":
        raise ValueError(f"knn must be 'torch' or 'faiss', got {backend!r}")
    d2 = (queries * queries).sum(1, keepdim=True) - 2 * queries @ keys.T + (keys * keys).sum(1)
    return d2.topk(k, dim=1, largest=False).indices


class _Window:
    """Min-max normalisation over the last ``size`` raw scores (the authors' ``novelty_history``)."""

    def __init__(self, size: int) -> None:
        self.buf: deque[float] = deque(maxlen=size)

    def normalise(self, raw: list[float]) -> list[float] | None:
        """Normalised ``raw`` after adding it to the window; None when the window has no spread yet."""
        self.buf.extend(raw)
        lo, hi = min(self.buf), max(self.buf)
        return None if hi == lo else [(x - lo) / (hi - lo) for x in raw]


@register_reward("episodic_memory")
class EpisodicMemory:
    """Exploitation and/or exploration bonus from kNN readouts of success / failure memories (Memory-R+)."""

    def __init__(
        self, mode: Mode = "exploit_explore", k: int = 1, window: int = 100, warmup_keys: int = 500,
        anneal_rate: float = 1.0, capacity: int = 10_000, per_key: int = 100, encoder: str = "minilm",
        knn: Literal["torch", "faiss"] = "torch", extract: ExtractMode = "auto",
    ) -> None:
        if mode not in ("exploit", "explore", "exploit_explore"):
            raise ValueError(f"episodic_memory: mode must be exploit, explore or exploit_explore, got {mode!r}")
        if knn not in ("torch", "faiss"):
            raise ValueError(f"episodic_memory: knn must be 'torch' or 'faiss', got {knn!r}")
        self.mode, self.k, self.warmup_keys, self.anneal_rate = mode, k, warmup_keys, anneal_rate
        self.capacity, self.per_key, self.knn = capacity, per_key, knn
        self.grader = MathGrader(extract)  # success / failure: the batch's shared ``correct`` column in a run
        self.encoder_name = encoder
        self.encoder: Encoder | None = None if encoder == "policy" else make_encoder(encoder)
        dim = self.encoder.dim if self.encoder is not None else 0
        self.success = KeyedMemory(dim, capacity, per_key)
        self.failure = KeyedMemory(dim, capacity, per_key)
        self.exploit_window, self.explore_window = _Window(window), _Window(window)
        self.anneal = 1.0
        self.last: dict[str, float] = {}

    @property
    def needs_policy(self) -> bool:
        """Whether it cannot run before the trainer's ``bind_policy`` (``encoder: policy``, not bound yet)."""
        return self.encoder is None

    def bind_policy(self, model: Any, tokenizer: Any) -> None:
        """Called by the trainer: with ``encoder: policy`` the frozen base of the policy embeds texts."""
        if self.encoder_name == "policy":
            self.encoder = PolicyEncoder(model, tokenizer)
            if len(self.success) == 0 and len(self.failure) == 0:
                self.success = KeyedMemory(self.encoder.dim, self.capacity, self.per_key)
                self.failure = KeyedMemory(self.encoder.dim, self.capacity, self.per_key)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError("episodic_memory: encoder 'policy' was never bound (the trainer calls bind_policy)")
        return self.encoder(texts)

    def __call__(
        self, completions: list[str], answer: list[Any] | None = None, question: list[str] | None = None,
        prompts: list[str] | None = None, correct: Sequence[bool | None] | None = None, **kwargs: Any,
    ) -> list[float]:
        qs = question or prompts
        if qs is None:
            raise ValueError("episodic_memory needs the 'question' column or 'prompts'")
        self.last = {}
        n = len(completions)
        correct = correct_or_grade(self.grader, completions, correct, answer=answer, question=question)
        uniq = list(dict.fromkeys(qs))
        emb = self._encode([reasoning_text(c) for c in completions] + uniq)
        e, q = emb[:n], emb[n:][[uniq.index(x) for x in qs]]
        # Insert the whole batch, then score it. The authors insert and score one completion at a time; scoring
        # after the batch keeps the completions of a group exchangeable (their order then changes nothing).
        for i, text in enumerate(qs):
            (self.success if correct[i] else self.failure).insert(_qid(text), q[i], e[i])
        exploit = self._exploit(e, q) if self.mode != "explore" else [0.0] * n
        explore = self._explore(e, q) if self.mode != "exploit" else [0.0] * n
        self.last |= {
            "memory/success_keys": float(len(self.success)), "memory/failure_keys": float(len(self.failure)),
            "memory/success_values": float(self.success.num_values()),
            "memory/failure_values": float(self.failure.num_values()),
            "memory/exploit_mean": sum(exploit) / n, "memory/explore_mean": sum(explore) / n,
            "memory/anneal": self.anneal,
        }
        return [a + b for a, b in zip(exploit, explore)]

    def centroids(self, q: torch.Tensor) -> list[torch.Tensor | None]:
        """Per query: the mean of the successful reasoning stored under its k nearest questions (None: none)."""
        return [f.mean(0) if len(f) else None for f in self.success.lookup(q, self.k, self.knn)]

    def exploit_distance(
        self, e: torch.Tensor, q: torch.Tensor, cents: list[torch.Tensor | None] | None = None
    ) -> list[float | None]:
        """Raw exploitation novelty: ||e - centroid of the successes under the k nearest questions|| (the
        reward's own computation; ``cents``: centroids already looked up for ``q``)."""
        cents = self.centroids(q) if cents is None else cents
        return [None if c is None else float((e[i] - c).norm()) for i, c in enumerate(cents)]

    def explore_novelty(self, e: torch.Tensor, q: torch.Tensor) -> list[float | None]:
        """Raw exploration novelty: 1 - max cosine to the failures under the k nearest questions."""
        found = self.failure.lookup(q, self.k, self.knn)
        return [1.0 - float((f @ e[i]).max()) if len(f) else None for i, f in enumerate(found)]

    def _exploit(self, e: torch.Tensor, q: torch.Tensor) -> list[float]:
        cents = self.centroids(q)
        raw = self.exploit_distance(e, q, cents)
        hit = [i for i, d in enumerate(raw) if d is not None]
        out = [0.0] * len(e)  # nothing retrieved: novelty 1 -> bonus 0 (authors)
        if hit:
            dist = [float(raw[i]) for i in hit]  # type: ignore[arg-type]
            self.last["memory/exploit_distance"] = sum(dist) / len(dist)
            sims = [float(torch.nn.functional.cosine_similarity(e[i], cents[i], dim=0)) for i in hit]  # type: ignore[arg-type]
            self.last["memory/exploit_centroid_sim"] = sum(sims) / len(sims)
            norm = self.exploit_window.normalise(dist) or dist  # no spread yet: the raw distance (authors)
            for i, d in zip(hit, norm):
                out[i] = 1.0 - d
        return out

    def _explore(self, e: torch.Tensor, q: torch.Tensor) -> list[float]:
        out = [0.0] * len(e)
        if len(self.failure) < self.warmup_keys:
            return out
        raw = self.explore_novelty(e, q)
        hit = [i for i, v in enumerate(raw) if v is not None]
        if hit:
            nov = [float(raw[i]) for i in hit]  # type: ignore[arg-type]
            self.last["memory/explore_novelty"] = sum(nov) / len(nov)
            self.last["memory/explore_max_sim"] = 1.0 - sum(nov) / len(nov)  # nearest stored failure
            norm = self.explore_window.normalise(nov)
            if norm is not None:  # no spread yet: 0 and no annealing step (authors)
                for j, (i, v) in enumerate(zip(hit, norm)):
                    out[i] = self.anneal * self.anneal_rate**j * v
                self.anneal *= self.anneal_rate ** len(hit)  # the authors anneal once per scored completion
        return out

    def metrics(self) -> dict[str, float]:
        out, self.last = self.last, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"success": self.success.state_dict(), "failure": self.failure.state_dict(), "anneal": self.anneal,
                "exploit_window": list(self.exploit_window.buf), "explore_window": list(self.explore_window.buf)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.success.load_state_dict(state["success"])
        self.failure.load_state_dict(state["failure"])
        self.anneal = state["anneal"]
        self.exploit_window.buf.clear()
        self.explore_window.buf.clear()
        self.exploit_window.buf.extend(state["exploit_window"])
        self.explore_window.buf.extend(state["explore_window"])


def _qid(question: str) -> str:
    return hashlib.sha1(question.encode()).hexdigest()[:16]
