-- Sealing what was written before owui-crypto was installed.
--
-- Such values read back as they are (they were never secret from the
-- database), and they are sealed the next time their owner rewrites them.
-- `owui-crypto seal-existing` does it for everyone at once: for each user
-- it activates their key and calls seal_existing(user), which rewrites only
-- the rows of that user that still hold plaintext; the base tables' seal
-- triggers do the sealing. Generated from the policy like everything else.

-- Plaintext values left in protected columns, per column.
CREATE FUNCTION owui_crypto.unsealed_counts() RETURNS TABLE (table_name name, column_name name, unsealed bigint)
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT pc.table_name, pc.column_name, b.family
               FROM owui_crypto.protected_column pc,
                    LATERAL owui_crypto.columns_of(pc.table_name) b
              WHERE b.column_name = pc.column_name
              ORDER BY 1, 2 LOOP
        table_name := c.table_name;
        column_name := c.column_name;
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM public.%I AS t WHERE %s',
                                  c.table_name, owui_crypto.unsealed_sql(c.family, 't', c.column_name))
           INTO unsealed;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE FUNCTION owui_crypto.unsealed_sql(family text, rec text, col name) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = ''
RETURN pg_catalog.format(CASE family WHEN 'jsonb' THEN '(%1$s.%2$I IS NOT NULL AND NOT owui_crypto.is_sealed(%1$s.%2$I::json))'
                                     ELSE '(%1$s.%2$I IS NOT NULL AND NOT owui_crypto.is_sealed(%1$s.%2$I))' END,
                         rec, col);

-- Seals the plaintext values of p_owner's rows (NULL: of the tables whose
-- rows have no owner) with the keys this transaction holds. Returns the rows
-- rewritten.
CREATE FUNCTION owui_crypto.seal_existing(p_owner text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = '' AS $$
DECLARE
    p owui_crypto.protected_table;
    parent owui_crypto.protected_table;
    sets text;
    unsealed text;
    owned text;
    n bigint;
    total bigint := 0;
BEGIN
    FOR p IN SELECT * FROM owui_crypto.protected_table ORDER BY owner_parent NULLS FIRST, table_name LOOP
        CONTINUE WHEN (p.owner_column IS NULL) <> (p_owner IS NULL);
        SELECT pg_catalog.string_agg(pg_catalog.format('%1$I = t.%1$I', b.column_name), ', '),
               pg_catalog.string_agg(owui_crypto.unsealed_sql(b.family, 't', b.column_name), ' OR ')
          INTO sets, unsealed
          FROM owui_crypto.columns_of(p.table_name) b WHERE b.protected;
        owned := 'true';
        IF p.owner_column IS NOT NULL AND p.owner_parent IS NULL THEN
            owned := pg_catalog.format('t.%I = %L', p.owner_column, p_owner);
        ELSIF p.owner_column IS NOT NULL THEN
            SELECT * INTO STRICT parent FROM owui_crypto.protected_table WHERE table_name = p.owner_parent;
            owned := pg_catalog.format('t.%I IN (SELECT q.%I FROM public.%I AS q WHERE q.%I = %L)',
                                       p.owner_column, parent.row_id, parent.table_name, parent.owner_column, p_owner);
        END IF;
        EXECUTE pg_catalog.format('UPDATE public.%1$I AS t SET %2$s WHERE (%3$s) AND (%4$s)',
                                  p.table_name, sets, owned, unsealed);
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END
$$;
SELECT owui_crypto.grant_runtime();
