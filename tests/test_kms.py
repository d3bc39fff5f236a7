"""KmsKeys against moto's real HTTP server, botocore Stubber, and dead endpoints.

The fixtures (``kms_server``, ``kms_settings``, ``fresh_kms``) come from
``tests/kms_fixtures.py`` through ``pytest_plugins`` in conftest.py.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.stub import Stubber
from hypothesis import given
from hypothesis import strategies as st

from app_adapter.config import Settings
from app_adapter.errors import (
    CannotUnwrap,
    InvalidInput,
    KeyUnavailable,
    KmsError,
    KmsThrottled,
    KmsUnreachable,
    MacAlgorithmMismatch,
    OwuiCryptoError,
)
from app_adapter.kms import HMAC_SPEC_TO_ALGORITHM, KmsKeys, botocore_config, uuid_from_mac
from app_adapter.secret import SecretBytes
from tests.kms_fixtures import KmsServer, assert_no_secret, exception_text

UUID_V8 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

# A recognisable DEK: if it shows up in any text, something leaked.
CANARY_DEK = bytes.fromhex("ca11ab1e" * 8)


@pytest.fixture
def keys(kms_settings: Settings) -> Iterator[KmsKeys]:
    with KmsKeys(kms_settings) as k:
        yield k


def capture(keys: KmsKeys, operation: str) -> list[dict[str, Any]]:
    """Record the JSON body of every ``operation`` request the client sends."""
    sent: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        sent.append(json.loads(params["body"]))

    keys.client.meta.events.register(f"before-call.kms.{operation}", hook)
    return sent


# -- user ids -----------------------------------------------------------------


def test_user_id_is_stable_normalised_and_uuid_v8(keys: KmsKeys) -> None:
    first = keys.user_id("alice@example.com")
    assert keys.user_id("  Alice@Example.COM\n") == first
    assert keys.user_id("alice@example.com") == first
    assert keys.user_id("bob@example.com") != first
    assert UUID_V8.match(first)
    parsed = uuid.UUID(first)
    assert parsed.version == 8
    assert parsed.variant == uuid.RFC_4122
    assert ":" not in first and len(first) == 36


def test_user_id_is_the_documented_layout_of_the_kms_mac(kms_server: KmsServer, keys: KmsKeys) -> None:
    mac = kms_server.admin.generate_mac(
        KeyId=kms_server.hmac_key_id, Message=b"carol@example.com", MacAlgorithm="HMAC_SHA_512"
    )["Mac"]
    b = bytearray(mac[:16])
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    assert keys.user_id("Carol@example.com") == f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def test_uuid_from_mac_known_vector() -> None:
    assert uuid_from_mac(bytes(range(32))) == "00010203-0405-8607-8809-0a0b0c0d0e0f"
    assert uuid_from_mac(b"\xff" * 16) == "ffffffff-ffff-8fff-bfff-ffffffffffff"
    with pytest.raises(InvalidInput):
        uuid_from_mac(b"\x00" * 15)


@given(st.binary(min_size=16, max_size=64))
def test_uuid_from_mac_keeps_122_bits_and_sets_version_and_variant(mac: bytes) -> None:
    text = uuid_from_mac(mac)
    assert UUID_V8.match(text)
    raw = uuid.UUID(text).bytes
    keep = bytes([0xFF] * 6 + [0x0F, 0xFF, 0x3F] + [0xFF] * 7)
    assert bytes(x & m for x, m in zip(raw, keep, strict=True)) == bytes(
        x & m for x, m in zip(mac[:16], keep, strict=True)
    )


@pytest.mark.parametrize("spec", sorted(HMAC_SPEC_TO_ALGORITHM))
def test_mac_algorithm_is_derived_from_the_key_spec(kms_server: KmsServer, spec: str) -> None:
    settings = kms_server.settings(hmac_key_id=kms_server.create_key(spec))
    with KmsKeys(settings) as keys:
        sent = capture(keys, "GenerateMac")
        keys.user_id("dave@example.com")
        assert keys.check_keys().mac_algorithm == HMAC_SPEC_TO_ALGORITHM[spec]
    assert [body["MacAlgorithm"] for body in sent] == [f"HMAC_SHA_{spec[5:]}"]


def test_hmac_512_key_sends_hmac_sha_512(keys: KmsKeys) -> None:
    sent = capture(keys, "GenerateMac")
    keys.user_id("erin@example.com")
    assert len(sent) == 1
    assert sent[0]["MacAlgorithm"] == "HMAC_SHA_512"
    assert base64.b64decode(sent[0]["Message"]) == b"erin@example.com"


def test_mismatched_explicit_algorithm_is_refused_before_calling(keys: KmsKeys) -> None:
    keys.check_keys()  # learns the HMAC_512 spec
    before = keys.metrics()["calls"]
    sent = capture(keys, "GenerateMac")
    with pytest.raises(MacAlgorithmMismatch) as info:
        keys.user_id("frank@example.com", mac_algorithm="HMAC_SHA_256")
    assert keys.metrics()["calls"] == before  # not even a DescribeKey
    assert sent == []
    assert "HMAC_512" in str(info.value) and "HMAC_SHA_512" in str(info.value)
    assert isinstance(info.value, ValueError)
    # The matching explicit algorithm is fine and changes nothing.
    assert keys.user_id("frank@example.com", mac_algorithm="HMAC_SHA_512") == keys.user_id(
        "frank@example.com"
    )


def test_unknown_algorithm_name_is_refused_without_any_call(kms_settings: Settings) -> None:
    with KmsKeys(kms_settings) as keys:
        with pytest.raises(InvalidInput):
            keys.user_id("gina@example.com", mac_algorithm="HMAC_SHA_1")
        assert keys.metrics()["calls"] == {}
    with pytest.raises(InvalidInput):
        KmsKeys(kms_settings, mac_algorithm="hmac_sha_512")


def test_pinned_algorithm_that_does_not_match_the_key_fails_check_keys(kms_settings: Settings) -> None:
    with KmsKeys(kms_settings, mac_algorithm="HMAC_SHA_256") as keys:
        sent = capture(keys, "GenerateMac")
        with pytest.raises(MacAlgorithmMismatch, match="OWUI_CRYPTO_KMS_MAC_ALGORITHM"):
            keys.check_keys()
        with pytest.raises(MacAlgorithmMismatch):
            keys.user_id("hank@example.com")
        assert sent == []
    pinned = Settings(**{**_fields(kms_settings), "kms_mac_algorithm": "HMAC_SHA_512"})
    with KmsKeys(pinned) as keys:
        assert keys.check_keys().mac_algorithm == "HMAC_SHA_512"


def test_email_longer_than_4096_utf8_bytes_is_refused_before_calling(keys: KmsKeys) -> None:
    local = "a" * (4097 - len("@example.com"))
    with pytest.raises(InvalidInput, match="4097 bytes") as info:
        keys.user_id(local + "@example.com")
    assert isinstance(info.value, ValueError) and isinstance(info.value, OwuiCryptoError)
    with pytest.raises(InvalidInput, match="4098 bytes"):
        keys.user_id("\u00e9" * 2049)  # 2049 characters, 4098 bytes
    assert keys.metrics()["calls"] == {}
    assert local not in str(info.value)  # length only, never the email
    assert UUID_V8.match(keys.user_id(local[1:] + "@example.com"))  # exactly 4096 is fine


@pytest.mark.parametrize("email", ["", "   ", "\n"])
def test_empty_email_is_refused(keys: KmsKeys, email: str) -> None:
    with pytest.raises(InvalidInput):
        keys.user_id(email)
    assert keys.metrics()["calls"] == {}


# -- DEKs -------------------------------------------------------------------


def test_wrap_unwrap_round_trip(keys: KmsKeys) -> None:
    user = keys.user_id("ivy@example.com")
    blob = keys.wrap_dek(user, CANARY_DEK)
    assert CANARY_DEK not in blob
    dek = keys.unwrap_dek(user, blob)
    assert isinstance(dek, SecretBytes)
    assert dek.reveal() == CANARY_DEK
    assert keys.unwrap_dek(user, keys.wrap_dek(user, SecretBytes(CANARY_DEK))) == dek
    assert_no_secret(repr(dek) + str(dek), CANARY_DEK)


def test_new_dek_round_trip(keys: KmsKeys, kms_server: KmsServer) -> None:
    dek, blob = keys.new_dek("user-1")
    assert isinstance(dek, SecretBytes) and len(dek) == 32
    assert keys.unwrap_dek("user-1", blob) == dek
    assert keys.new_dek("user-1")[0] != dek
    # The encryption context is the documented one: a plain Decrypt with it opens the blob.
    plain = kms_server.admin.decrypt(
        CiphertextBlob=blob,
        EncryptionContext={"purpose": "user-dek-encryption", "application": "open-webui", "user_id": "user-1"},
    )["Plaintext"]
    assert plain == dek.reveal()


def test_another_users_blob_does_not_unwrap(keys: KmsKeys) -> None:
    blob = keys.wrap_dek("user-a", CANARY_DEK)
    with pytest.raises(CannotUnwrap, match="user-b") as info:
        keys.unwrap_dek("user-b", blob)
    assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)
    assert info.value.__cause__.response["Error"]["Code"] == "InvalidCiphertextException"
    assert not info.value.retryable
    assert_no_secret(exception_text(info.value), CANARY_DEK)
    assert keys.metrics()["errors"] == {"CannotUnwrap": 1}


def test_blob_of_another_cmk_does_not_unwrap(kms_server: KmsServer, keys: KmsKeys) -> None:
    other = kms_server.settings(application_cmk_id=kms_server.create_key())
    with KmsKeys(other) as other_keys:
        blob = other_keys.wrap_dek("user-a", CANARY_DEK)
    with pytest.raises(CannotUnwrap) as info:
        keys.unwrap_dek("user-a", blob)
    # moto says AccessDeniedException where real KMS says IncorrectKeyException.
    assert info.value.__cause__.response["Error"]["Code"] == "AccessDeniedException"  # type: ignore[union-attr]


# -- accepted CMKs (OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS) ------------------------------------------------------------


def arn(kms_server: KmsServer, key_id: str) -> str:
    return str(kms_server.admin.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])


def test_blobs_of_the_primary_and_of_an_accepted_cmk_open_each_decrypt_naming_its_key(kms_server: KmsServer) -> None:
    old, new = kms_server.create_key(), kms_server.create_key()
    with KmsKeys(kms_server.settings(application_cmk_id=old)) as under_old, \
            KmsKeys(kms_server.settings(application_cmk_id=new)) as under_new:
        old_blob, new_blob = under_old.wrap_dek("user-a", CANARY_DEK), under_new.wrap_dek("user-a", CANARY_DEK)
        share = under_new.wrap_deployment_key("share", CANARY_DEK)
    with KmsKeys(kms_server.settings(application_cmk_id=old, accepted_cmk_ids=(new,))) as keys:
        sent = capture(keys, "Decrypt")
        encrypted = capture(keys, "Encrypt")
        opened = [keys.unwrap_dek_with_key("user-a", b) for b in (old_blob, new_blob)]
        assert [(dek.reveal(), key) for dek, key in opened] == [(CANARY_DEK, arn(kms_server, old)),
                                                               (CANARY_DEK, arn(kms_server, new))]
        # The key that opened the last blob is tried first: the next blob under it costs one Decrypt.
        assert keys.unwrap_dek("user-a", new_blob).reveal() == CANARY_DEK
        assert keys.unwrap_deployment_key("share", share).reveal() == CANARY_DEK
        # New wraps are always under the primary.
        keys.wrap_dek("user-b", CANARY_DEK)
        metrics = keys.metrics()
    assert [s["KeyId"] for s in sent] == [old, old, new, new, new]
    assert [e["KeyId"] for e in encrypted] == [old]
    # The miss on the way (old, for the blob under new) is a KMS call, not an error.
    assert metrics["calls"] == {"Decrypt": 5, "Encrypt": 1} and metrics["errors"] == {}


def test_a_blob_of_a_cmk_neither_primary_nor_accepted_is_refused(kms_server: KmsServer) -> None:
    old, new, foreign = kms_server.create_key(), kms_server.create_key(), kms_server.create_key()
    with KmsKeys(kms_server.settings(application_cmk_id=foreign)) as stranger:
        blob = stranger.wrap_dek("user-a", CANARY_DEK)
        share = stranger.wrap_deployment_key("share", CANARY_DEK)
    with KmsKeys(kms_server.settings(application_cmk_id=old, accepted_cmk_ids=(new,))) as keys:
        sent = capture(keys, "Decrypt")
        with pytest.raises(CannotUnwrap, match="none of the allowed CMKs") as info:
            keys.unwrap_dek("user-a", blob)
        with pytest.raises(CannotUnwrap):
            keys.unwrap_deployment_key("share", share)
        metrics = keys.metrics()
    text = exception_text(info.value)
    assert f"KMS_APPLICATION_CMK_ID={old}" in text and f"OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS={new}" in text
    assert_no_secret(text, CANARY_DEK)
    # Every Decrypt named an allowed key: KMS never used the foreign key (moto refuses a KeyId that does not
    # match the blob with AccessDeniedException, real KMS with IncorrectKeyException).
    assert {s["KeyId"] for s in sent} == {old, new} and len(sent) == 4
    assert "AccessDeniedException" in text
    assert metrics["errors"] == {"CannotUnwrap": 2} and metrics["errors_by_operation"] == {
        "Decrypt": {"CannotUnwrap": 2}}


def test_another_users_blob_under_an_accepted_cmk_does_not_unwrap(kms_server: KmsServer) -> None:
    old, new = kms_server.create_key(), kms_server.create_key()
    with KmsKeys(kms_server.settings(application_cmk_id=new)) as under_new:
        blob = under_new.wrap_dek("user-a", CANARY_DEK)
    with KmsKeys(kms_server.settings(application_cmk_id=old, accepted_cmk_ids=(new,))) as keys:
        with pytest.raises(CannotUnwrap, match="user-b"):
            keys.unwrap_dek("user-b", blob)


def test_check_keys_refuses_an_accepted_cmk_that_could_not_decrypt(kms_server: KmsServer) -> None:
    disabled, hmac_key = kms_server.create_key(), kms_server.create_key("HMAC_256")
    kms_server.admin.disable_key(KeyId=disabled)
    with KmsKeys(kms_server.settings(accepted_cmk_ids=(disabled,))) as keys:
        with pytest.raises(KeyUnavailable, match=f"OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS={disabled}.*Disabled"):
            keys.check_keys()
    with KmsKeys(kms_server.settings(accepted_cmk_ids=(hmac_key,))) as keys:
        with pytest.raises(KeyUnavailable, match="GENERATE_VERIFY_MAC"):
            keys.check_keys()
    good = kms_server.create_key()
    with KmsKeys(kms_server.settings(accepted_cmk_ids=(good,))) as keys:
        assert keys.check_keys().accepted_arns == (arn(kms_server, good),)


def test_a_disabled_accepted_cmk_is_unavailable_not_unopenable(kms_server: KmsServer) -> None:
    """A blob under an accepted key KMS refuses to use: the operator must act (KeyUnavailable), as for the primary.
    moto decrypts with disabled keys; the client adds real KMS's refusal."""
    old, new = kms_server.create_key(), kms_server.create_key()
    with KmsKeys(kms_server.settings(application_cmk_id=old)) as under_old:
        blob = under_old.wrap_dek("user-a", CANARY_DEK)
    with KmsKeys(kms_server.settings(application_cmk_id=new, accepted_cmk_ids=(old,))) as keys:
        def refuse_old(params: dict[str, Any], **_: Any) -> None:
            if json.loads(params["body"])["KeyId"] == old:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "DisabledException", "Message": "disabled"}}, "Decrypt")

        keys.client.meta.events.register("before-call.kms.Decrypt", refuse_old)
        with pytest.raises(KeyUnavailable, match="DisabledException"):
            keys.unwrap_dek("user-a", blob)
        assert keys.metrics()["errors"] == {"KeyUnavailable": 1}


@pytest.mark.parametrize("blob", [b"", b"not a kms blob", b"\x00" * 200])
def test_corrupt_blob_does_not_unwrap(keys: KmsKeys, blob: bytes) -> None:
    with pytest.raises(CannotUnwrap):
        keys.unwrap_dek("user-a", blob)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, "x" * 32])
def test_wrap_dek_refuses_anything_but_32_bytes(keys: KmsKeys, bad: Any) -> None:
    with pytest.raises(InvalidInput):
        keys.wrap_dek("user-a", bad)
    assert keys.metrics()["calls"] == {}


def test_deployment_keys_are_bound_to_their_name_and_purpose(keys: KmsKeys) -> None:
    share_key = CANARY_DEK
    blob = keys.wrap_deployment_key("share", share_key)
    assert keys.unwrap_deployment_key("share", blob).reveal() == share_key
    with pytest.raises(CannotUnwrap, match="'other'"):
        keys.unwrap_deployment_key("other", blob)
    # A deployment key is not a user's DEK and vice versa.
    with pytest.raises(CannotUnwrap):
        keys.unwrap_dek("share", blob)
    with pytest.raises(CannotUnwrap):
        keys.unwrap_deployment_key("user-a", keys.wrap_dek("user-a", CANARY_DEK))


# -- key checks -------------------------------------------------------------


def test_check_keys_accepts_the_default_keys(keys: KmsKeys, kms_server: KmsServer) -> None:
    check = keys.check_keys()
    assert check.hmac_key_spec == "HMAC_512"
    assert check.mac_algorithm == "HMAC_SHA_512"
    assert check.hmac_key_arn.endswith(kms_server.hmac_key_id)
    assert check.cmk_arn.endswith(kms_server.cmk_id)
    assert keys.metrics()["calls"] == {"DescribeKey": 2}


def test_disabled_keys_are_unavailable(fresh_kms: KmsServer) -> None:
    fresh_kms.admin.disable_key(KeyId=fresh_kms.cmk_id)
    with KmsKeys(fresh_kms.settings()) as keys:
        with pytest.raises(KeyUnavailable, match="KMS_APPLICATION_CMK_ID.*Disabled"):
            keys.check_keys()
        # moto itself keeps encrypting with the disabled key: only check_keys notices.
        keys.wrap_dek("user-a", CANARY_DEK)
    fresh_kms.admin.disable_key(KeyId=fresh_kms.hmac_key_id)
    with KmsKeys(fresh_kms.settings()) as keys:
        with pytest.raises(KeyUnavailable, match=f"KMS_HMAC_KEY_ID={fresh_kms.hmac_key_id}.*Disabled"):
            keys.check_keys()
        with pytest.raises(KeyUnavailable):
            keys.user_id("jack@example.com")  # the lazy DescribeKey checks the state too


def test_keys_pending_deletion_are_unavailable(kms_server: KmsServer) -> None:
    hmac_key, cmk = kms_server.create_key("HMAC_512"), kms_server.create_key()
    kms_server.admin.schedule_key_deletion(KeyId=hmac_key, PendingWindowInDays=7)
    with KmsKeys(kms_server.settings(hmac_key_id=hmac_key)) as keys:
        with pytest.raises(KeyUnavailable, match="PendingDeletion"):
            keys.check_keys()
    kms_server.admin.schedule_key_deletion(KeyId=cmk, PendingWindowInDays=7)
    with KmsKeys(kms_server.settings(application_cmk_id=cmk)) as keys:
        with pytest.raises(KeyUnavailable, match="KMS_APPLICATION_CMK_ID.*PendingDeletion"):
            keys.check_keys()


@pytest.mark.parametrize(
    ("variable", "spec", "usage"),
    [
        ("hmac_key_id", "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
        ("application_cmk_id", "HMAC_512", "GENERATE_VERIFY_MAC"),
        ("application_cmk_id", "RSA_2048", "ENCRYPT_DECRYPT"),
        ("hmac_key_id", "RSA_2048", "SIGN_VERIFY"),
    ],
)
def test_keys_of_the_wrong_usage_or_spec_are_unavailable(
    kms_server: KmsServer, variable: str, spec: str, usage: str
) -> None:
    settings = kms_server.settings(**{variable: kms_server.create_key(spec, usage)})
    with KmsKeys(settings) as keys:
        with pytest.raises(KeyUnavailable, match=f"KeyUsage {usage} and KeySpec {spec}"):
            keys.check_keys()


def test_missing_key_is_unavailable(kms_server: KmsServer) -> None:
    missing = str(uuid.uuid4())
    with KmsKeys(kms_server.settings(application_cmk_id=missing)) as keys:
        with pytest.raises(KeyUnavailable, match=missing) as info:
            keys.check_keys()
    assert info.value.__cause__.response["Error"]["Code"] == "NotFoundException"  # type: ignore[union-attr]


# -- errors moto never produces: botocore Stubber ----------------------------


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in Settings.__slots__}


def _describe_response(key_id: str, spec: str, usage: str, **extra: Any) -> dict[str, Any]:
    meta = {
        "KeyId": key_id,
        "Arn": f"arn:aws:kms:us-east-1:111122223333:key/{key_id}",
        "KeyState": "Enabled",
        "Enabled": True,
        "KeyUsage": usage,
        "KeySpec": spec,
        **extra,
    }
    return {"KeyMetadata": meta}


# Shared: every new boto3 session reloads the service models (~0.2 s).
_SESSION = boto3.session.Session()

HMAC_ID = "11111111-1111-1111-1111-111111111111"
CMK_ID = "22222222-2222-2222-2222-222222222222"


@pytest.fixture
def stubbed() -> Iterator[tuple[KmsKeys, Stubber]]:
    settings = Settings(aws_region="us-east-1", hmac_key_id=HMAC_ID, application_cmk_id=CMK_ID)
    # Nothing is sent: the Stubber answers before any connection is made.
    client = _SESSION.client(
        "kms",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore_config(settings),
    )
    with Stubber(client) as stubber:
        yield KmsKeys(settings, client=client), stubber
        stubber.assert_no_pending_responses()


def _preamble(stubber: Stubber, operation: str) -> None:
    """Queue the answers that come before ``operation`` (the Stubber is a FIFO)."""
    if operation == "generate_mac":
        stubber.add_response("describe_key", _describe_response(HMAC_ID, "HMAC_512", "GENERATE_VERIFY_MAC"))


def _run(keys: KmsKeys, operation: str) -> None:
    if operation == "generate_mac":
        keys.user_id("kate@example.com")
    elif operation == "encrypt":
        keys.wrap_dek("user-a", CANARY_DEK)
    elif operation == "decrypt":
        keys.unwrap_dek("user-a", b"\x01" * 100)
    elif operation == "generate_data_key":
        keys.new_dek("user-a")
    elif operation == "describe_key":
        keys.check_keys()
    else:  # pragma: no cover
        raise AssertionError(operation)


@pytest.mark.parametrize(
    ("operation", "code", "expected", "hint"),
    [
        ("generate_mac", "InvalidKeyUsageException", KeyUnavailable, f"KMS_HMAC_KEY_ID={HMAC_ID}"),
        ("generate_mac", "DisabledException", KeyUnavailable, f"KMS_HMAC_KEY_ID={HMAC_ID}"),
        ("generate_mac", "KMSInvalidStateException", KeyUnavailable, "is Enabled"),
        ("encrypt", "DisabledException", KeyUnavailable, f"KMS_APPLICATION_CMK_ID={CMK_ID}"),
        ("encrypt", "KMSInvalidStateException", KeyUnavailable, "is Enabled"),
        ("encrypt", "KeyUnavailableException", KeyUnavailable, "is Enabled"),
        ("encrypt", "AccessDeniedException", KeyUnavailable, "credentials"),
        ("decrypt", "KMSInvalidStateException", KeyUnavailable, f"KMS_APPLICATION_CMK_ID={CMK_ID}"),
        ("decrypt", "IncorrectKeyException", CannotUnwrap, "user 'user-a'"),
        ("decrypt", "AccessDeniedException", CannotUnwrap, "user 'user-a'"),
        ("decrypt", "ThrottlingException", KmsThrottled, "OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS"),
        ("encrypt", "ThrottlingException", KmsThrottled, "quota"),
        ("generate_data_key", "LimitExceededException", KmsThrottled, "quota"),
        ("generate_mac", "ThrottlingException", KmsThrottled, f"KMS_HMAC_KEY_ID={HMAC_ID}"),
        ("decrypt", "KMSInternalException", KmsUnreachable, "retry later"),
        ("describe_key", "DependencyTimeoutException", KmsUnreachable, "retry later"),
        ("describe_key", "UnrecognizedClientException", KeyUnavailable, "credentials"),
        ("encrypt", "SomethingNewException", KmsError, "SomethingNewException"),
    ],
)
def test_client_errors_map_to_our_classes(
    stubbed: tuple[KmsKeys, Stubber], operation: str, code: str, expected: type[Exception], hint: str
) -> None:
    keys, stubber = stubbed
    _preamble(stubber, operation)
    stubber.add_client_error(operation, service_error_code=code, service_message=f"{code} from KMS")
    with pytest.raises(expected, match=re.escape(hint)) as info:
        _run(keys, operation)
    assert type(info.value) is expected
    assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)
    assert info.value.retryable == (expected in (KmsThrottled, KmsUnreachable))
    assert code in str(info.value)
    assert keys.metrics()["errors"] == {expected.__name__: 1}
    assert_no_secret(exception_text(info.value), CANARY_DEK)


def test_kms_listing_other_mac_algorithms_than_the_spec_is_refused(stubbed: tuple[KmsKeys, Stubber]) -> None:
    keys, stubber = stubbed
    stubber.add_response(
        "describe_key",
        _describe_response(HMAC_ID, "HMAC_512", "GENERATE_VERIFY_MAC", MacAlgorithms=["HMAC_SHA_256"]),
    )
    with pytest.raises(KeyUnavailable, match="HMAC_SHA_256"):
        keys.check_keys()


def test_real_kms_style_describe_key_passes(stubbed: tuple[KmsKeys, Stubber]) -> None:
    keys, stubber = stubbed
    stubber.add_response(
        "describe_key",
        _describe_response(HMAC_ID, "HMAC_384", "GENERATE_VERIFY_MAC", MacAlgorithms=["HMAC_SHA_384"]),
    )
    stubber.add_response("describe_key", _describe_response(CMK_ID, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"))
    stubber.add_response(
        "generate_mac",
        {"Mac": bytes(48), "MacAlgorithm": "HMAC_SHA_384", "KeyId": HMAC_ID},
        expected_params={"KeyId": HMAC_ID, "Message": b"lee@example.com", "MacAlgorithm": "HMAC_SHA_384"},
    )
    assert keys.check_keys().mac_algorithm == "HMAC_SHA_384"
    assert keys.user_id("Lee@example.com") == "00000000-0000-8000-8000-000000000000"


def test_parameter_errors_do_not_keep_their_text() -> None:
    settings = Settings(aws_region="us-east-1", hmac_key_id=HMAC_ID, application_cmk_id=CMK_ID)
    client = _SESSION.client(
        "kms",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",  # never reached: validation comes first
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    keys = KmsKeys(settings, client=client)
    # botocore's ParamValidationError quotes the offending value; call with a
    # Plaintext of the wrong type to make one, through the private path.
    with pytest.raises(InvalidInput) as info:
        keys._call("Encrypt", "KMS_APPLICATION_CMK_ID", CMK_ID, KeyId=CMK_ID, Plaintext=[CANARY_DEK.hex()])
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert_no_secret(exception_text(info.value), CANARY_DEK)


# -- endpoints that do not answer -------------------------------------------


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never writes a byte."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)  # held open, never answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self._listener.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_endpoint_that_never_answers_fails_fast(
    kms_settings: Settings, silent_server: SilentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{silent_server.port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    with KmsKeys(kms_settings) as keys:
        assert keys.client.meta.endpoint_url == endpoint
        started = time.monotonic()
        with pytest.raises(KmsUnreachable, match="AWS_ENDPOINT_URL_KMS") as info:
            keys.wrap_dek("user-a", CANARY_DEK)
        elapsed = time.monotonic() - started
    assert elapsed < 5.0
    assert isinstance(info.value.__cause__, botocore.exceptions.ReadTimeoutError)
    assert info.value.retryable
    assert len(silent_server.accepted) == kms_settings.kms_max_attempts
    assert keys.metrics()["errors"] == {"KmsUnreachable": 1}
    assert_no_secret(exception_text(info.value), CANARY_DEK)


def test_refused_port_is_unreachable(kms_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    # Closed again: connecting to it is refused.
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", f"http://127.0.0.1:{port}")
    with KmsKeys(kms_settings) as keys:
        started = time.monotonic()
        with pytest.raises(KmsUnreachable) as info:
            keys.user_id("mia@example.com")
        assert time.monotonic() - started < 5.0
    assert isinstance(info.value.__cause__, botocore.exceptions.EndpointConnectionError)


def test_client_configuration_bounds_waiting(keys: KmsKeys, kms_server: KmsServer) -> None:
    config = keys.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (1.0, 1.0)
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert keys.client.meta.endpoint_url == kms_server.endpoint_url  # from AWS_ENDPOINT_URL_KMS
    defaults = botocore_config(Settings(aws_region="eu-west-1", hmac_key_id=HMAC_ID, application_cmk_id=CMK_ID))
    assert (defaults.connect_timeout, defaults.read_timeout, defaults.region_name) == (2.0, 2.0, "eu-west-1")
    assert defaults.retries == {"mode": "standard", "total_max_attempts": 2}


# -- metrics and logs -------------------------------------------------------


def test_metrics_count_calls_errors_and_latency(keys: KmsKeys) -> None:
    user = keys.user_id("noah@example.com")
    blob = keys.wrap_dek(user, CANARY_DEK)
    keys.unwrap_dek(user, blob)
    with pytest.raises(CannotUnwrap):
        keys.unwrap_dek("someone-else", blob)
    metrics = keys.metrics()
    assert metrics["calls"] == {"DescribeKey": 1, "GenerateMac": 1, "Encrypt": 1, "Decrypt": 2}
    assert metrics["errors"] == {"CannotUnwrap": 1}
    assert 0 < metrics["latency_seconds_last"] <= metrics["latency_seconds_total"]
    json.dumps(metrics)  # plain data


def test_botocore_debug_logs_never_show_the_dek(keys: KmsKeys, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="botocore"):
        blob = keys.wrap_dek("user-a", CANARY_DEK)
        dek = keys.unwrap_dek("user-a", blob)
        fresh, _ = keys.new_dek("user-a")
    assert "botocore record redacted" in caplog.text  # botocore did try to log bodies
    assert_no_secret(caplog.text, CANARY_DEK)
    assert_no_secret(caplog.text, fresh.reveal())
    assert dek.reveal() == CANARY_DEK


def test_repr_of_kms_keys_names_keys_only(keys: KmsKeys, kms_server: KmsServer) -> None:
    keys.wrap_dek("user-a", CANARY_DEK)
    text = repr(keys)
    assert kms_server.cmk_id in text
    assert_no_secret(text, CANARY_DEK)
