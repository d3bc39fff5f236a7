-- Nothing to undo step by step. What 80_hardening.sql replaced keeps its
-- hardened body, which works with the schema of 0006 (putting back the
-- versions it closed would reopen the holes, SECURITY.md); what it added is
-- removed with the schema when owui-crypto is removed (downgrade to base).
-- Upgrading again re-applies 80_hardening.sql: it is all CREATE OR REPLACE.
DO $$ BEGIN END $$;
