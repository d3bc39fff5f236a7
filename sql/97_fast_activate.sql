-- activate(), same protocol and checks as 80_hardening.sql's, at about half
-- its server time (scripts/bench_keys.py; tests/test_activate_flight.py).
-- What it spent its time on, and what changed:
-- * A function with a SET clause saves, sets and restores search_path on
--   every call, and the next name lookup recomputes the path: activate()
--   called three such helpers per activation. payload_counter() is now
--   inline (it stays for other callers); unwrap_transported() keeps its job
--   (and its calls still count the unwrapped keys for app_adapter.metrics)
--   but pins no path any more: like fernet_open() (10_fernet.sql) it names
--   everything schema-qualified, and only activate(), whose path is pinned,
--   may call it (no EXECUTE for the application's role).
-- * The five settings are cleared only on the path that activates nothing
--   and are otherwise set once each. An error ends the transaction (or its
--   savepoint, which restores the settings as they were before the call), so
--   no half-made activation can be used either way.
-- Kept exactly: the transport entry and its owner check, the counter spent
-- before anything else can fail (setval is not undone by a rollback),
-- refusal of a replayed or stale counter (OC004), the share token bound to
-- the same counter (OC004), fingerprints checked against the registrations
-- (OC005), the same error codes and messages.

-- Opens one offered token: Fernet under the entry's key, of counter (8 bytes,
-- big-endian) || key (32 bytes). Any failure is OC004.
CREATE OR REPLACE FUNCTION owui_crypto.unwrap_transported(transport_key pg_catalog.bytea, token pg_catalog.text)
RETURNS pg_catalog.bytea
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN owui_crypto.fernet_open(transport_key, token);
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
    user_payload bytea;
    share_payload bytea;
    fresh bigint;
    key bytea;
    user_key_id text;
    user_fingerprint bytea;
    share_key_id text;
    share_fingerprint bytea;
    ignored text;
BEGIN
    IF pg_catalog.to_regclass('pg_temp.owui_crypto_transport') IS NOT NULL THEN
        SELECT t.id, t.key, t.counter, pg_catalog.pg_get_userbyid(c.relowner) OPERATOR(pg_catalog.=) CURRENT_USER
          INTO entry_id, transport_key, counter, ours
          FROM pg_temp.owui_crypto_transport t, pg_catalog.pg_class c
         WHERE c.oid OPERATOR(pg_catalog.=) 'pg_temp.owui_crypto_transport'::pg_catalog.regclass
           AND t.id OPERATOR(pg_catalog.=) ANY (p_transport_ids)
         LIMIT 1;
    END IF;
    IF entry_id IS NULL THEN
        ignored := pg_catalog.set_config('owui_crypto.user_id', '', true);
        ignored := pg_catalog.set_config('owui_crypto.user_key_id', '', true);
        ignored := pg_catalog.set_config('owui_crypto.user_key', '', true);
        ignored := pg_catalog.set_config('owui_crypto.share_key_id', '', true);
        ignored := pg_catalog.set_config('owui_crypto.share_key', '', true);
        RETURN owui_crypto.transport_key();
    END IF;
    IF NOT ours THEN
        PERFORM owui_crypto.transport_entries();  -- raises OC004: someone else's table
    END IF;
    offer := pg_catalog.array_position(p_transport_ids, entry_id);

    -- The counter first, before anything else can fail: once a token has been
    -- seen, it is spent. unwrap_transported: NULL in, NULL out; OC004 on failure.
    IF p_user_keys[offer] IS NOT NULL THEN
        user_payload := owui_crypto.unwrap_transported(transport_key, p_user_keys[offer]);
    ELSIF p_share_keys[offer] IS NOT NULL THEN
        share_payload := owui_crypto.unwrap_transported(transport_key, p_share_keys[offer]);
    END IF;
    IF COALESCE(user_payload, share_payload) IS NOT NULL THEN
        IF pg_catalog.octet_length(COALESCE(user_payload, share_payload)) OPERATOR(pg_catalog.>=) 8 THEN
            fresh := ('x' OPERATOR(pg_catalog.||) pg_catalog.encode(
                         pg_catalog.substr(COALESCE(user_payload, share_payload), 1, 8), 'hex'))::pg_catalog.bit(64)::pg_catalog.int8;
        END IF;
        IF fresh IS NULL OR fresh OPERATOR(pg_catalog.<=) COALESCE(pg_catalog.pg_sequence_last_value(counter), 0) THEN
            RAISE EXCEPTION 'a key sent to activate() was already used (a replayed token)'
                USING ERRCODE = 'OC004', HINT = 'Every activation needs a fresh token; tokens are single-use.';
        END IF;
        ignored := pg_catalog.setval(counter, fresh)::pg_catalog.text;
    END IF;
    IF user_payload IS NOT NULL AND p_share_keys[offer] IS NOT NULL THEN
        share_payload := owui_crypto.unwrap_transported(transport_key, p_share_keys[offer]);
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
        IF user_payload IS NULL THEN
            RAISE EXCEPTION 'no key was offered for user %', p_user_id
                USING ERRCODE = 'OC005', HINT = 'Offer the user''s key wrapped under the transport key.';
        END IF;
        key := pg_catalog.substr(user_payload, 9);
        IF pg_catalog.octet_length(key) OPERATOR(pg_catalog.<>) 32
           OR owui_crypto.fingerprint(key) IS DISTINCT FROM user_fingerprint THEN
            RAISE EXCEPTION 'the key offered for user % is not that user''s key', p_user_id
                USING ERRCODE = 'OC005',
                      HINT = 'The application resolved the wrong key; nothing was activated.';
        END IF;
        ignored := pg_catalog.set_config('owui_crypto.user_id', p_user_id, true);
        ignored := pg_catalog.set_config('owui_crypto.user_key_id', user_key_id, true);
        ignored := pg_catalog.set_config('owui_crypto.user_key', pg_catalog.encode(key, 'hex'), true);
    ELSE
        ignored := pg_catalog.set_config('owui_crypto.user_id', '', true);
        ignored := pg_catalog.set_config('owui_crypto.user_key_id', '', true);
        ignored := pg_catalog.set_config('owui_crypto.user_key', '', true);
    END IF;

    IF share_payload IS NOT NULL THEN
        IF share_fingerprint IS NULL THEN
            RAISE EXCEPTION 'no share key is registered in this database'
                USING ERRCODE = 'OC005', HINT = 'Start the adapter once: it creates the share key.';
        END IF;
        IF pg_catalog.substr(share_payload, 1, 8) IS DISTINCT FROM pg_catalog.substr(COALESCE(user_payload, share_payload), 1, 8)
           OR pg_catalog.octet_length(share_payload) OPERATOR(pg_catalog.<) 8 THEN
            RAISE EXCEPTION 'the share key was not sent with the user key of this activation'
                USING ERRCODE = 'OC004';
        END IF;
        key := pg_catalog.substr(share_payload, 9);
        IF pg_catalog.octet_length(key) OPERATOR(pg_catalog.<>) 32
           OR owui_crypto.fingerprint(key) IS DISTINCT FROM share_fingerprint THEN
            RAISE EXCEPTION 'the share key offered is not this deployment''s share key'
                USING ERRCODE = 'OC005';
        END IF;
        ignored := pg_catalog.set_config('owui_crypto.share_key_id', share_key_id, true);
        ignored := pg_catalog.set_config('owui_crypto.share_key', pg_catalog.encode(key, 'hex'), true);
    ELSE
        ignored := pg_catalog.set_config('owui_crypto.share_key_id', '', true);
        ignored := pg_catalog.set_config('owui_crypto.share_key', '', true);
    END IF;
    RETURN NULL;
END
$$;
