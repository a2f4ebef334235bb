-- Models added through the API, and their files stored in parts.

ALTER TABLE tenants
    ADD COLUMN model_bytes bigint NOT NULL DEFAULT 0 CHECK (model_bytes >= 0);

-- A model file of an owner ('' for the operator, else a tenant), stored
-- part by part as it is uploaded, verified once its parts were read back
-- and matched its sha256. Each owner's files are its own: parts one tenant
-- sends never become part of another's file. A file lives while a model
-- of its owner names it; unfinished or unused ones are pruned after a day.
CREATE TABLE model_blobs (
    owner      text NOT NULL,
    sha256     text NOT NULL,
    size       bigint NOT NULL CHECK (size >= 0),
    part_size  bigint NOT NULL CHECK (part_size > 0),
    verified   boolean NOT NULL DEFAULT false,
    updated_at bigint NOT NULL,
    PRIMARY KEY (owner, sha256)
);

CREATE TABLE model_parts (
    owner   text NOT NULL,
    sha256  text NOT NULL,
    part    integer NOT NULL CHECK (part >= 0),
    content bytea NOT NULL,
    PRIMARY KEY (owner, sha256, part),
    FOREIGN KEY (owner, sha256) REFERENCES model_blobs (owner, sha256) ON DELETE CASCADE
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
    sha256 text NOT NULL,
    size   bigint NOT NULL,
    PRIMARY KEY (owner, name, path),
    FOREIGN KEY (owner, name) REFERENCES models (owner, name) ON DELETE CASCADE,
    FOREIGN KEY (owner, sha256) REFERENCES model_blobs (owner, sha256)
);
CREATE INDEX model_files_by_blob ON model_files (owner, sha256);
