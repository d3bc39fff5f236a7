"""owui-crypto: per-user encryption at rest of Open WebUI chats, inside PostgreSQL.

The SQL in ``sql/`` seals and opens; this package gets each user's key from
AWS KMS and hands it to PostgreSQL for one transaction at a time
(:mod:`app_adapter.hook`), provisions and forgets keys
(:mod:`app_adapter.keys`), and installs the SQL (:mod:`app_adapter.migrate`).
"""

__version__ = "0.1.0"
