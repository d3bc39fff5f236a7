#!/usr/bin/env bash
# Makes sure the services the tests and the demo talk to are up.
# PostgreSQL: an explicit TEST_DATABASE_URL wins; otherwise the local cluster
# at 127.0.0.1:5432 is started if it is installed but down. The harness falls
# back to testcontainers when neither answers.
set -euo pipefail

if [ -z "${TEST_DATABASE_URL:-}" ] && command -v pg_isready >/dev/null; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
      echo "services: starting the local PostgreSQL cluster"
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
    fi
  fi
fi

# PgBouncer (transaction pooling tests) comes from Debian's packages.
if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "services: installing pgbouncer from Debian's packages"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
  else
    echo "services: pgbouncer is not installed and cannot be installed here (need root + apt-get)" >&2
  fi
fi

# Chromium and its driver (the browser e2e test, e2e/test_browser.py) come from Debian's packages:
# selenium is given /usr/bin/chromedriver, so nothing is downloaded at run time.
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "services: installing chromium and chromium-driver from Debian's packages"
    apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "services: chromium/chromedriver are not installed and cannot be installed here (need root + apt-get)" >&2
  fi
fi

# promtool (Debian's prometheus package) checks the shipped alert rules and the dashboard's queries.
if ! command -v promtool >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "services: installing prometheus (for promtool) from Debian's packages"
    apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "services: promtool is not installed and cannot be installed here (need root + apt-get)" >&2
  fi
fi
