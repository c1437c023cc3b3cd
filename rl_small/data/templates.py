"""Prompt templates by name; the tokenizer's chat template is applied on top.

    text = render_prompt(tok, "boxed", "What is 2+3?")

``boxed`` is the R1-distill / community prompt; ``deepscaler`` DeepScaleR's; ``short`` asks for the number
only (fast rollouts for tiny models on CPU); ``xml`` is Memory-R's <reasoning>/<answer> format; ``code`` asks for
one fenced Python block (code tasks); ``plain`` is the question alone.
"""

from __future__ import annotations

from typing import Any

TEMPLATES: dict[str, str] = {
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "deepscaler": "{question} Let's think step by step and output the final answer within \\boxed{{}}.",
    "short": "{question}\nGive only the final answer as a number in \\boxed{{}}.",
    "xml": (
        "{question}\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
    ),
    "code": "{question}\nWrite the complete solution in one ```python code block.",
    "plain": "{question}",
}


# Prompt styles of the published evaluations (docs/METHODS.md §7): (template, system prompt).
BOXED_SENTENCE = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES: dict[str, tuple[str, str | None]] = {
    "r1": ("boxed", None),  # DeepSeek-R1-distill: no system prompt, the sentence after the problem
    "qwen_math": ("plain", BOXED_SENTENCE),  # Qwen2.5-Math: the sentence as the system prompt
    "deepscaler": ("deepscaler", None),
    "plain": ("plain", None),
    "code": ("code", None),
}


def render_prompt(tokenizer: Any, template: str, question: str, system_prompt: str | None = None) -> str:
    """Fill ``template`` with ``question`` and apply the tokenizer's chat template (if it has one)."""
    if template not in TEMPLATES:
        raise KeyError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}")
    user = TEMPLATES[template].format(question=question)
    if getattr(tokenizer, "chat_template", None) is None:
        return (system_prompt + "\n\n" if system_prompt else "") + user + "\n"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_messages(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A conversation (TRL conversational format) through the tokenizer's chat template, ready for the reply."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n\n".join(m["content"] for m in messages) + "\n"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
