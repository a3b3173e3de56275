"""The Azurite helper (``azstoragetorch.testing.Azurite``) is the emulator it started, never another
server that took its port: two test sessions on one machine each start emulators on free ports, and a
port found free can be taken before the emulator binds it."""

from __future__ import annotations

import pytest
from azure.storage.blob import BlobServiceClient

from azstoragetorch import testing
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite


def _service(emulator: Azurite) -> BlobServiceClient:
    return BlobServiceClient(
        emulator.account_url, credential={"account_name": ACCOUNT_NAME, "account_key": ACCOUNT_KEY}
    )


def test_a_taken_port_given_explicitly_fails_rather_than_borrowing_the_other_server(azurite: Azurite) -> None:
    # Before the fix the other emulator's answer on the port was taken for this one's.
    with pytest.raises(RuntimeError, match=f"Port {azurite.port} is in use"):
        Azurite(port=azurite.port).start()


def test_a_chosen_port_taken_meanwhile_is_chosen_again(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    choices = iter([azurite.port])  # the first "free" port is the other emulator's
    free_port = testing._free_port
    monkeypatch.setattr(testing, "_free_port", lambda: next(choices, None) or free_port())
    with Azurite() as emulator:
        assert emulator.port != azurite.port
        _service(emulator).create_container("only-here")
        names = {container.name for container in _service(azurite).list_containers()}
        assert "only-here" not in names  # the data went to the new emulator, not the other one
