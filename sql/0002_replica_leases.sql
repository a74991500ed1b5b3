-- 0002: several replicas on one database. Each process registers an instance with a lease that
-- its heartbeat renews (expiry on the database's clock); a reply being generated names the
-- instance that owns it, so a sweeper marks `interrupted` only the replies of instances whose
-- lease has expired (service/store/leases.py).

CREATE TABLE instances (
    id                uuid PRIMARY KEY,               -- made by the process at start
    name              text NOT NULL,                  -- --instance-name, for people (need not be unique)
    started_at        timestamptz NOT NULL DEFAULT now(),
    lease_expires_at  timestamptz NOT NULL
);

-- The instance generating an assistant message; NULL for every other message, and for a reply
-- begun before this migration (no owner: the sweeper treats it as orphaned). No foreign key:
-- the sweeper deletes expired instances while their finished messages stay.
ALTER TABLE messages ADD COLUMN owner uuid;
