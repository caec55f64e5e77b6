"""The policy codec against golden requests, fed whole and in chunks of 4096, 128, 16, 1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secumail.protocols.policy import (
    PolicyDecoder,
    PolicyProtocolError,
    encode_action,
    encode_request,
)

POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=131.155.210.17\nclient_name=watson.example.org\n"
    b"reverse_client_name=watson.example.org\nhelo_name=watson.example.org\n"
    b"sender=foo@bar.example\nrecipient=bar@foo.example\nrecipient_count=0\nqueue_id=\n"
    b"instance=123.456.7\nsize=12345\netrn_domain=\nstress=\nsasl_method=plain\n"
    b"sasl_username=you\nsasl_sender=\nccert_subject=solaris9.porcupine.org\n"
    b"ccert_issuer=Wietse+20Venema\nccert_fingerprint=C2:9D:F4\nccert_pubkey_fingerprint=68:B3\n"
    b"encryption_protocol=TLSv1/SSLv3\nencryption_cipher=DHE-RSA-AES256-SHA\n"
    b"encryption_keysize=256\nclient_port=1234\npolicy_context=submission\n"
    b"server_address=10.3.2.1\nserver_port=54321\ncompatibility_level=major.minor.patch\n"
    b"mail_version=3.8.0\n\n"
)

GOLDEN = [
    (POSTFIX_REQUEST, 1, {"client_address": "131.155.210.17", "mail_version": "3.8.0"}),
    (POSTFIX_REQUEST * 3, 3, {"sasl_username": "you", "queue_id": ""}),
    (b"request=smtpd_access_policy\r\nsender=\r\n\r\n", 1, {"sender": ""}),
    (b"request=smtpd_access_policy\nhelo_name=a=b\n\n", 1, {"helo_name": "a=b"}),
    (
        "request=smtpd_access_policy\nsender=jos\u00e9@exemple.fr\n\n".encode(),
        1,
        {"sender": "jos\u00e9@exemple.fr"},
    ),
]


def feed_in_chunks(data: bytes, size: int, decoder: PolicyDecoder) -> list[dict[str, str]]:
    requests = []
    for start in range(0, len(data), size):
        requests.extend(decoder.feed(data[start : start + size]))
    return requests


@pytest.mark.parametrize("chunk", [4096, 128, 16, 1])
@pytest.mark.parametrize(("data", "count", "expected"), GOLDEN)
def test_golden_requests_any_chunking(
    data: bytes, count: int, expected: dict[str, str], chunk: int
) -> None:
    decoder = PolicyDecoder()
    requests = feed_in_chunks(data, chunk, decoder)
    assert len(requests) == count
    for request in requests:
        assert request["request"] == "smtpd_access_policy"
        for name, value in expected.items():
            assert request[name] == value
    assert not decoder.pending


def test_half_request_is_pending_until_blank_line() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(b"request=smtpd_access_policy\nsender=a@b") == []
    assert decoder.pending
    assert decoder.feed(b".example\n") == []
    assert decoder.feed(b"\n") == [{"request": "smtpd_access_policy", "sender": "a@b.example"}]


MALFORMED = [
    (b"no equals sign\n", "without '='"),
    (b"request=smtpd_access_policy\nfavourite_colour=blue\n\n", "unknown attribute"),
    (b"Request=smtpd_access_policy\n", "malformed attribute name"),
    (b"=value\n", "malformed attribute name"),
    (b"sender=\xff\xfe\n", "not UTF-8"),
    (b"sender=a\x00b\n", "control character"),
    (b"sender=a\x1bb\n", "control character"),
    (b"\n", "empty request"),
    (b"sender=a\nsender=b\n", "given twice"),
    (b"sender=" + b"x" * 5000 + b"\n", "longer than"),
    (b"sender=" + b"x" * 5000, "longer than"),  # no newline at all: still bounded
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_input_is_refused(data: bytes, message: str) -> None:
    decoder = PolicyDecoder(max_line=2048)
    with pytest.raises(PolicyProtocolError, match=message):
        feed_in_chunks(data, 7, decoder)


def test_too_many_attributes() -> None:
    decoder = PolicyDecoder(max_attributes=8, strict=False)
    data = b"".join(b"x%d=1\n" % i for i in range(9))
    with pytest.raises(PolicyProtocolError, match="more than 8"):
        decoder.feed(data)


def test_lenient_mode_keeps_unknown_attributes() -> None:
    decoder = PolicyDecoder(strict=False)
    assert decoder.feed(b"request=smtpd_access_policy\nnew_in_postfix_4=x\n\n") == [
        {"request": "smtpd_access_policy", "new_in_postfix_4": "x"}
    ]


def test_encode_action_cannot_be_split_by_newlines() -> None:
    assert encode_action("DUNNO") == b"action=DUNNO\n\n"
    assert encode_action("PREPEND X: a\n\nb\r") == b"action=PREPEND X: a  b \n\n"


def test_encode_request_round_trips() -> None:
    attributes = {"request": "smtpd_access_policy", "sender": "", "recipient": "a@b.example"}
    assert PolicyDecoder().feed(encode_request(attributes)) == [attributes]


def requests_in(stream: bytes, chunk: int) -> list[dict[str, str]] | str:
    decoder = PolicyDecoder(max_line=256, max_attributes=16)
    found = []
    try:
        for start in range(0, len(stream), chunk):
            found += decoder.feed(stream[start:start + chunk])
    except PolicyProtocolError:
        return "protocol error"
    assert len(decoder._buffer) <= 256
    return found


@settings(deadline=None)  # 100 examples; 3,000 with HYPOTHESIS_PROFILE=fuzz
@given(st.binary(max_size=600), st.integers(1, 64))
def test_fuzz_any_bytes_decode_the_same_in_any_chunking(stream: bytes, chunk: int) -> None:
    """Requests or a protocol error, never another exception, within the limits, and the
    same outcome whether the bytes come at once or in pieces."""
    whole = requests_in(stream, len(stream) or 1)
    assert requests_in(stream, chunk) == whole
    if whole != "protocol error":
        assert all(request and len(request) <= 16 for request in whole)


def test_carriage_return_inside_a_value_is_refused() -> None:
    with pytest.raises(PolicyProtocolError, match="control character"):
        PolicyDecoder().feed(b"request=smtpd_access_policy\nsender=a\rb@c\n\n")
