"""A Dramatiq broker over PGMQ (Postgres message queues)."""
