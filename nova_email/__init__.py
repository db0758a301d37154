"""Nova Email: a Postgres copy of Nylas mailboxes, kept in sync by Dramatiq actors over PGMQ."""
