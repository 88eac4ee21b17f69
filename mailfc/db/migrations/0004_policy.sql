-- Flow limits (mailfc.policy.engine): the shared state of every milter, gateway
-- and hook server on every host.  See engine.py for the counting rules.
--
-- limit_leases: one row per open slot of a concurrency limit (concurrent_sends,
-- imap_sessions, imap_heavy_concurrent).  A holder renews its leases while it
-- lives; a crashed holder's leases expire and the slots come back.
CREATE TABLE limit_leases (
    id          bigserial PRIMARY KEY,
    subject     text NOT NULL,              -- 'account:bob@example.org' | 'domain:example.org'
    kind        text NOT NULL,
    holder      text NOT NULL,              -- host/pid/token of the process holding it
    acquired_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX limit_leases_subject ON limit_leases (subject, kind);
CREATE INDEX limit_leases_expires ON limit_leases (expires_at);

-- limit_counters: amounts per window in 12 sub-buckets of window/12 (at least
-- 1 s).  A bucket counts while any part of it lies inside the window, so an
-- amount counts for between window and window + window/12: never more than
-- `value` in any window, at the price of a retry time up to 1/12 later.
CREATE TABLE limit_counters (
    subject      text NOT NULL,
    kind         text NOT NULL,
    window_s     integer NOT NULL,
    bucket_start timestamptz NOT NULL,
    amount       bigint NOT NULL,
    PRIMARY KEY (subject, kind, window_s, bucket_start)
);

-- What each recording process wrote and could not write (mailfc sessions stats).
CREATE TABLE recorder_stats (
    holder          text PRIMARY KEY,
    component       text NOT NULL,
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    written         bigint NOT NULL DEFAULT 0,
    failed_flushes  bigint NOT NULL DEFAULT 0,
    dropped         bigint NOT NULL DEFAULT 0,
    pending         integer NOT NULL DEFAULT 0,
    last_error      text
);

-- The limits that apply to a domain and (optionally) an account of it:
-- the domain's own rows, the account's own rows, and the domain's
-- per-account defaults for kinds the account has no row of its own for.
-- Account-scoped rows come from the account's own domain.
CREATE FUNCTION mailfc_applicable_limits(p_domain text, p_account text)
RETURNS TABLE (scope text, subject text, kind text, value bigint, window_s integer, mode text)
LANGUAGE sql STABLE AS $$
    SELECT l.scope, 'domain:' || d.name, l.kind, l.value, l.window_s, l.mode
    FROM domains d JOIN limits l ON l.domain_id = d.id AND l.scope = 'domain'
    WHERE d.name = p_domain
    UNION ALL
    SELECT l.scope, 'account:' || p_account, l.kind, l.value, l.window_s, l.mode
    FROM domains d JOIN limits l ON l.domain_id = d.id
    LEFT JOIN accounts a ON a.id = l.account_id
    WHERE p_account IS NOT NULL
      AND d.name = split_part(p_account, '@', 2)
      AND ((l.scope = 'account' AND a.localpart = split_part(p_account, '@', 1))
           OR (l.scope = 'account_default' AND NOT EXISTS (
                SELECT 1 FROM limits o JOIN accounts oa ON oa.id = o.account_id
                WHERE o.scope = 'account' AND o.domain_id = d.id AND o.kind = l.kind
                  AND oa.localpart = split_part(p_account, '@', 1))))
$$;

-- One decision point, atomically (see engine.py for the Python side):
--   p_release          leases to give back first (always done)
--   p_blocks           check admin blocks (ip, sender, sender_domain, account, domain)
--   p_acquire          concurrency kinds to take a lease of
--   p_peek_*           windowed kinds to check (used + amount > value) without counting
--   p_consume_*        windowed kinds to check and, if admitted, count
-- An enforced limit that is over makes the whole call take nothing and count
-- nothing ('admitted': false); a shadow limit that is over is reported and the
-- call goes on as if it were not.  Limits of kinds the call does not name are
-- reported in 'usage' (value, mode) so the caller can apply instant caps.
-- Advisory locks per (subject, kind), taken in sorted order, make acquire and
-- consume atomic across every process and host.
CREATE FUNCTION mailfc_policy_check(
    p_domain text, p_account text, p_ip inet, p_sender text, p_blocks boolean,
    p_acquire text[], p_peek_kinds text[], p_peek_amounts bigint[],
    p_consume_kinds text[], p_consume_amounts bigint[],
    p_release bigint[], p_holder text, p_lease_s double precision)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    now_ timestamptz := clock_timestamp();
    l record;
    b record;
    used bigint;
    amount bigint;
    sub integer;
    freed bigint;
    retry double precision;
    role text;
    idx integer;
    enforced_over boolean := false;
    over jsonb := '[]';
    usage jsonb := '[]';
    leases bigint[] := '{}';
    acq_subjects text[] := '{}';
    acq_kinds text[] := '{}';
    con_subjects text[] := '{}';
    con_kinds text[] := '{}';
    con_windows integer[] := '{}';
    con_amounts bigint[] := '{}';
    new_id bigint;
BEGIN
    IF cardinality(p_release) > 0 THEN
        DELETE FROM limit_leases WHERE id = ANY (p_release);
    END IF;

    IF p_blocks THEN
        SELECT k.kind, k.value, k.reason INTO b FROM blocks k
        WHERE (k.expires_at IS NULL OR k.expires_at > now_)
          AND CASE k.kind
                WHEN 'ip' THEN p_ip IS NOT NULL
                               AND k.value ~ '^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$'
                               AND p_ip <<= k.value::inet
                WHEN 'domain' THEN k.value = p_domain
                WHEN 'account' THEN k.value = p_account
                WHEN 'sender' THEN k.value = lower(p_sender)
                WHEN 'sender_domain' THEN k.value = lower(split_part(p_sender, '@', 2))
                ELSE false
              END
        LIMIT 1;
        IF FOUND THEN
            RETURN jsonb_build_object(
                'admitted', false, 'leases', '[]'::jsonb, 'over', '[]'::jsonb,
                'usage', '[]'::jsonb,
                'block', jsonb_build_object('kind', b.kind, 'value', b.value,
                                            'reason', b.reason));
        END IF;
    END IF;

    FOR l IN SELECT * FROM mailfc_applicable_limits(p_domain, p_account)
             ORDER BY subject, kind LOOP
        IF l.kind = ANY (p_acquire) THEN
            role := 'acquire';
            PERFORM pg_advisory_xact_lock(
                hashtextextended('mailfc-limit:' || l.subject || '/' || l.kind, 0));
            DELETE FROM limit_leases
            WHERE subject = l.subject AND kind = l.kind AND expires_at <= now_;
            SELECT count(*) INTO used FROM limit_leases
            WHERE subject = l.subject AND kind = l.kind;
            amount := 1;
        ELSIF l.window_s IS NOT NULL AND l.kind = ANY (p_consume_kinds) THEN
            role := 'consume';
            PERFORM pg_advisory_xact_lock(
                hashtextextended('mailfc-limit:' || l.subject || '/' || l.kind, 0));
            amount := p_consume_amounts[array_position(p_consume_kinds, l.kind)];
        ELSIF l.window_s IS NOT NULL AND l.kind = ANY (p_peek_kinds) THEN
            role := 'peek';
            amount := p_peek_amounts[array_position(p_peek_kinds, l.kind)];
        ELSE
            usage := usage || jsonb_build_object(
                'scope', l.scope, 'subject', l.subject, 'kind', l.kind, 'value', l.value,
                'window_s', l.window_s, 'mode', l.mode, 'used', NULL);
            CONTINUE;
        END IF;

        IF role <> 'acquire' THEN
            sub := greatest(1, l.window_s / 12);
            SELECT coalesce(sum(c.amount), 0) INTO used FROM limit_counters c
            WHERE c.subject = l.subject AND c.kind = l.kind AND c.window_s = l.window_s
              AND c.bucket_start > now_ - make_interval(secs => l.window_s + sub);
        END IF;

        usage := usage || jsonb_build_object(
            'scope', l.scope, 'subject', l.subject, 'kind', l.kind, 'value', l.value,
            'window_s', l.window_s, 'mode', l.mode, 'used', used);

        IF used + amount > l.value THEN
            retry := NULL;
            IF role <> 'acquire' THEN
                -- The oldest buckets leave the window first: the retry time is
                -- when enough of them have left for this amount to fit.
                freed := 0;
                FOR b IN SELECT c.bucket_start, c.amount FROM limit_counters c
                         WHERE c.subject = l.subject AND c.kind = l.kind
                           AND c.window_s = l.window_s
                           AND c.bucket_start > now_ - make_interval(secs => l.window_s + sub)
                         ORDER BY c.bucket_start LOOP
                    freed := freed + b.amount;
                    IF used - freed + amount <= l.value THEN
                        retry := extract(epoch FROM b.bucket_start
                                         + make_interval(secs => l.window_s + sub) - now_);
                        EXIT;
                    END IF;
                END LOOP;
            END IF;
            over := over || jsonb_build_object(
                'scope', l.scope, 'subject', l.subject, 'kind', l.kind, 'value', l.value,
                'window_s', l.window_s, 'mode', l.mode, 'used', used, 'amount', amount,
                'retry_after_s', retry);
            IF l.mode = 'enforce' THEN
                enforced_over := true;
            END IF;
        END IF;

        IF role = 'acquire' THEN
            acq_subjects := acq_subjects || l.subject;
            acq_kinds := acq_kinds || l.kind;
        ELSIF role = 'consume' AND amount > 0 THEN
            con_subjects := con_subjects || l.subject;
            con_kinds := con_kinds || l.kind;
            con_windows := con_windows || l.window_s;
            con_amounts := con_amounts || amount;
        END IF;
    END LOOP;

    IF NOT enforced_over THEN
        FOR idx IN 1 .. cardinality(acq_subjects) LOOP
            INSERT INTO limit_leases (subject, kind, holder, acquired_at, expires_at)
            VALUES (acq_subjects[idx], acq_kinds[idx], p_holder, now_,
                    now_ + make_interval(secs => p_lease_s))
            RETURNING id INTO new_id;
            leases := leases || new_id;
        END LOOP;
        FOR idx IN 1 .. cardinality(con_subjects) LOOP
            sub := greatest(1, con_windows[idx] / 12);
            INSERT INTO limit_counters AS c (subject, kind, window_s, bucket_start, amount)
            VALUES (con_subjects[idx], con_kinds[idx], con_windows[idx],
                    to_timestamp(floor(extract(epoch FROM now_) / sub) * sub),
                    con_amounts[idx])
            ON CONFLICT (subject, kind, window_s, bucket_start)
            DO UPDATE SET amount = c.amount + EXCLUDED.amount;
        END LOOP;
    END IF;

    RETURN jsonb_build_object('admitted', NOT enforced_over, 'leases', to_jsonb(leases),
                              'over', over, 'usage', usage);
END $$;

-- Housekeeping: expired leases and counters no window can see any more.
CREATE FUNCTION mailfc_policy_expire() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    leases integer;
    counters integer;
BEGIN
    DELETE FROM limit_leases WHERE expires_at <= clock_timestamp();
    GET DIAGNOSTICS leases = ROW_COUNT;
    DELETE FROM limit_counters
    WHERE bucket_start < clock_timestamp()
                         - make_interval(secs => window_s + greatest(1, window_s / 12));
    GET DIAGNOSTICS counters = ROW_COUNT;
    RETURN leases + counters;
END $$;
