-- owui-crypto foundation: the project's two schemas and pgcrypto.
--
--   owui_crypto       internals: key ring, crypto functions, the protection
--                     policy and the generator. Never on anyone's search_path.
--   owui_crypto_view  one decrypting view per protected table, same name and
--                     columns as the base table. The application puts this
--                     schema first on its search_path and so reads and writes
--                     through the views without knowing.
--
-- pgcrypto is a trusted extension (PostgreSQL 13+), so a database owner that
-- is not a superuser can install it, as on Aurora.

DO $$
DECLARE
    home text;
BEGIN
    SELECT n.nspname INTO home
      FROM pg_catalog.pg_extension e
      JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'pgcrypto';
    IF home IS NOT NULL AND home <> 'owui_crypto' THEN
        RAISE EXCEPTION 'pgcrypto is already installed in schema "%"', home
            USING ERRCODE = 'OC010',
                  HINT = 'owui-crypto calls pgcrypto as owui_crypto.<function>. Move it with '
                         '"ALTER EXTENSION pgcrypto SET SCHEMA owui_crypto" after creating that schema, '
                         'or drop it if nothing else uses it, then run the upgrade again.';
    END IF;
END
$$;

CREATE SCHEMA owui_crypto;
CREATE SCHEMA owui_crypto_view;
REVOKE ALL ON SCHEMA owui_crypto, owui_crypto_view FROM PUBLIC;

CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA owui_crypto;

-- Roles (besides the owner) that may use the views: the application's role
-- when it is not the migrating role. owui_crypto.refresh() grants exactly what
-- they need; `owui-crypto grant ROLE` adds one.
CREATE TABLE owui_crypto.grantee (
    role_name name PRIMARY KEY
);
