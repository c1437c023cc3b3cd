"""PPO's critic: a value head on the policy's own base model, with its own LoRA adapter named "critic".

    critic = Critic(peft_model, lora_spec, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.0)
    values = critic.values(rollouts, pad_id)        # (B, C): V(s_t) before each completion token, with grad
    critic.step(max_grad_norm)                      # clip, AdamW step, zero grad
    state = critic.state_dict(); critic.load_state_dict(state)   # adapter, head, optimizer, scheduler

One frozen base model carries two PEFT adapters: the policy's ("default") and the critic's. ``values`` runs
the bare decoder with "critic" active and always switches back to "default", so generation, the policy
loss and the KL reference (every adapter disabled) never see the critic's weights. PEFT's ``set_adapter``
also freezes the inactive adapter, and a leaf frozen between forward and backward receives no gradient, so
both adapters are kept trainable after every switch: the values can be backpropagated after the switch back,
and the policy's graph survives a critic pass. Policy and critic have their own optimizers (so no
value-loss coefficient is needed to balance them). The head is nn.Linear(hidden, 1), initialised
N(0, 1/(hidden+1)) as in OpenRLHF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from rl_small.logprobs import shared_prefix_forward
from rl_small.types import Rollout

if TYPE_CHECKING:
    from rl_small.config import LoraSpec

ADAPTER = "critic"
POLICY_ADAPTER = "default"


class Critic:
    """The critic adapter + value head of a PEFT model, with its optimizer and LR scheduler."""

    def __init__(
        self,
        model: Any,
        lora: LoraSpec,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        from peft import LoraConfig

        if not hasattr(model, "peft_config"):
            raise ValueError("the PPO critic needs a PEFT (LoRA) policy model: set model.lora")
        if ADAPTER in model.peft_config:
            raise ValueError(f"the model already has an adapter named {ADAPTER!r}")
        self.model = model
        cfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets,
            task_type="CAUSAL_LM",
        )
        model.add_adapter(ADAPTER, cfg)  # inactive until ``values`` switches to it
        model.set_requires_grad([POLICY_ADAPTER, ADAPTER], True)
        hidden = model.get_base_model().config.hidden_size
        # beside the model's weights: on a GPU the hidden states it reads are there (a CPU head crashed there)
        self.head = torch.nn.Linear(hidden, 1, device=next(model.parameters()).device)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 1.0 / (hidden + 1))
            self.head.bias.zero_()
        self.lora_params = {n: p for n, p in model.named_parameters() if f".{ADAPTER}." in n}
        if not self.lora_params:
            raise RuntimeError(f"adding the {ADAPTER!r} adapter created no parameters (targets {lora.targets!r})")
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.scheduler = scheduler(self.optimizer) if scheduler else None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.lora_params.values(), *self.head.parameters()]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the block with the critic adapter on; the policy adapter is restored even on error."""
        self.model.set_adapter(ADAPTER)
        self.model.set_requires_grad([POLICY_ADAPTER, ADAPTER], True)
        try:
            yield
        finally:
            self.model.set_adapter(POLICY_ADAPTER)
            self.model.set_requires_grad([POLICY_ADAPTER, ADAPTER], True)

    def values(self, rollouts: list[Rollout], pad_id: int) -> torch.Tensor:
        """V(s_t) for every completion position (B, C), C = the longest completion; padding positions hold
        values of pad tokens (mask them). Gradients reach the critic adapter and head unless under no_grad."""
        decoder = self.model.get_base_model().base_model  # e.g. LlamaModel: hidden states, no vocab projection
        with self.active():
            hidden, _, _ = shared_prefix_forward(decoder, rollouts, pad_id, hidden=True)
            return self.head(hidden.float()).squeeze(-1)

    def step(self, max_grad_norm: float) -> float:
        """Clip the critic's gradient norm, step its optimizer, zero its gradients; returns the norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return {
            "lora": {n: p.detach().cpu().clone() for n, p in self.lora_params.items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.lora_params) ^ set(state["lora"]))
        if missing:
            raise KeyError(f"critic state does not match the critic adapter, e.g. {missing[:3]}")
        with torch.no_grad():
            for n, t in state["lora"].items():
                self.lora_params[n].copy_(t)
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
