import logging

import pytest

from azstoragetorch._client._redaction import install_log_filter, redact

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
