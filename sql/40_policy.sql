-- The protection policy: the one place that decides which tables and columns
-- are sealed and how each row's owner is found. Views, triggers and checks
-- are all generated from these two tables by owui_crypto.refresh()
-- (50_generate.sql); nothing else names a protected column.

CREATE TABLE owui_crypto.protected_table (
    table_name   name PRIMARY KEY,         -- in schema public, as Open WebUI made it
    row_id       name NOT NULL,            -- unique per row; binds each sealed value to its row
    key_kind     owui_crypto.key_kind NOT NULL,
    owner_column name,                     -- the owner's user id, or the parent's row id (see owner_parent)
    owner_parent name REFERENCES owui_crypto.protected_table,  -- the owner is the parent row's owner
    -- Rows sealed under their owner's key need an owner; rows sealed under the
    -- share key may name one, and then only that owner may write them.
    CHECK (key_kind = 'share' OR owner_column IS NOT NULL),
    CHECK (owner_parent IS NULL OR owner_column IS NOT NULL)
);

CREATE TABLE owui_crypto.protected_column (
    table_name  name REFERENCES owui_crypto.protected_table ON DELETE CASCADE,
    column_name name,
    placeholder text,   -- what a reader without the key sees, as a literal of the column's type; NULL reads NULL
    PRIMARY KEY (table_name, column_name)
);

-- Open WebUI 0.12.4. Everything not listed (ids, foreign keys, timestamps,
-- flags, chat.meta with its tags, usage) stays plaintext so that Open WebUI's
-- filters, indexes and timers keep working.
INSERT INTO owui_crypto.protected_table (table_name, row_id, key_kind, owner_column, owner_parent) VALUES
    ('chat',         'id', 'owner', 'user_id', NULL),
    -- A message belongs to its chat's owner, not to its author.
    ('chat_message', 'id', 'owner', 'chat_id', 'chat'),
    -- Shares exist to be read by others: one deployment-wide share key keeps
    -- them out of dumps without breaking sharing. Only the chat's owner may
    -- write one: anyone else would snapshot placeholders over it.
    ('shared_chat',  'id', 'share', 'chat_id', 'chat');

INSERT INTO owui_crypto.protected_column (table_name, column_name, placeholder) VALUES
    ('chat', 'title',   '[encrypted]'),
    ('chat', 'chat',    '{"title": "[encrypted]", "history": {"messages": {}, "currentId": null}, "messages": [], "encrypted": true}'),
    ('chat', 'summary', NULL),
    ('chat_message', 'content',         '"[encrypted]"'),
    ('chat_message', 'output',          NULL),
    ('chat_message', 'files',           NULL),
    ('chat_message', 'sources',         NULL),
    ('chat_message', 'embeds',          NULL),
    ('chat_message', 'status_history',  NULL),
    ('chat_message', 'error',           NULL),
    ('chat_message', 'context_summary', NULL),
    ('shared_chat', 'title', '[encrypted]'),
    ('shared_chat', 'chat',  '{"title": "[encrypted]", "history": {"messages": {}, "currentId": null}, "messages": [], "encrypted": true}');
