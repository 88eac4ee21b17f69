-- The recorder writes what it can (mailfc/policy/recorder.py, FAILURES): values
-- PostgreSQL cannot store (NUL, text that is not UTF-8, over-long keys) are stored
-- made storable and counted in `sanitized`; a row PostgreSQL still refuses is set
-- aside to the process's dead-letter file and counted in `dead_lettered`.
ALTER TABLE recorder_stats
    ADD COLUMN sanitized     bigint NOT NULL DEFAULT 0,
    ADD COLUMN dead_lettered bigint NOT NULL DEFAULT 0,
    ADD COLUMN dead_letter   text;

-- A message is recorded by the hop the client spoke to (the domain's Postfix through
-- the milter, SMTP-In) and again by Filter-Out on its way out, with its checks there.
-- `hop` names such a later hop ('filter-out'); the analysis counts a message only in
-- its row with no hop (mailfc/analysis/top.py), so 25 messages show as 25.  Adding a
-- column with no default costs nothing on the partitioned table.
ALTER TABLE smtp_messages ADD COLUMN hop text;
