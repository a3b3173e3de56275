"""Run code against Azurite, Microsoft's local Azure Storage emulator.

Useful for testing training code without an Azure account: :class:`Azurite` starts the emulator's
blob service on a free loopback port, keeps everything in memory, and stops it again::

    from azstoragetorch.testing import Azurite

    with Azurite() as azurite:
        url = azurite.blob_url("my-container", "model.pt")  # create the container first

``Azurite(oauth=True)`` serves HTTPS with a self-signed certificate and accepts bearer tokens,
so code that uses token credentials can be tested too; pair it with :class:`AzuriteTokenCredential`
and trust the certificate through ``REQUESTS_CA_BUNDLE=azurite.ca_bundle``.

The emulator comes from npm (``npm install azurite``). It is looked up in the ``AZURITE_BLOB``
environment variable, then ``tools/azurite/node_modules/.bin/azurite-blob`` in this repository (or
the current directory), then ``azurite-blob`` on ``PATH``.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any

from azure.core.credentials import AccessToken, AzureNamedKeyCredential

__all__ = ["ACCOUNT_KEY", "ACCOUNT_NAME", "Azurite", "AzuriteTokenCredential", "find_azurite_blob"]

# The emulator's fixed, publicly documented development account. Not a secret.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_RELATIVE_BINARY = pathlib.Path("tools", "azurite", "node_modules", ".bin", "azurite-blob")
_STARTUP_TIMEOUT_SECONDS = 60


def find_azurite_blob() -> str:
    """The path of the ``azurite-blob`` executable; ``FileNotFoundError`` says how to install it."""
    explicit = os.environ.get("AZURITE_BLOB")
    if explicit:
        return explicit
    for root in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents, pathlib.Path(__file__).resolve().parents[1]):
        candidate = root / _RELATIVE_BINARY
        if candidate.exists():
            return str(candidate)
    on_path = shutil.which("azurite-blob")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "Could not find the Azurite emulator. Run `make setup` (or `npm ci --prefix tools/azurite`) "
        "in the azstoragetorch repository, `npm install -g azurite`, or set AZURITE_BLOB to the "
        "path of azurite-blob."
    )


# What Azurite prints once it has bound its port.
_LISTENING = "successfully listens on"
_START_ATTEMPTS = 5


class _PortTaken(Exception):
    """The emulator could not bind its port: another process has it."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Azurite:
    """An Azurite blob service on ``127.0.0.1`` for the lifetime of the object (or ``with`` block).

    Args:
        port: The port to listen on; a free one is chosen when ``None``.
        in_memory: Keep blobs in memory (the default) instead of a temporary directory.
        oauth: Serve HTTPS with a self-signed certificate (see :attr:`ca_bundle`) and accept
            bearer tokens such as those of :class:`AzuriteTokenCredential`.
    """

    def __init__(self, port: int | None = None, *, in_memory: bool = True, oauth: bool = False) -> None:
        self._port_chosen = port is None  # a port of our own choosing can be chosen again if taken
        self.port = port or _free_port()
        self._in_memory = in_memory
        self._oauth = oauth
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="azurite-")
        self._log = open(os.path.join(self._workdir.name, "azurite.log"), "wb")  # noqa: SIM115

    @property
    def account_url(self) -> str:
        """The emulator's path-style account URL, ``http://127.0.0.1:<port>/devstoreaccount1``."""
        scheme = "https" if self._oauth else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{ACCOUNT_NAME}"

    @property
    def ca_bundle(self) -> str:
        """(``oauth=True``) The PEM file of the emulator's self-signed certificate, to trust."""
        return os.path.join(self._workdir.name, "cert.pem")

    @property
    def credential(self) -> AzureNamedKeyCredential:
        """An account-key credential for the development account."""
        return AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)

    @property
    def connection_string(self) -> str:
        """A connection string for azure-storage-blob clients (``BlobServiceClient.from_connection_string``)."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.account_url};"
        )

    def container_url(self, container: str) -> str:
        """The URL of ``container`` in the development account."""
        return f"{self.account_url}/{container}"

    def blob_url(self, container: str, blob: str) -> str:
        """The URL of ``blob`` in ``container``; ``blob`` may contain ``/``."""
        return f"{self.account_url}/{container}/{blob}"

    def start(self) -> Azurite:
        """Start the emulator and wait until it answers; returns ``self``."""
        for attempt in range(_START_ATTEMPTS):
            self._process = subprocess.Popen(
                self._command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            try:
                self._wait_until_ready()
                return self
            except _PortTaken:
                # Between choosing a free port and the emulator binding it, another process (another
                # test session's emulator, say) took it. Only a port we chose may be changed.
                if not self._port_chosen or attempt == _START_ATTEMPTS - 1:
                    self.stop()
                    raise RuntimeError(f"Port {self.port} is in use; Azurite could not listen on it.") from None
                self.port = _free_port()
        raise AssertionError("unreachable")

    def _command(self) -> list[str]:
        command = [
            find_azurite_blob(),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--loose",
            "--skipApiVersionCheck",
            "--disableProductStyleUrl",
            # Without this Azurite ignores SIGTERM (and tries to send telemetry off the machine).
            "--disableTelemetry",
        ]  # fmt: skip
        if self._oauth:
            key_path = os.path.join(self._workdir.name, "key.pem")
            if not os.path.exists(key_path):
                _write_self_signed_certificate(self.ca_bundle, key_path)
            command += ["--oauth", "basic", "--cert", self.ca_bundle, "--key", key_path]
        command += ["--inMemoryPersistence"] if self._in_memory else ["--location", self._workdir.name]
        return command

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
        log_start = self._log.tell()  # this attempt's part of the log
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                text = self.log_text()[log_start:]
                if "EADDRINUSE" in text:
                    raise _PortTaken()
                raise RuntimeError(f"Azurite exited during start-up with code {self._process.returncode}:\n{text}")
            # An answer on the port proves nothing until this process says it listens there: the
            # port may have been taken by another server after it was found free.
            if _LISTENING not in self.log_text()[log_start:]:
                time.sleep(0.05)
                continue
            try:
                context = ssl.create_default_context(cafile=self.ca_bundle) if self._oauth else None
                urllib.request.urlopen(f"{self.account_url}?comp=list", timeout=2, context=context)
            except urllib.error.HTTPError:
                return  # any HTTP answer (403 without credentials) means it is serving
            except OSError:
                time.sleep(0.1)
            else:
                return
        self.stop()
        raise TimeoutError(f"Azurite did not answer on port {self.port} within {_STARTUP_TIMEOUT_SECONDS} s.")

    def log_text(self) -> str:
        """Everything the emulator has printed so far, for diagnosing start-up failures."""
        self._log.flush()
        return pathlib.Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        """Stop the emulator and delete its files. Blobs kept in memory are gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                # Azurite waits for idle keep-alive connections before exiting; nothing of
                # value is lost by not waiting long for them.
                self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._log.close()
        self._workdir.cleanup()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class AzuriteTokenCredential:
    """A token credential whose tokens Azurite (started with ``oauth=True``) accepts.

    The tokens are unsigned JSON Web Tokens with the claims Azurite checks (issuer, audience and
    lifetime); real Azure would reject them.
    """

    def __init__(self) -> None:
        self.requested_scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.requested_scopes.append(scopes)
        now = int(time.time())
        claims = {
            "aud": "https://storage.azure.com",
            "iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
            "iat": now,
            "nbf": now - 60,
            "exp": now + 3600,
            "oid": "00000000-0000-0000-0000-000000000001",
        }
        token = ".".join(_base64url(part) for part in ({"alg": "none", "typ": "JWT"}, claims)) + ".x"
        return AccessToken(token, now + 3600)


def _base64url(part: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def _write_self_signed_certificate(cert_path: str, key_path: str) -> None:
    # cryptography comes with azure-identity (through msal).
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pathlib.Path(cert_path).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pathlib.Path(key_path).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
