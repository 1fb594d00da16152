-- The notification settings scheme. The new definitions are installed from the definitions file at
-- start-up like every shipped definition (preference_values has no foreign key to definitions, so the
-- copied values may precede them). This migration:
-- 1. brings shipped definitions that changed up to date where an installation still holds the shipped
--    field (an admin's edit is never overwritten): notifications.frequency gains "hourly", the two
--    replaced trading keys say they are deprecated; each update is a change row of kind definition;
-- 2. copies every stored override of the replaced trading keys to its new key (same scope and value,
--    version 1), each with its change row of kind preference.

WITH shipped (key, old_allowed, new_allowed, old_description, new_description) AS (
    VALUES
        ('notifications.frequency',
         '["immediate", "daily", "weekly"]'::jsonb,
         '["immediate", "hourly", "daily", "weekly"]'::jsonb,
         'How often non-critical notifications are delivered: immediately or as a daily or weekly digest.',
         'How often non-critical notifications are delivered: immediately, or as an hourly, daily or weekly digest.'),
        ('notifications.trading.event_rules',
         NULL,
         NULL,
         'Per trading event type: enabled flag, channels (EMAIL, SMS, PUSH, IN_APP, WEBHOOK), priority (LOW to CRITICAL), throttle in minutes and conditions on event data (amounts in USD).',
         'Deprecated, use notifications.event_rules (its stored values were copied there): per trading event type rules.'),
        ('notifications.trading.critical_bypass_throttle',
         NULL,
         NULL,
         'Whether CRITICAL trading notifications bypass throttling.',
         'Deprecated, use notifications.critical_bypass_throttle (its stored values were copied there).')
),
previous AS (
    SELECT d.*, s.old_allowed, s.new_allowed, s.old_description, s.new_description
    FROM definitions d JOIN shipped s USING (key)
    WHERE d.allowed_values = s.old_allowed OR d.description = s.old_description
    FOR UPDATE OF d
),
updated AS (
    UPDATE definitions d
    SET allowed_values = CASE WHEN d.allowed_values = b.old_allowed THEN b.new_allowed ELSE d.allowed_values END,
        description = CASE WHEN d.description = b.old_description THEN b.new_description ELSE d.description END,
        version = d.version + 1,
        updated_at = now(),
        updated_by = 'prefd:migration'
    FROM previous b
    WHERE d.key = b.key
    RETURNING d.*
)
INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version, actor, reason)
SELECT 'definition', 'GLOBAL', '', a.key,
       jsonb_build_object('category', b.category, 'type', b.value_type, 'default', b.default_value,
                          'allowed_values', b.allowed_values, 'min', b.min_value, 'max', b.max_value,
                          'max_length', b.max_length, 'scopes', to_jsonb(b.scopes), 'sensitive', b.sensitive,
                          'description', b.description),
       jsonb_build_object('category', a.category, 'type', a.value_type, 'default', a.default_value,
                          'allowed_values', a.allowed_values, 'min', a.min_value, 'max', a.max_value,
                          'max_length', a.max_length, 'scopes', to_jsonb(a.scopes), 'sensitive', a.sensitive,
                          'description', a.description),
       a.version, 'prefd:migration', 'notification settings scheme'
FROM updated a JOIN previous b USING (key)
ORDER BY a.key;

WITH renamed (old_key, new_key) AS (
    VALUES
        ('notifications.trading.event_rules', 'notifications.event_rules'),
        ('notifications.trading.critical_bypass_throttle', 'notifications.critical_bypass_throttle')
),
copied AS (
    INSERT INTO preference_values (scope_kind, scope_id, key, value, version, updated_at, updated_by)
    SELECT p.scope_kind, p.scope_id, r.new_key, p.value, 1, now(), 'prefd:migration'
    FROM preference_values p JOIN renamed r ON p.key = r.old_key
    WHERE p.value IS NOT NULL
    ON CONFLICT (scope_kind, scope_id, key) DO NOTHING
    RETURNING scope_kind, scope_id, key, value
)
INSERT INTO changes (kind, scope_kind, scope_id, key, old_value, new_value, version, actor, reason)
SELECT 'preference', c.scope_kind, c.scope_id, c.key, NULL, c.value, 1, 'prefd:migration', 'migrated from ' || r.old_key
FROM copied c JOIN renamed r ON c.key = r.new_key
ORDER BY c.scope_kind, c.scope_id, c.key;
