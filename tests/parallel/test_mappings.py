"""The communication functions every parallel mode uses: forward and backward of each pair equal
their definitions on 2 and 4 gloo processes (all-to-all with uneven splits included)."""
import pytest

import cases_mappings


@pytest.mark.parametrize("world", [2, 4])
def test_each_mapping_and_its_backward(pools, world):
    assert all(pools(world).run(cases_mappings.check_all))
