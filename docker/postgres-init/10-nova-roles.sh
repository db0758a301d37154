#!/bin/sh
# The bundled postgres's set-up, run by the compose file's one-shot `roles` service before every `migrate` (so an
# existing data volume gets it on its next `up` too), as the owner. Idempotent: run it again to change a password.
#
# 1. The three database URLs are set together or not at all. The workers' DATABASE_URL, the receiver's
#    RECEIVER_DATABASE_URL and migrate's MIGRATE_DATABASE_URL default to this postgres; setting only some of them
#    would have migrate change one database while the workers use another.
# 2. A password that goes into a default URL holds only characters a URL carries as they are (A-Z a-z 0-9 . _ ~ -),
#    e.g. `openssl rand -hex 24`; otherwise set the URLs yourself with the password percent-encoded.
# 3. The login roles of the processes that face work and the internet exist with the passwords from .env: the
#    workers' nova_app and the webhook receiver's nova_receiver. Each is a member of nova_worker and holds nothing
#    else, so it gets exactly the least-privilege grants of nova_email/sql/090 and 091 once `nova-email migrate`
#    (as the owner) has run. nova_worker is created here, empty, so the memberships can be declared now; 090
#    accepts an existing role.
#
# Connection: psql's PGHOST, PGPORT, PGUSER (the owner), PGDATABASE and PGPASSWORD.
set -eu

fail() {
    echo "10-nova-roles.sh: $*" >&2
    exit 1
}

urls_set="${DATABASE_URL_SET:-}${RECEIVER_DATABASE_URL_SET:-}${MIGRATE_DATABASE_URL_SET:-}"
if [ -n "$urls_set" ] && [ "$urls_set" != "yesyesyes" ]; then
    fail "set DATABASE_URL, RECEIVER_DATABASE_URL and MIGRATE_DATABASE_URL in .env together or not at all" \
        "(migrate would otherwise change another database than the workers use)"
fi

for variable in NOVA_APP_PASSWORD NOVA_RECEIVER_PASSWORD; do
    eval "value=\${$variable:-}"
    [ -n "$value" ] || fail "set $variable in .env (the password of a least-privilege login role)"
done
if [ -z "$urls_set" ]; then
    for variable in PGPASSWORD NOVA_APP_PASSWORD NOVA_RECEIVER_PASSWORD; do
        eval "value=\${$variable:-}"
        case "$value" in
            *[!A-Za-z0-9._~-]*)
                name=$variable
                [ "$variable" = PGPASSWORD ] && name=POSTGRES_PASSWORD
                fail "$name goes into a database URL as it is: use only A-Z a-z 0-9 . _ ~ - (e.g. openssl rand" \
                    "-hex 24), or set the three *DATABASE_URL variables with the password percent-encoded"
                ;;
        esac
    done
fi

psql --set ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --set app_password="$NOVA_APP_PASSWORD" --set receiver_password="$NOVA_RECEIVER_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I NOLOGIN', 'nova_worker')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'nova_worker') \gexec
SELECT format('CREATE ROLE %I LOGIN', name)
  FROM unnest(array['nova_app', 'nova_receiver']) name
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) \gexec
ALTER ROLE nova_app WITH LOGIN PASSWORD :'app_password';
ALTER ROLE nova_receiver WITH LOGIN PASSWORD :'receiver_password';
GRANT nova_worker TO nova_app, nova_receiver;
SQL
