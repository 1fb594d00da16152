-- AI configuration: named configs per scope, their encrypted API keys, the model catalog and
-- the usage ledger with per-period totals. Every config and catalog change also appends a
-- row to `changes` (kind ai_config / ai_model), as does every budget threshold crossing (budget).

ALTER TABLE changes DROP CONSTRAINT changes_kind_check;
ALTER TABLE changes ADD CONSTRAINT changes_kind_check
    CHECK (kind IN ('preference', 'definition', 'maintenance', 'erasure', 'ai_config', 'ai_model', 'budget'));

CREATE TABLE ai_models (
    model                 text PRIMARY KEY,
    context_window        integer NOT NULL CHECK (context_window >= 1),
    output_limit          integer NOT NULL CHECK (output_limit >= 1 AND output_limit <= context_window),
    input_nanos_per_1k    bigint NOT NULL CHECK (input_nanos_per_1k >= 0),
    output_nanos_per_1k   bigint NOT NULL CHECK (output_nanos_per_1k >= 0),
    features              text[] NOT NULL DEFAULT '{}',
    version               bigint NOT NULL DEFAULT 1,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    updated_by            text NOT NULL
);

-- Seed 001's catalog (prices are USD per 1,000 tokens, kept in nano-USD).
INSERT INTO ai_models (model, context_window, output_limit, input_nanos_per_1k, output_nanos_per_1k, features, updated_by)
VALUES
    ('claude-sonnet-4-5-20250929', 200000, 4096, 3000000, 15000000, '{text,vision,tool_use}', 'prefd:catalog'),
    ('claude-3-opus-20240229', 200000, 4096, 15000000, 75000000, '{text,vision,tool_use}', 'prefd:catalog'),
    ('claude-3-haiku-20240307', 200000, 4096, 250000, 1250000, '{text,vision}', 'prefd:catalog');

-- `configuration` holds the fields a config sets, by path ("model.temperature": 0.5), never a key.
CREATE TABLE ai_configs (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    scope_kind     text NOT NULL CHECK (scope_kind IN ('GLOBAL', 'ORG', 'USER')),
    scope_id       text NOT NULL,
    name           text NOT NULL,
    priority       integer NOT NULL DEFAULT 0,
    active         boolean NOT NULL DEFAULT true,
    configuration  jsonb NOT NULL DEFAULT '{}',
    key_version    bigint NOT NULL DEFAULT 0,
    version        bigint NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    updated_by     text NOT NULL,
    UNIQUE (scope_kind, scope_id, name),
    CHECK ((scope_kind = 'GLOBAL') = (scope_id = ''))
);
CREATE INDEX ai_configs_chain ON ai_configs (scope_kind, scope_id, priority, name) WHERE active;

-- API keys, AES-GCM encrypted under the master key `key_id`; `last4` is what masked responses show.
CREATE TABLE ai_api_keys (
    config_id   uuid NOT NULL REFERENCES ai_configs (id) ON DELETE CASCADE,
    slot        text NOT NULL CHECK (slot IN ('primary', 'secondary')),
    key_id      text NOT NULL,
    nonce       bytea NOT NULL,
    ciphertext  bytea NOT NULL,
    last4       text NOT NULL,
    PRIMARY KEY (config_id, slot)
);

-- The usage ledger is the source of truth for spend; one row per generation (request_id).
CREATE TABLE ai_usage (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id      text NOT NULL UNIQUE,
    user_id         text NOT NULL,
    org_id          text NOT NULL,
    model           text NOT NULL,
    input_tokens    bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens   bigint NOT NULL CHECK (output_tokens >= 0),
    cost_nanos      bigint NOT NULL CHECK (cost_nanos >= 0),
    actor           text NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ai_usage_user ON ai_usage (user_id, recorded_at);

-- Spend per user and period, maintained in the same transaction as each ledger row.
CREATE TABLE ai_usage_totals (
    user_id       text NOT NULL,
    period        text NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly')),
    period_start  date NOT NULL,
    cost_nanos    bigint NOT NULL,
    PRIMARY KEY (user_id, period, period_start)
);
