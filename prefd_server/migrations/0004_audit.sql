-- Audit: rollbacks are marked on their change rows; erasures are recorded under a pseudonym; the
-- retention purge records the cutoff time so history points before it are refused.

ALTER TABLE changes ADD COLUMN rollback_of text NOT NULL DEFAULT '';
CREATE INDEX changes_actor ON changes (actor);

ALTER TABLE feed_compactions ADD COLUMN cutoff timestamptz;

-- The key of the keyed hash that turns an erased user id into its pseudonym.
ALTER TABLE installation ADD COLUMN pseudonym_key text NOT NULL
    DEFAULT encode(sha256((random()::text || clock_timestamp()::text)::bytea), 'hex');

CREATE TABLE erasures (
    pseudonym   text PRIMARY KEY,
    erased_at   timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    reason      text NOT NULL
);
