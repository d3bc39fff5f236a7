-- Sealed values: the envelope around a Fernet token.
--
--   oc1:<key id>:<fernet token>
--
-- 'oc1' names the format and its version; the key id (16 hex) says which key
-- sealed it, so a reader without that key returns a placeholder at once. The
-- Fernet key is not the DEK itself but HMAC-SHA256(DEK, label || binding), where
-- the binding is "table.column/row id": a sealed value copied into another
-- row or column no longer opens, even for the same user.
--
-- In json columns the envelope is stored as a JSON string, so the column keeps
-- its type and Open WebUI's own migrations keep working on the base tables.
--
-- Every name is schema-qualified. The entry points that the views and
-- triggers call (open_*, seal_text) also pin search_path = '': the
-- application's search_path changes in every transaction (the adapter sets
-- it transaction-locally), and without the pin the cached plans of the whole
-- call tree were rebuilt each time -- measured: a one-row read went from
-- ~400 to ~220 us. The functions they call carry no SET clause (it costs
-- ~1.4 us per call and forbids inlining). Keys are touched only in
-- assignments, IF and RETURN (see 20_keys.sql for why).

CREATE TYPE owui_crypto.key_kind AS ENUM ('owner', 'share');

-- Same definition as app_adapter.envelope.value_key().
CREATE FUNCTION owui_crypto.value_key(master bytea, binding text) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
RETURN owui_crypto.hmac(pg_catalog.convert_to('owui-crypto value v1' || pg_catalog.chr(31) || binding, 'UTF8'),
                        master, 'sha256');

-- The key this transaction seals with for a row of kind `kind` owned by
-- `owner`, as 'key id:hex key'. Fails closed, naming what is missing. A row
-- sealed under the share key may still have an owner (its policy names one):
-- then only that owner may write it. The generator passes '' for such a row
-- whose owner cannot be found, so that it fails like any other stranger.
CREATE FUNCTION owui_crypto.sealing_key(kind owui_crypto.key_kind, owner text, binding text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    active text;
BEGIN
    IF kind = 'owner' OR owner IS NOT NULL THEN
        active := pg_catalog.current_setting('owui_crypto.user_id', true);
        IF active IS NULL OR active = '' THEN
            RAISE EXCEPTION 'no user key is active: cannot seal %', binding
                USING ERRCODE = 'OC001',
                      HINT = 'Bind the acting user so the adapter activates their key (owui_crypto.activate).';
        END IF;
        IF owner IS NULL THEN
            RAISE EXCEPTION 'the row has no owner: cannot seal %', binding
                USING ERRCODE = 'OC002', HINT = 'Write the owning row (for a message: its chat) first.';
        END IF;
        IF owner <> active THEN
            RAISE EXCEPTION 'user % is not the owner (%) of the row: cannot seal %', active, owner, binding
                USING ERRCODE = 'OC002',
                      HINT = 'Only the owner can write sealed content; their key is needed.';
        END IF;
    END IF;
    IF kind = 'share' THEN
        active := pg_catalog.current_setting('owui_crypto.share_key', true);
        IF active IS NULL OR active = '' THEN
            RAISE EXCEPTION 'no share key is active: cannot seal %', binding
                USING ERRCODE = 'OC001',
                      HINT = 'Activate the deployment share key (owui_crypto.activate) before writing shared content.';
        END IF;
        RETURN pg_catalog.current_setting('owui_crypto.share_key_id') || ':' || active;
    END IF;
    RETURN pg_catalog.current_setting('owui_crypto.user_key_id') || ':'
           || pg_catalog.current_setting('owui_crypto.user_key');
END
$$;

CREATE FUNCTION owui_crypto.seal_text(plaintext text, kind owui_crypto.key_kind, owner text, binding text)
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL SAFE SET search_path = '' AS $$
DECLARE
    key text;
BEGIN
    IF plaintext IS NULL THEN
        RETURN NULL;
    END IF;
    key := owui_crypto.sealing_key(kind, owner, binding);
    RETURN 'oc1:' || pg_catalog.left(key, 16) || ':'
           || owui_crypto.fernet_seal(owui_crypto.value_key(pg_catalog.decode(pg_catalog.substr(key, 18), 'hex'), binding),
                                      pg_catalog.convert_to(plaintext, 'UTF8'));
END
$$;

CREATE FUNCTION owui_crypto.seal_json(plaintext json, kind owui_crypto.key_kind, owner text, binding text)
RETURNS json
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN pg_catalog.to_json(owui_crypto.seal_text(plaintext::text, kind, owner, binding));

-- The hex key for key id `key_id` if this transaction holds it, else NULL.
CREATE FUNCTION owui_crypto.opening_key(key_id text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE key_id
    WHEN pg_catalog.current_setting('owui_crypto.user_key_id', true) THEN pg_catalog.current_setting('owui_crypto.user_key', true)
    WHEN pg_catalog.current_setting('owui_crypto.share_key_id', true) THEN pg_catalog.current_setting('owui_crypto.share_key', true)
END;

-- Opens an envelope with the transaction's keys. NULL in, NULL out; a value
-- that is not an envelope (written before owui-crypto was installed) is
-- returned as it is; a value sealed under a key this transaction does not
-- hold reads as `placeholder`; one that fails its integrity check raises OC003.
-- PARALLEL UNSAFE because fernet_open() turns every failure into one OC003
-- inside an exception block, a subtransaction, which parallel workers refuse.
CREATE FUNCTION owui_crypto.open_text(sealed text, binding text, placeholder text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL UNSAFE SET search_path = '' AS $$
DECLARE
    key text;
BEGIN
    IF sealed IS NULL OR pg_catalog.left(sealed, 4) <> 'oc1:' THEN
        RETURN sealed;
    END IF;
    key := owui_crypto.opening_key(pg_catalog.substr(sealed, 5, 16));
    IF key IS NULL OR key = '' THEN
        RETURN placeholder;
    END IF;
    RETURN pg_catalog.convert_from(
        owui_crypto.fernet_open(owui_crypto.value_key(pg_catalog.decode(key, 'hex'), binding),
                                pg_catalog.substr(sealed, 22)),
        'UTF8');
END
$$;

-- In a json column the envelope is a JSON string: open what is inside the quotes.
CREATE FUNCTION owui_crypto.open_json(sealed json, binding text, placeholder json) RETURNS json
LANGUAGE plpgsql STABLE PARALLEL UNSAFE SET search_path = '' AS $$
DECLARE
    envelope text := sealed::text;
BEGIN
    IF envelope IS NULL OR pg_catalog.left(envelope, 5) <> '"oc1:' THEN
        RETURN sealed;
    END IF;
    RETURN owui_crypto.open_text(pg_catalog.substr(envelope, 2, pg_catalog.octet_length(envelope) - 2),
                                 binding, placeholder::text)::json;
END
$$;

-- True for a value in the envelope format: sealing never seals twice.
CREATE FUNCTION owui_crypto.is_sealed(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN pg_catalog.left(value, 4) = 'oc1:';

CREATE FUNCTION owui_crypto.is_sealed(value json) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN pg_catalog.left(value::text, 5) = '"oc1:';
