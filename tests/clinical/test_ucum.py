"""UCUM units: parsing by the grammar and the official table, conversions checked by hand."""

from __future__ import annotations

import pytest

from service.clinical import ucum

# (from, to, molar mass, factor computed by hand)
CONVERSIONS = [
    ("mg/dl", "mg/dL", None, 1.0),  # l and L are both the litre
    ("g/L", "mg/dL", None, 100.0),  # 1000 mg / 10 dL
    ("mg/(100.mL)", "mg/dL", None, 1.0),  # 100 mL = 1 dL
    ("[lb_av]/[in_i]2", "kg/m2", None, 0.45359237 / 0.0254**2),  # 703.07
    ("kPa", "mm[Hg]", None, 1 / 0.133322),
    ("mmol/L", "mg/dL", 180.16, 18.016),  # glucose: 180.16 mg/mmol, per 10 dL
    ("mg/dL", "mmol/L", 180.16, 1 / 18.016),
    ("umol/L", "mg/dL", 113.12, 0.011312),  # creatinine
    ("10*3/uL", "10*9/L", None, 1.0),
    ("[in_i]", "cm", None, 2.54),
    ("/min", "Hz", None, 1 / 60),
    ("%", "1", None, 0.01),
    ("kg.m/s2", "N", None, 1.0),
    ("mg{total}/dL", "mg/dL", None, 1.0),  # annotations mean nothing to the value
]


@pytest.mark.parametrize(("source", "target", "molar_mass", "want"), CONVERSIONS)
def test_conversions(source: str, target: str, molar_mass: float | None, want: float) -> None:
    assert ucum.factor(source, target, molar_mass) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    ("source", "target", "molar_mass", "reason"),
    [
        ("mg", "mg/dL", None, "cannot be converted"),
        ("mmol/L", "mg/dL", None, "only with a molar mass"),
        ("10*9/L", "mmol/L", 50.0, "cannot be converted"),  # counts are not moles here
        ("Cel", "K", None, "special unit"),
        ("[IU]/L", "mg/dL", None, "cannot be converted"),  # arbitrary units: only themselves
        ("mg/dX", "mg/dL", None, "unknown unit 'dX'"),
        ("kg/m^2", "kg/m2", None, "not a UCUM unit"),
        ("mg/(dL", "mg/dL", None, "not closed"),
        ("Ym99", "1", None, "underflows"),
        ("(" * 20 + "m" + ")" * 20, "m", None, "nested"),
        ("m" * 200, "m", None, "not a UCUM unit code"),
        ("", "m", None, "not a UCUM unit code"),
    ],
)
def test_refusals(source: str, target: str, molar_mass: float | None, reason: str) -> None:
    with pytest.raises(ucum.UnitError, match=reason.replace("(", r"\(")):
        ucum.factor(source, target, molar_mass)


def test_every_unit_of_the_table_reduces_to_base_units() -> None:
    atoms, prefixes = ucum._table()
    assert len(atoms) > 300 and prefixes["k"] == 1e3 and prefixes["da"] == 10.0
    special = []
    for code, atom in atoms.items():
        if atom.special:
            special.append(code)
            continue
        unit = ucum.parse(code)
        assert unit.factor > 0, code
    assert {"Cel", "[degF]", "[pH]"} <= set(special)
    assert ucum.parse("mol").factor == pytest.approx(6.02214076e23)
