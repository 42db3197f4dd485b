"""The processed size rounds each side to the nearest multiple of the patch size, ties upwards (half up, not
Python's banker's rounding): the rule the released features were computed with."""

import pytest

from capi_backbones.features.preprocessing import Preprocessor


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((224, 231), (224, 238)),  # 231 / 14 = 16.5: a tie goes up to 17 patches (round() would give 16: 224)
        ((231, 224), (238, 224)),
        ((224, 217), (238, 224)),  # the short side 217 -> 224 scales 217 * 224/217 = 224; 224 * 224/217 = 231.2 -> 238
        ((224, 230), (224, 230 // 14 * 14)),  # 16.43: down
        ((224, 232), (224, 238)),  # 16.57: up
    ],
)
def test_sides_round_half_up_to_the_patch_grid(size, expected):
    assert Preprocessor(image_size=224, patch_size=14).output_size(*size) == expected
