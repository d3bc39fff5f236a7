-- Large values: the envelope check of 80_hardening.sql counted the padding
-- with rtrim(value, '='), and in a UTF8 database rtrim allocates 8 bytes a
-- character: an envelope over 134,217,727 characters (about 100 MB of
-- plaintext; Open WebUI's web client sends each message twice in a chat body)
-- failed with "invalid memory alloc request size" and the write was refused.
-- The regular expression already allows '=' only as the last one or two
-- characters, so the padding is read off the end instead. The regular
-- expression itself holds 4 bytes a character: values up to about 200 MB of
-- plaintext seal (PostgreSQL's 1 GB field limit is the next wall anyway).
-- Found by the soak's hostile input (e2e/test_hostile.py, the 50 MB chat).
CREATE OR REPLACE FUNCTION owui_crypto.envelope_key_id(value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    token_chars integer;
    token_bytes integer;
BEGIN
    IF value IS NULL OR pg_catalog.left(value, 4) OPERATOR(pg_catalog.<>) 'oc1:'
       OR NOT (value COLLATE pg_catalog."C" OPERATOR(pg_catalog.~) '^oc1:[0-9a-f]{16}:g[A-P][A-Za-z0-9_-]*={0,2}$') THEN
        RETURN NULL;
    END IF;
    token_chars := pg_catalog.octet_length(value) OPERATOR(pg_catalog.-) 21;
    IF token_chars OPERATOR(pg_catalog.%) 4 OPERATOR(pg_catalog.<>) 0 THEN
        RETURN NULL;
    END IF;
    token_bytes := token_chars OPERATOR(pg_catalog./) 4 OPERATOR(pg_catalog.*) 3
                   OPERATOR(pg_catalog.-) CASE WHEN pg_catalog.right(value, 2) OPERATOR(pg_catalog.=) '==' THEN 2
                                               WHEN pg_catalog.right(value, 1) OPERATOR(pg_catalog.=) '=' THEN 1
                                               ELSE 0 END;
    -- version + timestamp + IV (25) + ciphertext (16k, k >= 1) + HMAC (32)
    IF token_bytes OPERATOR(pg_catalog.<) 73
       OR (token_bytes OPERATOR(pg_catalog.-) 57) OPERATOR(pg_catalog.%) 16 OPERATOR(pg_catalog.<>) 0 THEN
        RETURN NULL;
    END IF;
    RETURN pg_catalog.substr(value, 5, 16);
END
$$;
