"""sql/10_fernet.sql against the Fernet spec's official vectors and Python's cryptography.fernet.

Every failure of ``fernet_open`` is SQLSTATE OC003 with one fixed message.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet, InvalidToken
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[1]
FERNET_SQL = REPO_ROOT / "sql" / "10_fernet.sql"
# The spec's official vectors, copied into the repository (see fixtures/fernet/README.md).
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "fernet"

OPENERS = ("owui_crypto.fernet_open",)
INTEGRITY_MESSAGE = "sealed value failed its integrity check"
KEY = bytes(range(32))

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LARGE = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- fixture -----------------------------------------------------------------


@pytest.fixture(scope="module")
def fernet_db(pg_server) -> Iterator[psycopg.Connection]:
    """A throw-away database holding pgcrypto in owui_crypto and sql/10_fernet.sql, nothing else."""
    with pg_server.scratch_database("owui_crypto_t_fernet") as name:
        with psycopg.connect(pg_server.url(name), autocommit=True) as conn:
            conn.execute("CREATE SCHEMA owui_crypto")
            conn.execute("CREATE EXTENSION pgcrypto WITH SCHEMA owui_crypto")
            conn.execute(FERNET_SQL.read_text(encoding="utf-8"))
            yield conn


# -- helpers -----------------------------------------------------------------


def reference(name: str) -> list[dict]:
    path = REFERENCE / name
    if not path.is_file():
        pytest.fail(
            f"Fernet reference vectors missing: {path} does not exist. They are the spec's official "
            "vectors (https://github.com/fernet/spec), shipped in tests/fixtures/fernet/.",
            pytrace=False,
        )
    return json.loads(path.read_text(encoding="utf-8"))


def epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


def secret(vector: dict) -> bytes:
    return base64.urlsafe_b64decode(vector["secret"])


def python_fernet(key: bytes) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(key))


def seal(conn: psycopg.Connection, key: bytes, message: bytes | None, iv: bytes | None = None,
         issued_at: int | None = None) -> str | None:
    return conn.execute(
        "SELECT owui_crypto.fernet_seal(%s::bytea, %s::bytea, %s::bytea, %s::bigint)",
        (key, message, iv, issued_at),
    ).fetchone()[0]


def open_(conn: psycopg.Connection, opener: str, key: bytes, token: str | None, ttl: int | None = None,
          now: int | None = None) -> bytes | None:
    value = conn.execute(
        f"SELECT {opener}(%s::bytea, %s::text, %s::bigint, %s::bigint)", (key, token, ttl, now)
    ).fetchone()[0]
    return None if value is None else bytes(value)


def assert_integrity_failure(conn: psycopg.Connection, opener: str, key: bytes, token: str, ttl: int | None = None,
                             now: int | None = None, secrets: tuple[str, ...] = ()) -> None:
    """The call raises exactly OC003, and nothing in the error repeats the key, the token or `secrets`."""
    with pytest.raises(psycopg.Error) as excinfo:
        open_(conn, opener, key, token, ttl, now)
    error = excinfo.value
    assert error.sqlstate == "OC003", f"{opener}: {error.sqlstate} {error}"
    assert error.diag.message_primary == INTEGRITY_MESSAGE
    assert error.diag.message_detail is None and error.diag.message_hint is None
    assert_no_leak(error, key, (token, *secrets))


def assert_no_leak(error: psycopg.Error, key: bytes, texts: tuple[str, ...] = ()) -> None:
    shown = " ".join(
        part or ""
        for part in (str(error), error.diag.message_primary, error.diag.message_detail, error.diag.message_hint,
                     error.diag.context, error.diag.internal_query)
    )
    for needle in (key.hex(), base64.urlsafe_b64encode(key).decode(), base64.b64encode(key).decode(),
                   *(t for t in texts if len(t) >= 8)):
        assert needle not in shown, "an error message repeats key, token or plaintext material"


# -- the spec's vectors ------------------------------------------------------


def test_reference_vectors_are_there():
    for name in ("fernet-generate.json", "fernet-verify.json", "fernet-invalid.json"):
        assert reference(name), name


def test_generate_vectors(fernet_db):
    for vector in reference("fernet-generate.json"):
        token = seal(fernet_db, secret(vector), vector["src"].encode(), bytes(vector["iv"]), epoch(vector["now"]))
        assert token == vector["token"]


@pytest.mark.parametrize("opener", OPENERS)
def test_verify_vectors(fernet_db, opener):
    for vector in reference("fernet-verify.json"):
        got = open_(fernet_db, opener, secret(vector), vector["token"], vector["ttl_sec"], epoch(vector["now"]))
        assert got == vector["src"].encode()
        # Without a ttl the timestamp is not checked at all.
        assert open_(fernet_db, opener, secret(vector), vector["token"]) == vector["src"].encode()


@pytest.mark.parametrize("opener", OPENERS)
def test_invalid_vectors(fernet_db, opener):
    vectors = reference("fernet-invalid.json")
    assert len(vectors) >= 8
    for vector in vectors:
        try:
            assert_integrity_failure(fernet_db, opener, secret(vector), vector["token"], vector["ttl_sec"],
                                     epoch(vector["now"]))
        except AssertionError as exc:
            raise AssertionError(f"invalid vector {vector['desc']!r}: {exc}") from exc


# -- interoperability with cryptography.fernet -------------------------------


def json_with_nul() -> st.SearchStrategy[bytes]:
    """JSON text whose strings hold NUL and other control characters, i.e. \\u0000 escapes."""
    scalars = st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(), max_size=30)
    nul_text = st.text(alphabet=st.sampled_from(["\x00", "\x01", "\n", "a", "é", "😀", '"', "\\"]), max_size=20)
    values = st.recursive(scalars | nul_text, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    return st.builds(lambda v, ascii_only: json.dumps({"m": v, "z": "\x00"}, ensure_ascii=ascii_only).encode(),
                     values, st.booleans())


def large_text() -> st.SearchStrategy[bytes]:
    """Unicode text of 100..300 KiB in UTF-8 (a generated snippet repeated)."""
    def build(snippet: str, size: int) -> bytes:
        data = (snippet * (size // len(snippet.encode()) + 1)).encode()[:size]
        return data.decode("utf-8", "ignore").encode()
    return st.builds(build, st.text(min_size=1, max_size=40), st.integers(100 * 1024, 300 * 1024))


def large_bytes() -> st.SearchStrategy[bytes]:
    return st.builds(lambda seed, size: random.Random(seed).randbytes(size),
                     st.integers(0, 2**32), st.integers(100 * 1024, 300 * 1024))


MESSAGES = (st.text().map(str.encode)
            | st.binary(max_size=2048)
            | json_with_nul()
            | st.sampled_from([b"", b"\x00", b"x" * 15, b"x" * 16, b"x" * 17, "\u0000".encode(), b"\\u0000"]))
KEYS = st.binary(min_size=32, max_size=32)


@PROPERTY
@given(key=KEYS, message=MESSAGES)
@example(key=KEY, message=b"")
@example(key=KEY, message=json.dumps({"content": "a\u0000b"}).encode())
def test_sql_seal_opens_in_python(fernet_db, key, message):
    token = seal(fernet_db, key, message)
    assert python_fernet(key).decrypt(token) == message


@PROPERTY
@given(key=KEYS, message=MESSAGES)
def test_python_token_opens_in_sql(fernet_db, key, message):
    token = python_fernet(key).encrypt(message).decode()
    for opener in OPENERS:
        assert open_(fernet_db, opener, key, token) == message
        assert open_(fernet_db, opener, key, token, 60, int(time.time())) == message  # issued just now


@LARGE
@given(key=KEYS, message=large_text() | large_bytes())
def test_large_values_both_ways(fernet_db, key, message):
    token = seal(fernet_db, key, message)
    assert python_fernet(key).decrypt(token) == message
    theirs = python_fernet(key).encrypt(message).decode()
    for opener in OPENERS:
        assert open_(fernet_db, opener, key, theirs) == message
        assert open_(fernet_db, opener, key, token) == message


@PROPERTY
@given(offset=st.integers(-150, 150), ttl=st.integers(0, 120))
@example(offset=60, ttl=60)
@example(offset=61, ttl=60)
@example(offset=-60, ttl=60)
@example(offset=-61, ttl=60)
def test_ttl_and_clock_skew_agree_with_python(fernet_db, offset, ttl):
    issued = 1_700_000_000
    token = seal(fernet_db, KEY, b"m", issued_at=issued)
    try:
        python_fernet(KEY).decrypt_at_time(token, ttl, issued + offset)
        python_accepts = True
    except InvalidToken:
        python_accepts = False
    for opener in OPENERS:
        if python_accepts:
            assert open_(fernet_db, opener, KEY, token, ttl, issued + offset) == b"m"
        else:
            assert_integrity_failure(fernet_db, opener, KEY, token, ttl, issued + offset)


def test_defaults_random_iv_and_current_time(fernet_db):
    server_now = "SELECT floor(extract(epoch FROM clock_timestamp()))::bigint"
    before = fernet_db.execute(server_now).fetchone()[0]
    first, second = seal(fernet_db, KEY, b"same"), seal(fernet_db, KEY, b"same")
    after = fernet_db.execute(server_now).fetchone()[0]
    assert first != second
    assert base64.urlsafe_b64decode(first)[9:25] != base64.urlsafe_b64decode(second)[9:25]
    assert before <= python_fernet(KEY).extract_timestamp(first) <= after
    for opener in OPENERS:
        # ttl with the statement's clock: a fresh token is within it.
        assert open_(fernet_db, opener, KEY, first, 10) == b"same"


def test_null_in_null_out(fernet_db):
    assert seal(fernet_db, KEY, None) is None
    for opener in OPENERS:
        assert open_(fernet_db, opener, KEY, None) is None


# -- failures ------------------------------------------------------------------


def flip(token: str, position: int, mask: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[position % len(raw)] ^= mask
    return base64.urlsafe_b64encode(bytes(raw)).decode()


@PROPERTY
@given(message=MESSAGES, position=st.integers(0, 10_000), mask=st.integers(1, 255))
def test_any_tampered_byte_fails(fernet_db, message, position, mask):
    token = seal(fernet_db, KEY, message)
    tampered = flip(token, position, mask)
    for opener in OPENERS:
        assert_integrity_failure(fernet_db, opener, KEY, tampered, secrets=(message.decode("latin-1"),))


@PROPERTY
@given(message=MESSAGES, position=st.integers(0, 10_000),
       junk=st.sampled_from(["%", "*", "!", " ", "\n", "é", "😀", "\\", "'", "+/", "=", "==A", "\u00ff"]))
def test_malformed_token_text_fails(fernet_db, message, position, junk):
    token = seal(fernet_db, KEY, message)
    at = position % len(token)
    tampered = token[:at] + junk + token[at + 1:]
    assume(tampered != token)
    try:  # a few substitutions still decode to the same bytes (e.g. whitespace is skipped)
        same = base64.urlsafe_b64decode(tampered) == base64.urlsafe_b64decode(token)
    except ValueError:
        same = False
    assume(not same)
    for opener in OPENERS:
        assert_integrity_failure(fernet_db, opener, KEY, tampered)


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("token", [
    "", "=", "====", "gA==", "gAAAAA", "not a token", "\u00e9\u00e9\u00e9\u00e9",
    base64.urlsafe_b64encode(b"\x80" + bytes(72)).decode(),          # right length, MAC of nothing
    base64.urlsafe_b64encode(b"\x81" + bytes(88)).decode(),          # wrong version
    base64.urlsafe_b64encode(b"\x80" + b"\xff" * 8 + bytes(64)).decode(),  # timestamp 2^64-1
], ids=["empty", "pad", "pads", "short", "unpadded", "spaces", "non-ascii", "zeros", "version", "max-ts"])
def test_garbage_tokens_fail(fernet_db, opener, token):
    assert_integrity_failure(fernet_db, opener, KEY, token)
    assert_integrity_failure(fernet_db, opener, KEY, token, ttl=60, now=1_700_000_000)


@pytest.mark.parametrize("opener", OPENERS)
def test_truncated_and_extended_tokens_fail(fernet_db, opener):
    token = seal(fernet_db, KEY, b"some message that spans blocks" * 3)
    raw = base64.urlsafe_b64decode(token)
    for variant in (raw[:-1], raw[:-16], raw[:-32], raw + b"\x00", raw + bytes(16), raw[:25] + raw[41:]):
        assert_integrity_failure(fernet_db, opener, KEY, base64.urlsafe_b64encode(variant).decode())


@PROPERTY
@given(key=KEYS, other=KEYS, message=MESSAGES)
def test_wrong_key_fails_without_leaking(fernet_db, key, other, message):
    assume(key != other)
    token = seal(fernet_db, key, message)
    for opener in OPENERS:
        assert_integrity_failure(fernet_db, opener, other, token, secrets=(key.hex(), message.decode("latin-1")))
    # The MAC is keyed by the signing half: a wrong signing half always fails...
    wrong_signing = other[:16] + key[16:]
    if wrong_signing != key:
        for opener in OPENERS:
            assert_integrity_failure(fernet_db, opener, wrong_signing, token)
    # ...while a wrong encryption half under the right signing half decrypts to
    # garbage that fails only when its padding happens to be invalid: the same in Python.
    wrong_encryption = key[:16] + other[16:]
    if wrong_encryption != key:
        try:
            python_result = python_fernet(wrong_encryption).decrypt(token)
        except InvalidToken:
            python_result = None
        for opener in OPENERS:
            if python_result is None:
                assert_integrity_failure(fernet_db, opener, wrong_encryption, token)
            else:
                assert open_(fernet_db, opener, wrong_encryption, token) == python_result != message


def test_wrong_encryption_half_opens_to_the_same_garbage_as_python(fernet_db):
    """Right signing half, wrong encryption half: valid padding by chance (~1/256) opens in both."""
    wrong = KEY[:16] + bytes(16)
    for attempt in range(5000):
        token = python_fernet(KEY).encrypt(b"attempt %d" % attempt)
        try:
            garbage = python_fernet(wrong).decrypt(token)
        except InvalidToken:
            continue
        for opener in OPENERS:
            assert open_(fernet_db, opener, wrong, token.decode()) == garbage
        return
    pytest.fail("no token with accidentally valid padding in 5000 attempts")


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_key_must_be_32_bytes(fernet_db, length):
    key = bytes(range(100, 100 + length))
    for call, args in (("SELECT owui_crypto.fernet_seal(%s::bytea, 'm'::bytea)", (key,)),
                       *((f"SELECT {o}(%s::bytea, %s::text)", (key, seal(fernet_db, KEY, b"m"))) for o in OPENERS)):
        with pytest.raises(psycopg.Error) as excinfo:
            fernet_db.execute(call, args)
        assert excinfo.value.sqlstate == "22023"
        assert "32 bytes" in excinfo.value.diag.message_primary
        if length:
            assert_no_leak(excinfo.value, key)
    with pytest.raises(psycopg.Error) as excinfo:
        fernet_db.execute("SELECT owui_crypto.fernet_seal(NULL::bytea, 'm'::bytea)")
    assert excinfo.value.sqlstate == "22023"


def test_iv_must_be_16_bytes(fernet_db):
    for iv in (b"", bytes(15), bytes(17)):
        with pytest.raises(psycopg.Error) as excinfo:
            seal(fernet_db, KEY, b"m", iv=iv)
        assert excinfo.value.sqlstate == "22023"


# -- how the functions are declared, and where they can run --------------------


def test_declarations(fernet_db):
    rows = dict((name, (volatility, parallel, strict)) for name, volatility, parallel, strict in fernet_db.execute(
        "SELECT p.proname, p.provolatile, p.proparallel, p.proisstrict FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'owui_crypto' AND p.proname LIKE 'fernet%%'"))
    assert rows == {
        "fernet_seal": ("v", "s", False),                 # random IV, clock
        "fernet_open": ("s", "u", False),                 # exception block: no parallel query
    }


def test_openers_in_a_parallel_query(fernet_db):
    """fernet_open keeps a plan serial even when parallel plans are forced, and still answers."""
    fernet_db.execute("CREATE TABLE fernet_parallel AS SELECT g, owui_crypto.fernet_seal(%s::bytea, "
                      "pg_catalog.int4send(g)) AS t FROM generate_series(1, 2000) g", (KEY,))
    fernet_db.execute("ANALYZE fernet_parallel")
    try:
        with fernet_db.transaction():
            for setting in ("parallel_setup_cost", "parallel_tuple_cost", "min_parallel_table_scan_size"):
                fernet_db.execute(f"SET LOCAL {setting} = 0")
            debug = "debug_parallel_query" if fernet_db.info.server_version >= 160000 else "force_parallel_mode"
            fernet_db.execute(f"SET LOCAL {debug} = on")
            for opener, parallel in ((OPENERS[0], False),):
                query = f"SELECT sum(pg_catalog.length({opener}(%s::bytea, t))) FROM fernet_parallel"
                plan = "\n".join(r[0] for r in fernet_db.execute("EXPLAIN (COSTS OFF) " + query, (KEY,)))
                assert ("Gather" in plan) == parallel, plan
                assert fernet_db.execute(query, (KEY,)).fetchone()[0] == 4 * 2000
    finally:
        fernet_db.execute("DROP TABLE fernet_parallel")


def test_names_do_not_depend_on_search_path(fernet_db):
    """Every name is schema-qualified: look-alikes first on the search_path change nothing."""
    token = seal(fernet_db, KEY, b"search path")
    with fernet_db.transaction():
        fernet_db.execute("CREATE SCHEMA trap")
        for signature in ("decode(text, text) RETURNS bytea", "encode(bytea, text) RETURNS text",
                          "replace(text, text, text) RETURNS text", "substr(bytea, integer, integer) RETURNS bytea",
                          "octet_length(bytea) RETURNS integer", "hmac(bytea, bytea, text) RETURNS bytea",
                          "get_byte(bytea, integer) RETURNS integer", "bit_count(bit) RETURNS bigint"):
            fernet_db.execute(f"CREATE FUNCTION trap.{signature} LANGUAGE plpgsql AS "
                              "$$BEGIN RAISE EXCEPTION 'trap called'; END$$")
        fernet_db.execute("CREATE FUNCTION trap.cat(bytea, bytea) RETURNS bytea LANGUAGE sql "
                          "AS $$SELECT '\\x00'::bytea$$")
        fernet_db.execute("CREATE OPERATOR trap.|| (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = trap.cat)")
        for path in ("trap, pg_catalog", "''"):
            fernet_db.execute(f"SET LOCAL search_path = {path}")
            again = fernet_db.execute("SELECT owui_crypto.fernet_seal(%s::bytea, 'search path'::bytea)",
                                      (KEY,)).fetchone()[0]
            assert python_fernet(KEY).decrypt(again) == b"search path"
            for opener in OPENERS:
                assert bytes(fernet_db.execute(f"SELECT {opener}(%s::bytea, %s::text)",
                                               (KEY, token)).fetchone()[0]) == b"search path"
        raise psycopg.Rollback()


def test_token_under_a_nondeterministic_collation(fernet_db):
    token = seal(fernet_db, KEY, b"collation")
    with fernet_db.transaction():
        fernet_db.execute("CREATE COLLATION pg_temp.nd (provider = icu, locale = 'und-u-ks-level2', "
                          "deterministic = false)")
        for opener in OPENERS:
            got = fernet_db.execute(f"SELECT {opener}(%s::bytea, %s::text COLLATE pg_temp.nd)",
                                    (KEY, token)).fetchone()[0]
            assert bytes(got) == b"collation"
        raise psycopg.Rollback()
