-- Models added through the API, and their files stored in parts.

ALTER TABLE tenants
    ADD COLUMN model_bytes bigint NOT NULL DEFAULT 0 CHECK (model_bytes >= 0);

-- A model file, stored part by part as it is uploaded, verified once its
-- parts were read back and matched its sha256. It lives while a model
-- names it; unfinished or unused ones are pruned after a day.
CREATE TABLE model_blobs (
    sha256     text PRIMARY KEY,
    size       bigint NOT NULL CHECK (size >= 0),
    part_size  bigint NOT NULL CHECK (part_size > 0),
    verified   boolean NOT NULL DEFAULT false,
    updated_at bigint NOT NULL
);

CREATE TABLE model_parts (
    sha256  text NOT NULL REFERENCES model_blobs (sha256) ON DELETE CASCADE,
    part    integer NOT NULL CHECK (part >= 0),
    content bytea NOT NULL,
    PRIMARY KEY (sha256, part)
);

-- owner '' is the operator; any other owner is the tenant of a private model.
CREATE TABLE models (
    owner      text NOT NULL,
    name       text NOT NULL,
    version    integer NOT NULL CHECK (version > 0),
    config     text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    PRIMARY KEY (owner, name)
);

CREATE TABLE model_files (
    owner  text NOT NULL,
    name   text NOT NULL,
    path   text NOT NULL,
    sha256 text NOT NULL REFERENCES model_blobs (sha256),
    size   bigint NOT NULL,
    PRIMARY KEY (owner, name, path),
    FOREIGN KEY (owner, name) REFERENCES models (owner, name) ON DELETE CASCADE
);
CREATE INDEX model_files_by_blob ON model_files (sha256);
