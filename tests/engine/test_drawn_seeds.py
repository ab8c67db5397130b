"""Seeds drawn for requests without one are exact in JavaScript (the model page rounded 63-bit
ones through JSON.parse, and replaying the rounded seed gave another answer)."""

from __future__ import annotations

from service.engine.params import new_seed


def test_drawn_seeds_are_below_2_to_the_53_and_use_its_range() -> None:
    seeds = [new_seed() for _ in range(10_000)]
    assert all(0 <= s < 2**53 for s in seeds)
    # Uniform on [0, 2**53): each draw is at least 2**52 with probability 1/2, so all 10,000
    # below it has probability 2**-10000. The top bit in use shows the range is not narrower.
    assert max(seeds) >= 2**52
    assert len(set(seeds)) == len(seeds)  # 10,000 of 2**53: a collision has p < 6e-9
