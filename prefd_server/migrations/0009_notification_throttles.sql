-- Notification throttles when Redis is not configured or down: one counter per user, event type and
-- fixed window (aligned to the epoch), and the outcome of each charge made with an idempotency key,
-- kept 24 hours so a retried decision is charged once. Rows of windows that ended more than a day
-- ago and charges older than a day are purged as charges come in.

CREATE TABLE notification_throttles (
    user_id       text NOT NULL,
    event_type    text NOT NULL,
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    count         integer NOT NULL CHECK (count >= 0),
    PRIMARY KEY (user_id, event_type, window_start)
);

CREATE INDEX notification_throttles_window_end ON notification_throttles (window_end);

-- The idempotency key is the caller's; one key may charge several recipients (a batch), so it is
-- unique per user and event type.
CREATE TABLE notification_throttle_charges (
    user_id          text NOT NULL,
    event_type       text NOT NULL,
    idempotency_key  text NOT NULL,
    allowed          boolean NOT NULL,
    count            integer NOT NULL,
    charged_limit    integer NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, event_type, idempotency_key)
);

CREATE INDEX notification_throttle_charges_created_at ON notification_throttle_charges (created_at);
