-- Hardening: what an attacker holding the application role's SQL, a pooled
-- connection, a log or a dump could do against 00-70, closed. Each block
-- replaces definitions of the earlier files (which stay as they were
-- applied: migrations are history); the attack suite is tests/test_attacks.py
-- and the reasoning is in SECURITY.md.
--
-- Rules this file establishes for everything owui_crypto defines:
-- * Every SECURITY DEFINER function, and every function that pins a path,
--   uses search_path = pg_catalog, pg_temp: pg_temp last, explicitly. With
--   search_path = '' PostgreSQL still searches pg_temp FIRST for relations
--   and types, so a role with TEMP could make a definer function resolve its
--   own domain or table and run code as the owner.
-- * The acting user is never taken on the word of a setting: custom settings
--   (owui_crypto.*) can be set by any SQL. Definer code that decides on an
--   owner asks acting_user(), which checks the active key's fingerprint.
-- * A value counts as sealed only if it is exactly an envelope AND carries the
--   key id its row must be sealed under; anything else is plaintext.

-- -- Strict envelopes -----------------------------------------------------------

-- The key id of `value` if it is exactly an envelope (oc1:<16 hex>:<Fernet
-- token of a valid length, version 0x80, base64url with padding>), else NULL.
-- Parsing only: whether the token opens needs the key.
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
                   OPERATOR(pg_catalog.-) (pg_catalog.octet_length(value)
                                           OPERATOR(pg_catalog.-) pg_catalog.octet_length(pg_catalog.rtrim(value, '=')));
    -- version + timestamp + IV (25) + ciphertext (16k, k >= 1) + HMAC (32)
    IF token_bytes OPERATOR(pg_catalog.<) 73
       OR (token_bytes OPERATOR(pg_catalog.-) 57) OPERATOR(pg_catalog.%) 16 OPERATOR(pg_catalog.<>) 0 THEN
        RETURN NULL;
    END IF;
    RETURN pg_catalog.substr(value, 5, 16);
END
$$;

-- In json columns the envelope is a JSON string and nothing else, byte for byte.
CREATE OR REPLACE FUNCTION owui_crypto.envelope_key_id(value json) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    envelope text := value::pg_catalog.text;
BEGIN
    IF envelope IS NULL OR pg_catalog.left(envelope, 5) OPERATOR(pg_catalog.<>) '"oc1:'
       OR pg_catalog.right(envelope, 1) OPERATOR(pg_catalog.<>) '"' THEN
        RETURN NULL;
    END IF;
    RETURN owui_crypto.envelope_key_id(pg_catalog.substr(envelope, 2, pg_catalog.octet_length(envelope) OPERATOR(pg_catalog.-) 2));
END
$$;

-- The key id a row owned by `owner` (kind 'owner') or any row (kind 'share')
-- must be sealed under; NULL when there is none (then nothing counts as
-- sealed). PL/pgSQL and text arguments, so that removing owui-crypto step by
-- step meets no dependency on the key ring or the policy's types.
CREATE OR REPLACE FUNCTION owui_crypto.expected_key_id(kind text, owner text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_id text;
BEGIN
    IF kind OPERATOR(pg_catalog.=) 'owner' THEN
        SELECT k.key_id INTO found_id FROM owui_crypto.user_key k WHERE k.user_id OPERATOR(pg_catalog.=) owner;
    ELSE
        SELECT d.key_id INTO found_id FROM owui_crypto.deployment_key d WHERE d.name OPERATOR(pg_catalog.=) 'share';
    END IF;
    RETURN found_id;
END
$$;

-- Kept for callers that only need the shape (assert_no_sealed_data counts
-- anything that may be sealed, so it errs on the side of refusing).
CREATE OR REPLACE FUNCTION owui_crypto.is_sealed(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN owui_crypto.envelope_key_id(value) IS NOT NULL;

CREATE OR REPLACE FUNCTION owui_crypto.is_sealed(value json) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN owui_crypto.envelope_key_id(value) IS NOT NULL;

-- JSON null is left as it is, like SQL NULL (sql/90_coverage.sql).
CREATE OR REPLACE FUNCTION owui_crypto.unsealed_sql(family text, rec text, col name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
RETURN pg_catalog.format(CASE family
    WHEN 'jsonb' THEN '(%1$s.%2$I IS NOT NULL AND %1$s.%2$I::pg_catalog.text <> ''null'' AND owui_crypto.envelope_key_id(%1$s.%2$I::pg_catalog.json) IS NULL)'
    WHEN 'json' THEN '(%1$s.%2$I IS NOT NULL AND %1$s.%2$I::pg_catalog.text <> ''null'' AND owui_crypto.envelope_key_id(%1$s.%2$I) IS NULL)'
    ELSE '(%1$s.%2$I IS NOT NULL AND owui_crypto.envelope_key_id(%1$s.%2$I) IS NULL)' END,
    rec, col);

-- -- Who is acting -----------------------------------------------------------------

-- The user whose key this transaction verifiably holds, or NULL when none is
-- active. Raises OC005 when the settings name a user but the key in them is
-- not that user's (someone set them by hand). Only meaningful inside definer
-- code: it reads the key ring.
CREATE OR REPLACE FUNCTION owui_crypto.acting_user() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    active text := pg_catalog.current_setting('owui_crypto.user_id', true);
    hex_key text := pg_catalog.current_setting('owui_crypto.user_key', true);
    registered bytea;
BEGIN
    IF active IS NULL OR active OPERATOR(pg_catalog.=) '' THEN
        RETURN NULL;
    END IF;
    SELECT k.fingerprint INTO registered FROM owui_crypto.user_key k WHERE k.user_id OPERATOR(pg_catalog.=) active;
    IF registered IS NULL OR hex_key IS NULL
       OR NOT (hex_key COLLATE pg_catalog."C" OPERATOR(pg_catalog.~) '^[0-9a-f]{64}$')
       OR owui_crypto.fingerprint(pg_catalog.decode(hex_key, 'hex')) IS DISTINCT FROM registered THEN
        RAISE EXCEPTION 'the key in this transaction''s settings is not the key of user %', active
            USING ERRCODE = 'OC005', HINT = 'Keys are given to a transaction only by owui_crypto.activate().';
    END IF;
    RETURN active;
END
$$;

-- True when `actor` is an Open WebUI administrator: admins delete other
-- users' chats (a user's deletion, the admin's chat management) in their own
-- requests.
CREATE OR REPLACE FUNCTION owui_crypto.is_admin(actor text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN EXISTS (SELECT 1 FROM public."user" u
                WHERE u.id OPERATOR(pg_catalog.=) actor AND u.role OPERATOR(pg_catalog.=) 'admin');

-- The key this transaction seals with (see 30_seal.sql); now also refuses a
-- key setting that is empty or malformed instead of sealing under it.
CREATE OR REPLACE FUNCTION owui_crypto.sealing_key(kind owui_crypto.key_kind, owner text, binding text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    active text;
    key_id text;
    hex_key text;
BEGIN
    IF kind OPERATOR(pg_catalog.=) 'owner' OR owner IS NOT NULL THEN
        active := pg_catalog.current_setting('owui_crypto.user_id', true);
        IF active IS NULL OR active OPERATOR(pg_catalog.=) '' THEN
            RAISE EXCEPTION 'no user key is active: cannot seal %', binding
                USING ERRCODE = 'OC001',
                      HINT = 'Bind the acting user so the adapter activates their key (owui_crypto.activate).';
        END IF;
        IF owner IS NULL THEN
            RAISE EXCEPTION 'the row has no owner: cannot seal %', binding
                USING ERRCODE = 'OC002', HINT = 'Write the owning row (for a message: its chat) first.';
        END IF;
        IF owner OPERATOR(pg_catalog.<>) active THEN
            RAISE EXCEPTION 'user % is not the owner (%) of the row: cannot seal %', active, owner, binding
                USING ERRCODE = 'OC002',
                      HINT = 'Only the owner can write sealed content; their key is needed.';
        END IF;
    END IF;
    IF kind OPERATOR(pg_catalog.=) 'share' THEN
        key_id := pg_catalog.current_setting('owui_crypto.share_key_id', true);
        hex_key := pg_catalog.current_setting('owui_crypto.share_key', true);
    ELSE
        key_id := pg_catalog.current_setting('owui_crypto.user_key_id', true);
        hex_key := pg_catalog.current_setting('owui_crypto.user_key', true);
    END IF;
    IF key_id IS NULL OR hex_key IS NULL
       OR NOT (key_id COLLATE pg_catalog."C" OPERATOR(pg_catalog.~) '^[0-9a-f]{16}$')
       OR NOT (hex_key COLLATE pg_catalog."C" OPERATOR(pg_catalog.~) '^[0-9a-f]{64}$') THEN
        RAISE EXCEPTION 'no usable % key is active: cannot seal %', kind, binding
            USING ERRCODE = 'OC001',
                  HINT = 'Activate the key with owui_crypto.activate(); keys set by hand are refused.';
    END IF;
    RETURN key_id OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) hex_key;
END
$$;

-- -- The transport: per client, unsteerable, not replayable -------------------------
--
-- Before: one transport key per backend in a custom setting, which any SQL
-- can set (steering) and which the backend handed to every client that asked
-- (so another client behind the same pooler could open a logged token).
-- Now each client gets its own entry (id, key) made by the backend and kept
-- in a temporary table owned by the schema owner, which the application role
-- can neither read nor write. Every wrapped key carries a counter; the
-- backend accepts a counter only above the last one it accepted for that
-- entry and records it in a temporary sequence, which no rollback undoes, so
-- a token copied from a log activates nothing, on any backend, ever again.

-- The entry table of this backend, made on first use; refuses one made by
-- anybody else (a role with TEMP could make its own first).
CREATE OR REPLACE FUNCTION owui_crypto.transport_entries() RETURNS regclass
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    entries regclass := pg_catalog.to_regclass('pg_temp.owui_crypto_transport');
    maker oid;
BEGIN
    IF entries IS NULL THEN
        CREATE TEMPORARY TABLE owui_crypto_transport (
            id      text PRIMARY KEY,
            key     bytea NOT NULL,
            counter regclass NOT NULL,
            made_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
        );
        entries := pg_catalog.to_regclass('pg_temp.owui_crypto_transport');
    END IF;
    SELECT c.relowner INTO maker FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) entries;
    IF maker OPERATOR(pg_catalog.<>) (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER) THEN
        RAISE EXCEPTION 'this session''s transport state was not made by owui-crypto'
            USING ERRCODE = 'OC004', HINT = 'A temporary table pg_temp.owui_crypto_transport shadows it; end the session.';
    END IF;
    RETURN entries;
END
$$;

-- A new entry for the client that asked, as 'id:key' (key: a Fernet key).
-- Entries beyond the newest 64 are dropped: a backend meets that many
-- clients only behind a large pool, and a dropped client just gets a new one.
CREATE OR REPLACE FUNCTION owui_crypto.transport_key() RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    entry_id text := pg_catalog.encode(owui_crypto.gen_random_bytes(8), 'hex');
    key bytea := owui_crypto.gen_random_bytes(32);
    counter regclass;
    stale record;
BEGIN
    PERFORM owui_crypto.transport_entries();
    EXECUTE pg_catalog.format('CREATE TEMPORARY SEQUENCE %I MINVALUE 0 START 0', 'owui_crypto_transport_' OPERATOR(pg_catalog.||) entry_id);
    counter := pg_catalog.to_regclass('pg_temp.owui_crypto_transport_' OPERATOR(pg_catalog.||) entry_id);
    INSERT INTO pg_temp.owui_crypto_transport (id, key, counter) VALUES (entry_id, key, counter);
    FOR stale IN SELECT t.id, t.counter FROM pg_temp.owui_crypto_transport t
                  ORDER BY t.made_at DESC OFFSET 64 LOOP
        DELETE FROM pg_temp.owui_crypto_transport t WHERE t.id OPERATOR(pg_catalog.=) stale.id;
        EXECUTE pg_catalog.format('DROP SEQUENCE pg_temp.%I', 'owui_crypto_transport_' OPERATOR(pg_catalog.||) stale.id);
    END LOOP;
    RETURN entry_id OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) owui_crypto.b64url_encode(key);
END
$$;

-- Opens one offered token: Fernet under the entry's key, of counter (8 bytes,
-- big-endian) || key (32 bytes). Any failure is OC004; a key of the wrong
-- length is OC005.
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

-- The counter of a payload, or NULL when the payload is too short to hold one.
CREATE OR REPLACE FUNCTION owui_crypto.payload_counter(payload bytea) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN pg_catalog.octet_length(payload) OPERATOR(pg_catalog.>=) 8
            THEN ('x' OPERATOR(pg_catalog.||) pg_catalog.encode(pg_catalog.substr(payload, 1, 8), 'hex'))::pg_catalog.bit(64)::pg_catalog.int8
       END;

-- The one entry point for keys (see 20_keys.sql for the protocol's shape).
-- p_transport_ids[i] names the entry that wrapped p_user_keys[i] and
-- p_share_keys[i]. Returns NULL when the keys are active; a fresh entry
-- ('id:key') for this client, activating nothing, when none of the offered
-- entries lives on this backend.
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

-- -- Forgetting ---------------------------------------------------------------------

-- The application forgets users Open WebUI has deleted; only the schema's
-- owner (owui-crypto forget, run by an operator) may shred a user that still
-- exists. Otherwise one injected statement could shred anyone.
CREATE OR REPLACE FUNCTION owui_crypto.forget_user_key(p_user_id text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public."user" u WHERE u.id OPERATOR(pg_catalog.=) p_user_id)
       AND NOT pg_catalog.pg_has_role(SESSION_USER, CURRENT_USER, 'MEMBER') THEN
        RAISE EXCEPTION 'user % still exists: only the owner of owui-crypto may shred their keys', p_user_id
            USING ERRCODE = 'OC002', HINT = 'Delete the user in Open WebUI, or run owui-crypto forget as the owner.';
    END IF;
    UPDATE public."user"
       SET salt = NULL, user_encrypted_dek = NULL, user_key = NULL, kms_encrypted_dek = NULL
     WHERE id OPERATOR(pg_catalog.=) p_user_id;
    DELETE FROM owui_crypto.user_key WHERE user_id OPERATOR(pg_catalog.=) p_user_id;
    RETURN FOUND;
END
$$;

-- -- The generator: owner checks without holes ------------------------------------
--
-- What changes against 50_generate.sql:
-- * Every generated function pins search_path = pg_catalog, pg_temp.
-- * Moving a row to another owner is OC007 whatever its columns hold, through
--   the view and on the base table.
-- * Changing a protected column of a row (to NULL included) needs its owner's
--   key, verified (acting_user()), not just the settings naming the owner.
-- * DELETE through the view: the row's owner, or an Open WebUI admin (whose
--   key is active), or anyone for a row that has no owner any more; anyone
--   else gets OC002. Deleting reveals nothing, but one injected statement
--   must not erase other users' chats.
-- * The base table counts a value as sealed only if it is exactly an envelope
--   under the key id its row must be sealed under (strict envelopes); any
--   other value is plaintext and is sealed, which needs the owner's key.

-- The SQL expression of a row's owner; `rec` is NEW or OLD.
CREATE OR REPLACE FUNCTION owui_crypto.owner_sql(owner_column name, owner_parent name, rec text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    parent record;
BEGIN
    IF owner_column IS NULL THEN
        RETURN 'NULL';
    END IF;
    IF owner_parent IS NULL THEN
        RETURN pg_catalog.format('%s.%I::pg_catalog.text', rec, owner_column);
    END IF;
    SELECT p.table_name, p.row_id, p.owner_column INTO STRICT parent
      FROM owui_crypto.protected_table p WHERE p.table_name OPERATOR(pg_catalog.=) owner_sql.owner_parent;
    RETURN pg_catalog.format('(SELECT p.%I::pg_catalog.text FROM public.%I AS p WHERE p.%I OPERATOR(pg_catalog.=) %s.%I)',
                             parent.owner_column, parent.table_name, parent.row_id, rec, owner_column);
END
$$;

-- The SQL of one protected column, for the view (alias t) and both triggers
-- (NEW, OLD, and `owner` / `expected` of the trigger's DECLARE). A value is
-- bound to its table, column and row; sql/90_coverage.sql extends this to
-- members of a JSON object. (Text arguments, not the policy's types: removing
-- owui-crypto step by step must meet no dependency on them.)
CREATE OR REPLACE FUNCTION owui_crypto.column_sql(
    p_table name, col name, family text, type_sql text, placeholder text, kind text, row_id name,
    OUT open_expr text,         -- the view's opened value
    OUT seal_expr text,         -- NEW's value sealed as the view's triggers seal it (always)
    OUT unchanged_test text,    -- NEW still holds what OLD held
    OUT stranger_test text,     -- the base table's trigger: NEW holds plaintext
    OUT direct_seal_expr text)  -- ... and this seals it
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    binding text := pg_catalog.format('%L || %%s.%I::pg_catalog.text',
                                      p_table OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) col OPERATOR(pg_catalog.||) '/', row_id);
    as_json text := CASE family WHEN 'jsonb' THEN '::pg_catalog.json' ELSE '' END;
    back text := CASE family WHEN 'jsonb' THEN '::pg_catalog.jsonb' ELSE '' END;
    members text[] := owui_crypto.protected_members(p_table, col);
BEGIN
    unchanged_test := owui_crypto.unchanged_sql(family, col);
    IF members IS NOT NULL THEN
        -- Only these members of a JSON object are sealed, each bound to
        -- "table.column/row id#member"; the rest stays for SQL to filter on.
        open_expr := pg_catalog.format('owui_crypto.open_members(t.%1$I%2$s, %3$L, %4$s, %5$L)%6$s',
                                       col, as_json, members, pg_catalog.format(binding, 't'), placeholder, back);
        seal_expr := pg_catalog.format('owui_crypto.seal_members(NEW.%1$I%2$s, %3$L, %4$L, owner, %5$s, NULL)%6$s',
                                       col, as_json, members, kind, pg_catalog.format(binding, 'NEW'), back);
        stranger_test := pg_catalog.format(
            '(NEW.%1$I IS NOT NULL AND owui_crypto.members_to_seal(NEW.%1$I%3$s, %4$L, expected)'
            ' AND NOT (TG_OP = ''UPDATE'' AND %2$s AND NOT owui_crypto.members_to_seal(NEW.%1$I%3$s, %4$L, ''*'')))',
            col, unchanged_test, as_json, members);
        direct_seal_expr := pg_catalog.format('owui_crypto.seal_members(NEW.%1$I%2$s, %3$L, %4$L, owner, %5$s, expected)%6$s',
                                              col, as_json, members, kind, pg_catalog.format(binding, 'NEW'), back);
        RETURN;
    END IF;
    open_expr := owui_crypto.open_sql(family, type_sql, 't', col, pg_catalog.format(binding, 't'), placeholder);
    seal_expr := owui_crypto.seal_sql(family, col, kind::owui_crypto.key_kind, pg_catalog.format(binding, 'NEW'));
    -- Plaintext: anything but an envelope under the row's own key id, except
    -- an envelope the row already held (whatever key sealed it: metadata
    -- updates need no key, and nothing is sealed twice). JSON null is left
    -- as it is, like SQL NULL.
    stranger_test := pg_catalog.format(
        '(NEW.%1$I IS NOT NULL%4$s AND owui_crypto.envelope_key_id(NEW.%1$I%3$s) IS DISTINCT FROM expected'
        ' AND NOT (TG_OP = ''UPDATE'' AND %2$s AND owui_crypto.envelope_key_id(NEW.%1$I%3$s) IS NOT NULL))',
        col, unchanged_test, as_json,
        CASE WHEN family IN ('json', 'jsonb') THEN pg_catalog.format(' AND NEW.%I::pg_catalog.text <> ''null''', col) ELSE '' END);
    direct_seal_expr := seal_expr;
END
$$;

-- The members of a JSON column that are sealed, or NULL for the whole value
-- (sql/90_coverage.sql makes this read the policy).
CREATE OR REPLACE FUNCTION owui_crypto.protected_members(p_table name, col name) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN NULL::text[];

CREATE OR REPLACE FUNCTION owui_crypto.generate(p_table name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $gen$
DECLARE
    policy owui_crypto.protected_table;
    c record;
    base text := pg_catalog.format('public.%I', p_table);
    view text := pg_catalog.format('owui_crypto_view.%I', p_table);
    owner_new text;
    owner_old text;
    seal_owner text;
    owner_moved text := 'false';
    select_list text[] := '{}';
    insert_cols text[] := '{}';
    insert_vals text[] := '{}';
    update_sets text[] := '{}';
    changed_tests text[] := '{}';
    nonnull_tests text[] := '{}';
    stranger_tests text[] := '{}';
    direct_seals text := '';
    parts record;
BEGIN
    SELECT * INTO STRICT policy FROM owui_crypto.protected_table p WHERE p.table_name OPERATOR(pg_catalog.=) p_table;
    IF pg_catalog.to_regclass(base) IS NULL THEN
        RAISE EXCEPTION 'protected table % does not exist', base
            USING ERRCODE = 'OC011', HINT = 'Run Open WebUI''s own migrations first, then owui-crypto upgrade.';
    END IF;
    FOR c IN SELECT pc.column_name FROM owui_crypto.protected_column pc
              WHERE pc.table_name OPERATOR(pg_catalog.=) p_table
                AND NOT EXISTS (SELECT 1 FROM owui_crypto.columns_of(p_table) b WHERE b.column_name OPERATOR(pg_catalog.=) pc.column_name)
    LOOP
        RAISE EXCEPTION 'protected column %.% does not exist', base, c.column_name
            USING ERRCODE = 'OC011', HINT = 'Open WebUI changed its schema: update sql/40_policy.sql.';
    END LOOP;

    owner_new := owui_crypto.owner_sql(policy.owner_column, policy.owner_parent, 'NEW');
    owner_old := owui_crypto.owner_sql(policy.owner_column, policy.owner_parent, 'OLD');
    seal_owner := owner_new;
    IF policy.owner_column IS NOT NULL THEN
        -- The owner column changed AND the owner it names changed (a message
        -- may move between two chats of the same user).
        owner_moved := pg_catalog.format('NEW.%1$I IS DISTINCT FROM OLD.%1$I AND (%2$s) IS DISTINCT FROM (%3$s)',
                                         policy.owner_column, owner_new, owner_old);
        IF policy.key_kind OPERATOR(pg_catalog.=) 'share' THEN
            seal_owner := 'COALESCE(' OPERATOR(pg_catalog.||) owner_new OPERATOR(pg_catalog.||) ', '''')';  -- see sealing_key()
        END IF;
    END IF;

    FOR c IN SELECT * FROM owui_crypto.columns_of(p_table) LOOP
        insert_cols := insert_cols OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.column_name);
        IF NOT c.protected THEN
            select_list := select_list OPERATOR(pg_catalog.||) pg_catalog.format('t.%I', c.column_name);
            insert_vals := insert_vals OPERATOR(pg_catalog.||) pg_catalog.format('NEW.%I', c.column_name);
            update_sets := update_sets OPERATOR(pg_catalog.||) pg_catalog.format('%1$I = NEW.%1$I', c.column_name);
            CONTINUE;
        END IF;
        IF c.family IS NULL THEN
            RAISE EXCEPTION 'protected column %.% has type %, which owui-crypto cannot seal', base, c.column_name, c.type_sql
                USING ERRCODE = 'OC011', HINT = 'Protect only text, unbounded varchar, json or jsonb columns.';
        END IF;
        parts := owui_crypto.column_sql(p_table, c.column_name, c.family, c.type_sql, c.placeholder,
                                        policy.key_kind::pg_catalog.text, policy.row_id);
        select_list := select_list OPERATOR(pg_catalog.||) (parts.open_expr OPERATOR(pg_catalog.||) ' AS '
                                                            OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.column_name));
        insert_vals := insert_vals OPERATOR(pg_catalog.||) parts.seal_expr;
        -- Unchanged (same row, same opened value): keep the stored value.
        update_sets := update_sets OPERATOR(pg_catalog.||) pg_catalog.format(
            '%1$I = CASE WHEN NEW.%2$I IS NOT DISTINCT FROM OLD.%2$I AND %3$s THEN %1$I ELSE %4$s END',
            c.column_name, policy.row_id, parts.unchanged_test, parts.seal_expr);
        changed_tests := changed_tests OPERATOR(pg_catalog.||) pg_catalog.format('NOT (%s)', parts.unchanged_test);
        nonnull_tests := nonnull_tests OPERATOR(pg_catalog.||) pg_catalog.format('NEW.%I IS NOT NULL', c.column_name);
        stranger_tests := stranger_tests OPERATOR(pg_catalog.||) parts.stranger_test;
        direct_seals := direct_seals OPERATOR(pg_catalog.||) pg_catalog.format(
            E'            IF %s THEN\n                NEW.%I := %s;\n            END IF;\n',
            parts.stranger_test, c.column_name, parts.direct_seal_expr);
    END LOOP;

    -- The view. Dropped and made anew, so columns Open WebUI added, dropped or
    -- retyped are picked up; the whole refresh is one transaction.
    EXECUTE pg_catalog.format('DROP VIEW IF EXISTS %s CASCADE', view);
    EXECUTE pg_catalog.format('CREATE VIEW %s AS SELECT %s FROM %s AS t',
                              view, pg_catalog.array_to_string(select_list, ', '), base);
    EXECUTE pg_catalog.format('COMMENT ON VIEW %s IS %L', view,
        'Generated by owui_crypto.refresh() from the protection policy; do not edit.');
    -- Inserts through a view get the view's defaults, not the table's.
    FOR c IN SELECT * FROM owui_crypto.columns_of(p_table) WHERE default_sql IS NOT NULL LOOP
        EXECUTE pg_catalog.format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', view, c.column_name, c.default_sql);
    END LOOP;

    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION owui_crypto.%1$I() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
-- Generated by owui_crypto.generate(%2$L); do not edit.
DECLARE
    owner text;
    actor text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        owner := %5$s;
        IF owner IS NOT NULL THEN
            actor := owui_crypto.acting_user();
            IF actor IS DISTINCT FROM owner AND NOT owui_crypto.is_admin(actor) THEN
                RAISE EXCEPTION 'user %% may not delete a row of %3$s owned by %%', COALESCE(actor, '(none)'), owner
                    USING ERRCODE = 'OC002', HINT = 'Only the owner of a row, or an admin, deletes it.';
            END IF;
        END IF;
        DELETE FROM %3$s WHERE %4$I = OLD.%4$I;
        IF NOT FOUND THEN RETURN NULL; END IF;
        RETURN OLD;
    END IF;
    owner := %6$s;
    IF TG_OP = 'INSERT' THEN
        IF %7$s THEN
            actor := owui_crypto.acting_user();  -- refuses keys set by hand (OC005)
        END IF;
        INSERT INTO %3$s (%8$s) VALUES (%9$s);
        RETURN NEW;
    END IF;
    IF %10$s THEN
        RAISE EXCEPTION 'a row of %3$s cannot move to another owner'
            USING ERRCODE = 'OC007',
                  HINT = 'Its sealed content belongs to the old owner; copy it as the new owner instead.';
    END IF;
    IF NEW.%4$I IS DISTINCT FROM OLD.%4$I OR %11$s THEN
        actor := owui_crypto.acting_user();
        IF actor IS NULL THEN
            RAISE EXCEPTION 'no user key is active: cannot change sealed content of %3$s'
                USING ERRCODE = 'OC001', HINT = 'Bind the acting user so the adapter activates their key.';
        END IF;
        IF %13$L AND (owner IS NULL OR owner = '' OR owner <> actor) THEN
            RAISE EXCEPTION 'user %% is not the owner (%%) of the row: cannot change sealed content of %3$s', actor, owner
                USING ERRCODE = 'OC002', HINT = 'Only the owner can write sealed content; their key is needed.';
        END IF;
    END IF;
    UPDATE %3$s SET %12$s WHERE %4$I = OLD.%4$I;
    IF NOT FOUND THEN RETURN NULL; END IF;
    RETURN NEW;
END
$body$;
$f$,
        'write_through_' OPERATOR(pg_catalog.||) p_table, p_table, base, policy.row_id, owner_old,
        seal_owner, pg_catalog.array_to_string(nonnull_tests, ' OR '),
        pg_catalog.array_to_string(insert_cols, ', '), pg_catalog.array_to_string(insert_vals, ', '),
        owner_moved, pg_catalog.array_to_string(changed_tests, ' OR '),
        pg_catalog.array_to_string(update_sets, ', '), policy.owner_column IS NOT NULL);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER owui_crypto_write_through INSTEAD OF INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION owui_crypto.%I()', view, 'write_through_' OPERATOR(pg_catalog.||) p_table);

    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION owui_crypto.%1$I() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
-- Generated by owui_crypto.generate(%2$L); do not edit.
-- Every write that reaches the base table, through the view or past it (psql,
-- COPY, ON CONFLICT, another tool): rows keep their owner, and only exact
-- envelopes under the row's own key id count as sealed; the rest is sealed.
DECLARE
    owner text;
    expected text;
    actor text;
BEGIN
    IF TG_OP = 'UPDATE' AND %3$s THEN
        RAISE EXCEPTION 'a row of %10$s cannot move to another owner'
            USING ERRCODE = 'OC007',
                  HINT = 'Its sealed content belongs to the old owner; copy it as the new owner instead.';
    END IF;
    IF %4$s THEN
        owner := %5$s;
        expected := owui_crypto.expected_key_id(%6$L, %7$s);
        IF %8$s THEN
            actor := owui_crypto.acting_user();  -- refuses keys set by hand (OC005)
%9$s        END IF;
    END IF;
    RETURN NEW;
END
$body$;
$f$,
        'seal_direct_' OPERATOR(pg_catalog.||) p_table, p_table, owner_moved,
        pg_catalog.array_to_string(nonnull_tests, ' OR '), seal_owner, policy.key_kind,
        CASE policy.key_kind WHEN 'owner' THEN 'owner' ELSE 'NULL' END,
        pg_catalog.array_to_string(stranger_tests, ' OR '), direct_seals, base);
    -- No UPDATE OF column list: it would make the columns depend on the
    -- trigger, and Open WebUI's own migrations could not drop or retype them.
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER owui_crypto_seal_direct BEFORE INSERT OR UPDATE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION owui_crypto.%I()', base, 'seal_direct_' OPERATOR(pg_catalog.||) p_table);
END
$gen$;

-- -- Privileges: exactly what the application needs, nothing to PUBLIC ---------------

-- The functions the application's role calls, directly or as the invoker of
-- the views' opening code. Everything else (the generator, the triggers, the
-- transport internals, seal_text) runs as the owner or not at all. A table,
-- so that later migrations add to it.
CREATE TABLE IF NOT EXISTS owui_crypto.runtime_function (
    signature text PRIMARY KEY  -- as regprocedure reads it
);
INSERT INTO owui_crypto.runtime_function (signature) VALUES
    -- keys
    ('owui_crypto.activate(text, text[], text[], text[])'), ('owui_crypto.active_user()'), ('owui_crypto.deactivate()'),
    ('owui_crypto.register_user_key(text, bytea)'), ('owui_crypto.register_deployment_key(text, bytea, text, bytea)'),
    ('owui_crypto.deployment_key_wrapped(text)'), ('owui_crypto.forget_user_key(text)'),
    -- the views open as the reader
    ('owui_crypto.open_text(text, text, text)'), ('owui_crypto.open_json(json, text, json)'),
    ('owui_crypto.opening_key(text)'), ('owui_crypto.fernet_open(bytea, text, bigint, bigint)'),
    ('owui_crypto.value_key(bytea, text)'), ('owui_crypto.hmac(bytea, bytea, text)'),
    ('owui_crypto.decrypt_iv(bytea, bytea, bytea, text)'),
    -- health and backfill (read the catalogs; write only through the triggers)
    ('owui_crypto.drift()'), ('owui_crypto.column_signature(regclass)'), ('owui_crypto.trigger_enabled(regclass, name)'),
    ('owui_crypto.unsealed_counts()'), ('owui_crypto.seal_existing(text)'), ('owui_crypto.columns_of(name)'),
    ('owui_crypto.unsealed_sql(text, text, name)'), ('owui_crypto.envelope_key_id(text)'),
    ('owui_crypto.envelope_key_id(json)'), ('owui_crypto.is_sealed(text)'), ('owui_crypto.is_sealed(json)')
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION owui_crypto.grant_runtime() RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee name;
    f text;
    t regtype;
BEGIN
    REVOKE ALL ON SCHEMA owui_crypto, owui_crypto_view FROM PUBLIC;
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA owui_crypto FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA owui_crypto, owui_crypto_view FROM PUBLIC;
    REVOKE ALL ON ALL SEQUENCES IN SCHEMA owui_crypto FROM PUBLIC;
    -- Types carry USAGE for PUBLIC by default: the enum, and the row type of
    -- every table and view. (Array types follow their element type.)
    FOR t IN SELECT y.oid::regtype FROM pg_catalog.pg_type y
              WHERE y.typnamespace OPERATOR(pg_catalog.=) ANY (ARRAY['owui_crypto'::regnamespace, 'owui_crypto_view'::regnamespace])
                AND y.typcategory OPERATOR(pg_catalog.<>) 'A'
                AND pg_catalog.pg_has_role(y.typowner, 'USAGE') LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON TYPE %s FROM PUBLIC', t);
    END LOOP;
    FOR grantee IN SELECT g.role_name FROM owui_crypto.grantee g LOOP
        EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA owui_crypto, owui_crypto_view TO %I', grantee);
        EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA owui_crypto_view TO %I', grantee);
        EXECUTE pg_catalog.format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA owui_crypto FROM %I', grantee);
        FOR f IN SELECT r.signature FROM owui_crypto.runtime_function r ORDER BY 1 LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', f, grantee);
        END LOOP;
    END LOOP;
END
$$;

-- -- Every function that pins a path pins pg_temp last --------------------------------

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'owui_crypto'::regnamespace
                AND (p.prosecdef OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.proconfig) c WHERE c LIKE 'search\_path=%'))
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$$;

-- drift() also reports a SECURITY DEFINER function without that pin (someone
-- recreated one by hand).
CREATE OR REPLACE FUNCTION owui_crypto.drift() RETURNS TABLE (table_name name, problem text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p owui_crypto.protected_table;
    base_cols text;
    view_cols text;
    missing name;
BEGIN
    FOR p IN SELECT * FROM owui_crypto.protected_table ORDER BY 1 LOOP
        table_name := p.table_name;
        IF pg_catalog.to_regclass(pg_catalog.format('public.%I', p.table_name)) IS NULL THEN
            problem := 'base table is missing'; RETURN NEXT; CONTINUE;
        END IF;
        FOR missing IN SELECT pc.column_name FROM owui_crypto.protected_column pc
                        WHERE pc.table_name = p.table_name
                          AND NOT EXISTS (SELECT 1 FROM owui_crypto.columns_of(p.table_name) b WHERE b.column_name = pc.column_name)
        LOOP
            problem := pg_catalog.format('protected column %I is missing from the base table', missing); RETURN NEXT;
        END LOOP;
        IF pg_catalog.to_regclass(pg_catalog.format('owui_crypto_view.%I', p.table_name)) IS NULL THEN
            problem := 'view is missing'; RETURN NEXT; CONTINUE;
        END IF;
        base_cols := owui_crypto.column_signature(pg_catalog.format('public.%I', p.table_name)::pg_catalog.regclass);
        view_cols := owui_crypto.column_signature(pg_catalog.format('owui_crypto_view.%I', p.table_name)::pg_catalog.regclass);
        IF base_cols IS DISTINCT FROM view_cols THEN
            problem := pg_catalog.format('view columns (%s) differ from the base table (%s)', view_cols, base_cols); RETURN NEXT;
        END IF;
        IF NOT owui_crypto.trigger_enabled(pg_catalog.format('owui_crypto_view.%I', p.table_name)::pg_catalog.regclass,
                                           'owui_crypto_write_through') THEN
            problem := 'write-through trigger on the view is missing or disabled'; RETURN NEXT;
        END IF;
        IF NOT owui_crypto.trigger_enabled(pg_catalog.format('public.%I', p.table_name)::pg_catalog.regclass,
                                           'owui_crypto_seal_direct') THEN
            problem := 'seal trigger on the base table is missing or disabled'; RETURN NEXT;
        END IF;
    END LOOP;
    table_name := NULL;
    FOR missing IN SELECT f.proname FROM pg_catalog.pg_proc f
                    WHERE f.pronamespace = 'owui_crypto'::regnamespace AND f.prosecdef
                      AND NOT COALESCE('search_path=pg_catalog, pg_temp' = ANY (f.proconfig), false)
                    ORDER BY 1 LOOP
        problem := pg_catalog.format('SECURITY DEFINER function owui_crypto.%I does not pin search_path = pg_catalog, pg_temp', missing);
        RETURN NEXT;
    END LOOP;
END
$$;

SELECT owui_crypto.refresh();
