-- Gigafactory's control-plane schema, version 1.

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value bytea NOT NULL
);

CREATE SEQUENCE tenant_incarnations;

CREATE TABLE tenants (
    name         text PRIMARY KEY,
    created_at   bigint NOT NULL,
    quota        jsonb NOT NULL,
    functions    integer NOT NULL DEFAULT 0 CHECK (functions >= 0),
    stored_bytes bigint NOT NULL DEFAULT 0 CHECK (stored_bytes >= 0),
    revision     bigint NOT NULL DEFAULT 0,
    incarnation  bigint NOT NULL
);

CREATE TABLE api_keys (
    hash       bytea PRIMARY KEY,
    id         text NOT NULL,
    tenant     text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
    created_at bigint NOT NULL
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant, id);

CREATE TABLE functions (
    tenant     text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
    name       text NOT NULL,
    active     integer NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE versions (
    tenant      text NOT NULL,
    function    text NOT NULL,
    number      integer NOT NULL CHECK (number > 0),
    sha256      text NOT NULL,
    size        bigint NOT NULL,
    deployed_at bigint NOT NULL,
    manifest    jsonb NOT NULL,
    PRIMARY KEY (tenant, function, number),
    FOREIGN KEY (tenant, function) REFERENCES functions (tenant, name) ON DELETE CASCADE
);
CREATE INDEX versions_by_blob ON versions (sha256);

CREATE TABLE version_files (
    tenant   text NOT NULL,
    function text NOT NULL,
    number   integer NOT NULL,
    path     text NOT NULL,
    sha256   text NOT NULL,
    size     bigint NOT NULL,
    PRIMARY KEY (tenant, function, number, path),
    FOREIGN KEY (tenant, function, number) REFERENCES versions (tenant, function, number)
        ON DELETE CASCADE
);
CREATE INDEX version_files_by_blob ON version_files (sha256);

-- Content-addressed: a blob lives while a version or a version's file names it.
CREATE TABLE blobs (
    sha256  text PRIMARY KEY,
    content bytea NOT NULL
);

-- Precompiled code of a blob, per engine build.
CREATE TABLE artifacts (
    sha256      text NOT NULL REFERENCES blobs (sha256) ON DELETE CASCADE,
    fingerprint text NOT NULL,
    content     bytea NOT NULL,
    PRIMARY KEY (sha256, fingerprint)
);
