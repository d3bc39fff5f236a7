-- Fernet (https://github.com/fernet/spec) computed in PostgreSQL with pgcrypto.
--
--   key    32 bytes = signing key (first 16) || encryption key (last 16)
--   token  base64url, with padding, of
--            0x80 || issued_at (8 bytes, big-endian seconds) || IV (16)
--            || AES-128-CBC(encryption key, IV, PKCS#7(message))
--            || HMAC-SHA256(signing key, everything before it)
--
-- Tokens open with Python's cryptography.fernet.Fernet and the other way round
-- (tests/test_fernet.py runs the spec's official vectors and property tests).
-- pgcrypto lives in schema owui_crypto (00_foundation.sql).
--
-- How it is written, and why (measured on PostgreSQL 15; scripts/bench_sql.py,
-- `make bench-sql`, prints the ratios against Python):
--
-- * PL/pgSQL, not LANGUAGE sql. A scalar SQL function is inlined only when its
--   body is one expression, and an inlined expression is not de-duplicated:
--   the decoded token (open) and the IV and body (seal) are needed two or three
--   times, so they would be computed that many times, and a random IV would
--   even differ between its uses. A non-inlined SQL function (FROM clause) runs
--   through the SQL-function executor: +4 us per call at 1 KiB. PL/pgSQL
--   evaluates each simple expression directly.
-- * No `SET search_path` clause. It made seal 1.4 us (8%) slower per call at
--   1 KiB. Instead every name is schema-qualified: functions (pg_catalog.*,
--   owui_crypto.*), types (pg_catalog.bytea), operators
--   (OPERATOR(pg_catalog.||); such operators all bind alike, hence the
--   parentheses), collations (pg_catalog."C"). COALESCE is syntax, not a name.
-- * replace(), never translate(): replace() scans with a byte loop, translate()
--   compares every character against its set and is ~10x slower. Three
--   replace() passes make base64url out of encode(..., 'base64'), which also
--   puts a newline after every 76 characters; two make base64 out of base64url.
--   Those passes and PostgreSQL's byte-at-a-time base64 code are most of the
--   cost above 16 KiB; AES and HMAC (OpenSSL) are the smaller part.
-- * length() counts characters (slow on large text); octet_length() is O(1).
-- * Token text is searched under COLLATE "C": replace() and ~ refuse a
--   nondeterministic collation that a caller's column might carry.
-- * Error messages never carry key, token or plaintext material. Every way a
--   token can fail raises the same OC003; the caller adds context.

-- Seals `message` (NULL in, NULL out). `iv` and `issued_at` are for tests and
-- reproducible vectors; leave them NULL (random IV, current time).
-- VOLATILE: random IV and the clock. PARALLEL SAFE: gen_random_bytes() and
-- clock_timestamp() are, and nothing here starts a subtransaction.
CREATE FUNCTION owui_crypto.fernet_seal(key bytea, message bytea, iv bytea DEFAULT NULL, issued_at bigint DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
DECLARE
    body pg_catalog.bytea;
BEGIN
    IF key IS NULL OR pg_catalog.octet_length(key) OPERATOR(pg_catalog.<>) 32 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'owui_crypto.fernet_seal: the key must be exactly 32 bytes';
    END IF;
    IF iv IS NOT NULL AND pg_catalog.octet_length(iv) OPERATOR(pg_catalog.<>) 16 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'owui_crypto.fernet_seal: the IV must be exactly 16 bytes';
    END IF;
    IF message IS NULL THEN
        RETURN NULL;
    END IF;
    -- version || timestamp || IV
    body := E'\\x80'::pg_catalog.bytea
            OPERATOR(pg_catalog.||) pg_catalog.int8send(COALESCE(issued_at,
                   pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()))::pg_catalog.int8))
            OPERATOR(pg_catalog.||) COALESCE(iv, owui_crypto.gen_random_bytes(16));
    -- || ciphertext (the IV is read back from the header: one random draw)
    body := body OPERATOR(pg_catalog.||)
            owui_crypto.encrypt_iv(message, pg_catalog.substr(key, 17, 16), pg_catalog.substr(body, 10, 16),
                                   'aes-cbc/pad:pkcs');
    -- || HMAC, then base64 -> base64url without line breaks
    RETURN pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
               pg_catalog.encode(body OPERATOR(pg_catalog.||)
                                 owui_crypto.hmac(body, pg_catalog.substr(key, 1, 16), 'sha256'), 'base64'),
               E'\n', ''), '+', '-'), '/', '_');
END
$$;

-- Opens `token` (NULL in, NULL out) and returns the message. With
-- `ttl_seconds` it also refuses a token issued more than ttl_seconds before
-- `now_epoch` (default: the statement's start time) or more than 60 s after it,
-- as the spec and cryptography.fernet do.
--
-- Any failure (not base64, wrong length, wrong version, wrong key or tampered
-- bytes, bad padding, expired, from the future) raises
--   SQLSTATE OC003 'sealed value failed its integrity check'.
-- decode() and pgcrypto raise their own errors for a malformed token (bad
-- base64, bad padding); the exception block turns them into OC003.
--
-- STABLE, not IMMUTABLE: it may read the clock, and an IMMUTABLE function with
-- constant arguments would be folded into the plan at planning time.
-- PARALLEL UNSAFE, not SAFE: the exception block is a subtransaction, and
-- PostgreSQL refuses subtransactions anywhere in a parallel query ("cannot start
-- subtransactions during a parallel operation", SQLSTATE 25000, leader included,
-- so RESTRICTED does not help); callers must be PARALLEL UNSAFE too. (A variant
-- without the block, validating the alphabet by regular expression and the
-- padding by hand, measured 2x slower from 16 KiB up; chat queries are small
-- index scans that gain nothing from parallel workers.)
CREATE FUNCTION owui_crypto.fernet_open(key bytea, token text, ttl_seconds bigint DEFAULT NULL, now_epoch bigint DEFAULT NULL)
RETURNS bytea
LANGUAGE plpgsql STABLE PARALLEL UNSAFE AS $$
DECLARE
    raw pg_catalog.bytea;
    n pg_catalog.int4;
    issued pg_catalog.int8;
BEGIN
    IF key IS NULL OR pg_catalog.octet_length(key) OPERATOR(pg_catalog.<>) 32 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'owui_crypto.fernet_open: the key must be exactly 32 bytes';
    END IF;
    IF token IS NULL THEN
        RETURN NULL;
    END IF;
    -- Every failure leaves this block (EXIT, or an error caught below) for the
    -- one RAISE after it, so all failures look the same, CONTEXT line included.
    <<checks>>
    BEGIN
        raw := pg_catalog.decode(pg_catalog.replace(pg_catalog.replace(token COLLATE pg_catalog."C", '-', '+'), '_', '/'),
                                 'base64');
        n := pg_catalog.octet_length(raw);
        -- 1 + 8 + 16 + 16k (k >= 1) + 32 bytes, version 0x80
        EXIT checks WHEN n OPERATOR(pg_catalog.<) 73
                      OR ((n OPERATOR(pg_catalog.-) 57) OPERATOR(pg_catalog.%) 16) OPERATOR(pg_catalog.<>) 0
                      OR pg_catalog.get_byte(raw, 0) OPERATOR(pg_catalog.<>) 128;
        IF ttl_seconds IS NOT NULL THEN
            issued := ('x' OPERATOR(pg_catalog.||) pg_catalog.encode(pg_catalog.substr(raw, 2, 8), 'hex'))::pg_catalog.bit(64)::pg_catalog.int8;
            now_epoch := COALESCE(now_epoch,
                                  pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.statement_timestamp()))::pg_catalog.int8);
            EXIT checks WHEN issued OPERATOR(pg_catalog.<) (now_epoch OPERATOR(pg_catalog.-) ttl_seconds)
                          OR issued OPERATOR(pg_catalog.>) (now_epoch OPERATOR(pg_catalog.+) 60);
        END IF;
        -- Constant-time MAC check: XOR the two MACs as bit strings and count the
        -- ones; bit_count reads every byte, where = would stop at the first difference.
        EXIT checks WHEN pg_catalog.bit_count(pg_catalog.bitxor(
                             ('x' OPERATOR(pg_catalog.||) pg_catalog.encode(
                                  owui_crypto.hmac(pg_catalog.substr(raw, 1, n OPERATOR(pg_catalog.-) 32),
                                                   pg_catalog.substr(key, 1, 16), 'sha256'),
                                  'hex'))::pg_catalog.bit(256),
                             ('x' OPERATOR(pg_catalog.||) pg_catalog.encode(
                                  pg_catalog.substr(raw, n OPERATOR(pg_catalog.-) 31, 32),
                                  'hex'))::pg_catalog.bit(256)))
                         OPERATOR(pg_catalog.<>) 0;
        RETURN owui_crypto.decrypt_iv(pg_catalog.substr(raw, 26, n OPERATOR(pg_catalog.-) 57),
                                      pg_catalog.substr(key, 17, 16), pg_catalog.substr(raw, 10, 16),
                                      'aes-cbc/pad:pkcs');
    EXCEPTION
        -- decode(): 22023; get_byte/substr/casts/overflow: other class 22 codes;
        -- pgcrypto (bad padding): 39000. Their messages are dropped.
        WHEN data_exception OR external_routine_invocation_exception THEN
            NULL;
    END;
    RAISE EXCEPTION USING ERRCODE = 'OC003', MESSAGE = 'sealed value failed its integrity check';
END
$$;
