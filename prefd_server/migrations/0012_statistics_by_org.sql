-- Statistics within one org. A change row now records the org it was made under: for a USER change
-- the org the write named (SetPreferences/ApplyTemplate/Rollback org_id, else the caller's org claim;
-- '' when neither), for an ORG change its org id, '' for GLOBAL. The statistics count each USER
-- override in the org of its latest change and each ORG override in its org, beside the figures of
-- every scope (org_id '').
ALTER TABLE changes ADD COLUMN org_id text NOT NULL DEFAULT '';

ALTER TABLE statistics_current ADD COLUMN org_id text NOT NULL DEFAULT '';

ALTER TABLE statistics_values ADD COLUMN org_id text NOT NULL DEFAULT '';
ALTER TABLE statistics_values DROP CONSTRAINT statistics_values_pkey;
ALTER TABLE statistics_values ADD PRIMARY KEY (key, org_id, scope_kind, value_hash);
DROP INDEX statistics_values_top;
CREATE INDEX statistics_values_top ON statistics_values (key, org_id, scope_kind, holders DESC, value_hash);

ALTER TABLE statistics_keys ADD COLUMN org_id text NOT NULL DEFAULT '';
ALTER TABLE statistics_keys DROP CONSTRAINT statistics_keys_pkey;
ALTER TABLE statistics_keys ADD PRIMARY KEY (key, org_id, scope_kind);

-- A policy is counted by the value it sets (not its envelope), so every figure is counted again from
-- the retained feed: the consumer starts over from the beginning (as `prefd rebuild-statistics` does).
TRUNCATE statistics_current, statistics_values, statistics_keys, statistics_users, statistics_daily;
UPDATE statistics_totals SET value = 0;
UPDATE statistics_position SET xid = 0, change_id = 0, updated_at = now();
