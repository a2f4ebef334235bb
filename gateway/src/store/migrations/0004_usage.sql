-- What each tenant used, per hour: every node adds its own use (chargeback).
-- Kept after a tenant is deleted: it was used.

CREATE TABLE usage (
    tenant           text NOT NULL,
    hour             bigint NOT NULL CHECK (hour >= 0),
    requests         bigint NOT NULL DEFAULT 0,
    compute_us       bigint NOT NULL DEFAULT 0,
    model_us         bigint NOT NULL DEFAULT 0,
    prompt_tokens    bigint NOT NULL DEFAULT 0,
    generated_tokens bigint NOT NULL DEFAULT 0,
    bytes_in         bigint NOT NULL DEFAULT 0,
    bytes_out        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour)
);
