-- Session records: every SMTP and IMAP session, message and command.
--
-- These tables take the platform's highest insert rate and are read by time
-- range (abuse analysis, limits), so each is partitioned by day on its time
-- column.  mailfc_ensure_partitions() creates the days around now (run by
-- `mailfc db maintain` and on every migrate); mailfc_drop_partitions() drops
-- whole days past the retention, which costs nothing compared with DELETE.
-- A DEFAULT partition catches rows outside the prepared days so an insert
-- never fails for want of a partition.
--
-- Rows name domain and account by text, not by foreign key: the history must
-- outlive a removed account, and inserts must not take locks on the CMDB.

CREATE SEQUENCE smtp_sessions_id_seq;
CREATE TABLE smtp_sessions (
    id              bigint NOT NULL DEFAULT nextval('smtp_sessions_id_seq'),
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz,
    component       text NOT NULL,          -- smtp-in, postfix, submission, ...
    host            text,
    domain          text,
    account         text,
    client_ip       inet,
    client_name     text,
    helo            text,
    tls             boolean,
    messages        integer NOT NULL DEFAULT 0,
    recipients      integer NOT NULL DEFAULT 0,
    bytes           bigint NOT NULL DEFAULT 0,
    verdict         text,                   -- accept, reject, tempfail, discard
    reason          text,
    PRIMARY KEY (id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX ON smtp_sessions (started_at);
CREATE INDEX ON smtp_sessions (domain, started_at);
CREATE INDEX ON smtp_sessions (account, started_at);
CREATE INDEX ON smtp_sessions (client_ip, started_at);

-- One row per transaction (MAIL FROM to end of message or abort).
CREATE SEQUENCE smtp_messages_id_seq;
CREATE TABLE smtp_messages (
    id              bigint NOT NULL DEFAULT nextval('smtp_messages_id_seq'),
    session_id      bigint NOT NULL,
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz,
    domain          text,
    account         text,
    client_ip       inet,
    queue_id        text,
    message_id      text,
    subject_digest  text,
    sender          text,
    recipients      text[] NOT NULL DEFAULT '{}',
    recipient_count integer NOT NULL DEFAULT 0,
    size            bigint,
    verdict         text,
    reason          text,
    PRIMARY KEY (id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX ON smtp_messages (started_at);
CREATE INDEX ON smtp_messages (domain, started_at);
CREATE INDEX ON smtp_messages (account, started_at);
CREATE INDEX ON smtp_messages (queue_id);
CREATE INDEX ON smtp_messages (message_id);

-- Every decision taken at a stage (connect, helo, mail, rcpt, data, eom),
-- with the limit or rule behind it.
CREATE SEQUENCE smtp_events_id_seq;
CREATE TABLE smtp_events (
    id              bigint NOT NULL DEFAULT nextval('smtp_events_id_seq'),
    session_id      bigint NOT NULL,
    message_id      bigint,
    at              timestamptz NOT NULL,
    stage           text NOT NULL,
    verdict         text NOT NULL,
    reason          text,
    rule            text,                   -- e.g. limit:messages/1h, block:ip
    mode            text,                   -- enforce, shadow
    detail          jsonb,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE INDEX ON smtp_events (session_id);
CREATE INDEX ON smtp_events (at);

CREATE SEQUENCE imap_sessions_id_seq;
CREATE TABLE imap_sessions (
    id              bigint NOT NULL DEFAULT nextval('imap_sessions_id_seq'),
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz,
    host            text,
    domain          text,
    account         text,
    client_ip       inet,
    bytes_in        bigint NOT NULL DEFAULT 0,
    bytes_out       bigint NOT NULL DEFAULT 0,
    commands        integer NOT NULL DEFAULT 0,
    verdict         text,
    reason          text,
    PRIMARY KEY (id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX ON imap_sessions (started_at);
CREATE INDEX ON imap_sessions (domain, started_at);
CREATE INDEX ON imap_sessions (account, started_at);
CREATE INDEX ON imap_sessions (client_ip, started_at);

CREATE SEQUENCE imap_commands_id_seq;
CREATE TABLE imap_commands (
    id              bigint NOT NULL DEFAULT nextval('imap_commands_id_seq'),
    session_id      bigint NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     real,
    domain          text,
    account         text,
    name            text NOT NULL,
    tag             text,
    arguments       text,
    result          text,                   -- OK, NO, BAD
    verdict         text,
    reason          text,
    PRIMARY KEY (id, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX ON imap_commands (session_id);
CREATE INDEX ON imap_commands (account, started_at);
CREATE INDEX ON imap_commands (started_at);

-- Login attempts at the routers (IMAP and submission), failures included.
CREATE SEQUENCE auth_attempts_id_seq;
CREATE TABLE auth_attempts (
    id              bigint NOT NULL DEFAULT nextval('auth_attempts_id_seq'),
    at              timestamptz NOT NULL,
    protocol        text NOT NULL,          -- imap, submission
    username        text,
    domain          text,
    client_ip       inet,
    success         boolean NOT NULL,
    reason          text,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE INDEX ON auth_attempts (at);
CREATE INDEX ON auth_attempts (client_ip, at);
CREATE INDEX ON auth_attempts (username, at);

CREATE TABLE session_tables (
    name        text PRIMARY KEY,
    time_column text NOT NULL
);
INSERT INTO session_tables VALUES
    ('smtp_sessions', 'started_at'), ('smtp_messages', 'started_at'),
    ('smtp_events', 'at'), ('imap_sessions', 'started_at'),
    ('imap_commands', 'started_at'), ('auth_attempts', 'at');

DO $$
DECLARE t record;
BEGIN
    FOR t IN SELECT name FROM session_tables LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', t.name || '_default', t.name);
    END LOOP;
END $$;

-- Daily partitions from days_back days ago to days_ahead days ahead (UTC days).
CREATE FUNCTION mailfc_ensure_partitions(days_back integer, days_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    t record;
    day date;
    part text;
    created integer := 0;
BEGIN
    FOR t IN SELECT name FROM session_tables LOOP
        FOR day IN
            SELECT generate_series((now() AT TIME ZONE 'UTC')::date - days_back,
                                   (now() AT TIME ZONE 'UTC')::date + days_ahead,
                                   interval '1 day')::date
        LOOP
            part := t.name || '_' || to_char(day, 'YYYYMMDD');
            IF to_regclass(part) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    part, t.name,
                    (day::timestamp AT TIME ZONE 'UTC'),
                    ((day + 1)::timestamp AT TIME ZONE 'UTC'));
                created := created + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN created;
END $$;

-- Drop the daily partitions that end before now - retention_days.
CREATE FUNCTION mailfc_drop_partitions(retention_days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    t record;
    p record;
    dropped integer := 0;
    cutoff date := (now() AT TIME ZONE 'UTC')::date - retention_days;
BEGIN
    FOR t IN SELECT name FROM session_tables LOOP
        FOR p IN
            SELECT c.relname FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = t.name::regclass
              AND c.relname ~ ('^' || t.name || '_[0-9]{8}$')
        LOOP
            IF to_date(right(p.relname, 8), 'YYYYMMDD') + 1 <= cutoff THEN
                EXECUTE format('DROP TABLE %I', p.relname);
                dropped := dropped + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN dropped;
END $$;

SELECT mailfc_ensure_partitions(1, 7);
