//! The cluster store: PostgreSQL, shared by every node.
//!
//! The schema is [migrations](MIGRATIONS) numbered from 1, applied at start
//! under an advisory lock (nodes starting together apply each once) and
//! refused when the database is newer than this build. Every change is one
//! SERIALIZABLE transaction, retried on a serialization failure; changes
//! to a tenant's keys, functions or quota first lock the tenant's row, so
//! racing deploys of a function are numbered without gaps or duplicates.
//! Each change also `NOTIFY`s [`CHANNEL`] in its transaction (delivered on
//! commit); every node `LISTEN`s and turns notifications into
//! [`Change`]s, and a lost listening connection into [`Change::Everything`].

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_postgres::{AsyncMessage, GenericClient, IsolationLevel, NoTls, Row};

use super::{
    ApiKey, Change, Deployed, FileRef, FunctionRecord, MODEL_PART_BYTES, ModelBlob, ModelRecord,
    NewModel, NewVersion, Node, NodeStatus, Planned, Store, StoreError, Tenant, Version, now,
    owned_key, unusable_blob,
};
use crate::auth::TokenHash;
use crate::quota::{Quota, Usage};
use crate::usage::{Consumed, UsageRow};

/// The schema, one migration per entry, applied in order.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_initial.sql")),
    (2, include_str!("migrations/0002_nodes.sql")),
    (3, include_str!("migrations/0003_models.sql")),
    (4, include_str!("migrations/0004_usage.sql")),
];

/// The channel changes are announced on.
const CHANNEL: &str = "gigafactory_changes";

/// Advisory lock held while migrating (any constant unique to us).
const MIGRATION_LOCK: i64 = 0x6769_6761_6661_6374;

/// Connections each node keeps to the database at most.
const POOL_SIZE: usize = 16;

/// How long a request waits for a connection (or to make one) before the
/// store counts as unavailable.
const CONNECT_WAIT: Duration = Duration::from_secs(3);

/// How often a transaction is retried after a serialization failure.
const MAX_ATTEMPTS: u32 = 64;

/// A connection pool on one PostgreSQL database.
pub struct PostgresStore {
    pool: Pool,
    fingerprint: String,
    changes: broadcast::Sender<Change>,
}

impl PostgresStore {
    /// Connects, migrates the schema and starts listening for changes.
    pub async fn connect(url: &str, fingerprint: &str) -> Result<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .with_context(|| format!("parsing the store URL {:?}", redact(url)))?;
        config.connect_timeout(CONNECT_WAIT);
        config.application_name("gigafactory");
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_WAIT))
            .create_timeout(Some(CONNECT_WAIT))
            .recycle_timeout(Some(CONNECT_WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .context("building the PostgreSQL connection pool")?;
        let store = Self {
            pool,
            fingerprint: fingerprint.to_string(),
            changes: broadcast::channel(super::CHANGES_BUFFERED).0,
        };
        store
            .migrate()
            .await
            .with_context(|| format!("preparing the database at {}", redact(url)))?;
        tokio::spawn(listen(config, store.changes.clone()));
        Ok(store)
    }

    /// Applies the migrations this database lacks, in one transaction.
    async fn migrate(&self) -> Result<()> {
        let mut client = self.pool.get().await.context("connecting")?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY, applied_at bigint NOT NULL)",
        )
        .await?;
        let applied: HashSet<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let newest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if let Some(ahead) = applied.iter().find(|v| **v > newest) {
            bail!(
                "the database schema has migration {ahead}, newer than this build knows \
                 (1 to {newest}): upgrade this node"
            );
        }
        for (version, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tracing::info!(version, "applying a store schema migration");
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("applying migration {version}"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &(now() as i64)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(anyhow::Error::new(e)))
    }

    fn announce(&self, changes: impl IntoIterator<Item = Change>) {
        for change in changes {
            let _ = self.changes.send(change);
        }
    }
}

/// Runs `$body` in a SERIALIZABLE transaction bound to `$tx`, retrying it
/// (from a fresh transaction) on serialization failures and deadlocks; the
/// transaction commits when the body returns `Ok`.
macro_rules! transaction {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = $store.client().await?;
            let $tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::Serializable)
                .start()
                .await
                .map_err(db)?;
            let outcome: Result<_, StoreError> = async { $body }.await;
            let outcome = match outcome {
                Ok(value) => $tx.commit().await.map(|()| value).map_err(db),
                Err(error) => {
                    let _ = $tx.rollback().await;
                    Err(error)
                }
            };
            match outcome {
                Err(error) if retryable(&error) && attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                outcome => break outcome,
            }
        }
    }};
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn admin_token(&self) -> Result<Option<TokenHash>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT value FROM meta WHERE key = 'admin_token_sha256'",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(row.and_then(|row| TokenHash::from_slice(row.get(0))))
    }

    async fn set_admin_token(&self, hash: &TokenHash) -> Result<(), StoreError> {
        transaction!(self, |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('admin_token_sha256', $1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&hash.as_bytes()],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let tenant = transaction!(self, |tx| {
            let row = tx
                .query_opt(
                    &format!(
                        "INSERT INTO tenants (name, created_at, quota, incarnation)
                         VALUES ($1, $2, $3, nextval('tenant_incarnations'))
                         ON CONFLICT (name) DO NOTHING RETURNING {TENANT_COLUMNS}"
                    ),
                    &[&name, &(now() as i64), &Json(Quota::default())],
                )
                .await
                .map_err(db)?;
            let Some(row) = row else {
                return Err(StoreError::Conflict(format!(
                    "tenant {name:?} already exists"
                )));
            };
            notify(&tx, &Change::Tenant(name.to_string())).await?;
            tenant_from(&row)
        })?;
        self.announce([Change::Tenant(name.to_string())]);
        Ok(tenant)
    }

    async fn tenant(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(db)?;
        row.as_ref().map(tenant_from).transpose()
    }

    async fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name"),
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter().map(tenant_from).collect()
    }

    async fn set_quota(&self, name: &str, quota: &Quota) -> Result<Tenant, StoreError> {
        let tenant = transaction!(self, |tx| {
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE tenants SET quota = $2, revision = revision + 1
                         WHERE name = $1 RETURNING {TENANT_COLUMNS}"
                    ),
                    &[&name, &Json(quota)],
                )
                .await
                .map_err(db)?
                .ok_or_else(|| no_tenant(name))?;
            notify(&tx, &Change::Tenant(name.to_string())).await?;
            tenant_from(&row)
        })?;
        self.announce([Change::Tenant(name.to_string())]);
        Ok(tenant)
    }

    async fn delete_tenant(&self, name: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        let functions = transaction!(self, |tx| {
            lock_tenant(&tx, name).await?;
            let functions = load_functions(&*tx, name, None).await?;
            let models = load_models(&*tx, Some(name), None).await?;
            tx.execute("DELETE FROM tenants WHERE name = $1", &[&name])
                .await
                .map_err(db)?;
            tx.execute("DELETE FROM models WHERE owner = $1", &[&name])
                .await
                .map_err(db)?;
            // Its uploads too, finished or not: a later tenant of the name
            // starts with none.
            tx.execute("DELETE FROM model_blobs WHERE owner = $1", &[&name])
                .await
                .map_err(db)?;
            for model in &models {
                notify(&tx, &Change::Model(model.key())).await?;
            }
            let blobs: Vec<String> = functions
                .iter()
                .flat_map(|f| &f.versions)
                .flat_map(Version::blobs)
                .map(str::to_string)
                .collect();
            release_blobs(&tx, &blobs).await?;
            notify(&tx, &Change::Tenant(name.to_string())).await?;
            Ok(functions)
        })?;
        self.announce([Change::Tenant(name.to_string())]);
        Ok(functions)
    }

    async fn add_key(
        &self,
        tenant: &str,
        hash: &TokenHash,
        id: &str,
    ) -> Result<ApiKey, StoreError> {
        let created_at = now();
        transaction!(self, |tx| {
            bump_revision(&tx, tenant).await?;
            tx.execute(
                "INSERT INTO api_keys (hash, id, tenant, created_at) VALUES ($1, $2, $3, $4)",
                &[&hash.as_bytes(), &id, &tenant, &(created_at as i64)],
            )
            .await
            .map_err(db)?;
            notify(&tx, &Change::Key(hash.clone())).await
        })?;
        self.announce([Change::Key(hash.clone())]);
        Ok(ApiKey {
            id: id.to_string(),
            tenant: tenant.to_string(),
            created_at,
        })
    }

    async fn keys_of(&self, tenant: &str) -> Result<Vec<ApiKey>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, tenant, created_at FROM api_keys WHERE tenant = $1 ORDER BY id",
                &[&tenant],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(key_from).collect())
    }

    async fn revoke_key(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        let hash = transaction!(self, |tx| {
            bump_revision(&tx, tenant).await?;
            let row = tx
                .query_opt(
                    "DELETE FROM api_keys WHERE hash =
                       (SELECT hash FROM api_keys WHERE tenant = $1 AND id = $2 LIMIT 1)
                     RETURNING hash",
                    &[&tenant, &id],
                )
                .await
                .map_err(db)?
                .ok_or_else(|| {
                    StoreError::NotFound(format!("tenant {tenant:?} has no key {id:?}"))
                })?;
            let hash = TokenHash::from_slice(row.get(0))
                .ok_or_else(|| anyhow::anyhow!("a stored key hash is not 32 bytes"))?;
            notify(&tx, &Change::Key(hash.clone())).await?;
            Ok(hash)
        })?;
        self.announce([Change::Key(hash)]);
        Ok(())
    }

    async fn key(&self, hash: &TokenHash) -> Result<Option<ApiKey>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, tenant, created_at FROM api_keys WHERE hash = $1",
                &[&hash.as_bytes()],
            )
            .await
            .map_err(db)?;
        Ok(row.as_ref().map(key_from))
    }

    async fn deploy(
        &self,
        tenant: &str,
        name: &str,
        new: &NewVersion<'_>,
    ) -> Result<Deployed, StoreError> {
        let deployed = transaction!(self, |tx| {
            let owner = lock_tenant(&tx, tenant).await?;
            let existing = load_functions(&*tx, tenant, Some(name)).await?.pop();
            let (function, usage) = match new.plan(&owner, name, existing)? {
                Planned::New { function, usage } => (function, usage),
                Planned::Unchanged(function) => {
                    let created = false;
                    return Ok(Deployed { function, created });
                }
            };
            let number = function.active;
            tx.execute(
                "UPDATE tenants SET functions = $2, stored_bytes = $3, revision = revision + 1
                 WHERE name = $1",
                &[
                    &tenant,
                    &(usage.functions as i32),
                    &(usage.stored_bytes as i64),
                ],
            )
            .await
            .map_err(db)?;
            for (sha256, content) in new.blobs() {
                tx.execute(
                    "INSERT INTO blobs (sha256, content) VALUES ($1, $2)
                     ON CONFLICT (sha256) DO NOTHING",
                    &[&sha256, &content],
                )
                .await
                .map_err(db)?;
            }
            tx.execute(
                "INSERT INTO artifacts (sha256, fingerprint, content) VALUES ($1, $2, $3)
                 ON CONFLICT (sha256, fingerprint) DO UPDATE SET content = EXCLUDED.content",
                &[&new.sha256, &self.fingerprint, &new.artifact],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO functions (tenant, name, active, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant, name) DO UPDATE SET active = EXCLUDED.active",
                &[
                    &tenant,
                    &name,
                    &(number as i32),
                    &(function.created_at as i64),
                ],
            )
            .await
            .map_err(db)?;
            insert_version(&tx, tenant, name, function.active_version()).await?;
            let changes = function_changed(tenant, name);
            for change in &changes {
                notify(&tx, change).await?;
            }
            Ok(Deployed {
                function,
                created: true,
            })
        })?;
        if deployed.created {
            self.announce(function_changed(tenant, name));
        }
        Ok(deployed)
    }

    async fn function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError> {
        let client = self.client().await?;
        Ok(load_functions(&**client, tenant, Some(name)).await?.pop())
    }

    async fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        let client = self.client().await?;
        load_functions(&**client, tenant, None).await
    }

    async fn delete_function(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        transaction!(self, |tx| {
            lock_tenant(&tx, tenant).await?;
            let function = load_functions(&*tx, tenant, Some(name))
                .await?
                .pop()
                .ok_or_else(|| StoreError::NotFound(format!("no function {name:?}")))?;
            tx.execute(
                "DELETE FROM functions WHERE tenant = $1 AND name = $2",
                &[&tenant, &name],
            )
            .await
            .map_err(db)?;
            let freed: u64 = function.versions.iter().map(Version::stored_bytes).sum();
            tx.execute(
                "UPDATE tenants SET functions = GREATEST(functions - 1, 0),
                     stored_bytes = GREATEST(stored_bytes - $2, 0), revision = revision + 1
                 WHERE name = $1",
                &[&tenant, &(freed as i64)],
            )
            .await
            .map_err(db)?;
            let blobs: Vec<String> = function
                .versions
                .iter()
                .flat_map(Version::blobs)
                .map(str::to_string)
                .collect();
            release_blobs(&tx, &blobs).await?;
            for change in &function_changed(tenant, name) {
                notify(&tx, change).await?;
            }
            Ok(())
        })?;
        self.announce(function_changed(tenant, name));
        Ok(())
    }

    async fn activate(
        &self,
        tenant: &str,
        name: &str,
        number: u32,
    ) -> Result<FunctionRecord, StoreError> {
        let function = transaction!(self, |tx| {
            lock_tenant(&tx, tenant).await?;
            let mut function = load_functions(&*tx, tenant, Some(name))
                .await?
                .pop()
                .ok_or_else(|| StoreError::NotFound(format!("no function {name:?}")))?;
            function.activate(number)?;
            tx.execute(
                "UPDATE functions SET active = $3 WHERE tenant = $1 AND name = $2",
                &[&tenant, &name, &(number as i32)],
            )
            .await
            .map_err(db)?;
            for change in &function_changed(tenant, name) {
                notify(&tx, change).await?;
            }
            Ok(function)
        })?;
        self.announce(function_changed(tenant, name));
        Ok(function)
    }

    async fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT content FROM blobs WHERE sha256 = $1", &[&sha256])
            .await
            .map_err(db)?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn artifact(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT content FROM artifacts WHERE sha256 = $1 AND fingerprint = $2",
                &[&sha256, &self.fingerprint],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn put_artifact(&self, sha256: &str, artifact: &[u8]) -> Result<(), StoreError> {
        transaction!(self, |tx| {
            tx.execute(
                "INSERT INTO artifacts (sha256, fingerprint, content)
                 SELECT sha256, $2, $3 FROM blobs WHERE sha256 = $1
                 ON CONFLICT (sha256, fingerprint) DO UPDATE SET content = EXCLUDED.content",
                &[&sha256, &self.fingerprint, &artifact],
            )
            .await
            .map_err(db)?;
            Ok(())
        })
    }

    async fn prune_artifacts(&self) -> Result<usize, StoreError> {
        // Other nodes may run other builds and need their artifacts; a
        // blob's artifacts go with the blob.
        Ok(0)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every acknowledged change was committed.
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.query_one("SELECT 1", &[]).await.map_err(db)?;
        Ok(())
    }

    async fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        transaction!(self, |tx| {
            let add = tx
                .prepare(
                    "INSERT INTO usage (tenant, hour, requests, compute_us, model_us,
                                        prompt_tokens, generated_tokens, bytes_in, bytes_out)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (tenant, hour) DO UPDATE SET
                         requests = usage.requests + EXCLUDED.requests,
                         compute_us = usage.compute_us + EXCLUDED.compute_us,
                         model_us = usage.model_us + EXCLUDED.model_us,
                         prompt_tokens = usage.prompt_tokens + EXCLUDED.prompt_tokens,
                         generated_tokens = usage.generated_tokens + EXCLUDED.generated_tokens,
                         bytes_in = usage.bytes_in + EXCLUDED.bytes_in,
                         bytes_out = usage.bytes_out + EXCLUDED.bytes_out",
                )
                .await
                .map_err(db)?;
            for row in rows {
                let c = &row.consumed;
                let figures = [
                    row.hour,
                    c.requests,
                    c.compute_us,
                    c.model_us,
                    c.prompt_tokens,
                    c.generated_tokens,
                    c.bytes_in,
                    c.bytes_out,
                ]
                .map(as_bigint);
                tx.execute(
                    &add,
                    &[
                        &row.tenant,
                        &figures[0],
                        &figures[1],
                        &figures[2],
                        &figures[3],
                        &figures[4],
                        &figures[5],
                        &figures[6],
                        &figures[7],
                    ],
                )
                .await
                .map_err(db)?;
            }
            Ok(())
        })
    }

    async fn usage(
        &self,
        tenant: Option<&str>,
        since: u64,
        until: u64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT tenant, hour, requests, compute_us, model_us, prompt_tokens,
                        generated_tokens, bytes_in, bytes_out
                 FROM usage
                 WHERE ($1::text IS NULL OR tenant = $1) AND hour >= $2 AND hour < $3
                 ORDER BY tenant, hour",
                &[&tenant, &as_bigint(since), &as_bigint(until)],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|row| {
                let figure = |i: usize| row.get::<_, i64>(i).max(0) as u64;
                UsageRow {
                    tenant: row.get(0),
                    hour: figure(1),
                    consumed: Consumed {
                        requests: figure(2),
                        compute_us: figure(3),
                        model_us: figure(4),
                        prompt_tokens: figure(5),
                        generated_tokens: figure(6),
                        bytes_in: figure(7),
                        bytes_out: figure(8),
                    },
                }
            })
            .collect())
    }

    async fn backup(
        &self,
        _: Box<dyn std::io::Write + Send>,
    ) -> Result<super::backup::Summary, StoreError> {
        Err(StoreError::Unsupported(
            "this node's store is PostgreSQL, which holds every record and blob in its \
             tables: back it up with PostgreSQL's own tools (pg_dump, or continuous \
             archiving); `gigafactory backup` is for the embedded store"
                .to_string(),
        ))
    }

    async fn begin_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        size: u64,
    ) -> Result<ModelBlob, StoreError> {
        let owner = owner_column(owner);
        transaction!(self, |tx| {
            tx.execute(
                "INSERT INTO model_blobs (owner, sha256, size, part_size, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (owner, sha256) DO UPDATE SET updated_at = EXCLUDED.updated_at",
                &[
                    &owner,
                    &sha256,
                    &(size as i64),
                    &(MODEL_PART_BYTES as i64),
                    &(now() as i64),
                ],
            )
            .await
            .map_err(db)?;
            let blob = load_model_blob(&*tx, owner, sha256)
                .await?
                .expect("just inserted");
            blob.resumes(size)?;
            Ok(blob)
        })
    }

    async fn model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
    ) -> Result<Option<ModelBlob>, StoreError> {
        let client = self.client().await?;
        load_model_blob(&**client, owner_column(owner), sha256).await
    }

    async fn put_model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
        content: &[u8],
    ) -> Result<ModelBlob, StoreError> {
        let owner = owner_column(owner);
        transaction!(self, |tx| {
            let blob = tx
                .query_opt(
                    "SELECT size, part_size FROM model_blobs
                     WHERE owner = $1 AND sha256 = $2 FOR UPDATE",
                    &[&owner, &sha256],
                )
                .await
                .map_err(db)?
                .ok_or_else(|| {
                    StoreError::NotFound(format!("no upload of the model file {sha256} was begun"))
                })?;
            let shape = ModelBlob {
                sha256: sha256.to_string(),
                size: blob.get::<_, i64>(0) as u64,
                part_size: blob.get::<_, i64>(1) as u64,
                received: Vec::new(),
                verified: false,
            };
            shape.check_part(index, content.len())?;
            tx.execute(
                "INSERT INTO model_parts (owner, sha256, part, content) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (owner, sha256, part) DO NOTHING",
                &[&owner, &sha256, &(index as i32), &content],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "UPDATE model_blobs SET updated_at = $3 WHERE owner = $1 AND sha256 = $2",
                &[&owner, &sha256, &(now() as i64)],
            )
            .await
            .map_err(db)?;
            Ok(load_model_blob(&*tx, owner, sha256).await?.expect("locked"))
        })
    }

    async fn model_part(
        &self,
        owner: Option<&str>,
        sha256: &str,
        index: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT content FROM model_parts WHERE owner = $1 AND sha256 = $2 AND part = $3",
                &[&owner_column(owner), &sha256, &(index as i32)],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn verify_model_blob(
        &self,
        owner: Option<&str>,
        sha256: &str,
        matched: bool,
    ) -> Result<(), StoreError> {
        let owner = owner_column(owner);
        transaction!(self, |tx| {
            let updated = tx
                .execute(
                    "UPDATE model_blobs SET verified = verified OR $3, updated_at = $4
                     WHERE owner = $1 AND sha256 = $2",
                    &[&owner, &sha256, &matched, &(now() as i64)],
                )
                .await
                .map_err(db)?;
            if updated == 0 {
                return Err(StoreError::NotFound(format!("no model file {sha256}")));
            }
            if !matched {
                tx.execute(
                    "DELETE FROM model_parts p USING model_blobs b
                     WHERE p.owner = $1 AND p.sha256 = $2
                       AND b.owner = p.owner AND b.sha256 = p.sha256 AND NOT b.verified",
                    &[&owner, &sha256],
                )
                .await
                .map_err(db)?;
            }
            Ok(())
        })
    }

    async fn put_model(&self, new: &NewModel, replace: bool) -> Result<ModelRecord, StoreError> {
        let key = owned_key(new.owner.as_deref(), &new.name);
        let record = transaction!(self, |tx| {
            let owner = match &new.owner {
                Some(owner) => Some(lock_tenant(&tx, owner).await?),
                None => None,
            };
            let existing = load_models(
                &*tx,
                Some(owner_column(new.owner.as_deref())),
                Some(&new.name),
            )
            .await?
            .pop();
            let record = new.plan(existing.as_ref(), replace)?;
            for (path, file) in &new.files {
                let blob =
                    load_model_blob(&*tx, owner_column(new.owner.as_deref()), &file.sha256).await?;
                if let Some(refused) = unusable_blob(path, blob.as_ref()) {
                    return Err(refused);
                }
            }
            if let Some(owner) = &owner {
                let usage = new.usage_of(owner, existing.as_ref())?;
                tx.execute(
                    "UPDATE tenants SET model_bytes = $2, revision = revision + 1 WHERE name = $1",
                    &[&owner.name, &(usage.model_bytes as i64)],
                )
                .await
                .map_err(db)?;
            }
            let owner_name = owner_column(new.owner.as_deref());
            tx.execute(
                "DELETE FROM models WHERE owner = $1 AND name = $2",
                &[&owner_name, &new.name],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO models (owner, name, version, config, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &owner_name,
                    &record.name,
                    &(record.version as i32),
                    &record.config,
                    &(record.created_at as i64),
                    &(record.updated_at as i64),
                ],
            )
            .await
            .map_err(db)?;
            for (path, file) in &record.files {
                tx.execute(
                    "INSERT INTO model_files (owner, name, path, sha256, size)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &owner_name,
                        &record.name,
                        path,
                        &file.sha256,
                        &(file.size as i64),
                    ],
                )
                .await
                .map_err(db)?;
            }
            release_model_blobs(&tx, existing.as_slice()).await?;
            notify(&tx, &Change::Model(key.clone())).await?;
            if let Some(owner) = &new.owner {
                notify(&tx, &Change::Tenant(owner.clone())).await?;
            }
            Ok(record)
        })?;
        self.announce([Change::Model(key)]);
        if let Some(owner) = &new.owner {
            self.announce([Change::Tenant(owner.clone())]);
        }
        Ok(record)
    }

    async fn model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let client = self.client().await?;
        Ok(
            load_models(&**client, Some(owner_column(owner)), Some(name))
                .await?
                .pop(),
        )
    }

    async fn models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let client = self.client().await?;
        load_models(&**client, None, None).await
    }

    async fn delete_model(
        &self,
        owner: Option<&str>,
        name: &str,
    ) -> Result<ModelRecord, StoreError> {
        let owner_name = owner_column(owner);
        let key = owned_key(owner, name);
        let model = transaction!(self, |tx| {
            if let Some(owner) = owner {
                lock_tenant(&tx, owner).await?;
            }
            let model = load_models(&*tx, Some(owner_name), Some(name))
                .await?
                .pop()
                .ok_or_else(|| StoreError::NotFound(format!("no model {name:?}")))?;
            tx.execute(
                "DELETE FROM models WHERE owner = $1 AND name = $2",
                &[&owner_name, &name],
            )
            .await
            .map_err(db)?;
            if let Some(owner) = owner {
                tx.execute(
                    "UPDATE tenants SET model_bytes = GREATEST(model_bytes - $2, 0),
                         revision = revision + 1
                     WHERE name = $1",
                    &[&owner, &(model.stored_bytes() as i64)],
                )
                .await
                .map_err(db)?;
                notify(&tx, &Change::Tenant(owner.to_string())).await?;
            }
            release_model_blobs(&tx, std::slice::from_ref(&model)).await?;
            notify(&tx, &Change::Model(key.clone())).await?;
            Ok(model)
        })?;
        self.announce([Change::Model(key)]);
        if let Some(owner) = owner {
            self.announce([Change::Tenant(owner.to_string())]);
        }
        Ok(model)
    }

    async fn pending_model_bytes(&self, owner: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COALESCE(SUM(size), 0)::bigint FROM model_blobs b WHERE b.owner = $1
                   AND NOT EXISTS (SELECT 1 FROM model_files f
                                   WHERE f.owner = b.owner AND f.sha256 = b.sha256)",
                &[&owner],
            )
            .await
            .map_err(db)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn prune_model_blobs(&self, before: u64) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let pruned = client
            .execute(
                "DELETE FROM model_blobs b WHERE b.updated_at < $1
                   AND NOT EXISTS (SELECT 1 FROM model_files f
                                   WHERE f.owner = b.owner AND f.sha256 = b.sha256)",
                &[&(before as i64)],
            )
            .await
            .map_err(db)?;
        Ok(pruned as usize)
    }

    async fn heartbeat(&self, node: &NodeStatus, taken_within: Duration) -> Result<(), StoreError> {
        let client = self.client().await?;
        let updated = client
            .execute(
                "INSERT INTO nodes AS n (name, instance, address, labels, version, started_at,
                                         draining, report, heartbeat_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())
                 ON CONFLICT (name) DO UPDATE SET
                     instance = EXCLUDED.instance, address = EXCLUDED.address,
                     labels = EXCLUDED.labels, version = EXCLUDED.version,
                     started_at = EXCLUDED.started_at, draining = EXCLUDED.draining,
                     report = EXCLUDED.report, heartbeat_at = now()
                 WHERE n.instance = EXCLUDED.instance
                    OR n.heartbeat_at < now() - make_interval(secs => $9)",
                &[
                    &node.name,
                    &node.instance,
                    &node.address,
                    &Json(&node.labels),
                    &node.version,
                    &(node.started_at as i64),
                    &node.draining,
                    &Json(&node.report),
                    &taken_within.as_secs_f64(),
                ],
            )
            .await
            .map_err(db)?;
        if updated == 0 {
            return Err(StoreError::Conflict(format!(
                "another process is node {:?} (it heartbeat within the last {} s): \
                 give this one another --node-name",
                node.name,
                taken_within.as_secs()
            )));
        }
        // Nodes gone for an hour are forgotten.
        client
            .execute(
                "DELETE FROM nodes WHERE heartbeat_at < now() - interval '1 hour'",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, instance, address, labels, version, started_at, draining, report,
                        extract(epoch FROM now() - heartbeat_at)::float8 AS silent_for
                 FROM nodes ORDER BY name",
                &[],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let Json(labels) = row.try_get("labels").context("decoding a node's labels")?;
                let Json(report) = row.try_get("report").context("decoding a node's report")?;
                let status = NodeStatus {
                    name: row.get("name"),
                    instance: row.get("instance"),
                    address: row.get("address"),
                    labels,
                    version: row.get("version"),
                    started_at: row.get::<_, i64>("started_at") as u64,
                    draining: row.get("draining"),
                    report,
                };
                let silent_for = row.get::<_, f64>("silent_for").max(0.0);
                Ok(Node {
                    status,
                    silent_for: Duration::from_secs_f64(silent_for),
                })
            })
            .collect()
    }

    async fn leave(&self, node: &NodeStatus) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM nodes WHERE name = $1 AND instance = $2",
                &[&node.name, &node.instance],
            )
            .await
            .map_err(db)?;
        Ok(())
    }
}

const TENANT_COLUMNS: &str =
    "name, created_at, quota, functions, stored_bytes, model_bytes, revision, incarnation";

fn tenant_from(row: &Row) -> Result<Tenant, StoreError> {
    let Json(quota): Json<Quota> = row.try_get("quota").context("decoding a tenant's quota")?;
    Ok(Tenant {
        name: row.get("name"),
        created_at: row.get::<_, i64>("created_at") as u64,
        quota,
        usage: Usage {
            functions: row.get::<_, i32>("functions") as u32,
            stored_bytes: row.get::<_, i64>("stored_bytes") as u64,
            model_bytes: row.get::<_, i64>("model_bytes") as u64,
        },
        revision: row.get::<_, i64>("revision") as u64,
        incarnation: row.get::<_, i64>("incarnation") as u64,
        deleting: false,
    })
}

fn key_from(row: &Row) -> ApiKey {
    ApiKey {
        id: row.get(0),
        tenant: row.get(1),
        created_at: row.get::<_, i64>(2) as u64,
    }
}

fn no_tenant(name: &str) -> StoreError {
    StoreError::NotFound(format!("no tenant {name:?}"))
}

/// The tenant's row, locked until the transaction ends: every change to a
/// tenant's keys, functions or usage takes this lock first.
async fn lock_tenant(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
) -> Result<Tenant, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1 FOR UPDATE"),
            &[&name],
        )
        .await
        .map_err(db)?
        .ok_or_else(|| no_tenant(name))?;
    tenant_from(&row)
}

async fn bump_revision(tx: &tokio_postgres::Transaction<'_>, name: &str) -> Result<(), StoreError> {
    let updated = tx
        .execute(
            "UPDATE tenants SET revision = revision + 1 WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(db)?;
    if updated == 0 {
        return Err(no_tenant(name));
    }
    Ok(())
}

/// A tenant's functions (or the one named), each with its versions.
async fn load_functions(
    client: &impl GenericClient,
    tenant: &str,
    only: Option<&str>,
) -> Result<Vec<FunctionRecord>, StoreError> {
    let functions = client
        .query(
            "SELECT name, active, created_at FROM functions
             WHERE tenant = $1 AND ($2::text IS NULL OR name = $2) ORDER BY name",
            &[&tenant, &only],
        )
        .await
        .map_err(db)?;
    if functions.is_empty() {
        return Ok(Vec::new());
    }
    let versions = client
        .query(
            "SELECT function, number, sha256, size, deployed_at, manifest FROM versions
             WHERE tenant = $1 AND ($2::text IS NULL OR function = $2) ORDER BY function, number",
            &[&tenant, &only],
        )
        .await
        .map_err(db)?;
    let files = client
        .query(
            "SELECT function, number, path, sha256, size FROM version_files
             WHERE tenant = $1 AND ($2::text IS NULL OR function = $2)",
            &[&tenant, &only],
        )
        .await
        .map_err(db)?;
    let mut by_version: BTreeMap<(String, i32), BTreeMap<String, FileRef>> = BTreeMap::new();
    for file in &files {
        let reference = FileRef {
            sha256: file.get(3),
            size: file.get::<_, i64>(4) as u64,
        };
        by_version
            .entry((file.get(0), file.get(1)))
            .or_default()
            .insert(file.get(2), reference);
    }
    let mut records: BTreeMap<String, FunctionRecord> = functions
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            let record = FunctionRecord {
                tenant: tenant.to_string(),
                name: name.clone(),
                active: row.get::<_, i32>(1) as u32,
                versions: Vec::new(),
                created_at: row.get::<_, i64>(2) as u64,
            };
            (name, record)
        })
        .collect();
    for row in &versions {
        let function: String = row.get(0);
        let number: i32 = row.get(1);
        let Json(manifest) = row
            .try_get("manifest")
            .context("decoding a version's manifest")?;
        let version = Version {
            number: number as u32,
            sha256: row.get(2),
            size: row.get::<_, i64>(3) as u64,
            deployed_at: row.get::<_, i64>(4) as u64,
            manifest,
            files: by_version
                .remove(&(function.clone(), number))
                .unwrap_or_default(),
        };
        if let Some(record) = records.get_mut(&function) {
            record.versions.push(version);
        }
    }
    Ok(records.into_values().collect())
}

async fn insert_version(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &str,
    function: &str,
    version: &Version,
) -> Result<(), StoreError> {
    let number = version.number as i32;
    tx.execute(
        "INSERT INTO versions (tenant, function, number, sha256, size, deployed_at, manifest)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &tenant,
            &function,
            &number,
            &version.sha256,
            &(version.size as i64),
            &(version.deployed_at as i64),
            &Json(&version.manifest),
        ],
    )
    .await
    .map_err(db)?;
    for (path, file) in &version.files {
        tx.execute(
            "INSERT INTO version_files (tenant, function, number, path, sha256, size)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &tenant,
                &function,
                &number,
                path,
                &file.sha256,
                &(file.size as i64),
            ],
        )
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// The `owner` column of a model: '' for the operator's.
fn owner_column(owner: Option<&str>) -> &str {
    owner.unwrap_or("")
}

/// Models with their files: of one owner (`''`: the operator) or all,
/// one by name or all.
async fn load_models(
    client: &impl GenericClient,
    owner: Option<&str>,
    only: Option<&str>,
) -> Result<Vec<ModelRecord>, StoreError> {
    let models = client
        .query(
            "SELECT owner, name, version, config, created_at, updated_at FROM models
             WHERE ($1::text IS NULL OR owner = $1) AND ($2::text IS NULL OR name = $2)
             ORDER BY owner, name",
            &[&owner, &only],
        )
        .await
        .map_err(db)?;
    let files = client
        .query(
            "SELECT owner, name, path, sha256, size FROM model_files
             WHERE ($1::text IS NULL OR owner = $1) AND ($2::text IS NULL OR name = $2)",
            &[&owner, &only],
        )
        .await
        .map_err(db)?;
    let mut by_model: BTreeMap<(String, String), BTreeMap<String, FileRef>> = BTreeMap::new();
    for file in &files {
        let reference = FileRef {
            sha256: file.get(3),
            size: file.get::<_, i64>(4) as u64,
        };
        by_model
            .entry((file.get(0), file.get(1)))
            .or_default()
            .insert(file.get(2), reference);
    }
    Ok(models
        .iter()
        .map(|row| {
            let (owner, name): (String, String) = (row.get(0), row.get(1));
            ModelRecord {
                files: by_model
                    .remove(&(owner.clone(), name.clone()))
                    .unwrap_or_default(),
                owner: (!owner.is_empty()).then_some(owner),
                name,
                version: row.get::<_, i32>(2) as u32,
                config: row.get(3),
                created_at: row.get::<_, i64>(4) as u64,
                updated_at: row.get::<_, i64>(5) as u64,
            }
        })
        .collect())
}

/// A model file of `owner` (`''`: the operator) and the parts stored of it.
async fn load_model_blob(
    client: &impl GenericClient,
    owner: &str,
    sha256: &str,
) -> Result<Option<ModelBlob>, StoreError> {
    let Some(row) = client
        .query_opt(
            "SELECT size, part_size, verified FROM model_blobs WHERE owner = $1 AND sha256 = $2",
            &[&owner, &sha256],
        )
        .await
        .map_err(db)?
    else {
        return Ok(None);
    };
    let received = client
        .query(
            "SELECT part FROM model_parts WHERE owner = $1 AND sha256 = $2 ORDER BY part",
            &[&owner, &sha256],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|part| part.get::<_, i32>(0) as u32)
        .collect();
    Ok(Some(ModelBlob {
        sha256: sha256.to_string(),
        size: row.get::<_, i64>(0) as u64,
        part_size: row.get::<_, i64>(1) as u64,
        received,
        verified: row.get(2),
    }))
}

/// Deletes the files of `models` no model names any more (their parts go
/// with them).
async fn release_model_blobs(
    tx: &tokio_postgres::Transaction<'_>,
    models: &[ModelRecord],
) -> Result<(), StoreError> {
    for model in models {
        let blobs: Vec<&str> = model.files.values().map(|f| f.sha256.as_str()).collect();
        tx.execute(
            "DELETE FROM model_blobs b WHERE b.owner = $1 AND b.sha256 = ANY($2)
               AND NOT EXISTS (SELECT 1 FROM model_files f
                               WHERE f.owner = b.owner AND f.sha256 = b.sha256)",
            &[&owner_column(model.owner.as_deref()), &blobs],
        )
        .await
        .map_err(db)?;
    }
    Ok(())
}

/// Deletes those of `blobs` no version or version file names any more
/// (their artifacts go with them).
async fn release_blobs(
    tx: &tokio_postgres::Transaction<'_>,
    blobs: &[String],
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM blobs b WHERE b.sha256 = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.sha256 = b.sha256)
           AND NOT EXISTS (SELECT 1 FROM version_files f WHERE f.sha256 = b.sha256)",
        &[&blobs],
    )
    .await
    .map_err(db)?;
    Ok(())
}

fn function_changed(tenant: &str, name: &str) -> [Change; 2] {
    [
        Change::Tenant(tenant.to_string()),
        Change::Function {
            tenant: tenant.to_string(),
            name: name.to_string(),
        },
    ]
}

/// Queues the change's notification; PostgreSQL delivers it on commit.
async fn notify(tx: &tokio_postgres::Transaction<'_>, change: &Change) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &encode(change)])
        .await
        .map_err(db)?;
    Ok(())
}

/// A change as a notification payload: `t:<tenant>`, `k:<hash hex>`,
/// `f:<tenant>/<function>`, `*`.
fn encode(change: &Change) -> String {
    match change {
        Change::Tenant(name) => format!("t:{name}"),
        Change::Key(hash) => format!("k:{}", hex::encode(hash.as_bytes())),
        Change::Function { tenant, name } => format!("f:{tenant}/{name}"),
        Change::Model(key) => format!("m:{key}"),
        Change::Everything => "*".to_string(),
    }
}

fn decode(payload: &str) -> Change {
    let parsed = match payload.split_once(':') {
        Some(("t", name)) => Some(Change::Tenant(name.to_string())),
        Some(("k", hash)) => hex::decode(hash)
            .ok()
            .and_then(|bytes| TokenHash::from_slice(&bytes))
            .map(Change::Key),
        Some(("f", function)) => function
            .split_once('/')
            .map(|(tenant, name)| Change::Function {
                tenant: tenant.to_string(),
                name: name.to_string(),
            }),
        Some(("m", key)) => Some(Change::Model(key.to_string())),
        _ => None,
    };
    // A payload this build does not know (a newer node's) may mean anything.
    parsed.unwrap_or(Change::Everything)
}

/// Listens for other nodes' changes for as long as the process runs,
/// reconnecting after a lost connection; after every (re)connection the
/// receivers are told that anything may have changed meanwhile.
async fn listen(config: tokio_postgres::Config, changes: broadcast::Sender<Change>) {
    let mut failures = 0;
    loop {
        match listen_once(&config, &changes).await {
            Ok(()) => failures = 0,
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!("listening for store changes: {error:#}; reconnecting");
                }
            }
        }
        let _ = changes.send(Change::Everything);
        tokio::time::sleep(backoff(failures.min(6))).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    changes: &broadcast::Sender<Change>,
) -> Result<()> {
    let (client, mut connection) = config.connect(NoTls).await.context("connecting")?;
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    let forward = changes.clone();
    tokio::spawn(async move {
        let ending = loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    let _ = forward.send(decode(note.payload()));
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => break Err(error),
                None => break Ok(()),
            }
        };
        let _ = ended_tx.send(ending);
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .context("LISTEN")?;
    tracing::debug!("listening for store changes");
    // Anything changed before LISTEN took effect was missed.
    let _ = changes.send(Change::Everything);
    match ended.await {
        Ok(Err(error)) => Err(anyhow::Error::new(error).context("the listening connection")),
        _ => bail!("the listening connection closed"),
    }
}

/// A database error as a store error: unreachable or closed is
/// `Unavailable` (the caller may retry later), the rest `Storage`.
/// A figure as a PostgreSQL bigint (saturating: no figure gets near it).
fn as_bigint(figure: u64) -> i64 {
    i64::try_from(figure).unwrap_or(i64::MAX)
}

fn db(error: tokio_postgres::Error) -> StoreError {
    let unreachable = error.is_closed()
        || error.code().is_none_or(|code| {
            [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::CONNECTION_FAILURE,
                SqlState::CONNECTION_EXCEPTION,
                SqlState::READ_ONLY_SQL_TRANSACTION,
            ]
            .contains(code)
        });
    if unreachable {
        StoreError::Unavailable(anyhow::Error::new(error))
    } else {
        StoreError::Storage(anyhow::Error::new(error))
    }
}

/// Serialization failures and deadlocks, and the unique and foreign-key
/// violations of a racing change (two adds of one model, an upload
/// pruned under an add): the transaction may succeed if run again, or
/// see what happened and refuse with a clear error.
fn retryable(error: &StoreError) -> bool {
    let StoreError::Storage(error) = error else {
        return false;
    };
    error
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|code| {
            [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::UNIQUE_VIOLATION,
                SqlState::FOREIGN_KEY_VIOLATION,
            ]
            .contains(code)
        })
}

/// Jittered exponential backoff: 2, 4, 8 … ms (capped at about 1 s), ±50%.
fn backoff(attempt: u32) -> Duration {
    let base = 1u64 << attempt.clamp(1, 10);
    let mut noise = [0u8; 2];
    let _ = getrandom::fill(&mut noise);
    let jitter = u64::from(u16::from_le_bytes(noise)) % base.max(1);
    Duration::from_millis(base / 2 + jitter)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip_and_unknown_ones_mean_everything() {
        let changes = [
            Change::Tenant("acme".into()),
            Change::Key(TokenHash::of("gf_x")),
            Change::Function {
                tenant: "acme".into(),
                name: "embed".into(),
            },
            Change::Model("acme/tiny".into()),
            Change::Model("minilm".into()),
            Change::Everything,
        ];
        for change in changes {
            assert_eq!(decode(&encode(&change)), change);
        }
        assert_eq!(decode("q:from-a-newer-node"), Change::Everything);
        assert_eq!(decode("k:not-hex"), Change::Everything);
    }

    #[test]
    fn a_password_never_reaches_a_message() {
        assert_eq!(
            redact("postgres://gf:s3cret@db:5432/gigafactory"),
            "postgres://gf:***@db:5432/gigafactory"
        );
        assert_eq!(redact("postgres://db/gf"), "postgres://db/gf");
    }
}
