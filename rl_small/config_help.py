"""What the config accepts, from the pydantic models of ``rl_small.config``: the closest key to a typo, and
``rl-small config [section]`` (every field with its type, default and description).

    closest_key(("algo", "kl_coeff"))   # "algo.kl_coef"
    closest_key(("rollout", "kl_coef")) # "algo.kl_coef" (the same name in another section)
    print(describe("algo"))              # algo.clip: tuple[float, float] = [0.2, 0.2]  (eps_low, eps_high); ...
                                         # algo.gamma: float = 1.0  [name: ppo] ppo: GAE discount.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (``LoraSpec | None``, ``list[MixSpec]``, the algo variants)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_of(arg)]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The (first) pydantic model inside an annotation, if any."""
    found = _models_of(annotation)
    return found[0] if found else None


def _root() -> type[BaseModel]:
    from rl_small.config import RunConfig

    return RunConfig


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[str]:
    """Every dotted key the config accepts (sections and leaves), e.g. ``algo``, ``algo.kl_coef``, ``model.lora.r``."""
    model = model or _root()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key
        subs = [m for m in _models_of(field.annotation) if m.model_config.get("extra") == "forbid"]
        yield from dict.fromkeys(k for sub in subs for k in all_keys(sub, key + "."))  # algo: every variant's


def closest_key(loc: tuple[Any, ...]) -> str | None:
    """The known key nearest to an unknown one: a close name in the same section, else the same name in
    another section, else the closest dotted key overall; None when nothing is close."""
    parts = [str(p) for p in loc if not isinstance(p, int)]  # list indices (data.mix.0.x) are not keys
    wrong, prefix = parts[-1], ".".join(parts[:-1])
    keys = list(all_keys())
    siblings = [k.rsplit(".", 1)[-1] for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == prefix]
    near = difflib.get_close_matches(wrong, siblings, n=1, cutoff=0.6)
    if near:
        return f"{prefix}.{near[0]}" if prefix else near[0]
    elsewhere = [k for k in keys if k.rsplit(".", 1)[-1] == wrong]
    if elsewhere:
        return elsewhere[0]
    near = difflib.get_close_matches(".".join(parts), keys, n=1, cutoff=0.75)
    return near[0] if near else None


def format_errors(err: ValidationError, source: str) -> str:
    """A recipe's validation errors, one line each, naming the key, the problem and the value; an unknown key
    gets the closest known one."""
    from rl_small.config_algo import VARIANTS

    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        parts = list(e["loc"])  # without the algo variant tag pydantic inserts: algo.grpo.kl_coef -> algo.kl_coef
        parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "algo" and p in VARIANTS)]
        loc = ".".join(str(p) for p in parts)
        if e["type"] == "extra_forbidden":
            near = closest_key(tuple(parts))
            lines.append(f"  unknown key {loc!r}" + (f"; did you mean {near}?" if near else "") + " (rl-small config)")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a section's check names the key
            lines.append(f"  {loc or 'config'}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    for noise in ("typing.", "rl_small.config.", "NoneType"):
        text = text.replace(noise, "None" if noise == "NoneType" else "")
    return text


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value)


def _variant_lines(variants: list[type[BaseModel]], prefix: str) -> Iterator[str]:
    """A discriminated union (``algo``): ``name`` with every variant, the shared fields, then each variant's
    own fields and its own defaults of shared ones, tagged ``[name: <variant>]``."""
    names = [v.model_fields["name"].default for v in variants]
    yield (f"{prefix}name: {'|'.join(names)} = {json.dumps(names[0])}  Advantage estimator; ppo = GAE with a "
           "learned critic. Each variant brings its paper's defaults; an option tagged [name: X] exists only there.")
    base = variants[0].__mro__[1]
    yield from _lines(base, prefix)
    for variant, vname in zip(variants, names):
        for name, field in variant.model_fields.items():
            shared = base.model_fields.get(name)
            if name != "name" and (shared is None or _default(shared) != _default(field)):
                desc = " ".join((field.description or "").split())
                yield f"{prefix}{name}: {_type_name(field.annotation)} = {_default(field)}  [name: {vname}] {desc}"


def _lines(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        subs = _models_of(field.annotation)
        if len(subs) > 1:
            yield from _variant_lines(subs, key + ".")
            continue
        sub = subs[0] if subs else None
        desc = " ".join((field.description or "").split())
        if sub is not None and sub.model_config.get("extra") == "forbid" and typing.get_origin(field.annotation) \
                is not list:
            if field.description:
                yield f"{key}: {_type_name(field.annotation)} = {_default(field)}  {desc}"
            yield from _lines(sub, key + ".")
            continue
        yield f"{key}: {_type_name(field.annotation)} = {_default(field)}" + (f"  {desc}" if desc else "")
        if sub is not None and sub is not model:  # list items (data.mix[], rewards[]): their own fields
            yield from _lines(sub, f"{key}[].")


def describe(section: str | None = None) -> str:
    """Every field of ``section`` (``algo``, ``model.lora``, ...; None: the whole config), one per line:
    ``key: type = default  description``. An unknown section is a ValueError naming the closest one."""
    model, prefix = _root(), ""
    for part in (section.split(".") if section else []):
        field = model.model_fields.get(part)
        sub = _model_of(field.annotation) if field is not None else None
        if sub is None:
            near = closest_key(tuple(f"{prefix}{part}".split(".")))
            hint = f"; did you mean {near!r}?" if near else ""
            known = ", ".join(k for k, f in model.model_fields.items() if _model_of(f.annotation))
            raise ValueError(f"unknown config section {section!r}{hint} (sections here: {known})")
        listed = typing.get_origin(field.annotation) is list
        variants = _models_of(field.annotation)
        if len(variants) > 1:  # algo: no sub-section inside it
            return "\n".join(_variant_lines(variants, f"{prefix}{part}."))
        model, prefix = sub, f"{prefix}{part}{'[]' if listed else ''}."
    extra = [f"{prefix}<any other key>: a parameter of the reward"] if model.model_config.get("extra") == "allow" else []
    return "\n".join([*_lines(model, prefix), *extra])


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("section", nargs="?", help="model, data, rollout, algo, rewards, optim, train, model.lora, ...")


def run_config(args: argparse.Namespace) -> int:
    """``rl-small config [section]``: print the fields; an unknown section is a one-line error."""
    try:
        sys.stdout.write(describe(args.section) + "\n")
    except ValueError as err:
        sys.stderr.write(f"rl-small config: error: {err}\n")
        return 1
    return 0
