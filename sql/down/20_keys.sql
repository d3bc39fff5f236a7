DROP FUNCTION owui_crypto.active_user(), owui_crypto.unwrap_transported(bytea, text),
    owui_crypto.activate(text, text[], text[], text[]), owui_crypto.deactivate(), owui_crypto.transport_key(),
    owui_crypto.deployment_key_wrapped(text), owui_crypto.register_deployment_key(text, bytea, text, bytea),
    owui_crypto.register_user_key(text, bytea), owui_crypto.b64url_encode(bytea), owui_crypto.b64url_decode(text),
    owui_crypto.fingerprint(bytea);
DROP TABLE owui_crypto.deployment_key, owui_crypto.user_key;
