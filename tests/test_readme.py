"""The README's "Write your own reward" example works exactly as printed."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rl_small.config import load_recipe
from rl_small.trainer import build_rewards

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reward_example(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    text = README.read_text()
    section = text.split("## Write your own reward", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    recipe = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_rewards.py").write_text(code)
    (tmp_path / "recipe.yaml").write_text(recipe)
    monkeypatch.chdir(tmp_path)  # the recipe names the file relative to where the run starts
    cfg = load_recipe(tmp_path / "recipe.yaml")
    assert yaml.safe_load(recipe)["rewards"][1]["max_tokens"] == 48
    combo = build_rewards(cfg)
    totals, per, _ = combo(["\\boxed{4}", "no"], answer=["4", "4"], completion_ids=[[1] * 12, [1] * 48])
    assert per["my_rewards.py:brevity"] == [0.75, 0.0]
    assert totals == [1.0 + 0.2 * 0.75, 0.0]
