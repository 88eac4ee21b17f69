-- The CMDB: hosts, domains, accounts, aliases, container specs and instances,
-- limits and blocks.  Names are stored lower-case; domains in their ASCII
-- (IDNA) form, so lookups are plain equality on an indexed column.

CREATE TABLE hosts (
    id                  bigserial PRIMARY KEY,
    name                text NOT NULL UNIQUE,
    dispatcher_address  inet NOT NULL,
    lmtp_port           integer NOT NULL DEFAULT 10024,
    imap_port           integer NOT NULL DEFAULT 10143,
    smtp_port           integer NOT NULL DEFAULT 10587,
    container_subnet    cidr NOT NULL,
    capacity            integer NOT NULL DEFAULT 1000 CHECK (capacity >= 0),
    state               text NOT NULL DEFAULT 'active'
                        CHECK (state IN ('active', 'draining', 'down')),
    heartbeat_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE domains (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name = lower(name)),
    state       text NOT NULL DEFAULT 'active'
                CHECK (state IN ('active', 'suspended')),
    host_id     bigint REFERENCES hosts (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domains_host_idx ON domains (host_id);

CREATE TABLE accounts (
    id              bigserial PRIMARY KEY,
    domain_id       bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    localpart       text NOT NULL CHECK (localpart = lower(localpart)),
    password_hash   text NOT NULL,
    state           text NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'suspended')),
    quota_bytes     bigint CHECK (quota_bytes IS NULL OR quota_bytes >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, localpart)
);

CREATE TABLE aliases (
    id          bigserial PRIMARY KEY,
    domain_id   bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    localpart   text NOT NULL CHECK (localpart = lower(localpart)),
    destination text NOT NULL CHECK (destination = lower(destination)),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, localpart, destination)
);

-- One row per (domain, service); the row with domain_id NULL is the default
-- every domain without its own row gets.
CREATE TABLE container_specs (
    id                  bigserial PRIMARY KEY,
    domain_id           bigint REFERENCES domains (id) ON DELETE CASCADE,
    service             text NOT NULL CHECK (service IN ('smtp', 'lmtp', 'imap')),
    cpu_quota_us        integer NOT NULL DEFAULT 50000 CHECK (cpu_quota_us > 0),
    cpu_period_us       integer NOT NULL DEFAULT 100000 CHECK (cpu_period_us > 0),
    cpu_quota_max_us    integer NOT NULL DEFAULT 200000 CHECK (cpu_quota_max_us > 0),
    memory_bytes        bigint NOT NULL DEFAULT 268435456 CHECK (memory_bytes > 0),
    memory_max_bytes    bigint NOT NULL DEFAULT 1073741824 CHECK (memory_max_bytes > 0),
    pids_limit          integer NOT NULL DEFAULT 256 CHECK (pids_limit > 0),
    lifetime_s          integer NOT NULL DEFAULT 3600 CHECK (lifetime_s > 0),
    idle_timeout_s      integer NOT NULL DEFAULT 300 CHECK (idle_timeout_s > 0),
    max_instances       integer NOT NULL DEFAULT 2 CHECK (max_instances > 0)
);
CREATE UNIQUE INDEX container_specs_key
    ON container_specs (coalesce(domain_id, 0), service);
INSERT INTO container_specs (domain_id, service) VALUES
    (NULL, 'smtp'), (NULL, 'lmtp'), (NULL, 'imap');

CREATE TABLE container_instances (
    id                  bigserial PRIMARY KEY,
    domain_id           bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    service             text NOT NULL CHECK (service IN ('smtp', 'lmtp', 'imap')),
    host_id             bigint NOT NULL REFERENCES hosts (id),
    name                text NOT NULL UNIQUE,
    address             inet,
    state               text NOT NULL DEFAULT 'starting'
                        CHECK (state IN ('starting', 'running', 'draining', 'stopped')),
    pid                 integer,
    created_at          timestamptz NOT NULL DEFAULT now(),
    ready_at            timestamptz,
    last_activity_at    timestamptz,
    draining_at         timestamptz,
    stopped_at          timestamptz,
    stop_reason         text
);
-- An address is unique among the live instances of a host: a concurrent
-- start that picks a taken address fails here and picks again.
CREATE UNIQUE INDEX container_instances_live_address
    ON container_instances (host_id, address) WHERE state <> 'stopped';
CREATE INDEX container_instances_live
    ON container_instances (domain_id, service) WHERE state <> 'stopped';

-- scope 'domain': the domain as a whole; 'account': one account;
-- 'account_default': applies to each account of the domain without its own.
CREATE TABLE limits (
    id          bigserial PRIMARY KEY,
    scope       text NOT NULL CHECK (scope IN ('domain', 'account', 'account_default')),
    domain_id   bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    account_id  bigint REFERENCES accounts (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    value       bigint NOT NULL CHECK (value >= 0),
    window_s    integer CHECK (window_s IS NULL OR window_s > 0),
    mode        text NOT NULL DEFAULT 'enforce' CHECK (mode IN ('enforce', 'shadow')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((scope = 'account') = (account_id IS NOT NULL))
);
CREATE UNIQUE INDEX limits_key ON limits (scope, domain_id, coalesce(account_id, 0), kind);

-- Admin blocks: permanent refusals (550 5.7.1) until removed or expired.
CREATE TABLE blocks (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL
                CHECK (kind IN ('ip', 'sender', 'sender_domain', 'account', 'domain')),
    value       text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    UNIQUE (kind, value)
);
