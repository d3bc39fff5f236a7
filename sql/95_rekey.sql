-- Rekeying one user (owui-crypto rekey, the incident path for a DEK that may
-- have leaked): their registration moves from the old key to a new one in the
-- same transaction that reseals their rows. Owner only: not a runtime function.

-- Replaces user p_user_id's key registration, if it still is p_old_fingerprint
-- (a concurrent rekey or forget wins, and this one fails with OC020).
CREATE OR REPLACE FUNCTION owui_crypto.replace_user_key(p_user_id text, p_old_fingerprint bytea, p_new_fingerprint bytea)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_key_id text := pg_catalog.encode(pg_catalog.substr(p_new_fingerprint, 1, 8), 'hex');
BEGIN
    UPDATE owui_crypto.user_key k
       SET key_id = new_key_id, fingerprint = p_new_fingerprint, created_at = pg_catalog.now()
     WHERE k.user_id OPERATOR(pg_catalog.=) p_user_id AND k.fingerprint OPERATOR(pg_catalog.=) p_old_fingerprint;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user %''s key is not the one this rekey started from', p_user_id
            USING ERRCODE = 'OC020', HINT = 'Another rekey or a forget ran meanwhile; run rekey again.';
    END IF;
    RETURN new_key_id;
END
$$;
REVOKE ALL ON FUNCTION owui_crypto.replace_user_key(text, bytea, bytea) FROM PUBLIC;
