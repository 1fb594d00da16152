-- Change-feed retention: each compaction records the feed position through which changes may
-- be gone, so a watch from an older cursor is told "compacted" instead of silently skipping.

ALTER TABLE changes DROP CONSTRAINT changes_kind_check;
ALTER TABLE changes ADD CONSTRAINT changes_kind_check
    CHECK (kind IN ('preference', 'definition', 'maintenance', 'erasure'));

CREATE TABLE feed_compactions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    through_xid   xid8 NOT NULL,
    through_id    bigint NOT NULL,
    removed       bigint NOT NULL,
    actor         text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
