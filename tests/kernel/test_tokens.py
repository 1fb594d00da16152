"""Sealed tokens open only as issued: every other spelling of one is refused."""

from __future__ import annotations

import string

from prefd_server.kernel.tokens import TokenKey

ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def test_a_sealed_token_opens_to_its_payload_and_no_other_key_opens_it() -> None:
    key = TokenKey.derive("inst-a", "secret")
    token = key.seal("c2.inst-a.12.3")
    assert key.open(token) == "c2.inst-a.12.3"
    assert TokenKey.derive("inst-a", "another secret").open(token) is None


def test_every_one_character_respelling_of_a_token_is_refused() -> None:
    key = TokenKey.derive("inst-a", "secret")
    # Payload lengths covering each count of unused trailing bits in base64 (0, 2 and 4).
    for payload in ("c2.i.1.0", "c2.i.12.0", "c2.i.123.0"):
        token = key.seal(payload)
        for at, char in enumerate(token):
            if char == ".":
                continue
            for other in ALPHABET:
                if other != char:
                    respelled = token[:at] + other + token[at + 1 :]
                    assert key.open(respelled) is None, (payload, at, other)
