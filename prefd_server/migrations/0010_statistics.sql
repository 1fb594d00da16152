-- Preference statistics, kept by one change-feed consumer: per (scope, key) the value it counts,
-- per key and scope kind the holders and the holders of each value, the users known to the
-- statistics, daily rollups, and the consumer's feed position, all changed in one transaction per
-- batch of changes. scope_kind '*' rows add up every scope kind (so reads at all scopes stay an
-- index lookup). A value is identified by md5 of its jsonb text (PostgreSQL's canonical JSON); a
-- sensitive key's values are never stored: its counted value is '' ("held, value not kept").

-- Where the consumer is in the change feed: everything at or before (xid, change_id) is counted.
CREATE TABLE statistics_position (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    xid          bigint NOT NULL DEFAULT 0,
    change_id    bigint NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO statistics_position DEFAULT VALUES;

-- The value each stored (scope, key) is counted under (NULL: the override was removed; the row
-- stays, as in preference_values, with the version the count reflects).
CREATE TABLE statistics_current (
    scope_kind   text NOT NULL,
    scope_id     text NOT NULL,
    key          text NOT NULL,
    value_hash   text,
    version      bigint NOT NULL,
    PRIMARY KEY (scope_kind, scope_id, key)
);

-- Holders of one value of one key at one scope kind ('*': all kinds); rows at 0 are removed.
CREATE TABLE statistics_values (
    key          text NOT NULL,
    scope_kind   text NOT NULL,
    value_hash   text NOT NULL,
    value_json   text NOT NULL,
    holders      bigint NOT NULL CHECK (holders >= 0),
    PRIMARY KEY (key, scope_kind, value_hash)
);
CREATE INDEX statistics_values_top ON statistics_values (key, scope_kind, holders DESC, value_hash);

-- Holders of a key (overrides currently stored) and its distinct counted values, per scope kind.
CREATE TABLE statistics_keys (
    key              text NOT NULL,
    scope_kind       text NOT NULL,
    holders          bigint NOT NULL DEFAULT 0 CHECK (holders >= 0),
    distinct_values  bigint NOT NULL DEFAULT 0 CHECK (distinct_values >= 0),
    PRIMARY KEY (key, scope_kind)
);

-- Users the statistics know: every user with a stored preference row (an override now or earlier),
-- until erased.
CREATE TABLE statistics_users (
    user_id      text PRIMARY KEY
);

CREATE TABLE statistics_totals (
    name         text PRIMARY KEY,
    value        bigint NOT NULL
);
INSERT INTO statistics_totals (name, value) VALUES ('known_users', 0);

-- One row per key and UTC day with changes: the changes that day, and holders and most common value
-- as of the day's last change the consumer applied (a day without a row has the previous row's state).
CREATE TABLE statistics_daily (
    key                text NOT NULL,
    day                date NOT NULL,
    changes            bigint NOT NULL DEFAULT 0,
    holders            bigint NOT NULL DEFAULT 0,
    user_holders       bigint NOT NULL DEFAULT 0,
    top_value_json     text,
    top_holders        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (key, day)
);
