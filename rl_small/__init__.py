"""rl-small: RL post-training (GRPO + LoRA) for small language models.

Importing this package is cheap: torch, transformers and vLLM are imported by the modules that need them.
Entry points: ``rl-small train`` (``rl_small.cli``) and ``python -m rl_small.train --recipe R``.
"""

__version__ = "0.1.0"
