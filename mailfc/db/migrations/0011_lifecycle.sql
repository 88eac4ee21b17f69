-- Lifecycle of hosts and containers an admin can trust.
--
-- hosts.state 'pending': added by `mailfc host add` and never heard from; no
-- domain is placed on it until its first heartbeat makes it 'active'.  The
-- column default stays 'active' (a host that registers itself is alive).
ALTER TABLE hosts DROP CONSTRAINT IF EXISTS hosts_state_check;
ALTER TABLE hosts ADD CONSTRAINT hosts_state_check
    CHECK (state IN ('pending', 'active', 'draining', 'down'));

-- An admin's `container update` pins what it changed: the controller leaves
-- that setting of that instance alone until the time given ('infinity': until
-- `container update --unpin`).  NULL: not pinned.
ALTER TABLE container_instances ADD COLUMN cpu_pinned_until timestamptz;
ALTER TABLE container_instances ADD COLUMN memory_pinned_until timestamptz;
