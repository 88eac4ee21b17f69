-- Abuse analysis (mailfc.analysis): the admin event log, and the indexes the
-- analysis queries need on top of those of 0002_sessions.sql.
--
-- admin_events: one row per admin action that changes what the policy does
-- (block, unblock), written in the same transaction as the change itself, so the
-- history of an account shows who blocked it, when and why.
CREATE TABLE admin_events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,              -- block, unblock
    kind        text NOT NULL,              -- the block kind: account, domain, ip, ...
    value       text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    detail      jsonb
);
CREATE INDEX admin_events_value ON admin_events (value, at);
CREATE INDEX admin_events_at ON admin_events (at);
