-- Abuse analysis (mailfc.analysis): logins by account whatever the case the user
-- typed.  The routers record the user name as typed; the analysis compares
-- lower(username) with the stored (lower-case) account, which the plain
-- (username, at) index of 0002_sessions.sql cannot serve.
CREATE INDEX auth_attempts_lower_username ON auth_attempts (lower(username), at);
