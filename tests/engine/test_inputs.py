"""Input checks that run on the event loop for every request (service/engine/inputs.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.bundle.spec import InputSpec
from service.engine.inputs import to_array
from service.errors import InvalidInputError

IMAGE = InputSpec(shape=[2, 3], value_range=(0.0, 16.0))
FLAT = InputSpec(shape=[2], feature_names=["a", "b"], valid_ranges=[(0.0, 1.0), (-5.0, 5.0)])


@pytest.mark.parametrize(
    "instance",
    [
        [[1, 2, 3], [4, True, 6]],  # nested: the bool sits in an inner list
        [[1, 2, 3], [4, 5, False]],
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], True],
    ],
)
def test_booleans_refused_at_any_depth(instance: list) -> None:
    with pytest.raises(InvalidInputError, match="true/false are not accepted"):
        to_array([[[0, 0, 0], [0, 0, 0]], instance], IMAGE, 10)


def test_numbers_at_any_depth_accepted() -> None:
    arr = to_array([[[1, 2, 3], [4, 5, 6.5]]], IMAGE, 10)
    assert arr.dtype == np.float32 and arr.shape == (1, 2, 3)


def test_ranges_from_the_spec_every_time() -> None:
    assert to_array([[0.5, 4.0]], FLAT, 10).shape == (1, 2)
    for _ in range(2):  # the second call uses the bounds built by the first
        with pytest.raises(InvalidInputError, match=r"feature 'b' = 6 is outside .*\[-5, 5\]"):
            to_array([[0.5, 4.0], [0.5, 6.0]], FLAT, 10)
    other = InputSpec(shape=[2], valid_ranges=[(0.0, 1.0), (-5.0, 7.0)])
    assert to_array([[0.5, 6.0]], other, 10).shape == (1, 2)  # its own bounds, not FLAT's


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_refused_even_with_unbounded_ranges(bad: float) -> None:
    spec = InputSpec(shape=[2], valid_ranges=[(-np.inf, np.inf), (0.0, 1.0)])
    with pytest.raises(InvalidInputError, match="NaN and Infinity are not valid inputs"):
        to_array([[bad, 0.5]], spec, 10)
    for flat_spec in (FLAT, IMAGE):
        x = [[0.5, bad]] if flat_spec is FLAT else [[[0, 0, 0], [0, 0, bad]]]
        with pytest.raises(InvalidInputError, match="NaN and Infinity"):
            to_array(x, flat_spec, 10)


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(shape=[2]),  # no ranges
        InputSpec(shape=[2], valid_ranges=[(-np.inf, np.inf), (0.0, 1.0)]),
        InputSpec(shape=[2], valid_ranges=[(-1e300, 1e300), (0.0, 1.0)]),  # wider than float32
    ],
)
def test_a_value_float32_cannot_hold_is_refused(spec: InputSpec) -> None:
    """1e39 is finite as the float64 it was read as, and infinite as the float32 the model
    computes in: a deterministic answer came back 200 with null probabilities."""
    assert to_array([[3e38, 0.5]], spec, 10)[0, 0] == np.float32(3e38)
    with pytest.raises(InvalidInputError) as e:
        to_array([[0.0, 0.5], [-1e39, 0.5]], spec, 10)
    assert e.value.message == (
        "instance 1, element 0 = -1e+39 is beyond what the model's float32 inputs hold "
        "(magnitude at most 3.40282e+38); check the value and its unit"
    )


def test_a_token_id_int64_cannot_hold_is_refused() -> None:
    spec = InputSpec(shape=[2], dtype="int64")
    with pytest.raises(InvalidInputError, match="instance 0, element 1 = 1e\\+19 is beyond"):
        to_array([[1, 1e19]], spec, 10)


def test_image_models_take_their_feature_names_and_flat_rows() -> None:
    # digits lists px0..px63 as its feature names (its CSVs use them) but refused both forms.
    from pathlib import Path

    from service.bundle.manifest import Manifest

    root = Path(__file__).resolve().parents[2]
    spec = Manifest.model_validate_json(
        (root / "models/digits/1/manifest.json").read_bytes()
    ).inputs
    assert spec.shape == [1, 8, 8] and spec.feature_names == [f"px{k}" for k in range(64)]
    flat = [float(k % 17) for k in range(64)]
    nested = [[flat[r * 8 : r * 8 + 8] for r in range(8)]]  # row-major, as in the CSVs
    want = to_array([nested], spec, 10)
    keyed = dict(zip(spec.feature_names, flat, strict=True))
    np.testing.assert_array_equal(to_array([keyed], spec, 10), want)
    np.testing.assert_array_equal(to_array([flat, flat], spec, 10), np.concatenate([want, want]))
    with pytest.raises(InvalidInputError) as err:
        to_array([flat[:63]], spec, 10)
    assert err.value.message == (
        "instance 0 has shape [63], expected [1, 8, 8] (or a flat list of 64 numbers, row-major "
        "or an object keyed by its feature names)"
    )
    unnamed = InputSpec(shape=[2, 3], value_range=(0.0, 16.0))
    assert to_array([[1, 2, 3, 4, 5, 6]], unnamed, 10).tolist() == [[[1, 2, 3], [4, 5, 6]]]


def test_an_image_sent_as_an_object_gets_a_short_message() -> None:
    """{"b64": ...} to a 3x32x32 model with feature names: 82 kB, every name listed twice, the
    client's own key at character 41,110."""
    names = [f"p{i}" for i in range(3 * 32 * 32)]
    spec = InputSpec(shape=[3, 32, 32], feature_names=names)
    with pytest.raises(InvalidInputError) as e:
        to_array([{"b64": "iVBORw0KGgo="}], spec, 1)
    said = e.value.message
    assert said.startswith("instance 0: unknown ['b64']; missing ['p0', 'p1', 'p2', 'p3', 'p4']")
    assert "and 3067 more feature(s)" in said and len(said) < 300
    assert "the model's 3072 features (GET /v1/models/{name} lists them)" in said
