-- Back to 80_hardening.sql's activate() and unwrap_transported(): same protocol and checks, their
-- original bodies (unwrap_transported pinning its path again).

CREATE OR REPLACE FUNCTION owui_crypto.unwrap_transported(transport_key bytea, token text) RETURNS bytea
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    payload bytea;
BEGIN
    payload := owui_crypto.fernet_open(transport_key, token);
    RETURN payload;
EXCEPTION WHEN SQLSTATE 'OC003' THEN
    RAISE EXCEPTION 'a key sent to activate() did not unwrap under this client''s transport key'
        USING ERRCODE = 'OC004', HINT = 'Wrap keys with the transport key activate() returned.';
END
$$;

CREATE OR REPLACE FUNCTION owui_crypto.activate(
    p_user_id text, p_transport_ids text[], p_user_keys text[], p_share_keys text[]
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    offer integer;
    entry_id text;
    transport_key bytea;
    counter regclass;
    ours boolean;
    payload bytea;
    fresh bigint;
    key bytea;
    user_key_id text;
    user_fingerprint bytea;
    share_key_id text;
    share_fingerprint bytea;
    ignored text;
BEGIN
    -- Statements are what costs here (each is one executor run): one finds
    -- the entry and checks who made its table, one reads both registrations.
    ignored := pg_catalog.set_config('owui_crypto.user_id', '', true);
    ignored := pg_catalog.set_config('owui_crypto.user_key_id', '', true);
    ignored := pg_catalog.set_config('owui_crypto.user_key', '', true);
    ignored := pg_catalog.set_config('owui_crypto.share_key_id', '', true);
    ignored := pg_catalog.set_config('owui_crypto.share_key', '', true);
    IF pg_catalog.to_regclass('pg_temp.owui_crypto_transport') IS NULL THEN
        RETURN owui_crypto.transport_key();
    END IF;
    SELECT t.id, t.key, t.counter, pg_catalog.pg_get_userbyid(c.relowner) OPERATOR(pg_catalog.=) CURRENT_USER
      INTO entry_id, transport_key, counter, ours
      FROM pg_temp.owui_crypto_transport t, pg_catalog.pg_class c
     WHERE c.oid OPERATOR(pg_catalog.=) 'pg_temp.owui_crypto_transport'::pg_catalog.regclass
       AND t.id OPERATOR(pg_catalog.=) ANY (p_transport_ids)
     LIMIT 1;
    IF entry_id IS NULL THEN
        RETURN owui_crypto.transport_key();
    END IF;
    IF NOT ours THEN
        PERFORM owui_crypto.transport_entries();  -- raises OC004: someone else's table
    END IF;
    offer := pg_catalog.array_position(p_transport_ids, entry_id);

    -- The counter first, before anything can fail: once a token has been
    -- seen, it is spent.
    IF p_user_keys[offer] IS NOT NULL THEN
        payload := owui_crypto.unwrap_transported(transport_key, p_user_keys[offer]);
    ELSIF p_share_keys[offer] IS NOT NULL THEN
        payload := owui_crypto.unwrap_transported(transport_key, p_share_keys[offer]);
    END IF;
    IF payload IS NOT NULL THEN
        fresh := owui_crypto.payload_counter(payload);
        IF fresh IS NULL OR fresh OPERATOR(pg_catalog.<=) COALESCE(pg_catalog.pg_sequence_last_value(counter), 0) THEN
            RAISE EXCEPTION 'a key sent to activate() was already used (a replayed token)'
                USING ERRCODE = 'OC004', HINT = 'Every activation needs a fresh token; tokens are single-use.';
        END IF;
        ignored := pg_catalog.setval(counter, fresh)::pg_catalog.text;
    END IF;

    SELECT (SELECT k.key_id FROM owui_crypto.user_key k WHERE k.user_id OPERATOR(pg_catalog.=) p_user_id),
           (SELECT k.fingerprint FROM owui_crypto.user_key k WHERE k.user_id OPERATOR(pg_catalog.=) p_user_id),
           d.key_id, d.fingerprint
      INTO user_key_id, user_fingerprint, share_key_id, share_fingerprint
      FROM (SELECT 1) AS one LEFT JOIN owui_crypto.deployment_key d ON d.name OPERATOR(pg_catalog.=) 'share';

    IF p_user_id IS NOT NULL THEN
        IF user_key_id IS NULL THEN
            RAISE EXCEPTION 'no key is registered for user %', p_user_id
                USING ERRCODE = 'OC005', HINT = 'Provision the user before acting as them.';
        END IF;
        IF p_user_keys[offer] IS NULL THEN
            RAISE EXCEPTION 'no key was offered for user %', p_user_id
                USING ERRCODE = 'OC005', HINT = 'Offer the user''s key wrapped under the transport key.';
        END IF;
        key := pg_catalog.substr(payload, 9);
        IF pg_catalog.octet_length(key) OPERATOR(pg_catalog.<>) 32
           OR owui_crypto.fingerprint(key) IS DISTINCT FROM user_fingerprint THEN
            RAISE EXCEPTION 'the key offered for user % is not that user''s key', p_user_id
                USING ERRCODE = 'OC005',
                      HINT = 'The application resolved the wrong key; nothing was activated.';
        END IF;
        ignored := pg_catalog.set_config('owui_crypto.user_id', p_user_id, true);
        ignored := pg_catalog.set_config('owui_crypto.user_key_id', user_key_id, true);
        ignored := pg_catalog.set_config('owui_crypto.user_key', pg_catalog.encode(key, 'hex'), true);
    END IF;

    IF p_share_keys[offer] IS NOT NULL THEN
        IF share_fingerprint IS NULL THEN
            RAISE EXCEPTION 'no share key is registered in this database'
                USING ERRCODE = 'OC005', HINT = 'Start the adapter once: it creates the share key.';
        END IF;
        payload := owui_crypto.unwrap_transported(transport_key, p_share_keys[offer]);
        IF owui_crypto.payload_counter(payload) IS DISTINCT FROM fresh THEN
            RAISE EXCEPTION 'the share key was not sent with the user key of this activation'
                USING ERRCODE = 'OC004';
        END IF;
        key := pg_catalog.substr(payload, 9);
        IF pg_catalog.octet_length(key) OPERATOR(pg_catalog.<>) 32
           OR owui_crypto.fingerprint(key) IS DISTINCT FROM share_fingerprint THEN
            RAISE EXCEPTION 'the share key offered is not this deployment''s share key'
                USING ERRCODE = 'OC005';
        END IF;
        ignored := pg_catalog.set_config('owui_crypto.share_key_id', share_key_id, true);
        ignored := pg_catalog.set_config('owui_crypto.share_key', pg_catalog.encode(key, 'hex'), true);
    END IF;
    RETURN NULL;
END
$$;
