-- The generator: from the policy (40_policy.sql) and the live base tables it
-- builds, per protected table,
--   * owui_crypto_view.<table>: same name, same columns in the same order,
--     protected columns opened with the transaction's keys;
--   * owui_crypto.write_through_<table>(): INSTEAD OF trigger that seals what
--     is written through the view and passes the rest to the base table;
--   * owui_crypto.seal_direct_<table>(): BEFORE trigger on the base table
--     that seals plaintext written past the view by any other path;
-- and owui_crypto.drift() reports where the live objects no longer match.
--
-- Run owui_crypto.refresh() after Open WebUI changes a protected table (its
-- own migrations); `owui-crypto refresh` and `alembic upgrade head` do.

-- One row per base column: what the generated SQL needs to know about it.
CREATE FUNCTION owui_crypto.columns_of(p_table name)
RETURNS TABLE (column_name name, type_sql text, family text, protected boolean, placeholder text,
               default_sql text, attnum smallint)
LANGUAGE sql STABLE SET search_path = ''
BEGIN ATOMIC
    SELECT a.attname,
           pg_catalog.format_type(a.atttypid, a.atttypmod),
           CASE WHEN a.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype)
                     AND a.atttypmod = -1 THEN 'text'
                WHEN a.atttypid = 'pg_catalog.json'::pg_catalog.regtype THEN 'json'
                WHEN a.atttypid = 'pg_catalog.jsonb'::pg_catalog.regtype THEN 'jsonb'
           END,
           pc.column_name IS NOT NULL,
           pc.placeholder,
           CASE WHEN a.attidentity <> '' THEN
                    pg_catalog.format('pg_catalog.nextval(%L::pg_catalog.regclass)',
                                      pg_catalog.pg_get_serial_sequence(pg_catalog.format('public.%I', p_table), a.attname))
                ELSE pg_catalog.pg_get_expr(d.adbin, d.adrelid) END,
           a.attnum
      FROM pg_catalog.pg_attribute a
      LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
      LEFT JOIN owui_crypto.protected_column pc ON pc.table_name = p_table AND pc.column_name = a.attname
     WHERE a.attrelid = pg_catalog.to_regclass(pg_catalog.format('public.%I', p_table))
       AND a.attnum > 0 AND NOT a.attisdropped
     ORDER BY a.attnum;
END;

-- SQL expressions for one protected column; `rec` is NEW, OLD or the view's alias.
CREATE FUNCTION owui_crypto.open_sql(family text, type_sql text, rec text, col name, binding text, placeholder text)
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = ''
RETURN CASE family
    WHEN 'text'  THEN pg_catalog.format('owui_crypto.open_text(%s.%I::text, %s, %L)::%s', rec, col, binding, placeholder,
                                        type_sql)
    WHEN 'json'  THEN pg_catalog.format('owui_crypto.open_json(%s.%I, %s, %L::json)', rec, col, binding, placeholder)
    WHEN 'jsonb' THEN pg_catalog.format('owui_crypto.open_json(%s.%I::json, %s, %L::json)::jsonb', rec, col, binding, placeholder)
END;

CREATE FUNCTION owui_crypto.seal_sql(family text, col name, kind owui_crypto.key_kind, binding text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = ''
RETURN CASE family
    WHEN 'text'  THEN pg_catalog.format('owui_crypto.seal_text(NEW.%I, %L, owner, %s)', col, kind, binding)
    WHEN 'json'  THEN pg_catalog.format('owui_crypto.seal_json(NEW.%I, %L, owner, %s)', col, kind, binding)
    WHEN 'jsonb' THEN pg_catalog.format('owui_crypto.seal_json(NEW.%I::json, %L, owner, %s)::jsonb', col, kind, binding)
END;

-- "NEW.col still holds what OLD.col showed": json has no equality operator,
-- and its text is exactly what was stored, so compare that.
CREATE FUNCTION owui_crypto.unchanged_sql(family text, col name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = ''
RETURN CASE family
    WHEN 'json' THEN pg_catalog.format('NEW.%1$I::text IS NOT DISTINCT FROM OLD.%1$I::text', col)
    ELSE pg_catalog.format('NEW.%1$I IS NOT DISTINCT FROM OLD.%1$I', col)
END;

CREATE FUNCTION owui_crypto.plaintext_sql(family text, col name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = ''
RETURN CASE family
    WHEN 'jsonb' THEN pg_catalog.format('(NEW.%1$I IS NOT NULL AND NOT owui_crypto.is_sealed(NEW.%1$I::json))', col)
    ELSE pg_catalog.format('(NEW.%1$I IS NOT NULL AND NOT owui_crypto.is_sealed(NEW.%1$I))', col)
END;

-- Builds the view and both triggers of one protected table.
CREATE FUNCTION owui_crypto.generate(p_table name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = '' AS $gen$
DECLARE
    policy owui_crypto.protected_table;
    parent owui_crypto.protected_table;
    c record;
    base text := pg_catalog.format('public.%I', p_table);
    view text := pg_catalog.format('owui_crypto_view.%I', p_table);
    owner_sql text := 'NULL';
    owner_moved_sql text := 'false';
    select_list text[] := '{}';
    insert_cols text[] := '{}';
    insert_vals text[] := '{}';
    update_sets text[] := '{}';
    plaintext_tests text[] := '{}';
    direct_seals text := '';
    has_content text[] := '{}';
    protected_cols text[] := '{}';
    binding text;
BEGIN
    SELECT * INTO STRICT policy FROM owui_crypto.protected_table WHERE table_name = p_table;
    IF pg_catalog.to_regclass(base) IS NULL THEN
        RAISE EXCEPTION 'protected table % does not exist', base
            USING ERRCODE = 'OC011', HINT = 'Run Open WebUI''s own migrations first, then owui-crypto upgrade.';
    END IF;
    FOR c IN SELECT pc.column_name FROM owui_crypto.protected_column pc
              WHERE pc.table_name = p_table
                AND NOT EXISTS (SELECT 1 FROM owui_crypto.columns_of(p_table) b WHERE b.column_name = pc.column_name)
    LOOP
        RAISE EXCEPTION 'protected column %.% does not exist', base, c.column_name
            USING ERRCODE = 'OC011', HINT = 'Open WebUI changed its schema: update sql/40_policy.sql.';
    END LOOP;

    IF policy.owner_column IS NOT NULL THEN
        owner_moved_sql := pg_catalog.format('NEW.%1$I IS DISTINCT FROM OLD.%1$I', policy.owner_column);
        IF policy.owner_parent IS NULL THEN
            owner_sql := pg_catalog.format('NEW.%I::text', policy.owner_column);
        ELSE
            SELECT * INTO STRICT parent FROM owui_crypto.protected_table WHERE table_name = policy.owner_parent;
            owner_sql := pg_catalog.format('(SELECT p.%I::text FROM public.%I AS p WHERE p.%I = NEW.%I)',
                                           parent.owner_column, parent.table_name, parent.row_id, policy.owner_column);
        END IF;
        IF policy.key_kind = 'share' THEN
            owner_sql := 'COALESCE(' || owner_sql || ', '''')';  -- see owui_crypto.sealing_key()
        END IF;
    END IF;

    FOR c IN SELECT * FROM owui_crypto.columns_of(p_table) LOOP
        insert_cols := insert_cols || pg_catalog.quote_ident(c.column_name);
        IF NOT c.protected THEN
            select_list := select_list || pg_catalog.format('t.%I', c.column_name);
            insert_vals := insert_vals || pg_catalog.format('NEW.%I', c.column_name);
            update_sets := update_sets || pg_catalog.format('%1$I = NEW.%1$I', c.column_name);
            CONTINUE;
        END IF;
        IF c.family IS NULL THEN
            RAISE EXCEPTION 'protected column %.% has type %, which owui-crypto cannot seal', base, c.column_name, c.type_sql
                USING ERRCODE = 'OC011', HINT = 'Protect only text, unbounded varchar, json or jsonb columns.';
        END IF;
        binding := pg_catalog.format('%L || %s.%I::text', p_table || '.' || c.column_name || '/', '%s', policy.row_id);
        protected_cols := protected_cols || pg_catalog.quote_ident(c.column_name);
        select_list := select_list || (owui_crypto.open_sql(c.family, c.type_sql, 't', c.column_name,
                                           pg_catalog.format(binding, 't'), c.placeholder)
                                       || ' AS ' || pg_catalog.quote_ident(c.column_name));
        insert_vals := insert_vals || owui_crypto.seal_sql(c.family, c.column_name, policy.key_kind, pg_catalog.format(binding, 'NEW'));
        update_sets := update_sets || pg_catalog.format(
            '%1$I = CASE WHEN NEW.%2$I IS NOT DISTINCT FROM OLD.%2$I AND %3$s THEN %1$I ELSE %4$s END',
            c.column_name, policy.row_id, owui_crypto.unchanged_sql(c.family, c.column_name),
            owui_crypto.seal_sql(c.family, c.column_name, policy.key_kind, pg_catalog.format(binding, 'NEW')));
        has_content := has_content || pg_catalog.format('OLD.%I IS NOT NULL', c.column_name);
        plaintext_tests := plaintext_tests || owui_crypto.plaintext_sql(c.family, c.column_name);
        direct_seals := direct_seals || pg_catalog.format(E'        IF %s THEN\n            NEW.%I := %s;\n        END IF;\n',
            owui_crypto.plaintext_sql(c.family, c.column_name), c.column_name,
            owui_crypto.seal_sql(c.family, c.column_name, policy.key_kind, pg_catalog.format(binding, 'NEW')));
    END LOOP;

    -- The view. Dropped and made anew, so columns Open WebUI added, dropped or
    -- retyped are picked up; the whole refresh is one transaction.
    EXECUTE pg_catalog.format('DROP VIEW IF EXISTS %s CASCADE', view);
    EXECUTE pg_catalog.format('CREATE VIEW %s AS SELECT %s FROM %s AS t',
                              view, pg_catalog.array_to_string(select_list, ', '), base);
    EXECUTE pg_catalog.format('COMMENT ON VIEW %s IS %L', view,
        'Generated by owui_crypto.refresh() from the protection policy; do not edit.');
    -- Inserts through a view get the view's defaults, not the table's.
    FOR c IN SELECT * FROM owui_crypto.columns_of(p_table) WHERE default_sql IS NOT NULL LOOP
        EXECUTE pg_catalog.format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', view, c.column_name, c.default_sql);
    END LOOP;

    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION owui_crypto.%1$I() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = '' AS $body$
-- Generated by owui_crypto.generate(%2$L); do not edit.
DECLARE
    owner text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM %3$s WHERE %4$I = OLD.%4$I;
        IF NOT FOUND THEN RETURN NULL; END IF;
        RETURN OLD;
    END IF;
    owner := %5$s;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO %3$s (%6$s) VALUES (%7$s);
        RETURN NEW;
    END IF;
    IF (%8$s) AND (%9$s) THEN
        RAISE EXCEPTION 'sealed content of %3$s cannot move to another owner'
            USING ERRCODE = 'OC007',
                  HINT = 'Its key belongs to the old owner; copy it as the new owner instead.';
    END IF;
    UPDATE %3$s SET %10$s WHERE %4$I = OLD.%4$I;
    IF NOT FOUND THEN RETURN NULL; END IF;
    RETURN NEW;
END
$body$;
$f$,
        'write_through_' || p_table, p_table, base, policy.row_id, owner_sql,
        pg_catalog.array_to_string(insert_cols, ', '), pg_catalog.array_to_string(insert_vals, ', '),
        owner_moved_sql, pg_catalog.array_to_string(has_content, ' OR '),
        pg_catalog.array_to_string(update_sets, ', '));
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER owui_crypto_write_through INSTEAD OF INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION owui_crypto.%I()', view, 'write_through_' || p_table);

    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION owui_crypto.%1$I() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = '' AS $body$
-- Generated by owui_crypto.generate(%2$L); do not edit.
-- Seals plaintext that reached the base table without the view (psql, COPY,
-- another tool); leaves sealed values exactly as they are.
DECLARE
    owner text;
BEGIN
    IF %3$s THEN
        owner := %4$s;
%5$s    END IF;
    RETURN NEW;
END
$body$;
$f$,
        'seal_direct_' || p_table, p_table, pg_catalog.array_to_string(plaintext_tests, ' OR '),
        owner_sql, direct_seals);
    -- No UPDATE OF column list: it would make the columns depend on the
    -- trigger, and Open WebUI's own migrations could not drop or retype them.
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE TRIGGER owui_crypto_seal_direct BEFORE INSERT OR UPDATE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION owui_crypto.%I()', base, 'seal_direct_' || p_table);
END
$gen$;

-- Exactly the privileges the application's roles need; nothing to PUBLIC.
CREATE FUNCTION owui_crypto.grant_runtime() RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    grantee name;
BEGIN
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA owui_crypto FROM PUBLIC;
    REVOKE ALL ON ALL TABLES IN SCHEMA owui_crypto, owui_crypto_view FROM PUBLIC;
    FOR grantee IN SELECT g.role_name FROM owui_crypto.grantee g LOOP
        EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA owui_crypto, owui_crypto_view TO %I', grantee);
        EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA owui_crypto_view TO %I', grantee);
        -- The views call the open functions as the reader; the runtime entry
        -- points (activate, register_*, forget_user_key) are SECURITY DEFINER.
        EXECUTE pg_catalog.format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA owui_crypto TO %I', grantee);
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION owui_crypto.refresh(), owui_crypto.generate(name), '
                                  'owui_crypto.grant_runtime(), owui_crypto.assert_no_sealed_data(), owui_crypto.detach() FROM %I', grantee);
    END LOOP;
END
$$;

-- Drops the generated views, so that Open WebUI's own migrations can drop or
-- retype columns of the protected tables; refresh() builds them again. The
-- base tables keep their seal triggers meanwhile: nothing is written unsealed.
CREATE FUNCTION owui_crypto.detach() RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    t name;
    n integer := 0;
BEGIN
    FOR t IN SELECT p.table_name FROM owui_crypto.protected_table p LOOP
        EXECUTE pg_catalog.format('DROP VIEW IF EXISTS owui_crypto_view.%I CASCADE', t);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

CREATE FUNCTION owui_crypto.refresh() RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    t name;
    n integer := 0;
BEGIN
    FOR t IN SELECT p.table_name FROM owui_crypto.protected_table p ORDER BY p.owner_parent NULLS FIRST, p.table_name LOOP
        PERFORM owui_crypto.generate(t);
        n := n + 1;
    END LOOP;
    PERFORM owui_crypto.grant_runtime();
    RETURN n;
END
$$;

-- "name type, ..." of a relation's columns, in order.
CREATE FUNCTION owui_crypto.column_signature(rel regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = ''
BEGIN ATOMIC
    SELECT pg_catalog.string_agg(pg_catalog.format('%I %s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)),
                                 ', ' ORDER BY a.attnum)
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
END;

CREATE FUNCTION owui_crypto.trigger_enabled(rel regclass, trigger_name name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = ''
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                WHERE g.tgrelid = rel AND g.tgname = trigger_name AND g.tgenabled <> 'D');

-- Where the live objects no longer match the policy and the base tables.
-- Empty means healthy.
CREATE FUNCTION owui_crypto.drift() RETURNS TABLE (table_name name, problem text)
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    p owui_crypto.protected_table;
    base_cols text;
    view_cols text;
    missing name;
BEGIN
    FOR p IN SELECT * FROM owui_crypto.protected_table ORDER BY 1 LOOP
        table_name := p.table_name;
        IF pg_catalog.to_regclass(pg_catalog.format('public.%I', p.table_name)) IS NULL THEN
            problem := 'base table is missing'; RETURN NEXT; CONTINUE;
        END IF;
        FOR missing IN SELECT pc.column_name FROM owui_crypto.protected_column pc
                        WHERE pc.table_name = p.table_name
                          AND NOT EXISTS (SELECT 1 FROM owui_crypto.columns_of(p.table_name) b WHERE b.column_name = pc.column_name)
        LOOP
            problem := pg_catalog.format('protected column %I is missing from the base table', missing); RETURN NEXT;
        END LOOP;
        IF pg_catalog.to_regclass(pg_catalog.format('owui_crypto_view.%I', p.table_name)) IS NULL THEN
            problem := 'view is missing'; RETURN NEXT; CONTINUE;
        END IF;
        base_cols := owui_crypto.column_signature(pg_catalog.format('public.%I', p.table_name)::pg_catalog.regclass);
        view_cols := owui_crypto.column_signature(pg_catalog.format('owui_crypto_view.%I', p.table_name)::pg_catalog.regclass);
        IF base_cols IS DISTINCT FROM view_cols THEN
            problem := pg_catalog.format('view columns (%s) differ from the base table (%s)', view_cols, base_cols); RETURN NEXT;
        END IF;
        IF NOT owui_crypto.trigger_enabled(pg_catalog.format('owui_crypto_view.%I', p.table_name)::pg_catalog.regclass,
                                           'owui_crypto_write_through') THEN
            problem := 'write-through trigger on the view is missing or disabled'; RETURN NEXT;
        END IF;
        IF NOT owui_crypto.trigger_enabled(pg_catalog.format('public.%I', p.table_name)::pg_catalog.regclass,
                                           'owui_crypto_seal_direct') THEN
            problem := 'seal trigger on the base table is missing or disabled'; RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- Refuses (OC006) while any protected column holds sealed data: removing
-- owui-crypto would leave it readable by nobody.
CREATE FUNCTION owui_crypto.assert_no_sealed_data() RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    c record;
    n bigint;
    found text[] := '{}';
BEGIN
    FOR c IN SELECT pc.table_name, pc.column_name FROM owui_crypto.protected_column pc
              WHERE pg_catalog.to_regclass(pg_catalog.format('public.%I', pc.table_name)) IS NOT NULL
              ORDER BY 1, 2 LOOP
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM public.%I WHERE owui_crypto.is_sealed(%I)',
                                  c.table_name, c.column_name) INTO n;
        IF n > 0 THEN
            found := found || pg_catalog.format('%s.%s: %s', c.table_name, c.column_name, n);
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(found) > 0 THEN
        RAISE EXCEPTION 'refusing to remove owui-crypto: sealed values remain (%)', pg_catalog.array_to_string(found, ', ')
            USING ERRCODE = 'OC006',
                  HINT = 'Without owui-crypto nobody could read them. Export or delete that data first.';
    END IF;
END
$$;
