-- Takes the policy back to chats only. Refuses (OC006) while any column this
-- migration protects holds sealed data: nobody could read it afterwards.
DO $$
DECLARE
    c record;
    n bigint;
    found text[] := '{}';
BEGIN
    FOR c IN SELECT pc.table_name, pc.column_name, pc.members FROM owui_crypto.protected_column pc
              WHERE (pc.table_name, pc.column_name) NOT IN (
                        ('chat', 'title'), ('chat', 'chat'), ('chat', 'summary'), ('shared_chat', 'title'),
                        ('shared_chat', 'chat'))
                AND pc.table_name NOT IN ('chat_message')
                AND pg_catalog.to_regclass(pg_catalog.format('public.%I', pc.table_name)) IS NOT NULL LOOP
        EXECUTE pg_catalog.format(
            'SELECT pg_catalog.count(*) FROM public.%I WHERE pg_catalog.strpos(%I::pg_catalog.text, ''oc1:'') > 0',
            c.table_name, c.column_name) INTO n;
        IF n > 0 THEN
            found := found || pg_catalog.format('%s.%s: %s', c.table_name, c.column_name, n);
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(found) > 0 THEN
        RAISE EXCEPTION 'refusing to narrow the policy: sealed values remain (%)', pg_catalog.array_to_string(found, ', ')
            USING ERRCODE = 'OC006', HINT = 'Without their policy nobody could read them. Export or delete that data first.';
    END IF;
    FOR c IN SELECT p.table_name FROM owui_crypto.protected_table p
              WHERE p.table_name NOT IN ('chat', 'chat_message', 'shared_chat') LOOP
        EXECUTE pg_catalog.format('DROP VIEW IF EXISTS owui_crypto_view.%I', c.table_name);
        IF pg_catalog.to_regclass(pg_catalog.format('public.%I', c.table_name)) IS NOT NULL THEN
            EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS owui_crypto_seal_direct ON public.%I', c.table_name);
        END IF;
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS owui_crypto.%I()', 'write_through_' || c.table_name);
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS owui_crypto.%I()', 'seal_direct_' || c.table_name);
    END LOOP;
END
$$;
DELETE FROM owui_crypto.protected_column WHERE table_name NOT IN ('chat', 'chat_message', 'shared_chat')
    OR (table_name, column_name) IN (('chat', 'tasks'), ('chat', 'variables'));
DELETE FROM owui_crypto.protected_table WHERE table_name NOT IN ('chat', 'chat_message', 'shared_chat');
DELETE FROM owui_crypto.runtime_function WHERE signature IN (
    'owui_crypto.open_members(json, text[], text, text)', 'owui_crypto.protected_members(name, name)',
    'owui_crypto.members_to_seal(json, text[], text)', 'owui_crypto.unsealed_test(name, name, text, text)',
    'owui_crypto.unclassified_columns()');
DROP FUNCTION owui_crypto.unclassified_columns();
DROP TABLE owui_crypto.plaintext_column;
ALTER TABLE owui_crypto.protected_column DROP COLUMN members;
CREATE OR REPLACE FUNCTION owui_crypto.protected_members(p_table name, col name) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN NULL::text[];
SELECT owui_crypto.refresh();
