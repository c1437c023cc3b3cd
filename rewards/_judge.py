"""Judging tests outside the sandbox: the candidate computes values, the trainer decides pass or fail.

A test that is one ``assert`` statement (every MBPP ``test_list`` entry, most of HumanEval's) is split into
*holes*, the maximal sub-expressions that need the candidate's namespace (``candidate(3)``,
``sorted(f(x), key=lambda t: t[1])``), and a *template* the trainer evaluates with a small interpreter
(constants, containers, arithmetic, comparisons, ``and``/``or``/``not``, subscripts and a few pure builtins
such as ``set``, ``sorted``, ``abs``, ``len``, ``math.isclose``). Only the holes' sources go into the sandbox;
the sandbox returns each hole's value in a tagged encoding of plain builtin types, and the trainer rebuilds the
values and evaluates the template. The expected values never enter the candidate's process, so whatever the
candidate does to the harness there (``gc.get_objects()`` and rewriting the job, walking frames, forging the
report) it can only choose the values it returns, which a function written to return them could do as well.

Not split (run and judged inside the sandbox, as before): tests of several statements (HumanEval's loops and
helper variables), asserts whose holes would carry a comparison (the expected value would leak into the
sandbox) or use a name the dataset's setup code defines.
A value that is not a builtin scalar or container (a ``re.Match``, an object of the candidate's class) comes
back as its truth value only: it passes ``assert f(x)`` / ``assert not f(x)`` as in Python, and equals nothing
but itself, so it fails a comparison its own ``__eq__`` would have passed.
"""

from __future__ import annotations

import ast
import decimal
import fractions
import math
import operator
from dataclasses import dataclass
from typing import Any

SAFE_CALLS: dict[str, Any] = {f.__name__: f for f in (
    abs, round, len, set, frozenset, tuple, list, dict, sorted, min, max, sum, float, int, str, bool, all, any,
    complex, isinstance, bytes,
)}
MATH = {"isclose", "fabs", "sqrt", "floor", "ceil", "pi", "e", "inf", "nan", "isnan", "isinf", "isfinite",
        "log", "log2", "log10", "exp", "trunc", "gcd", "hypot"}  # bounded cost: no factorial, comb, prod
BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
CMPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
        ast.Is: operator.is_, ast.IsNot: operator.is_not}
MAX_SIZE = 1_000_000  # elements / digits an arithmetic result may reach in the trainer
HOLE = "_rl_small_hole_"


@dataclass
class Judged:
    """A test judged in the trainer: its template expression and the hole sources the sandbox evaluates."""

    template: ast.expr
    holes: list[str]


def setup_names(setup: list[str]) -> set[str]:
    """Names the dataset's setup code binds (``METADATA``, helper functions, imports): such a name in a hole
    would let the sandbox compute part of the expected side, so tests that use one stay in the sandbox."""
    names: set[str] = set()
    for src in setup:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names - {"math"}  # ``math.<pure function>`` is evaluated by the trainer with its own math


def _evaluable(node: ast.AST, own: frozenset[str] = frozenset()) -> bool:
    """Whether the trainer can evaluate ``node`` by itself (no hole inside); ``own``: safe names that are the
    candidate's functions in this test."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id in SAFE_CALLS and node.id not in own
    if isinstance(node, ast.Attribute):
        return (isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in MATH
                and "math" not in own)
    return _structural(node, own) and all(_evaluable(c, own) for c in _children(node))


def _structural(node: ast.AST, own: frozenset[str] = frozenset()) -> bool:
    """Nodes the trainer's interpreter evaluates itself once their children are known."""
    if isinstance(node, ast.Call):  # a lambda argument (sorted's key) keeps the whole call in one hole
        return (_evaluable(node.func, own) and not any(isinstance(a, ast.Starred | ast.Lambda) for a in node.args)
                and all(k.arg and not isinstance(k.value, ast.Lambda) for k in node.keywords))
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return not any(isinstance(e, ast.Starred) for e in node.elts)
    if isinstance(node, ast.Dict):
        return None not in node.keys
    if isinstance(node, ast.BinOp):
        return type(node.op) in BINOPS
    return isinstance(node, ast.UnaryOp | ast.BoolOp | ast.Compare | ast.IfExp | ast.Subscript | ast.Slice)


def _children(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Call):
        return [*node.args, *(k.value for k in node.keywords)]
    return [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]


class _Splitter(ast.NodeTransformer):
    def __init__(self, forbidden: set[str], own: frozenset[str]) -> None:
        self.holes: list[str] = []
        self.ok = True
        self.forbidden, self.own = forbidden, own

    def visit(self, node: ast.AST) -> ast.AST:
        if not isinstance(node, ast.expr) or _evaluable(node, self.own):
            return node
        if _structural(node, self.own):
            return self.generic_visit(node)
        inner = list(ast.walk(node))
        if any(isinstance(n, ast.Compare) for n in inner) or any(
                isinstance(n, ast.Name) and n.id in self.forbidden for n in inner):
            self.ok = False
        self.holes.append(ast.unparse(node))
        return ast.copy_location(ast.Name(f"{HOLE}{len(self.holes) - 1}", ast.Load()), node)


def candidate_names(code: str) -> set[str]:
    """Names the candidate's code binds at module level (its functions, classes, variables)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            continue  # what a function binds inside is not the test's namespace
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        if isinstance(node, ast.Import):  # ``import math`` binds the real math: no shadowing
            names.update(a.asname for a in node.names if a.asname)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        if not isinstance(node, ast.Lambda | ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
            todo.extend(ast.iter_child_nodes(node))
    return names


def split_test(src: str, forbidden: set[str], shadowed: set[str] | frozenset[str] = frozenset()) -> Judged | None:
    """The judge-side form of a test, or None when it must run inside the sandbox.

    ``shadowed``: names the candidate's code binds. A safe name (``sum``, ``math``) stays the real builtin in
    the trainer, unless the test names nothing else: then it is the function under test (MBPP's own ``sum``)
    and becomes a hole. Shadowing ``set`` to pull ``set(f(x)) == set([1, 2])`` into the sandbox does not work.
    """
    try:
        body = ast.parse(src).body
    except SyntaxError:
        return None
    if len(body) != 1 or not isinstance(body[0], ast.Assert):
        return None
    used = {n.id for n in ast.walk(body[0].test) if isinstance(n, ast.Name)}
    safe = set(SAFE_CALLS) | {"math"}
    own = frozenset(used & set(shadowed)) if used <= safe else frozenset()
    splitter = _Splitter(forbidden, own)
    template = splitter.visit(body[0].test)
    if not splitter.ok or not isinstance(template, ast.expr):  # no hole (``assert True``): the trainer alone
        return None
    return Judged(template, splitter.holes)


def _pairs(items: list[Any]) -> list[Any]:
    _no_collisions([k for k, _ in items])
    return items


class Opaque:
    """A value that is no builtin (a ``re.Match``): only its truth value comes back, and it equals nothing
    but itself, as an object without ``__eq__`` would."""

    def __init__(self, type_name: str, truth: bool) -> None:
        self.type_name, self.truth = type_name, truth

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


class _Missing(Exception):
    """A hole whose value could not be computed or rebuilt (the test fails when the template uses it)."""


def _no_collisions(items: Any) -> Any:
    """``items`` as a list, refused when many share one hash: ints (unlike strings) hash predictably, and a set
    of thousands of colliding values (multiples of 2**61 - 1) would take the trainer minutes to build."""
    items = list(items)
    counts: dict[int, int] = {}
    for x in items:
        h = hash(x)
        counts[h] = counts.get(h, 0) + 1
        if counts[h] > 64:
            raise _Missing("too many equal hashes")
    return items


def _checked(build: Any, pairs: bool = False) -> Any:
    """``set``/``frozenset``/``dict`` for the template's calls, with the collision check on their input."""
    def make(items: Any = (), **kw: Any) -> Any:
        if pairs and isinstance(items, dict):
            items = items.items()
        items = list(items)
        _no_collisions([k for k, _ in items] if pairs else items)
        return build(items, **kw)
    make.__name__ = build.__name__
    _TYPES[make] = build
    return make


def _isinstance(obj: Any, types: Any) -> bool:
    """``isinstance`` that reads the checked constructors as the types they build."""
    types = tuple(_TYPES.get(t, t) for t in types) if isinstance(types, tuple) else _TYPES.get(types, types)
    return isinstance(obj, types)


_TYPES: dict[Any, type] = {}
SAFE_CALLS.update(set=_checked(set), frozenset=_checked(frozenset), dict=_checked(dict, pairs=True),
                  isinstance=_isinstance)


def decode(v: Any, depth: int = 0) -> Any:
    """Rebuild a value from the sandbox's tagged encoding (plain builtins only)."""
    if v is None or isinstance(v, bool):
        return v
    if depth > 100 or not isinstance(v, list) or not v or not isinstance(v[0], str):
        raise _Missing("malformed")
    tag, *a = v
    items = (lambda: [decode(x, depth + 1) for x in a[0]])
    builders = {
        "i": lambda: int(a[0], 16), "f": lambda: float.fromhex(a[0]), "s": lambda: str(a[0]),
        "c": lambda: complex(float.fromhex(a[0]), float.fromhex(a[1])), "y": lambda: bytes.fromhex(a[0]),
        "Y": lambda: bytearray.fromhex(a[0]), "l": items, "t": lambda: tuple(items()),
        "S": lambda: set(_no_collisions(items())), "F": lambda: frozenset(_no_collisions(items())),
        "d": lambda: dict(_pairs(items())),
        "q": lambda: fractions.Fraction(int(a[0], 16), int(a[1], 16)), "D": lambda: decimal.Decimal(a[0]),
        "p": lambda: tuple(items()),  # a [key, value] pair of a dict
    }
    if tag == "?" and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], bool):
        return Opaque(a[0], a[1])
    if tag not in builders:
        raise _Missing(f"{tag}: {a[0] if a else ''}")  # "!" raised in the sandbox, "?" not encodable
    try:
        return builders[tag]()
    except (ValueError, TypeError, IndexError, OverflowError, ArithmeticError) as exc:
        raise _Missing(str(exc)) from exc


def _round(x: Any, ndigits: int | None = None) -> Any:
    if ndigits is not None and abs(int(ndigits)) > 1000:  # round(5, -10**9) computes 10**(10**9)
        raise _Missing("round: ndigits too large")
    return round(x, ndigits)


SAFE_CALLS["round"] = _round


def _binop(op: ast.operator, a: Any, b: Any) -> Any:
    """Arithmetic with the sizes a test's expected side needs, refused beyond MAX_SIZE (no trainer DoS)."""
    if (isinstance(op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and b > 0
            and max(abs(a).bit_length(), 1) * b > 3 * MAX_SIZE):
        raise _Missing("power too large")
    if isinstance(op, ast.Mod) and isinstance(a, str | bytes):  # '%999999999d' % 1: no formatting
        raise _Missing("string formatting")
    if isinstance(op, ast.Mult) and isinstance(a, int | bool) != isinstance(b, int | bool):
        n, seq = (a, b) if isinstance(a, int) else (b, a)
        if isinstance(seq, str | bytes | list | tuple) and n * len(seq) > MAX_SIZE:
            raise _Missing("repetition too large")
    return BINOPS[type(op)](a, b)


def evaluate(node: ast.AST, values: list[Any]) -> Any:
    """Evaluate a template with the rebuilt hole values (``_Missing`` for a hole that has none)."""
    ev = lambda n: evaluate(n, values)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id.startswith(HOLE):
            value = values[int(node.id[len(HOLE):])]
            if isinstance(value, _Missing):
                raise value
            return value
        return SAFE_CALLS[node.id]
    if isinstance(node, ast.Attribute):
        return getattr(math, node.attr)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](ev(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](ev(node.operand))
    if isinstance(node, ast.BinOp):
        return _binop(node.op, ev(node.left), ev(node.right))
    if isinstance(node, ast.BoolOp):
        result = None
        for v in node.values:
            result = ev(v)
            if bool(result) != isinstance(node.op, ast.And):
                return result
        return result
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = ev(right_node)
            if not CMPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return ev(node.body) if ev(node.test) else ev(node.orelse)
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(ev(p) if p is not None else None for p in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Call):
        func = ev(node.func)
        return func(*(ev(a) for a in node.args), **{k.arg: ev(k.value) for k in node.keywords if k.arg})
    raise _Missing(f"unsupported {type(node).__name__}")


def passes(judged: Judged, encoded: Any) -> bool:
    """Whether a split test passes, given what the sandbox returned for its holes."""
    if not isinstance(encoded, list) or len(encoded) != len(judged.holes):
        return False
    values: list[Any] = []
    for v in encoded:
        try:
            values.append(decode(v))
        except (_Missing, RecursionError) as exc:
            values.append(exc if isinstance(exc, _Missing) else _Missing("too deep"))
    try:
        return bool(evaluate(judged.template, values))
    except Exception:  # noqa: BLE001 - any failure of the test's own expression fails the test, as an assert would
        return False
