SELECT owui_crypto.assert_no_sealed_data();
DROP FUNCTION owui_crypto.forget_user_key(text);
ALTER TABLE public."user"
    DROP COLUMN salt,
    DROP COLUMN user_encrypted_dek,
    DROP COLUMN user_key,
    DROP COLUMN kms_encrypted_dek;
