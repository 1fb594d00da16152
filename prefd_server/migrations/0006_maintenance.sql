-- The maintenance log: every VACUUM / ANALYZE / REINDEX run through RunMaintenance, with who asked,
-- where it is and how it ended. At most one unfinished operation per target; `backend_pid` is the
-- session running it, so an operation whose session is gone can be told as interrupted.

CREATE TABLE maintenance_operations (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation    text NOT NULL CHECK (operation IN ('VACUUM', 'VACUUM_ANALYZE', 'ANALYZE', 'REINDEX')),
    target       text NOT NULL,
    full_vacuum  boolean NOT NULL DEFAULT false,
    status       text NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    initiator    text NOT NULL,
    reason       text NOT NULL DEFAULT '',
    backend_pid  integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_ms  double precision,
    error        text NOT NULL DEFAULT ''
);

CREATE UNIQUE INDEX maintenance_operations_one_unfinished ON maintenance_operations (target)
    WHERE status IN ('queued', 'running');
CREATE INDEX maintenance_operations_target ON maintenance_operations (target, id);
