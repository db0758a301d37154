#!/bin/sh
# Run by the postgres image once, when it initialises an empty data volume (docker-entrypoint-initdb.d), as the
# owner (POSTGRES_USER). Creates the login roles of the processes that face work and the internet: the workers
# (nova_app) and the webhook receiver (nova_receiver). Each is a member of nova_worker and holds nothing else, so
# they get exactly the least-privilege grants of nova_email/sql/090 and 091 once `nova-email migrate` (as the owner)
# has run. nova_worker is created here, empty, so the memberships can be declared now; 090 accepts an existing role.
set -eu

for variable in NOVA_APP_PASSWORD NOVA_RECEIVER_PASSWORD; do
    eval "value=\${$variable:-}"
    if [ -z "$value" ]; then
        echo "10-nova-roles.sh: set $variable in .env (the password of a least-privilege login role)" >&2
        exit 1
    fi
done

psql --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set app_password="$NOVA_APP_PASSWORD" --set receiver_password="$NOVA_RECEIVER_PASSWORD" <<'SQL'
CREATE ROLE nova_worker NOLOGIN;
CREATE ROLE nova_app LOGIN PASSWORD :'app_password' IN ROLE nova_worker;
CREATE ROLE nova_receiver LOGIN PASSWORD :'receiver_password' IN ROLE nova_worker;
SQL
