-- The cluster's nodes, each as its last heartbeat reported it.

CREATE TABLE nodes (
    name         text PRIMARY KEY,
    instance     text NOT NULL,
    address      text NOT NULL,
    labels       jsonb NOT NULL,
    version      text NOT NULL,
    started_at   bigint NOT NULL,
    draining     boolean NOT NULL,
    report       jsonb NOT NULL,
    heartbeat_at timestamptz NOT NULL
);
