"""BlobStorageReader's narrowing of a stored tensor to the part a load asked for (torch's public
``Tensor.narrow`` in place of its private ``narrow_tensor_by_index``)."""

from __future__ import annotations

import torch

from azstoragetorch.integrations.dcp._in_memory import _narrow


def test_each_dimension_is_narrowed_to_its_offset_and_length_as_a_view() -> None:
    stored = torch.arange(6 * 5 * 4).reshape(6, 5, 4)

    part = _narrow(stored, [2, 0, 1], [3, 5, 2])

    assert torch.equal(part, stored[2:5, :, 1:3])
    assert part.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()  # no copy


def test_a_tensor_read_whole_and_a_scalar_are_returned_as_they_are() -> None:
    stored = torch.ones(3, 2)
    scalar = torch.tensor(7.0)

    assert _narrow(stored, [0, 0], [3, 2]) is stored
    assert _narrow(scalar, [], []) is scalar
