DROP FUNCTION owui_crypto.replace_user_key(text, bytea, bytea);
