"""userkeys (PBKDF2 + Fernet user wrapping, key fingerprints) and SecretBytes."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import pickle

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from app_adapter.errors import CannotUnwrap, InvalidInput
from app_adapter.secret import SecretBytes
from app_adapter.userkeys import (
    DEFAULT_ITERATIONS,
    FINGERPRINT_MESSAGE,
    derive_user_key,
    fingerprint,
    key_id,
    new_salt,
    open_dek_for_user,
    seal_dek_for_user,
)
from tests.kms_fixtures import assert_no_secret, exception_text

CANARY_DEK = bytes.fromhex("ca11ab1e" * 8)
SALT = b"0123456789abcdef"
FAST = 1_000  # the minimum, to keep the tests quick


# -- fingerprints: fixed definitions shared with the SQL side -----------------


def test_fingerprint_vectors() -> None:
    # Computed independently with `openssl dgst -sha256 -mac HMAC -macopt hexkey:...`.
    assert fingerprint(bytes(range(32))).hex() == (
        "a6a3e846cad1e0346da7fa3d8d6b30f38cc7e45cfa015a1b765c7de14712d62a"
    )
    assert key_id(bytes(range(32))) == "a6a3e846cad1e034"
    assert key_id(CANARY_DEK) == "dfaed460999a01b1"
    assert key_id(SecretBytes(CANARY_DEK)) == key_id(CANARY_DEK)
    assert FINGERPRINT_MESSAGE == b"owui-crypto key fingerprint v1"


@given(st.binary(min_size=1, max_size=64))
def test_key_id_is_16_lowercase_hex_of_the_fingerprint(key: bytes) -> None:
    fp = fingerprint(key)
    assert fp == hmac.new(key, b"owui-crypto key fingerprint v1", hashlib.sha256).digest()
    kid = key_id(key)
    assert len(kid) == 16 and kid == kid.lower() and kid == fp[:8].hex()


def test_fingerprint_refuses_non_bytes() -> None:
    with pytest.raises(InvalidInput):
        fingerprint("not bytes")  # type: ignore[arg-type]


# -- PBKDF2 user keys -------------------------------------------------------


def test_derive_user_key_vector_and_form() -> None:
    key = derive_user_key(b"correct horse battery staple", SALT, FAST)
    # hashlib.pbkdf2_hmac, a second implementation, gives the same 32 bytes.
    assert key == b"yqSq2SygY1sB4EcH9f2FG0JTMES-wqLsOT5YmiRBplI="
    assert len(base64.urlsafe_b64decode(key)) == 32
    Fernet(key)  # the form Fernet takes


def test_default_iterations_are_600k() -> None:
    assert DEFAULT_ITERATIONS == 600_000
    expected = hashlib.pbkdf2_hmac("sha256", b"s3cret", SALT, 600_000, 32)
    assert derive_user_key(b"s3cret", SALT) == base64.urlsafe_b64encode(expected)


def test_derive_user_key_depends_on_secret_salt_and_iterations() -> None:
    base = derive_user_key(b"a", SALT, FAST)
    assert derive_user_key(b"b", SALT, FAST) != base
    assert derive_user_key(b"a", SALT[::-1], FAST) != base
    assert derive_user_key(b"a", SALT, FAST + 1) != base


@pytest.mark.parametrize(
    ("secret", "salt", "iterations"),
    [(b"", SALT, FAST), (b"x", b"short", FAST), (b"x", SALT, 999), ("text", SALT, FAST), (b"x", SALT, 1.5e6)],
)
def test_derive_user_key_refuses_weak_or_wrong_inputs(secret: object, salt: bytes, iterations: object) -> None:
    with pytest.raises(InvalidInput):
        derive_user_key(secret, salt, iterations)  # type: ignore[arg-type]


def test_new_salt() -> None:
    a, b = new_salt(), new_salt()
    assert len(a) == 16 and a != b


# -- sealing a DEK for its user --------------------------------------------


def test_seal_open_round_trip() -> None:
    user_key = derive_user_key(b"client cert secret", SALT, FAST)
    token = seal_dek_for_user(CANARY_DEK, user_key)
    assert_no_secret(token.decode(), CANARY_DEK)
    opened = open_dek_for_user(token, user_key)
    assert isinstance(opened, SecretBytes)
    assert opened.reveal() == CANARY_DEK
    assert open_dek_for_user(seal_dek_for_user(opened, user_key), user_key) == opened
    # It is a plain Fernet token: the SQL side (pgcrypto Fernet) can open it too.
    assert Fernet(user_key).decrypt(token) == CANARY_DEK


def test_wrong_user_key_cannot_open() -> None:
    token = seal_dek_for_user(CANARY_DEK, derive_user_key(b"alice", SALT, FAST))
    with pytest.raises(CannotUnwrap) as info:
        open_dek_for_user(token, derive_user_key(b"mallory", SALT, FAST))
    assert info.value.__cause__ is None
    assert_no_secret(exception_text(info.value), CANARY_DEK)


@pytest.mark.parametrize("token", [b"", b"garbage", "garbage"])
def test_malformed_token_cannot_open(token: object) -> None:
    with pytest.raises(CannotUnwrap):
        open_dek_for_user(token, derive_user_key(b"alice", SALT, FAST))  # type: ignore[arg-type]


def test_a_sealed_non_dek_is_refused() -> None:
    user_key = derive_user_key(b"alice", SALT, FAST)
    with pytest.raises(CannotUnwrap, match="16 bytes"):
        open_dek_for_user(Fernet(user_key).encrypt(b"\x00" * 16), user_key)


@pytest.mark.parametrize("dek", [b"", b"\x01" * 31, b"\x01" * 33, "x" * 32])
def test_seal_refuses_anything_but_32_bytes(dek: object) -> None:
    with pytest.raises(InvalidInput):
        seal_dek_for_user(dek, derive_user_key(b"alice", SALT, FAST))  # type: ignore[arg-type]


@pytest.mark.parametrize("user_key", [b"", b"short", CANARY_DEK, base64.b64encode(b"\xff" * 31)])
def test_malformed_user_key_is_refused_without_echoing_it(user_key: bytes) -> None:
    with pytest.raises(InvalidInput) as info:
        seal_dek_for_user(CANARY_DEK, user_key)
    assert info.value.__cause__ is None
    assert_no_secret(exception_text(info.value), CANARY_DEK)


# -- SecretBytes ------------------------------------------------------------


def test_secret_bytes_never_shows_its_value() -> None:
    secret = SecretBytes(CANARY_DEK)
    old_style = "%s %r" % (secret, secret)  # noqa: UP031 - logging formats this way
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:x}", old_style):
        assert_no_secret(text, CANARY_DEK)
        assert "32 bytes redacted" in text
    assert_no_secret(repr([secret, {"dek": secret}]), CANARY_DEK)


def test_secret_bytes_reveal_len_and_equality() -> None:
    secret = SecretBytes(bytearray(CANARY_DEK))
    assert secret.reveal() == CANARY_DEK and isinstance(secret.reveal(), bytes)
    assert len(secret) == 32
    assert secret == SecretBytes(CANARY_DEK)
    assert secret != SecretBytes(b"\x00" * 32)
    assert secret != SecretBytes(CANARY_DEK[:31])
    assert (secret == CANARY_DEK) is False  # only SecretBytes compare equal


def test_secret_bytes_equality_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("app_adapter.secret.hmac.compare_digest", spy)
    assert SecretBytes(CANARY_DEK) == SecretBytes(CANARY_DEK)
    assert not SecretBytes(CANARY_DEK) != SecretBytes(CANARY_DEK)  # noqa: SIM202 - exercises __ne__
    assert len(seen) == 2


def test_secret_bytes_is_not_picklable_hashable_or_mutable() -> None:
    secret = SecretBytes(CANARY_DEK)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError) as info:
            pickle.dumps(secret, protocol=protocol)
        assert_no_secret(exception_text(info.value), CANARY_DEK)
    with pytest.raises(TypeError):
        hash(secret)
    with pytest.raises(TypeError):
        {secret}  # noqa: B018
    with pytest.raises(AttributeError):
        secret._value = b""  # type: ignore[misc]
    with pytest.raises(AttributeError):
        secret.other = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        bytes(secret)  # type: ignore[call-overload]
    assert copy.copy(secret) is secret and copy.deepcopy(secret) is secret


@pytest.mark.parametrize("value", ["text", 42, None, [1, 2]])
def test_secret_bytes_needs_bytes(value: object) -> None:
    with pytest.raises(TypeError) as info:
        SecretBytes(value)  # type: ignore[arg-type]
    assert type(value).__name__ in str(info.value)
