-- The controller's decisions and adaptive limits.
--
-- events: every decision the controller (or an admin action) takes, with its
-- reason and the measurements behind it; `mailfc events` reads it.  Time
-- ordered and append-only; small next to the session tables, so a plain
-- table with a time index.
CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    host        text,
    domain      text,
    service     text,
    instance    text,
    kind        text NOT NULL,      -- start, stop, drain, scale_up, scale_down, scale_out,
                                    -- scale_in, limit_change, host_down, ...
    reason      text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_at ON events (at);
CREATE INDEX events_domain_at ON events (domain, at);

-- Adaptive limits: with both set, `value` is the effective value, moved by the
-- controller within [min_value, max_value]; with both NULL the limit is fixed.
ALTER TABLE limits ADD COLUMN min_value bigint;
ALTER TABLE limits ADD COLUMN max_value bigint;
ALTER TABLE limits ADD CONSTRAINT limits_range CHECK (
    (min_value IS NULL AND max_value IS NULL)
    OR (min_value IS NOT NULL AND max_value IS NOT NULL
        AND 0 <= min_value AND min_value <= max_value
        AND value BETWEEN min_value AND max_value));
