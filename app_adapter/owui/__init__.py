"""Running the real Open WebUI with owui-crypto in place (``owui-crypto serve``).

Open WebUI is never copied or edited: the modules here wrap its functions,
override its FastAPI dependencies and listen to its SQLAlchemy engines.

* :mod:`.compat`    -- the supported versions and the shape of everything wrapped;
* :mod:`.launcher`  -- settings it refuses, migrations, installing, uvicorn;
* :mod:`.binding`   -- who is acting, for requests, sockets, automations, timers;
* :mod:`.lifecycle` -- user ids from KMS, keys at sign-up, crypto-shredding;
* :mod:`.statements` -- the one Open WebUI statement PostgreSQL refuses on a view;
* :mod:`.responses` -- refusals of the database as clear HTTP answers.
"""
