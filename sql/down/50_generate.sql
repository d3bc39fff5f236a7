SELECT owui_crypto.assert_no_sealed_data();
DO $$
DECLARE
    t name;
BEGIN
    FOR t IN SELECT table_name FROM owui_crypto.protected_table LOOP
        EXECUTE format('DROP VIEW IF EXISTS owui_crypto_view.%I', t);
        IF to_regclass(format('public.%I', t)) IS NOT NULL THEN
            EXECUTE format('DROP TRIGGER IF EXISTS owui_crypto_seal_direct ON public.%I', t);
        END IF;
        EXECUTE format('DROP FUNCTION IF EXISTS owui_crypto.%I()', 'write_through_' || t);
        EXECUTE format('DROP FUNCTION IF EXISTS owui_crypto.%I()', 'seal_direct_' || t);
    END LOOP;
END
$$;
DROP FUNCTION owui_crypto.refresh(), owui_crypto.detach(), owui_crypto.drift(), owui_crypto.column_signature(regclass), owui_crypto.trigger_enabled(regclass, name), owui_crypto.assert_no_sealed_data(),
    owui_crypto.grant_runtime(), owui_crypto.generate(name), owui_crypto.columns_of(name),
    owui_crypto.open_sql(text, text, text, name, text, text), owui_crypto.seal_sql(text, name, owui_crypto.key_kind, text),
    owui_crypto.unchanged_sql(text, name), owui_crypto.plaintext_sql(text, name);
