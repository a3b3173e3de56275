import logging

import pytest

from azstoragetorch._client._redaction import install_log_filter, redact, redact_url

SECRET = "c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"


@pytest.mark.parametrize(
    "text",
    [
        f"GET /devstoreaccount1/c/b?sv=2021&sp=r&sig={SECRET} HTTP/1.1",
        f"Max retries exceeded with url: /acct/c/b?se=2030&sig={SECRET}&sp=r (Caused by ...)",
        f"url='https://a.blob.core.windows.net/c/b?sig={SECRET}'",
        f"sig={SECRET}",
    ],
)
def test_redact_removes_signatures(text: str) -> None:
    assert SECRET not in redact(text)


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "Could not read https://a.blob.core.windows.net/c/b?snapshot=2024: HTTP 404"
    assert redact(text) == text


def test_urllib3_debug_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    install_log_filter()
    logger = logging.getLogger("urllib3.connectionpool")
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        logger.debug(
            '%s://%s:%s "%s %s %s" %s', "http", "127.0.0.1", 10000, "GET", f"/a/c/b?sig={SECRET}", "HTTP/1.1", 200
        )
    assert caplog.records
    assert all(SECRET not in record.getMessage() for record in caplog.records)


# -- redact_url: what a URL may show in a message --------------------------------------------------------

BASE = "https://acct.blob.core.windows.net/container/dir/model.pt"
# Every field a SAS token (account, service or user delegation) may carry, and then some.
SAS_FIELDS = [
    "sv", "ss", "srt", "sr", "sp", "se", "st", "spr", "sip", "si", "sig", "skoid", "sktid", "skt", "ske", "sks",
    "skv", "saoid", "suoid", "scid", "sdd", "ses", "rscc", "rscd", "rsce", "rscl", "rsct", "code", "token",
]  # fmt: skip


@pytest.mark.parametrize("field", SAS_FIELDS)
def test_redact_url_drops_every_query_parameter(field: str) -> None:
    assert redact_url(f"{BASE}?{field}={SECRET}") == BASE
    assert redact_url(f"{BASE}?snapshot=2024&{field}={SECRET}&sp=r") == BASE


@pytest.mark.parametrize(
    "url",
    [
        f"{BASE}?sv=2021-08-06&sp=r&sig={SECRET}",
        f"{BASE}?SIG={SECRET}",  # any case
        f"{BASE}?Sig={SECRET}&SV=2021",
        f"{BASE}?%73ig={SECRET}",  # the name percent-encoded, as a server decodes it
        f"{BASE}?sig%3D{SECRET}",
        f"{BASE}??sig={SECRET}",
        f"{BASE}?;sig={SECRET}",
        f"{BASE}?sv=1 sig={SECRET}",  # a space in a URL copied into a message
        f"{BASE}?sv=1\nsig={SECRET}",
        f"{BASE}#sig={SECRET}",  # a fragment
        f"{BASE}#frag?sig={SECRET}",
        f"{BASE}?sig={SECRET}#frag",
    ],
)
def test_redact_url_keeps_nothing_after_the_path(url: str) -> None:
    assert redact_url(url) == BASE


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:p%40ss@acct.blob.core.windows.net/c/b", "https://acct.blob.core.windows.net/c/b"),
        ("https://user@acct.blob.core.windows.net/c/b", "https://acct.blob.core.windows.net/c/b"),
        ("https://user:pa@ss@acct.blob.core.windows.net/c/b", "https://acct.blob.core.windows.net/c/b"),
        ("HTTP://user:secret@127.0.0.1:10000/devstoreaccount1/c", "HTTP://127.0.0.1:10000/devstoreaccount1/c"),
        (f"https://user:secret@acct.blob.core.windows.net/c/b?sig={SECRET}", "https://acct.blob.core.windows.net/c/b"),
        ("https://:secret@acct.blob.core.windows.net", "https://acct.blob.core.windows.net"),
    ],
)
def test_redact_url_drops_a_user_name_and_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        BASE,
        "http://127.0.0.1:10000/devstoreaccount1/c/run%201/a%2Bb.pt",  # encoded names stay as written
        "https://acct.blob.core.windows.net/c/user@example.com/model.pt",  # an "@" in the path is a name
        "abfs://container@acct.dfs.core.windows.net/dir/model.pt",  # fsspec's container@account
        "https://acct.blob.core.windows.net/c/%E2%80%8Bzero-width",
    ],
)
def test_redact_url_leaves_urls_without_secrets_alone(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize("pasted", [f"b%3Fsig={SECRET}", f"b%3Fsv=1%26sig%3D{SECRET}", f"b%3FSIG%3D{SECRET}"])
def test_redact_url_masks_a_sas_pasted_percent_encoded_into_the_path(pasted: str) -> None:
    # Not a query string but a blob name ("b?sig=..."): masked all the same, as the token it looks like.
    shown = redact_url(f"https://acct.blob.core.windows.net/c/{pasted}")
    assert SECRET not in shown and shown.startswith("https://acct.blob.core.windows.net/c/b%3F")
