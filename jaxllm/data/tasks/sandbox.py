"""A restricted evaluator for model-written arithmetic programs (P-CoT rewards, ReFT arXiv 2401.08967).

The paper's code `exec`s the generated `solution()` under a timeout; here a program is never
executed as Python. It is parsed with `ast` and interpreted node by node over a whitelist:
assignments `name = expr` of numbers, names, + − × ÷ // % (and ** with a small exponent), unary
±, and nothing else — no calls, attributes, subscripts, imports, loops, comprehensions, lambdas or
strings. Size (characters, nodes, statements), number magnitude and wall time are bounded, so any
program finishes quickly. The answer is the value of `answer_name` (default `ans`) after the
last statement. Anything outside the rules gives `None`, which the reward turns into 0.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import operator
import time


class SandboxError(ValueError):
    """The program broke a rule of the sandbox (the message names the rule)."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    max_chars: int = 2000
    max_nodes: int = 400
    max_statements: int = 32
    max_magnitude: float = 1e12
    max_exponent: int = 8
    max_seconds: float = 0.1
    answer_name: str = "ans"


def _check(value, limits: SandboxLimits):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SandboxError(f"only numbers are allowed, got {type(value).__name__}")
    if not math.isfinite(value) or abs(value) > limits.max_magnitude:
        raise SandboxError(f"number {value!r} exceeds the magnitude bound {limits.max_magnitude:g}")
    return value


def _eval(node, env: dict, limits: SandboxLimits, deadline: float):
    if time.monotonic() > deadline:
        raise SandboxError("time limit exceeded")
    if isinstance(node, ast.Constant):
        return _check(node.value, limits)
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise SandboxError(f"undefined name {node.id!r}")
        return env[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand, env, limits, deadline)), limits)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left = _eval(node.left, env, limits, deadline)
        right = _eval(node.right, env, limits, deadline)
        if isinstance(node.op, ast.Pow) and (abs(right) > limits.max_exponent or abs(left) > limits.max_magnitude ** 0.25):
            raise SandboxError(f"power {left!r} ** {right!r} is out of bounds")
        try:
            return _check(_BINOPS[type(node.op)](left, right), limits)
        except (ZeroDivisionError, OverflowError) as e:
            raise SandboxError(str(e)) from None
    raise SandboxError(f"{type(node).__name__} is not allowed")


def evaluate(program: str, limits: SandboxLimits = SandboxLimits()) -> float:
    """Value of `limits.answer_name` after running `program` (cut at its first blank line) in the
    sandbox; SandboxError for anything the rules refuse."""
    program = program.split("\n\n")[0]
    if len(program) > limits.max_chars:
        raise SandboxError(f"program has {len(program)} characters, more than {limits.max_chars}")
    try:
        tree = ast.parse(program, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise SandboxError(f"does not parse: {e}") from None
    n_nodes = sum(1 for _ in ast.walk(tree))
    if n_nodes > limits.max_nodes:
        raise SandboxError(f"program has {n_nodes} syntax nodes, more than {limits.max_nodes}")
    if len(tree.body) > limits.max_statements:
        raise SandboxError(f"program has {len(tree.body)} statements, more than {limits.max_statements}")
    env: dict[str, float] = {}
    deadline = time.monotonic() + limits.max_seconds
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise SandboxError(f"only `name = expression` statements are allowed, got {type(stmt).__name__}")
        env[stmt.targets[0].id] = _eval(stmt.value, env, limits, deadline)
    if limits.answer_name not in env:
        raise SandboxError(f"the program never assigns {limits.answer_name!r}")
    return float(env[limits.answer_name])


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> float | None:
    """The program's answer, or None when the sandbox refuses or the program fails."""
    try:
        return evaluate(program, limits)
    except SandboxError:
        return None
