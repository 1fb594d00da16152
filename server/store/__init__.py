"""SQL over asyncpg: the only place prefd talks to PostgreSQL."""
