-- Preference templates: named bundles of values applied to a USER or ORG scope as one write.
CREATE TABLE preference_templates (
    name            text PRIMARY KEY,
    description     text NOT NULL DEFAULT '',
    scope_kind      text NOT NULL CHECK (scope_kind IN ('ORG', 'USER')),
    template_values jsonb NOT NULL,
    version         bigint NOT NULL DEFAULT 1 CHECK (version > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      text NOT NULL,
    times_applied   bigint NOT NULL DEFAULT 0,
    last_applied_at timestamptz
);
