-- Container runtime additions (mailfc.runtime).
--
-- slot: the ordinal of a live instance among the instances of its (domain,
-- service).  Each slot has its own persistent state directory on the host
-- (a Postfix queue may be used by one master at a time), so two live
-- instances of one domain and service never share a slot; a concurrent start
-- that picks a taken slot fails on the index and picks again, as with the
-- addresses.
ALTER TABLE container_instances ADD COLUMN slot integer NOT NULL DEFAULT 0
    CHECK (slot >= 0);
CREATE UNIQUE INDEX container_instances_live_slot
    ON container_instances (domain_id, service, slot) WHERE state <> 'stopped';
-- recover() and `mailfc container list` read the live instances of a host.
CREATE INDEX container_instances_host_live
    ON container_instances (host_id) WHERE state <> 'stopped';
