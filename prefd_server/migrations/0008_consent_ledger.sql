-- The consent ledger: one append-only row per grant or withdrawal of consent for a purpose, each
-- written in the transaction of its change row (kind consent, key consent/<purpose>) and sharing
-- its id. A purpose's current state is derived (its latest entry); expiry is derived from
-- expires_at. Erasure pseudonymises the rows instead of deleting them: consent evidence is kept.

ALTER TABLE changes DROP CONSTRAINT changes_kind_check;
ALTER TABLE changes ADD CONSTRAINT changes_kind_check
    CHECK (kind IN ('preference', 'definition', 'maintenance', 'erasure', 'ai_config', 'ai_model', 'budget',
                    'consent'));

CREATE TABLE consent_ledger (
    id               bigint PRIMARY KEY,  -- the id of the entry's change row
    change_xid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    user_id          text NOT NULL,
    purpose          text NOT NULL CHECK (purpose ~ '^[a-z0-9_.-]{1,128}$'),
    legal_basis      text NOT NULL CHECK (legal_basis IN ('consent', 'contract', 'legal_obligation',
                                                          'vital_interests', 'public_task',
                                                          'legitimate_interests')),
    status           text NOT NULL CHECK (status IN ('granted', 'withdrawn', 'expired')),
    source           text NOT NULL DEFAULT '',
    notice_version   text NOT NULL DEFAULT '',
    proof_reference  text NOT NULL DEFAULT '',
    granted_at       timestamptz,
    expires_at       timestamptz,
    withdrawn_at     timestamptz,
    actor            text NOT NULL,
    peer             text NOT NULL DEFAULT '',
    user_agent       text NOT NULL DEFAULT '',
    recorded_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consent_ledger_user_purpose ON consent_ledger (user_id, purpose, id);
CREATE INDEX consent_ledger_user ON consent_ledger (user_id, id);

-- Append-only like `changes`: only a session that sets prefd.consent_maintenance (the erasure
-- path, which pseudonymises) may update or delete rows.
CREATE FUNCTION consent_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('prefd.consent_maintenance', true), '') <> 'on' THEN
        RAISE EXCEPTION 'consent_ledger is append-only: % refused', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;
CREATE TRIGGER consent_ledger_append_only
    BEFORE UPDATE OR DELETE ON consent_ledger
    FOR EACH ROW EXECUTE FUNCTION consent_ledger_append_only();
CREATE TRIGGER consent_ledger_no_truncate
    BEFORE TRUNCATE ON consent_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION consent_ledger_append_only();
