-- Coverage: every place Open WebUI 0.12.4 keeps a user's words in PostgreSQL
-- is either sealed or plaintext by a stated decision, and nothing new slips
-- through unnoticed.
--
-- * The policy gains the tables beyond chats (feedback, memories, notes,
--   files, folders, automations, calendar events, channel messages, prompts)
--   and can seal single members of a JSON object (feedback.data's reason and
--   comment, next to the rating and model id that SQL filters on).
-- * owui_crypto.plaintext_column states, with a reason, what stays plaintext;
--   owui_crypto.unclassified_columns() names every text or JSON column of
--   Open WebUI that is in neither list (a new release), which `owui-crypto
--   check` reports and `owui-crypto serve` refuses to start with.
-- * JSON null is left as it is, like SQL NULL: sealing it hid nothing that its
--   length does not show, and it cost a decryption per column per row read.

-- -- Members of a JSON object --------------------------------------------------------

ALTER TABLE owui_crypto.protected_column ADD COLUMN members text[];
COMMENT ON COLUMN owui_crypto.protected_column.members IS
    'NULL: the whole value is sealed. Otherwise only these top-level members of a JSON object; '
    'placeholder is then what each of them reads as without the key.';

CREATE OR REPLACE FUNCTION owui_crypto.protected_members(p_table name, col name) RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found text[];
BEGIN
    SELECT pc.members INTO found FROM owui_crypto.protected_column pc
     WHERE pc.table_name OPERATOR(pg_catalog.=) p_table AND pc.column_name OPERATOR(pg_catalog.=) col;
    RETURN found;
END
$$;

-- True when a listed member of `value` holds plaintext: anything but JSON null
-- or an envelope under `expected` ('*': under any key id).
CREATE OR REPLACE FUNCTION owui_crypto.members_to_seal(value json, members text[], expected text) RETURNS boolean
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF value IS NULL OR pg_catalog.json_typeof(value) OPERATOR(pg_catalog.<>) 'object' THEN
        RETURN false;
    END IF;
    RETURN EXISTS (
        SELECT 1 FROM pg_catalog.json_each(value) e
         WHERE e.key OPERATOR(pg_catalog.=) ANY (members)
           AND e.value::pg_catalog.text OPERATOR(pg_catalog.<>) 'null'
           AND CASE WHEN expected OPERATOR(pg_catalog.=) '*' THEN owui_crypto.envelope_key_id(e.value) IS NULL
                    ELSE owui_crypto.envelope_key_id(e.value) IS DISTINCT FROM expected END);
END
$$;

-- Seals the listed members of a JSON object, each bound to binding#member.
-- With `expected`, members already sealed under that key id stay as they
-- are; without (the views' writes), every listed member is sealed. Member
-- order is kept; the object is rewritten only when something is sealed.
CREATE OR REPLACE FUNCTION owui_crypto.seal_members(value json, members text[], kind text, owner text, binding text,
                                                    expected text) RETURNS json
LANGUAGE plpgsql VOLATILE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sealed json;
BEGIN
    IF NOT owui_crypto.members_to_seal(value, members, COALESCE(expected, '')) THEN
        RETURN value;
    END IF;
    SELECT pg_catalog.json_object_agg(e.key,
               CASE WHEN e.key OPERATOR(pg_catalog.=) ANY (members)
                         AND e.value::pg_catalog.text OPERATOR(pg_catalog.<>) 'null'
                         AND (expected IS NULL OR owui_crypto.envelope_key_id(e.value) IS DISTINCT FROM expected)
                    THEN pg_catalog.to_json(owui_crypto.seal_text(e.value::pg_catalog.text, kind::owui_crypto.key_kind, owner,
                                                                  binding OPERATOR(pg_catalog.||) '#' OPERATOR(pg_catalog.||) e.key))
                    ELSE e.value END
               ORDER BY e.n)
      INTO sealed
      FROM pg_catalog.json_each(value) WITH ORDINALITY AS e(key, value, n);
    RETURN sealed;
END
$$;

-- Opens the sealed members of a JSON object with the transaction's keys; a
-- member sealed under a key this transaction does not hold reads as
-- `placeholder` (a JSON literal; NULL: JSON null).
CREATE OR REPLACE FUNCTION owui_crypto.open_members(value json, members text[], binding text, placeholder text)
RETURNS json
LANGUAGE plpgsql STABLE PARALLEL UNSAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    opened json;
BEGIN
    IF value IS NULL OR pg_catalog.strpos(value::pg_catalog.text, '"oc1:') OPERATOR(pg_catalog.=) 0
       OR pg_catalog.json_typeof(value) OPERATOR(pg_catalog.<>) 'object' THEN
        RETURN value;
    END IF;
    SELECT pg_catalog.json_object_agg(e.key,
               CASE WHEN e.key OPERATOR(pg_catalog.=) ANY (members) AND owui_crypto.envelope_key_id(e.value) IS NOT NULL
                    THEN owui_crypto.open_text(e.value OPERATOR(pg_catalog.#>>) '{}',
                                               binding OPERATOR(pg_catalog.||) '#' OPERATOR(pg_catalog.||) e.key,
                                               COALESCE(placeholder, 'null'))::pg_catalog.json
                    ELSE e.value END
               ORDER BY e.n)
      INTO opened
      FROM pg_catalog.json_each(value) WITH ORDINALITY AS e(key, value, n);
    RETURN opened;
END
$$;

-- JSON null stays JSON null (see the top of this file).
CREATE OR REPLACE FUNCTION owui_crypto.seal_json(plaintext json, kind owui_crypto.key_kind, owner text, binding text)
RETURNS json
LANGUAGE sql VOLATILE PARALLEL SAFE
RETURN CASE WHEN plaintext::pg_catalog.text OPERATOR(pg_catalog.=) 'null' THEN plaintext
            ELSE pg_catalog.to_json(owui_crypto.seal_text(plaintext::pg_catalog.text, kind, owner, binding)) END;

-- Plaintext left from before the install, per column, members included.
CREATE OR REPLACE FUNCTION owui_crypto.unsealed_test(p_table name, col name, family text, rec text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    members text[] := owui_crypto.protected_members(p_table, col);
BEGIN
    IF members IS NULL THEN
        RETURN owui_crypto.unsealed_sql(family, rec, col);
    END IF;
    RETURN pg_catalog.format('owui_crypto.members_to_seal(%s.%I%s, %L, ''*'')', rec, col,
                             CASE family WHEN 'jsonb' THEN '::pg_catalog.json' ELSE '' END, members);
END
$$;

CREATE OR REPLACE FUNCTION owui_crypto.unsealed_counts() RETURNS TABLE (table_name name, column_name name, unsealed bigint)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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
                                  c.table_name, owui_crypto.unsealed_test(c.table_name, c.column_name, c.family, 't'))
           INTO unsealed;
        RETURN NEXT;
    END LOOP;
END
$$;

-- As in 70_seal_existing.sql, with members (unsealed_test) and the tables
-- whose owner is a column of their own at any depth of the policy.
CREATE OR REPLACE FUNCTION owui_crypto.seal_existing(p_owner text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
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
        CONTINUE WHEN pg_catalog.to_regclass(pg_catalog.format('public.%I', p.table_name)) IS NULL;
        CONTINUE WHEN (p.owner_column IS NULL) <> (p_owner IS NULL);
        SELECT pg_catalog.string_agg(pg_catalog.format('%1$I = t.%1$I', b.column_name), ', '),
               pg_catalog.string_agg(owui_crypto.unsealed_test(p.table_name, b.column_name, b.family, 't'), ' OR ')
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

-- -- The policy, beyond chats ------------------------------------------------------------
--
-- Sealed under the owner's key: what only its owner reads. Under the
-- deployment share key (with the author as owner: only they write it): what
-- Open WebUI shows to other users (channel messages, prompts).

INSERT INTO owui_crypto.protected_table (table_name, row_id, key_kind, owner_column, owner_parent) VALUES
    ('feedback',       'id', 'owner', 'user_id', NULL),
    ('memory',         'id', 'owner', 'user_id', NULL),
    ('note',           'id', 'owner', 'user_id', NULL),
    ('file',           'id', 'owner', 'user_id', NULL),
    ('folder',         'id', 'owner', 'user_id', NULL),
    ('automation',     'id', 'owner', 'user_id', NULL),
    ('calendar_event', 'id', 'owner', 'user_id', NULL),
    ('message',        'id', 'share', 'user_id', NULL),
    ('prompt',         'id', 'share', 'user_id', NULL),
    ('prompt_history', 'id', 'share', 'user_id', NULL);

INSERT INTO owui_crypto.protected_column (table_name, column_name, placeholder, members) VALUES
    -- chat: what Open WebUI keeps beside the body
    ('chat', 'tasks',     NULL, NULL),
    ('chat', 'variables', NULL, NULL),
    -- a full copy of the rated chat, and the rater's own words; rating and
    -- model id stay for the leaderboard's SQL
    -- the placeholder has the shape Open WebUI's admin dialog reads (snapshot.chat.chat.history.messages)
    ('feedback', 'snapshot', '{"chat": {"title": "[encrypted]", "chat": {"title": "[encrypted]", "history": {"messages": {}, "currentId": null}, "messages": [], "encrypted": true}}}', NULL),
    ('feedback', 'data',     '"[encrypted]"', ARRAY['reason', 'comment']),
    ('memory', 'content', '[encrypted]', NULL),
    ('note', 'title', '[encrypted]', NULL),
    ('note', 'data',  '{"content": {"md": "[encrypted]", "html": "<p>[encrypted]</p>", "json": null}}', NULL),
    -- uploads: the extracted text and the name; status stays for its filter
    ('file', 'filename', '[encrypted]', NULL),
    ('file', 'data', '""', ARRAY['content']),
    ('file', 'meta', '"[encrypted]"', ARRAY['name', 'description']),
    ('folder', 'name', '[encrypted]', NULL),
    ('folder', 'data', NULL, NULL),
    ('automation', 'name', '[encrypted]', NULL),
    ('automation', 'data', NULL, NULL),
    ('calendar_event', 'title',       '[encrypted]', NULL),
    ('calendar_event', 'description', NULL, NULL),
    ('calendar_event', 'location',    NULL, NULL),
    ('message', 'content', '[encrypted]', NULL),
    ('message', 'data',    NULL, NULL),
    ('prompt', 'content', '[encrypted]', NULL),
    ('prompt_history', 'snapshot', NULL, NULL);

-- -- Plaintext by decision -------------------------------------------------------------

CREATE TABLE owui_crypto.plaintext_column (
    table_pattern  text NOT NULL,  -- LIKE pattern over Open WebUI's table names
    column_pattern text NOT NULL,  -- LIKE pattern over column names
    reason         text NOT NULL CHECK (reason <> ''),
    PRIMARY KEY (table_pattern, column_pattern)
);

INSERT INTO owui_crypto.plaintext_column (table_pattern, column_pattern, reason) VALUES
    -- shapes that hold no words
    ('%', 'id',             'row identifier'),
    ('%', '%\_id',          'reference to another row'),
    ('%', '%\_by',          'the user who did it (an id)'),
    ('%', 'hash',           'content hash used for deduplication'),
    ('%', 'version\_num',   'migration bookkeeping'),
    ('%', 'status',         'a state Open WebUI filters on'),
    ('%', 'type',           'a kind Open WebUI filters on'),
    ('%', 'role',           'a role Open WebUI filters on'),
    ('%', 'color',          'a display colour'),
    ('%', 'permission%',    'access rules Open WebUI evaluates in SQL'),
    ('%', 'principal\_type', 'access rules Open WebUI evaluates in SQL'),
    ('%', 'resource\_type', 'access rules Open WebUI evaluates in SQL'),
    ('%', 'meta',           'Open WebUI''s metadata (tags, sizes, flags, timestamps) that its SQL filters and sorts on'),
    ('%', 'usage',          'token counts'),
    ('%', 'commit\_message', 'version notes of workspace objects'),
    -- identity and authentication: read before any user is bound
    ('user', '%',           'identity: Open WebUI signs users in and lists them before any user key is active'),
    ('auth', '%',           'authentication: a password hash, MFA state and session stamps, read at sign-in'),
    ('oauth\_session', 'token', 'encrypted by Open WebUI itself (OAUTH_SESSION_TOKEN_ENCRYPTION_KEY)'),
    ('oauth\_session', 'provider', 'the identity provider''s name'),
    ('api\_key', '%',       'credentials Open WebUI looks up by value'),
    ('channel\_webhook', '%', 'webhook credentials and display names Open WebUI looks up by value'),
    ('config%', '%',        'the deployment''s configuration'),
    -- what an administrator builds for everyone
    ('model%', '%',         'workspace models: built by administrators for their users'),
    ('tool%', '%',          'workspace tools: code and settings for everyone'),
    ('function%', '%',      'workspace functions: code and settings for everyone'),
    ('skill%', '%',         'workspace skills: built for everyone'),
    ('app', '%',            'workspace apps: built for everyone'),
    ('group', '%',          'user groups: names and permissions administrators manage'),
    ('knowledge', '%',      'knowledge bases: names and descriptions shown to everyone they are shared with; their files'' text is sealed in file'),
    ('knowledge\_directory', 'name', 'folder names inside a knowledge base, shown to everyone it is shared with'),
    ('channel', '%',        'channels: names and descriptions shown to every member; their messages are sealed'),
    ('channel\_member', '%', 'membership state'),
    ('message\_reaction', 'name', 'an emoji name'),
    ('calendar', '%',       'calendars: names shown to everyone they are shared with; events are sealed'),
    ('calendar\_event', 'rrule', 'the recurrence rule Open WebUI expands in SQL'),
    ('calendar\_event', 'data', 'event settings (reminders, all-day)'),
    ('calendar\_event\_attendee', '%', 'an attendee''s answer'),
    ('automation\_run', 'error', 'a run''s error class and message, for the administrator'),
    ('chat', 'share\_id',   'a reference to the share'),
    ('chatidtag', 'tag\_name', 'tags stay plaintext: Open WebUI filters chats by tag in SQL'),
    ('tag', 'name',         'tags stay plaintext: Open WebUI filters chats by tag in SQL'),
    ('prompt', 'command',   'the slash command Open WebUI looks prompts up by'),
    ('prompt', 'name',      'shown in every user''s prompt list'),
    ('prompt', 'data',      'prompt settings'),
    ('prompt', 'tags',      'tags stay plaintext: Open WebUI filters by tag in SQL'),
    ('memory', 'path',      'where a memory sits in the memory tree'),
    ('file', 'path',        'the storage location Open WebUI reads the upload from (it embeds the file name: see README)'),
    ('folder', 'items',     'the ids of the chats and files in a folder'),
    ('document', '%',       'a table of Open WebUI before 0.5 that 0.12.4 no longer writes'),
    ('alembic\_version', '%', 'migration bookkeeping'),
    ('owui\_crypto\_alembic\_version', '%', 'migration bookkeeping'),
    ('document\_chunk', '%', 'pgvector collections: not covered yet (README)');

-- Every text, varchar, json or jsonb column of a table in public that is
-- neither protected nor plaintext by decision: what a new Open WebUI release
-- added and nobody has decided on yet. SECURITY DEFINER: it reads the policy,
-- which the application role cannot.
CREATE OR REPLACE FUNCTION owui_crypto.unclassified_columns()
RETURNS TABLE (table_name name, column_name name, type_sql text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT c.relname, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
     WHERE c.relnamespace OPERATOR(pg_catalog.=) 'public'::regnamespace
       AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::"char"[])
       AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
       AND a.atttypid OPERATOR(pg_catalog.=) ANY (ARRAY['pg_catalog.text', 'pg_catalog.varchar', 'pg_catalog.json',
                                                      'pg_catalog.jsonb']::pg_catalog.regtype[]::pg_catalog.oid[])
       AND NOT EXISTS (SELECT 1 FROM owui_crypto.protected_column pc
                        WHERE pc.table_name OPERATOR(pg_catalog.=) c.relname
                          AND pc.column_name OPERATOR(pg_catalog.=) a.attname)
       AND NOT EXISTS (SELECT 1 FROM owui_crypto.plaintext_column pt
                        WHERE c.relname::pg_catalog.text OPERATOR(pg_catalog.~~) pt.table_pattern
                          AND a.attname::pg_catalog.text OPERATOR(pg_catalog.~~) pt.column_pattern)
     ORDER BY 1, 2;
END;

-- What the application role now also calls: the members' opening code, and
-- the coverage check at start (owui-crypto serve).
INSERT INTO owui_crypto.runtime_function (signature) VALUES
    ('owui_crypto.open_members(json, text[], text, text)'), ('owui_crypto.protected_members(name, name)'),
    ('owui_crypto.members_to_seal(json, text[], text)'), ('owui_crypto.unsealed_test(name, name, text, text)'),
    ('owui_crypto.unclassified_columns()')
ON CONFLICT DO NOTHING;

-- Health checks the application role runs at start read the policy, which it
-- may not: they run as the owner (they read catalogs and count rows, nothing more).
ALTER FUNCTION owui_crypto.drift() SECURITY DEFINER;
ALTER FUNCTION owui_crypto.unsealed_counts() SECURITY DEFINER;

SELECT owui_crypto.refresh();
