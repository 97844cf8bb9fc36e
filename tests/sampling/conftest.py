"""The sampler's C kernels on each of their loops."""

from collections.abc import Iterator

import pytest

from winnow.kernels.cpu import gumbel_max, row_stats


@pytest.fixture(params=[True, False], ids=["avx512", "avx2"])
def isa(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run the test with the sampler's C kernels (gumbel_max and row_stats) on their AVX-512
    loops, then on their AVX2 loops; back to AVX-512 (where the CPU has it) after."""
    wanted = request.param
    if wanted and not (gumbel_max.use_avx512(True) and row_stats.use_avx512(True)):
        pytest.skip("no AVX-512 on this CPU")
    gumbel_max.use_avx512(wanted)
    row_stats.use_avx512(wanted)
    yield wanted
    gumbel_max.use_avx512(True)
    row_stats.use_avx512(True)
