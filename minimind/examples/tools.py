"""Example tools for `minimind agent --tools` (the verb's default): a calculator and a unit converter.

Copy this file to write your own: every public function defined here is a tool; its schema comes from the
signature (annotations give the JSON types, parameters without a default are required) and the first docstring
line. A `TOOLS = [...]` list, when present, names the tools instead (functions, or
`{"function": f, "schema": {...}}` dicts with an explicit schema). Tools run in a separate process with a
timeout; whatever they return is sent back to the model as JSON text, and an exception is reported to it as an
error.
"""

from __future__ import annotations

import ast
import operator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Unit -> (dimension, factor to the dimension's base unit); temperatures are converted separately.
_UNITS = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mile": ("length", 1609.344), "miles": ("length", 1609.344), "ft": ("length", 0.3048),
    "feet": ("length", 0.3048), "inch": ("length", 0.0254),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "pounds": ("mass", 0.45359237),
    "l": ("volume", 1.0), "ml": ("volume", 0.001), "gallon": ("volume", 3.785411784),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
}
_TEMPERATURES = {"c", "f", "k", "celsius", "fahrenheit", "kelvin"}


def _number(value: float) -> int | float:
    """An integral float as an int (12.0 -> 12), else rounded to 6 decimals: the form a reference answer has."""
    value = round(value, 6)
    return int(value) if float(value).is_integer() else value


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def calculator(expression: str) -> dict:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses) and return its value."""
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").replace("−", "-")
    if len(text) > 200:
        raise ValueError("expression longer than 200 characters")
    # Parsed, never eval'd: only numbers and arithmetic operators are accepted.
    return {"result": _number(_evaluate(ast.parse(text, mode="eval")))}


def _celsius(value: float, unit: str) -> float:
    return {"c": value, "f": (value - 32) / 1.8, "k": value - 273.15}[unit[0]]


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict:
    """Convert a value between units of length, mass, volume, time or temperature (e.g. km to miles)."""
    source, target = from_unit.strip().lower(), to_unit.strip().lower()
    if source in _TEMPERATURES and target in _TEMPERATURES:
        celsius = _celsius(value, source)
        result = {"c": celsius, "f": celsius * 1.8 + 32, "k": celsius + 273.15}[target[0]]
        return {"result": _number(result), "unit": to_unit}
    if source not in _UNITS or target not in _UNITS:
        raise ValueError(f"unknown unit {source if source not in _UNITS else target!r}")
    (dimension, factor), (other, to_factor) = _UNITS[source], _UNITS[target]
    if dimension != other:
        raise ValueError(f"cannot convert {dimension} to {other}")
    return {"result": _number(value * factor / to_factor), "unit": to_unit}
