-- The memo's per-user key columns on Open WebUI's "user" table, nullable so
-- that Open WebUI's own inserts keep working; the memo's verification queries
-- run on them verbatim.
--   salt               PBKDF2 salt of the user-key path
--   user_encrypted_dek DEK sealed (Fernet) under the key derived from the user secret
--   user_key           legacy only: NULL unless OWUI_CRYPTO_STORE_USER_KEY asks for it
--                      (storing it next to user_encrypted_dek protects nothing)
--   kms_encrypted_dek  DEK wrapped by KMS: the recovery path
ALTER TABLE public."user"
    ADD COLUMN salt bytea,
    ADD COLUMN user_encrypted_dek text,
    ADD COLUMN user_key text,
    ADD COLUMN kms_encrypted_dek bytea;

-- Crypto-shredding: once a user's wrapped DEKs and key registration are gone,
-- whatever this database holds sealed under their key opens for nobody. A
-- backup taken before still holds kms_encrypted_dek, which the application
-- CMK can unwrap: shredding backups too needs a KMS-side step (README).
CREATE FUNCTION owui_crypto.forget_user_key(p_user_id text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    UPDATE public."user"
       SET salt = NULL, user_encrypted_dek = NULL, user_key = NULL, kms_encrypted_dek = NULL
     WHERE id = p_user_id;
    DELETE FROM owui_crypto.user_key WHERE user_id = p_user_id;
    RETURN FOUND;
END
$$;
SELECT owui_crypto.grant_runtime();
