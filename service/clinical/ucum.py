"""UCUM units: parse a unit code and convert between commensurable units.

The grammar is UCUM's (case-sensitive codes): terms joined by `.` and `/`, a leading `/`,
parentheses, integer factors (`100`), exponents (`m2`, `s-1`), annotations (`{score}`, which
mean 1), metric prefixes on metric atoms. The atoms, prefixes and definitions come from the
official `ucum-essence.xml` (version 2.2, shipped unmodified beside this file under the UCUM
licence; UCUM is (c) Regenstrief Institute), not from a hand-written table: each atom is
reduced to a factor times a product of the seven base units (m, s, g, rad, K, C, cd).

Two deliberate departures from pure UCUM, both stricter:
- `mol` is kept apart from plain numbers (UCUM defines it as 6.02214076e23): mmol/L and 10*9/L
  are not commensurable here. Mass <-> substance conversions need a molar mass (g/mol), given
  per analyte by the clinical mapping.
- Arbitrary units ([IU], [arb'U], ...) are commensurable only with themselves; special units
  (Cel, [degF], [pH], ...: not ratio scales) are refused.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

ESSENCE = Path(__file__).with_name("ucum-essence.xml")
NS = "{http://unitsofmeasure.org/ucum-essence}"
BASE = ("m", "s", "g", "rad", "K", "C", "cd")
MOL = "mol"  # a dimension of its own here (see the module docstring)
MAX_CODE = 120  # characters of a unit code
MAX_DEPTH = 8  # nested parentheses
EXPONENT = re.compile(r"^(.*?)([+-]?\d+)$")


class UnitError(ValueError):
    """A unit code that cannot be parsed or converted; the message says why."""


@dataclass(frozen=True)
class Unit:
    """`factor` x the product of base units raised to `dims` (arbitrary units keyed by code)."""

    factor: float
    dims: tuple[tuple[str, int], ...] = ()

    def times(self, other: Unit, power: int = 1) -> Unit:
        dims = dict(self.dims)
        for k, v in other.dims:
            dims[k] = dims.get(k, 0) + v * power
        kept = tuple(sorted((k, v) for k, v in dims.items() if v))
        return Unit(self.factor * other.factor**power, kept)

    def power(self, n: int) -> Unit:
        return Unit(1.0).times(self, n)


@dataclass(frozen=True)
class Atom:
    code: str
    metric: bool
    special: bool
    arbitrary: bool
    value: float
    definition: str  # a UCUM term in other atoms; "" for base units


@cache
def _table() -> tuple[dict[str, Atom], dict[str, float]]:
    root = ET.parse(ESSENCE).getroot()
    atoms: dict[str, Atom] = {}
    prefixes = {
        p.attrib["Code"]: float(p.find(f"{NS}value").attrib["value"])  # type: ignore[union-attr]
        for p in root.iter(f"{NS}prefix")
    }
    for b in root.iter(f"{NS}base-unit"):
        atoms[b.attrib["Code"]] = Atom(b.attrib["Code"], True, False, False, 1.0, "")
    for u in root.iter(f"{NS}unit"):
        v = u.find(f"{NS}value")
        assert v is not None
        atoms[u.attrib["Code"]] = Atom(
            code=u.attrib["Code"],
            metric=u.attrib.get("isMetric") == "yes",
            special=u.attrib.get("isSpecial") == "yes",
            arbitrary=u.attrib.get("isArbitrary") == "yes",
            value=float(v.attrib.get("value", "1")),
            definition=v.attrib.get("Unit", "1"),
        )
    return atoms, prefixes


@cache
def _atom_unit(code: str) -> Unit:
    atoms, _ = _table()
    atom = atoms[code]
    if atom.special:
        raise UnitError(f"{code!r} is a special unit (not a ratio scale) and is not converted")
    if code in BASE:
        return Unit(1.0, ((code, 1),))
    if code == MOL:  # its number (6.02214076e23) from the table, its dimension its own
        return Unit(Unit(atom.value).times(_Parser(atom.definition).main()).factor, ((MOL, 1),))
    if atom.arbitrary:
        return Unit(1.0, ((code, 1),))
    return Unit(atom.value).times(_Parser(atom.definition).main())


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.depth = 0

    def fail(self, why: str) -> UnitError:
        return UnitError(f"{self.s!r} is not a UCUM unit: {why}")

    def main(self) -> Unit:
        if self.s.startswith("/"):
            self.i = 1
            unit = self.term().power(-1)
        else:
            unit = self.term()
        if self.i != len(self.s):
            raise self.fail(f"unexpected {self.s[self.i]!r} at {self.i}")
        return unit

    def term(self) -> Unit:
        unit = self.component()
        while self.i < len(self.s) and self.s[self.i] in "./":
            op = self.s[self.i]
            self.i += 1
            unit = unit.times(self.component(), 1 if op == "." else -1)
        return unit

    def component(self) -> Unit:
        s = self.s
        if self.i < len(s) and s[self.i] == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail("too deeply nested")
            self.i += 1
            unit = self.term()
            if self.i >= len(s) or s[self.i] != ")":
                raise self.fail("a '(' is not closed")
            self.i += 1
            self.depth -= 1
            self.annotation()
            return unit
        start, bracket = self.i, 0
        while self.i < len(s):
            c = s[self.i]
            if c == "[":
                bracket += 1
            elif c == "]":
                bracket -= 1
            elif bracket == 0 and c in "./(){}":
                break
            self.i += 1
        symbol = s[start : self.i]
        if self.annotation() and not symbol:
            return Unit(1.0)  # an annotation alone means 1
        if not symbol:
            raise self.fail(f"a unit is missing at {start}")
        if symbol.isdigit():
            return Unit(float(symbol))
        return _symbol(symbol, self)

    def annotation(self) -> bool:
        if self.i < len(self.s) and self.s[self.i] == "{":
            end = self.s.find("}", self.i)
            if end < 0:
                raise self.fail("a '{' is not closed")
            self.i = end + 1
            return True
        return False


def _symbol(symbol: str, parser: _Parser) -> Unit:
    """An atom, with an optional metric prefix and an optional integer exponent."""
    found = _resolve(symbol)
    if found is not None:
        return found
    m = EXPONENT.match(symbol)
    if m and m.group(1):
        found = _resolve(m.group(1))
        if found is not None:
            return found.power(int(m.group(2)))
    raise parser.fail(f"unknown unit {symbol!r}")


def _resolve(symbol: str) -> Unit | None:
    atoms, prefixes = _table()
    if symbol in atoms:
        return _atom_unit(symbol)
    for n in (2, 1):  # "da" before "d"
        prefix, rest = symbol[:n], symbol[n:]
        if prefix in prefixes and rest in atoms and atoms[rest].metric:
            return Unit(prefixes[prefix]).times(_atom_unit(rest))
    return None


@lru_cache(maxsize=1024)
def parse(code: str) -> Unit:
    """The unit of a UCUM code, or UnitError saying why it is not one."""
    if not code or len(code) > MAX_CODE or not code.isascii() or " " in code:
        raise UnitError(f"{code[:MAX_CODE]!r} is not a UCUM unit code")
    try:
        unit = _Parser(code).main()
    except (OverflowError, ZeroDivisionError):
        unit = Unit(math.inf)
    if not (math.isfinite(unit.factor) and unit.factor > 0):
        raise UnitError(f"{code!r} is not a usable unit (its magnitude over- or underflows)")
    return unit


def factor(source: str, target: str, molar_mass: float | None = None) -> float:
    """The number that turns a value in `source` into one in `target` (value x factor).

    Mass and substance amounts convert into each other only with `molar_mass` (g/mol).
    """
    src, tgt = parse(source), parse(target)
    if src.dims == tgt.dims:
        return src.factor / tgt.factor
    if molar_mass is not None:
        # Base units count particles (mol = 6.02214076e23): one of them weighs molar_mass / that.
        if src.times(tgt, -1).dims == (("g", -1), (MOL, 1)):  # substance -> mass
            return src.factor * molar_mass / _mol() / tgt.factor
        if tgt.times(src, -1).dims == (("g", -1), (MOL, 1)):  # mass -> substance
            return src.factor * _mol() / molar_mass / tgt.factor
    molar = src.times(tgt, -1).dims in ((("g", -1), (MOL, 1)), (("g", 1), (MOL, -1)))
    hint = " (mass and substance convert only with a molar mass)" if molar else ""
    raise UnitError(f"{source!r} cannot be converted to {target!r}{hint}")


def _mol() -> float:
    return parse("mol").factor
