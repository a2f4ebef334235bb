//! The store under races and crashes: a key created while its tenant is
//! being deleted never outlives the tenant (not even into a tenant of the
//! same name created later), and a `kill -9` in the middle of deploys,
//! deletes and key creations loses nothing the gateway had acknowledged.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gigafactory_gateway::cli::Client;
use hyper::Method;
use support::{Reply, Server, json, text, wasm};

/// Requests in flight while checking what survived.
const LANES: usize = 8;

/// `POST /v1/tenants` for `name`; the status.
async fn create_tenant(admin: &Client, name: &str) -> u16 {
    let body = serde_json::json!({ "name": name }).to_string();
    let body = Some(("application/json", Bytes::from(body)));
    let reply = admin.send(Method::POST, "/v1/tenants", body, &[]).await;
    reply.expect("creating a tenant").status.as_u16()
}

/// `DELETE /v1/tenants/{name}`; the status.
async fn delete_tenant(admin: &Client, name: &str) -> u16 {
    let path = format!("/v1/tenants/{name}");
    let reply = admin.send(Method::DELETE, &path, None, &[]).await;
    reply.expect("deleting a tenant").status.as_u16()
}

/// `POST /v1/tenants/{tenant}/keys`: the key when created (201), `None`
/// when refused, an error when the gateway did not answer.
async fn create_key(admin: &Client, tenant: &str) -> anyhow::Result<Option<String>> {
    let path = format!("/v1/tenants/{tenant}/keys");
    let reply = admin.send(Method::POST, &path, None, &[]).await?;
    if reply.status != 201 {
        return Ok(None);
    }
    let key = json(&reply)["key"].as_str().map(str::to_string);
    Ok(Some(key.expect("a created key")))
}

/// GETs every `(token, path)`, [`LANES`] at a time; the replies in order.
async fn get_all(server: &Server, requests: Vec<(String, String)>) -> Vec<Reply> {
    let requests = Arc::new(requests);
    let lanes: Vec<_> = (0..LANES)
        .map(|lane| {
            let client = server.client(None);
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut replies = Vec::new();
                for (token, path) in requests.iter().skip(lane).step_by(LANES) {
                    let bearer = [("authorization".to_string(), format!("Bearer {token}"))];
                    let reply = client.send(Method::GET, path, None, &bearer).await;
                    replies.push(reply.unwrap_or_else(|e| panic!("GET {path}: {e:#}")));
                }
                replies.into_iter()
            })
        })
        .collect();
    let mut replies = Vec::new();
    for lane in lanes {
        replies.push(lane.await.expect("a checking lane panicked"));
    }
    (0..requests.len())
        .map(|i| replies[i % LANES].next().expect("a reply per request"))
        .collect()
}

/// Panics listing the first few `failures`, if any.
fn assert_none(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} {what}, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
}

mod key_race {
    use super::*;

    const TENANT: &str = "race";
    const ROUNDS: usize = 40;

    /// Deletes the tenant while four keys are being created for it; the
    /// keys that were created, after the delete finished.
    async fn race(admin: &Arc<Client>) -> Vec<String> {
        let create = || {
            let admin = admin.clone();
            tokio::spawn(async move { create_key(&admin, TENANT).await.expect("creating a key") })
        };
        let mut creating = vec![create(), create()];
        let deleting = {
            let admin = admin.clone();
            tokio::spawn(async move { delete_tenant(&admin, TENANT).await })
        };
        creating.extend([create(), create()]);
        let mut keys = Vec::new();
        for task in creating {
            keys.extend(task.await.expect("a key creation panicked"));
        }
        let deleted = deleting.await.expect("the delete panicked");
        assert_eq!(deleted, 204, "deleting tenant {TENANT:?} (it existed)");
        keys
    }

    /// One round; the keys created in the race and those still valid.
    async fn round(server: &Server, admin: &Arc<Client>) -> (usize, Vec<String>) {
        assert_eq!(
            create_tenant(admin, TENANT).await,
            201,
            "creating the tenant"
        );
        let keys = race(admin).await;
        assert_eq!(
            create_tenant(admin, TENANT).await,
            201,
            "re-creating the tenant"
        );
        let requests = keys
            .iter()
            .map(|key| (key.clone(), "/v1/whoami".to_string()))
            .collect();
        let survivors = keys
            .iter()
            .zip(get_all(server, requests).await)
            .filter(|(_, reply)| reply.status != 401)
            .map(|(key, reply)| format!("{key}: {} {}", reply.status, text(&reply)))
            .collect();
        assert_eq!(delete_tenant(admin, TENANT).await, 204, "cleaning up");
        (keys.len(), survivors)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_key_created_while_its_tenant_is_deleted_never_survives() {
        let data = tempfile::tempdir().unwrap();
        let server = Server::start_without_models(data.path());
        let admin = Arc::new(server.admin());
        let (created, survivors) = tokio::time::timeout(Duration::from_secs(120), async {
            let (mut created, mut survivors) = (0, Vec::new());
            for _ in 0..ROUNDS {
                let (n, survived) = round(&server, &admin).await;
                created += n;
                survivors.extend(survived);
            }
            (created, survivors)
        })
        .await
        .expect("the key race took over 2 minutes");
        eprintln!(
            "key race: {ROUNDS} rounds, {created} keys created during the delete, {} survived",
            survivors.len()
        );
        assert_none("keys outlived their tenant's deletion", &survivors);
    }
}

mod kill_nine {
    use super::*;

    const TENANT: &str = "t";
    const ROUNDS: usize = 20;
    /// Functions invoked per check (all are checked by listing).
    const INVOKED: usize = 10;

    /// What the gateway acknowledged, across every round.
    #[derive(Clone, Default)]
    struct Ledger {
        /// Functions whose deploy was acknowledged, in order.
        deployed: Vec<String>,
        /// Functions whose delete was acknowledged (204).
        deleted: BTreeSet<String>,
        /// Functions whose delete got no clear answer: either state is right.
        maybe_deleted: BTreeSet<String>,
        /// Acknowledged deploys that a delete then found missing (404).
        lost: Vec<String>,
        /// Keys whose creation was acknowledged.
        keys: Vec<String>,
        /// The position in `deployed` of the next function to delete.
        next_delete: usize,
    }

    impl Ledger {
        /// Every other acknowledged deploy, once each.
        fn next_to_delete(&mut self) -> Option<String> {
            let name = self.deployed.get(self.next_delete)?.clone();
            self.next_delete += 2;
            Some(name)
        }

        /// Records a delete's answer (`None`: the gateway did not answer).
        fn settle_delete(&mut self, name: String, status: Option<u16>) {
            match status {
                Some(204) => {
                    self.deleted.insert(name);
                }
                Some(404) => self.lost.push(name),
                _ => {
                    self.maybe_deleted.insert(name);
                }
            }
        }

        /// Acknowledged deploys not deleted, or perhaps deleted.
        fn live(&self) -> Vec<&String> {
            self.deployed
                .iter()
                .filter(|n| !self.deleted.contains(*n) && !self.maybe_deleted.contains(*n))
                .collect()
        }
    }

    type Shared = Arc<Mutex<Ledger>>;

    /// Deploys `f{round}-{i}` for i = 0, 1, … until the gateway is gone.
    async fn deploy_loop(client: Client, round: usize, hello: Bytes, ledger: Shared) {
        for i in 0.. {
            let name = format!("f{round}-{i}");
            let body = Some(("application/wasm", hello.clone()));
            let path = format!("/v1/functions/{name}");
            let Ok(reply) = client.send(Method::PUT, &path, body, &[]).await else {
                return;
            };
            if reply.status.is_success() {
                ledger.lock().unwrap().deployed.push(name);
            }
        }
    }

    /// Creates keys for the tenant until the gateway is gone.
    async fn key_loop(admin: Client, ledger: Shared) {
        while let Ok(created) = create_key(&admin, TENANT).await {
            ledger.lock().unwrap().keys.extend(created);
        }
    }

    /// Deletes acknowledged functions until the gateway is gone.
    async fn delete_loop(client: Client, ledger: Shared, killed: Arc<AtomicBool>) {
        while !killed.load(Ordering::Relaxed) {
            let next = ledger.lock().unwrap().next_to_delete();
            let Some(name) = next else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let path = format!("/v1/functions/{name}");
            let reply = client.send(Method::DELETE, &path, None, &[]).await;
            let status = reply.as_ref().ok().map(|r| r.status.as_u16());
            ledger.lock().unwrap().settle_delete(name, status);
            if status.is_none() {
                return;
            }
        }
    }

    /// Makes sure the tenant exists and returns a fresh key for it; the
    /// first round also deploys `hello` once, so that its compiled
    /// artifact is stored and later deploys are quick.
    async fn prepare(server: &Server, round: usize, hello: &Bytes, ledger: &Shared) -> String {
        let admin = server.admin();
        let status = create_tenant(&admin, TENANT).await;
        assert!(
            status == 201 || (round > 0 && status == 409),
            "creating tenant {TENANT:?} in round {round}: {status}"
        );
        let key = create_key(&admin, TENANT).await.unwrap();
        let key = key.expect("a key for the round");
        ledger.lock().unwrap().keys.push(key.clone());
        if round == 0 {
            server.deploy(&key, "warm", hello.to_vec()).await;
            ledger.lock().unwrap().deployed.push("warm".to_string());
        }
        key
    }

    /// Runs the three workers for a while (150–600 ms, by round), then
    /// kills the server under them.
    async fn crash_during_writes(server: Server, round: usize, hello: &Bytes, ledger: &Shared) {
        let key = prepare(&server, round, hello, ledger).await;
        let killed = Arc::new(AtomicBool::new(false));
        let workers = [
            tokio::spawn(deploy_loop(
                server.client(Some(&key)),
                round,
                hello.clone(),
                ledger.clone(),
            )),
            tokio::spawn(key_loop(server.admin(), ledger.clone())),
            tokio::spawn(delete_loop(
                server.client(Some(&key)),
                ledger.clone(),
                killed.clone(),
            )),
        ];
        let busy = 150 + (round as u64 * 211) % 451;
        tokio::time::sleep(Duration::from_millis(busy)).await;
        server.kill();
        killed.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.await.expect("a worker panicked");
        }
    }

    /// Every acknowledged key still authenticates as the tenant.
    async fn check_keys(server: &Server, ledger: &Ledger) {
        let requests = ledger
            .keys
            .iter()
            .map(|key| (key.clone(), "/v1/whoami".to_string()))
            .collect();
        let failures: Vec<String> = ledger
            .keys
            .iter()
            .zip(get_all(server, requests).await)
            .filter(|(_, r)| r.status != 200 || json(r)["tenant"] != TENANT)
            .map(|(key, r)| format!("{key}: {} {}", r.status, text(&r)))
            .collect();
        assert_none("acknowledged keys were lost", &failures);
    }

    /// The tenant's functions, by `GET /v1/functions`.
    async fn listed(server: &Server, key: &str) -> BTreeSet<String> {
        let client = server.client(Some(key));
        let listing = client.api(Method::GET, "/v1/functions", None).await;
        let listing = listing.expect("listing the functions");
        let functions = listing["functions"].as_array().expect("a list").iter();
        functions
            .map(|f| f["name"].as_str().expect("a name").to_string())
            .collect()
    }

    /// Live functions are listed, deleted ones are not and answer 404.
    async fn check_listing(server: &Server, ledger: &Ledger, key: &str) {
        let listed = listed(server, key).await;
        let mut failures: Vec<String> = ledger
            .live()
            .into_iter()
            .filter(|name| !listed.contains(*name))
            .map(|name| format!("{name}: deployed, not deleted, not listed"))
            .collect();
        failures.extend(
            ledger
                .deleted
                .iter()
                .filter(|name| listed.contains(*name))
                .map(|name| format!("{name}: deleted, still listed")),
        );
        let requests = ledger
            .deleted
            .iter()
            .map(|name| (key.to_string(), format!("/v1/functions/{name}")))
            .collect();
        failures.extend(
            ledger
                .deleted
                .iter()
                .zip(get_all(server, requests).await)
                .filter(|(_, r)| r.status != 404)
                .map(|(name, r)| format!("{name}: deleted, GET answers {}", r.status)),
        );
        assert_none("acknowledged deploys or deletes were lost", &failures);
    }

    /// The newest live functions and some older ones answer as deployed.
    async fn check_invocations(server: &Server, ledger: &Ledger, key: &str) -> usize {
        let live = ledger.live();
        let newest = live.iter().rev().take(INVOKED / 2);
        let stride = (live.len() / (INVOKED / 2)).max(1);
        let older = live.iter().step_by(stride).take(INVOKED / 2);
        let sample: BTreeSet<&String> = newest.chain(older).copied().collect();
        let requests = sample
            .iter()
            .map(|name| (key.to_string(), format!("/fn/{TENANT}/{name}")))
            .collect();
        let failures: Vec<String> = sample
            .iter()
            .zip(get_all(server, requests).await)
            .filter(|(_, r)| r.status != 200 || !text(r).starts_with("Hello from Gigafactory!"))
            .map(|(name, r)| format!("{name}: {} {}", r.status, text(&r)))
            .collect();
        assert_none("live functions failed to answer", &failures);
        sample.len()
    }

    /// Checks every acknowledged effect so far; how many were checked.
    async fn check(server: &Server, ledger: &Ledger) -> usize {
        assert_none("acknowledged deploys had vanished", &ledger.lost);
        let key = ledger.keys.first().expect("an acknowledged key");
        check_keys(server, ledger).await;
        check_listing(server, ledger, key).await;
        check_invocations(server, ledger, key).await;
        ledger.keys.len() + ledger.deployed.len() + ledger.deleted.len()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_crash_loses_nothing_acknowledged() {
        let data = tempfile::tempdir().unwrap();
        let ledger = Shared::default();
        let hello = Bytes::from(wasm("hello"));
        let started = Instant::now();
        let checked = tokio::time::timeout(Duration::from_secs(300), async {
            let mut server = Server::start_without_models(data.path());
            let mut checked = 0;
            for round in 0..ROUNDS {
                crash_during_writes(server, round, &hello, &ledger).await;
                server = Server::start_without_models(data.path());
                let snapshot = ledger.lock().unwrap().clone();
                checked = check(&server, &snapshot).await;
            }
            checked
        })
        .await
        .expect("the crash rounds took over 5 minutes");
        let ledger = ledger.lock().unwrap();
        eprintln!(
            "kill -9: {ROUNDS} rounds, {checked} acknowledged effects checked \
             ({} deploys, {} deletes, {} keys; {} deletes unanswered) in {:.1} s",
            ledger.deployed.len(),
            ledger.deleted.len(),
            ledger.keys.len(),
            ledger.maybe_deleted.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
