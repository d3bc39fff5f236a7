DROP FUNCTION owui_crypto.is_sealed(text), owui_crypto.is_sealed(json),
    owui_crypto.open_json(json, text, json), owui_crypto.open_text(text, text, text), owui_crypto.opening_key(text),
    owui_crypto.seal_json(json, owui_crypto.key_kind, text, text), owui_crypto.seal_text(text, owui_crypto.key_kind, text, text),
    owui_crypto.sealing_key(owui_crypto.key_kind, text, text), owui_crypto.value_key(bytea, text);
DROP TYPE owui_crypto.key_kind;
