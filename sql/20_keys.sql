-- Keys: who owns which key, and how a transaction is given one.
--
-- The database never stores a usable key. It stores, per key, a fingerprint
-- (HMAC-SHA256 keyed by the key over a fixed label) so that activation can
-- check that the key offered for a user is that user's key, and a short key
-- id (the first 8 bytes of the fingerprint, hex) that sealed values carry so
-- a reader can tell "not my key" without any cryptography.
--
-- A key reaches PostgreSQL only wrapped under a per-backend *transport key*.
-- The transport key is made inside this backend by owui_crypto.transport_key()
-- and leaves it only as a query result, which no PostgreSQL log records. The
-- client sends keys wrapped under it, so statement logs (log_statement = all
-- shows bind parameters) and pg_stat_activity see only wrapped bytes that are
-- useless without this backend's memory.

CREATE TABLE owui_crypto.user_key (
    user_id     text PRIMARY KEY,
    key_id      text NOT NULL UNIQUE CHECK (key_id ~ '^[0-9a-f]{16}$'),
    fingerprint bytea NOT NULL CHECK (pg_catalog.length(fingerprint) = 32),
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Keys of the deployment rather than of a user. 'share' seals shared-chat
-- snapshots, which anyone Open WebUI lets read a share must be able to open.
CREATE TABLE owui_crypto.deployment_key (
    name        text PRIMARY KEY CHECK (name IN ('share')),
    key_id      text NOT NULL UNIQUE CHECK (key_id ~ '^[0-9a-f]{16}$'),
    fingerprint bytea NOT NULL CHECK (pg_catalog.length(fingerprint) = 32),
    kms_key_id  text NOT NULL,
    kms_wrapped bytea NOT NULL,  -- the only way back to the key: KMS Decrypt
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Same definition as app_adapter.userkeys.fingerprint().
CREATE FUNCTION owui_crypto.fingerprint(key bytea) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
RETURN owui_crypto.hmac(pg_catalog.convert_to('owui-crypto key fingerprint v1', 'UTF8'), key, 'sha256');

CREATE FUNCTION owui_crypto.b64url_decode(s text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN pg_catalog.decode(pg_catalog.replace(pg_catalog.replace(s, '-', '+'), '_', '/'), 'base64');

CREATE FUNCTION owui_crypto.b64url_encode(b bytea) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
           pg_catalog.encode(b, 'base64'), E'\n', ''), '+', '-'), '/', '_');

-- Registers the fingerprint of a freshly provisioned user key. Idempotent for
-- the same key; refuses to replace a different one, because a user's DEK is
-- never replaced (everything sealed under it would become unreadable).
CREATE FUNCTION owui_crypto.register_user_key(p_user_id text, p_fingerprint bytea) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    existing owui_crypto.user_key;
    new_key_id text := pg_catalog.encode(pg_catalog.substr(p_fingerprint, 1, 8), 'hex');
BEGIN
    INSERT INTO owui_crypto.user_key (user_id, key_id, fingerprint)
    VALUES (p_user_id, new_key_id, p_fingerprint)
    ON CONFLICT (user_id) DO NOTHING;
    SELECT * INTO existing FROM owui_crypto.user_key WHERE user_id = p_user_id;
    IF existing.fingerprint <> p_fingerprint THEN
        RAISE EXCEPTION 'user % already has a key; a user''s key is never replaced', p_user_id
            USING ERRCODE = 'OC020',
                  HINT = 'Use the existing key (unwrap kms_encrypted_dek), or forget the user first.';
    END IF;
    RETURN existing.key_id;
END
$$;

CREATE FUNCTION owui_crypto.register_deployment_key(
    p_name text, p_fingerprint bytea, p_kms_key_id text, p_kms_wrapped bytea
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    existing owui_crypto.deployment_key;
BEGIN
    INSERT INTO owui_crypto.deployment_key (name, key_id, fingerprint, kms_key_id, kms_wrapped)
    VALUES (p_name, pg_catalog.encode(pg_catalog.substr(p_fingerprint, 1, 8), 'hex'),
            p_fingerprint, p_kms_key_id, p_kms_wrapped)
    ON CONFLICT (name) DO NOTHING;
    SELECT * INTO existing FROM owui_crypto.deployment_key WHERE name = p_name;
    IF existing.fingerprint <> p_fingerprint THEN
        RAISE EXCEPTION 'the deployment already has a % key; it is never replaced', p_name
            USING ERRCODE = 'OC020',
                  HINT = 'Unwrap the stored copy (owui_crypto.deployment_key_wrapped) instead of making a new key.';
    END IF;
    RETURN existing.key_id;
END
$$;

-- The KMS-wrapped copy of a deployment key, for the application to unwrap.
CREATE FUNCTION owui_crypto.deployment_key_wrapped(p_name text, OUT kms_key_id text, OUT kms_wrapped bytea)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
BEGIN ATOMIC
    SELECT d.kms_key_id, d.kms_wrapped FROM owui_crypto.deployment_key d WHERE d.name = p_name;
END;

-- This backend's transport key as 'id:key' (key: 32 bytes, base64url, i.e. a
-- Fernet key). Made on first use. It lives in a session setting, so a
-- transaction that rolls back takes a key made inside it along; the client
-- then simply receives a fresh one from activate().
CREATE FUNCTION owui_crypto.transport_key() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    current text := pg_catalog.current_setting('owui_crypto.transport_key', true);
BEGIN
    IF current IS NULL OR current = '' THEN
        current := pg_catalog.encode(owui_crypto.gen_random_bytes(8), 'hex') || ':'
                   || owui_crypto.b64url_encode(owui_crypto.gen_random_bytes(32));
        current := pg_catalog.set_config('owui_crypto.transport_key', current, false);
    END IF;
    RETURN current;
END
$$;

-- Forgets whatever keys this transaction holds. (Assignments, not one SELECT
-- over a list: a statement would go through the executor on every call.)
CREATE FUNCTION owui_crypto.deactivate() RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    ignored text;
BEGIN
    ignored := pg_catalog.set_config('owui_crypto.user_id', '', true);
    ignored := pg_catalog.set_config('owui_crypto.user_key_id', '', true);
    ignored := pg_catalog.set_config('owui_crypto.user_key', '', true);
    ignored := pg_catalog.set_config('owui_crypto.share_key_id', '', true);
    ignored := pg_catalog.set_config('owui_crypto.share_key', '', true);
END
$$;

-- Key material is only ever touched in PL/pgSQL assignments, IF and RETURN:
-- those run as "simple expressions" outside the executor, so auto_explain
-- (even with log_nested_statements and log_verbose) never prints a plan in
-- which a key was folded into a constant. PERFORM and SELECT INTO would.
--
-- The one entry point for keys. Gives this transaction, and nothing beyond
-- it, the key of p_user_id and the share key, each sent as a Fernet token
-- under a backend's transport key.
--
-- The client offers the keys wrapped under every transport key it knows
-- (parallel arrays: p_transport_ids[i] wrapped p_user_keys[i] and
-- p_share_keys[i]): behind a pooler it cannot know which server backend the
-- transaction landed on, and so it still needs one round trip.
--
-- Returns NULL when the keys are active. Returns this backend's transport key
-- instead, activating nothing, when none of the offers is for this backend (a
-- new connection, or a pooler moved the client to a backend it has not met):
-- the client adds it to what it knows and calls again in the same transaction.
CREATE FUNCTION owui_crypto.activate(
    p_user_id text, p_transport_ids text[], p_user_keys text[], p_share_keys text[]
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    transport text := pg_catalog.current_setting('owui_crypto.transport_key', true);
    offer integer;
    transport_key bytea;
    key bytea;
    registered_key_id text;
    registered_fingerprint bytea;
    ignored text;
BEGIN
    IF transport IS NOT NULL AND transport <> '' THEN
        offer := pg_catalog.array_position(p_transport_ids, pg_catalog.split_part(transport, ':', 1));
    END IF;
    IF offer IS NULL THEN
        RETURN owui_crypto.transport_key();
    END IF;
    transport_key := owui_crypto.b64url_decode(pg_catalog.split_part(transport, ':', 2));
    PERFORM owui_crypto.deactivate();

    IF p_user_id IS NOT NULL THEN
        SELECT k.key_id, k.fingerprint INTO registered_key_id, registered_fingerprint
          FROM owui_crypto.user_key k WHERE k.user_id = p_user_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no key is registered for user %', p_user_id
                USING ERRCODE = 'OC005', HINT = 'Provision the user before acting as them.';
        END IF;
        key := owui_crypto.unwrap_transported(transport_key, p_user_keys[offer]);
        -- A plain comparison: fingerprints are no secret (every dump has them),
        -- so the time it takes to find a difference tells nothing.
        IF owui_crypto.fingerprint(key) <> registered_fingerprint THEN
            RAISE EXCEPTION 'the key offered for user % is not that user''s key', p_user_id
                USING ERRCODE = 'OC005',
                      HINT = 'The application resolved the wrong key; nothing was activated.';
        END IF;
        ignored := pg_catalog.set_config('owui_crypto.user_id', p_user_id, true);
        ignored := pg_catalog.set_config('owui_crypto.user_key_id', registered_key_id, true);
        ignored := pg_catalog.set_config('owui_crypto.user_key', pg_catalog.encode(key, 'hex'), true);
    END IF;

    IF p_share_keys[offer] IS NOT NULL THEN
        SELECT d.key_id, d.fingerprint INTO registered_key_id, registered_fingerprint
          FROM owui_crypto.deployment_key d WHERE d.name = 'share';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no share key is registered in this database'
                USING ERRCODE = 'OC005', HINT = 'Start the adapter once: it creates the share key.';
        END IF;
        key := owui_crypto.unwrap_transported(transport_key, p_share_keys[offer]);
        IF owui_crypto.fingerprint(key) <> registered_fingerprint THEN
            RAISE EXCEPTION 'the share key offered is not this deployment''s share key'
                USING ERRCODE = 'OC005';
        END IF;
        ignored := pg_catalog.set_config('owui_crypto.share_key_id', registered_key_id, true);
        ignored := pg_catalog.set_config('owui_crypto.share_key', pg_catalog.encode(key, 'hex'), true);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION owui_crypto.unwrap_transported(transport_key bytea, token text) RETURNS bytea
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN owui_crypto.fernet_open(transport_key, token);
EXCEPTION WHEN SQLSTATE 'OC003' THEN
    RAISE EXCEPTION 'a key sent to activate() did not unwrap under this backend''s transport key'
        USING ERRCODE = 'OC004', HINT = 'Wrap keys with the transport key activate() returned.';
END
$$;

-- The user whose key this transaction holds, or NULL.
CREATE FUNCTION owui_crypto.active_user() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN NULLIF(pg_catalog.current_setting('owui_crypto.user_id', true), '');
