"""Settings.from_env: defaults, validation, and error messages that name the variable."""

from __future__ import annotations

import dataclasses

import pytest

from app_adapter.config import ENV_VARS, Settings, settings_table_markdown
from app_adapter.errors import ConfigError, OwuiCryptoError

KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BASE = {
    "AWS_REGION": "us-east-1",
    "KMS_HMAC_KEY_ID": "1234abcd-12ab-34cd-56ef-1234567890ab",
    "KMS_APPLICATION_CMK_ID": KEY_ARN,
}


def env(**changes: str | None) -> dict[str, str]:
    merged: dict[str, str | None] = {**BASE, **changes}
    return {k: v for k, v in merged.items() if v is not None}


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert s == Settings(
        aws_region="us-east-1",
        hmac_key_id=BASE["KMS_HMAC_KEY_ID"],
        application_cmk_id=KEY_ARN,
        kms_mac_algorithm=None,
        key_cache_ttl_seconds=300.0,
        key_cache_size=10_000,
        kms_connect_timeout=2.0,
        kms_read_timeout=2.0,
        kms_max_attempts=2,
        user_secret_provider=None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.aws_region = "eu-west-1"  # type: ignore[misc]


def test_every_variable_set() -> None:
    s = Settings.from_env(
        env(
            KMS_HMAC_KEY_ID="alias/owui-users",
            OWUI_CRYPTO_KMS_MAC_ALGORITHM="HMAC_SHA_512",
            OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS="0.5",
            OWUI_CRYPTO_KEY_CACHE_SIZE=" 42 ",
            OWUI_CRYPTO_KMS_CONNECT_TIMEOUT="1.5",
            OWUI_CRYPTO_KMS_READ_TIMEOUT="3",
            OWUI_CRYPTO_KMS_MAX_ATTEMPTS="10",
            OWUI_CRYPTO_STORE_USER_KEY="no",
            OWUI_CRYPTO_USER_SECRET_PROVIDER="mycompany.certs:user_secret",
        )
    )
    assert s.hmac_key_id == "alias/owui-users"
    assert s.kms_mac_algorithm == "HMAC_SHA_512"
    assert (s.key_cache_ttl_seconds, s.key_cache_size) == (0.5, 42)
    assert (s.kms_connect_timeout, s.kms_read_timeout, s.kms_max_attempts) == (1.5, 3.0, 10)
    assert s.user_secret_provider == "mycompany.certs:user_secret"


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OWUI_CRYPTO_KEY_CACHE_SIZE", "7")
    assert Settings.from_env().key_cache_size == 7


@pytest.mark.parametrize("name", ["AWS_REGION", "KMS_HMAC_KEY_ID", "KMS_APPLICATION_CMK_ID"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_required_variable_is_named(name: str, value: str | None) -> None:
    with pytest.raises(ConfigError, match=f"^{name} is not set; expected: ") as info:
        Settings.from_env(env(**{name: value}))
    assert isinstance(info.value, OwuiCryptoError)


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("AWS_REGION", "US-EAST-1", "us-east-1"),
        ("AWS_REGION", "useast1", "us-east-1"),
        ("KMS_HMAC_KEY_ID", "my-key", "alias/"),
        ("KMS_HMAC_KEY_ID", "arn:aws:kms:us-east-1:1234:key/x", "arn:aws:kms:"),
        ("KMS_APPLICATION_CMK_ID", "key/1234abcd-12ab-34cd-56ef-1234567890ab", "a key id"),
        ("KMS_APPLICATION_CMK_ID", KEY_ARN.replace("us-east-1", "eu-west-1"), "region 'eu-west-1'"),
        ("OWUI_CRYPTO_KMS_MAC_ALGORITHM", "HMAC_SHA_1", "HMAC_SHA_512"),
        ("OWUI_CRYPTO_KMS_MAC_ALGORITHM", "hmac_sha_256", "HMAC_SHA_256"),
        ("OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS", "0", "> 0"),
        ("OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS", "-5", "> 0"),
        ("OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS", "5m", "seconds"),
        ("OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS", "nan", "> 0"),
        ("OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS", "inf", "> 0"),
        ("OWUI_CRYPTO_KEY_CACHE_SIZE", "0", "whole number > 0"),
        ("OWUI_CRYPTO_KEY_CACHE_SIZE", "1.5", "whole number > 0"),
        ("OWUI_CRYPTO_KEY_CACHE_SIZE", "lots", "whole number > 0"),
        ("OWUI_CRYPTO_KMS_CONNECT_TIMEOUT", "0", "seconds > 0"),
        ("OWUI_CRYPTO_KMS_CONNECT_TIMEOUT", "2s", "seconds > 0"),
        ("OWUI_CRYPTO_KMS_READ_TIMEOUT", "-1", "seconds > 0"),
        ("OWUI_CRYPTO_KMS_MAX_ATTEMPTS", "0", "from 1 to 10"),
        ("OWUI_CRYPTO_KMS_MAX_ATTEMPTS", "11", "from 1 to 10"),
        ("OWUI_CRYPTO_KMS_MAX_ATTEMPTS", "two", "from 1 to 10"),
    ],
)
def test_malformed_variable_is_named_with_a_valid_example(name: str, value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(**{name: value}))
    message = str(info.value)
    assert message.startswith(name)
    assert hint in message
    assert info.value.__cause__ is None  # no "during handling of ValueError" noise


@pytest.mark.parametrize(
    "ref",
    [
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        "mrk-1234abcd12ab34cd56ef1234567890ab",
        "alias/owui/users_hmac-1",
        KEY_ARN,
        "arn:aws:kms:us-east-1:111122223333:alias/owui-users",
        "arn:aws:kms:us-east-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab",
    ],
)
def test_key_reference_forms(ref: str) -> None:
    assert Settings.from_env(env(KMS_HMAC_KEY_ID=ref)).hmac_key_id == ref


def test_other_partitions_and_regions() -> None:
    arn = "arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    s = Settings.from_env(env(AWS_REGION="us-gov-west-1", KMS_APPLICATION_CMK_ID=arn))
    assert s.aws_region == "us-gov-west-1"


@pytest.mark.parametrize("value", ["1", "TRUE", "yes"])
def test_the_removed_store_user_key_switch_refuses_to_start(value: str) -> None:
    """A user_key stored beside the DEK it wraps opened every DEK for a reader of a dump."""
    with pytest.raises(ConfigError, match="OWUI_CRYPTO_STORE_USER_KEY was removed"):
        Settings.from_env(env(OWUI_CRYPTO_STORE_USER_KEY=value))


@pytest.mark.parametrize("value", ["0", "false", "No", ""])
def test_the_removed_switch_left_off_is_harmless(value: str) -> None:
    assert Settings.from_env(env(OWUI_CRYPTO_STORE_USER_KEY=value)).user_secret_provider is None


@pytest.mark.parametrize("value", ["module", "a b:c", "mod:func:x", ":f"])
def test_user_secret_provider_must_be_module_colon_function(value: str) -> None:
    with pytest.raises(ConfigError, match="OWUI_CRYPTO_USER_SECRET_PROVIDER"):
        Settings.from_env(env(OWUI_CRYPTO_USER_SECRET_PROVIDER=value))


def test_no_endpoint_variable_of_our_own() -> None:
    names = [name for name, _, _ in ENV_VARS]
    assert not [n for n in names if "ENDPOINT" in n]
    assert names[:3] == ["AWS_REGION", "KMS_HMAC_KEY_ID", "KMS_APPLICATION_CMK_ID"]


def test_settings_table_lists_every_variable_once() -> None:
    table = settings_table_markdown()
    lines = table.strip().splitlines()
    assert lines[0] == "| Variable | Default | Meaning |"
    assert len(lines) == 2 + len(ENV_VARS)
    for (name, default, _), line in zip(ENV_VARS, lines[2:], strict=True):
        assert line.startswith(f"| `{name}` | ")
        assert ("*(required)*" in line) is (default is None)
        assert line.count(" | ") == 2  # no stray cell separators
    assert "| `OWUI_CRYPTO_KEY_CACHE_TTL_SECONDS` | `300` |" in table


def test_defaults_in_the_table_are_the_dataclass_defaults() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Settings)}
    s = Settings.from_env(BASE)
    assert s.key_cache_ttl_seconds == fields["key_cache_ttl_seconds"]
    assert s.key_cache_size == fields["key_cache_size"]
    assert s.kms_max_attempts == fields["kms_max_attempts"]
    assert s.kms_connect_timeout == fields["kms_connect_timeout"]
    assert s.kms_read_timeout == fields["kms_read_timeout"]
    assert s.user_secret_provider == fields["user_secret_provider"]


# -- OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS (moving to another CMK while serving) ------------------------------------

OTHER_ARN = "arn:aws:kms:us-east-1:111122223333:key/0000abcd-12ab-34cd-56ef-1234567890ab"


def test_accepted_cmks_default_to_none() -> None:
    assert Settings.from_env(BASE).accepted_cmk_ids == ()
    assert Settings.from_env(env(OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS=" ")).accepted_cmk_ids == ()


def test_accepted_cmks_are_a_comma_separated_list_of_key_references() -> None:
    value = f" {OTHER_ARN} , alias/owui-next,,mrk-{'a' * 32},{OTHER_ARN},{KEY_ARN}, "
    s = Settings.from_env(env(OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS=value))
    # Order kept; blanks, repeats and the primary itself dropped (listed in both during a switch: harmless).
    assert s.accepted_cmk_ids == (OTHER_ARN, "alias/owui-next", f"mrk-{'a' * 32}")
    assert s.application_cmk_id == KEY_ARN


@pytest.mark.parametrize(("value", "message"), [
    ("not-a-key", "'not-a-key' is not a KMS key reference"),
    (f"{OTHER_ARN};alias/x", "is not a KMS key reference"),  # only commas separate
    (OTHER_ARN.replace("us-east-1", "eu-west-1"), "region 'eu-west-1' but AWS_REGION='us-east-1'"),
])
def test_a_malformed_accepted_cmk_names_the_variable(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS") as info:
        Settings.from_env(env(OWUI_CRYPTO_KMS_ACCEPTED_CMK_IDS=value))
    assert message in str(info.value)


def test_the_owners_url_is_listed_and_is_no_kms_setting() -> None:
    """OWUI_CRYPTO_OWNER_DATABASE_URL is read by owui-crypto serve (app_adapter.owui.launcher), not by Settings."""
    from app_adapter.config import OWNER_URL_ENV

    assert OWNER_URL_ENV in {name for name, _, _ in ENV_VARS}
    assert Settings.from_env(env(**{OWNER_URL_ENV: "postgresql://owner:pw@db/owui"})) == Settings.from_env(BASE)
