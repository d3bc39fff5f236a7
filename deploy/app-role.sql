-- The application role of deploy/owui-crypto.yaml: the login role Open WebUI runs as (README, "Two roles").
-- Run once, as the master user, from a host that reaches the cluster (README, "Deploy to AWS", step 3):
--
--   psql "host=<DatabaseEndpoint> dbname=openwebui user=owui_admin sslmode=require" \
--     -v app_role=owui_app -f deploy/app-role.sql
--
-- It only creates the role and lets it sign in with RDS IAM tokens: no password, no ownership, no privilege on
-- any table. owui-crypto serve grants it exactly what Open WebUI needs, as the owner, at every start, and refuses
-- to start if it could act as the owner. Running it again changes nothing.
--
-- Variables: app_role (default owui_app, the stack's ApplicationDatabaseUsername), iam_role (default rds_iam,
-- Aurora's role for IAM authentication; the tests name a stand-in).

\set ON_ERROR_STOP on
\if :{?app_role}
\else
  \set app_role owui_app
\endif
\if :{?iam_role}
\else
  \set iam_role rds_iam
\endif

-- As AWS documents it (CREATE USER, GRANT rds_iam); spelled out so that it holds nothing else.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', :'app_role')
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'app_role') \gexec

SELECT format('GRANT %I TO %I', :'iam_role', :'app_role') \gexec
