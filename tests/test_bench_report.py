"""What the benchmark's tables print beside a target: a verdict the figure does not contradict."""

from __future__ import annotations

import pytest

from bench.intake import ratio_text


@pytest.mark.parametrize(
    ("value", "target", "printed"),
    [
        (0.49877, 0.50, "0.499"),  # run 23's job ratio, a MISS that two decimals showed as 0.50
        (0.5962, 0.60, "0.596"),
        (0.6001, 0.60, "0.60"),
        (0.5597, 0.60, "0.56"),
        (0.49877, None, "0.50"),  # no target: two decimals
        (0.995, 1.0, "0.99"),  # rounded down by float formatting: already on its side
    ],
)
def test_a_ratio_beside_its_target_is_never_rounded_onto_the_other_side(
    value: float, target: float | None, printed: str
) -> None:
    assert ratio_text(value, target) == printed
