-- Nothing to undo: the replaced body is 80_hardening.sql's with the padding
-- read off the end; putting rtrim back would only bring the size limit back.
-- Removing owui-crypto (downgrade to base) drops the function with its schema.
DO $$ BEGIN END $$;
