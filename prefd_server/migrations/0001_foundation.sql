-- Definitions, per-scope values, and the append-only change table that is at once
-- the audit trail and the change feed.

CREATE TABLE installation (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id           text NOT NULL DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 12),
    created_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO installation DEFAULT VALUES;

CREATE TABLE definitions (
    key                text PRIMARY KEY,
    category           text NOT NULL,
    value_type         text NOT NULL CHECK (value_type IN ('bool', 'int', 'double', 'string', 'enum', 'string_list', 'json')),
    default_value      jsonb NOT NULL,
    allowed_values     jsonb NOT NULL DEFAULT '[]',
    min_value          double precision,
    max_value          double precision,
    max_length         integer,
    scopes             text[] NOT NULL,
    sensitive          boolean NOT NULL DEFAULT false,
    description        text NOT NULL DEFAULT '',
    version            bigint NOT NULL DEFAULT 1,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    updated_by         text NOT NULL
);
CREATE INDEX definitions_category ON definitions (category, key);

-- One row per (scope, key) ever written. value IS NULL marks a removed override: the row
-- stays so the per-key version keeps growing across remove and set again.
CREATE TABLE preference_values (
    scope_kind   text NOT NULL CHECK (scope_kind IN ('GLOBAL', 'ORG', 'USER')),
    scope_id     text NOT NULL,
    key          text NOT NULL,
    value        jsonb,
    version      bigint NOT NULL CHECK (version > 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    updated_by   text NOT NULL,
    PRIMARY KEY (scope_kind, scope_id, key),
    CHECK ((scope_kind = 'GLOBAL') = (scope_id = ''))
);
CREATE INDEX preference_values_key ON preference_values (key) WHERE value IS NOT NULL;

CREATE TABLE changes (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    kind         text NOT NULL CHECK (kind IN ('preference', 'definition')),
    scope_kind   text NOT NULL,
    scope_id     text NOT NULL,
    key          text NOT NULL,
    old_value    jsonb,
    new_value    jsonb,
    version      bigint NOT NULL,
    actor        text NOT NULL,
    peer         text NOT NULL DEFAULT '',
    user_agent   text NOT NULL DEFAULT '',
    reason       text NOT NULL DEFAULT '',
    request_id   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX changes_feed ON changes (xid, id);
CREATE INDEX changes_scope_key ON changes (scope_kind, scope_id, key, version);

-- The change table is append-only. Only a session that sets prefd.change_maintenance
-- (the audited retention purge and erasure paths) may update or delete rows.
CREATE FUNCTION changes_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('prefd.change_maintenance', true), '') <> 'on' THEN
        RAISE EXCEPTION 'changes is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;
CREATE TRIGGER changes_append_only
    BEFORE UPDATE OR DELETE ON changes
    FOR EACH ROW EXECUTE FUNCTION changes_append_only();
CREATE TRIGGER changes_no_truncate
    BEFORE TRUNCATE ON changes
    FOR EACH STATEMENT EXECUTE FUNCTION changes_append_only();
