DROP FUNCTION owui_crypto.seal_existing(text), owui_crypto.unsealed_counts(), owui_crypto.unsealed_sql(text, text, name);
