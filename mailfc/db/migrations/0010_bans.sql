-- Login bans (mailfc.db.bans): client addresses or networks whose logins the
-- IMAP and submission routers refuse without checking the password.  A router
-- bans an address that fails logins for many distinct accounts (password
-- spraying) with set_by 'auto'; an admin adds and removes bans with
-- `mailfc ban`.  Every router reads the active ones every few seconds.  Each
-- ban and unban is also an events row (kind ban / unban), so the history
-- outlives the ban.
CREATE TABLE bans (
    id          bigserial PRIMARY KEY,
    network     cidr NOT NULL UNIQUE,       -- an address is a /32 (/128) network
    reason      text NOT NULL DEFAULT '',
    set_by      text NOT NULL,              -- 'auto' (a router) or the admin's name
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz                 -- NULL: until removed
);
CREATE INDEX bans_expires_at ON bans (expires_at);
