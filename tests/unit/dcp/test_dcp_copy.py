"""How BlobStorageReader copies a loaded item into its target tensor: one memory copy on the calling
thread where both layouts are plain, ``Tensor.copy_`` (with its conversions) everywhere else."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from azstoragetorch.integrations.dcp._in_memory import _copy_on_this_thread

CASES: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]] = {
    # target, source
    "contiguous": (lambda: torch.zeros(64, 8), lambda: torch.randn(64, 8)),
    "rows of a larger tensor (offset, still contiguous)": (
        lambda: torch.zeros(100, 8)[10:74],
        lambda: torch.randn(64, 8),
    ),
    "columns of a larger tensor (not contiguous)": (lambda: torch.zeros(64, 16)[:, 4:12], lambda: torch.randn(64, 8)),
    "non-contiguous source": (lambda: torch.zeros(64, 8), lambda: torch.randn(8, 64).t()),
    "another dtype": (lambda: torch.zeros(64, 8, dtype=torch.float64), lambda: torch.randn(64, 8)),
    "conjugate view": (
        lambda: torch.zeros(16, dtype=torch.complex64),
        lambda: torch.randn(16, dtype=torch.complex64).conj(),
    ),
    "empty": (lambda: torch.zeros(0, 8), lambda: torch.zeros(0, 8)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_target_gets_what_copy_gives(case: str) -> None:
    make_target, make_source = CASES[case]
    torch.manual_seed(0)
    source = make_source()
    expected = make_target()
    expected.copy_(source)
    target = make_target()

    _copy_on_this_thread(target, source)

    assert target.dtype == expected.dtype and torch.equal(target, expected)


def test_only_the_targets_own_bytes_change() -> None:
    base = torch.full((100, 8), 7.0)
    source = torch.randn(64, 8)

    _copy_on_this_thread(base[10:74], source)

    assert torch.equal(base[10:74], source)
    assert torch.all(base[:10] == 7.0) and torch.all(base[74:] == 7.0)
