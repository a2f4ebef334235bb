//! What every end-to-end test needs: the guest components built from
//! source, and a real `gigafactory serve` process on a free port.

#![allow(dead_code, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use gigafactory_gateway::cli::Client;
pub use gigafactory_gateway::cli::client::Reply;
use hyper::Method;

pub const ADMIN_TOKEN: &str = "gfadmin_test-admin-token";

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `gigafactory` binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gigafactory"))
}

/// A component by crate name: the examples (`hello`, `embed`) and the test
/// guests (`tests/guests/*`), built from source once per test binary.
pub fn wasm(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        build(&root().join("examples/Cargo.toml"), "wasm32-wasip2", &[]);
        // Programs importing witx wasi-nn cannot be components.
        let mut guests = vec!["--workspace"];
        for name in CORE_MODULES_ONLY {
            guests.extend(["--exclude", name]);
        }
        build(
            &root().join("tests/guests/Cargo.toml"),
            "wasm32-wasip2",
            &guests,
        );
    });
    let file = |dir: &str| {
        root()
            .join(dir)
            .join(format!("target/wasm32-wasip2/release/{name}.wasm"))
    };
    let path = [file("examples"), file("tests/guests")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no component {name}.wasm was built"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Guests that import witx wasi-nn (as programs for wasmtime's and
/// WasmEdge's preview 1 wasi-nn do), built as core modules only.
const CORE_MODULES_ONLY: [&str; 3] = ["nn_witx", "witx_embed", "wasmedge_chat"];

/// The guest `name` built as a core module (wasm32-wasip1), as programs
/// for WAGI and other preview 1 hosts are.
pub fn core_module(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<()> = OnceLock::new();
    let manifest = root().join("tests/guests/Cargo.toml");
    let mut packages = vec!["--package", "cgi_echo", "--package", "hostile_command"];
    for name in CORE_MODULES_ONLY {
        packages.extend(["--package", name]);
    }
    BUILT.get_or_init(|| build(&manifest, "wasm32-wasip1", &packages));
    let path = root().join(format!(
        "tests/guests/target/wasm32-wasip1/release/{name}.wasm"
    ));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn build(manifest: &Path, target: &str, extra: &[&str]) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--release", "--target", target])
        .args(extra)
        .arg("--manifest-path")
        .arg(manifest)
        .status()
        .expect("running cargo");
    assert!(
        status.success(),
        "building {} for {target} failed (rustup target add {target})",
        manifest.display()
    );
}

/// A running `gigafactory serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub url: String,
    pub data: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
    /// The empty model repository of [`Server::start_without_models`].
    empty_models: Option<tempfile::TempDir>,
    /// The certificate its clients trust (a server on HTTPS).
    ca: Option<PathBuf>,
}

impl Server {
    /// Starts a server on `data` with the repository's models.
    pub fn start(data: &Path) -> Self {
        Self::start_with(data, &[])
    }

    /// Starts a server with extra `serve` flags.
    pub fn start_with(data: &Path, extra: &[&str]) -> Self {
        Self::start_with_models(data, &root().join("models"), extra)
    }

    /// Starts a server on `data` with an empty model repository, so it is
    /// up in moments: for tests of the control plane and the store.
    pub fn start_without_models(data: &Path) -> Self {
        let models = tempfile::tempdir().expect("an empty model repository");
        let mut server = Self::start_with_models(data, models.path(), &[]);
        server.empty_models = Some(models);
        server
    }

    /// [`Server::start_without_models`] with extra `serve` flags.
    pub fn start_without_models_with(data: &Path, extra: &[&str]) -> Self {
        let models = tempfile::tempdir().expect("an empty model repository");
        let mut server = Self::start_with_models(data, models.path(), extra);
        server.empty_models = Some(models);
        server
    }

    /// Starts a server on the model repository `models`, with extra `serve` flags.
    pub fn start_with_models(data: &Path, models: &Path, extra: &[&str]) -> Self {
        Self::launch(data, models, extra, &Launch::default())
    }

    /// Starts a server with the repository's models, extra `serve` flags,
    /// and `launch`'s environment and descriptor limit.
    pub fn start_launched(data: &Path, extra: &[&str], launch: &Launch) -> Self {
        let models = launch
            .models
            .clone()
            .unwrap_or_else(|| root().join("models"));
        Self::launch(data, &models, extra, launch)
    }

    fn launch(data: &Path, models: &Path, extra: &[&str], launch: &Launch) -> Self {
        // A descriptor limit is set by a shell that then becomes the server.
        let mut command = match launch.nofile {
            Some(limit) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(binary());
                shell
            }
            None => Command::new(binary()),
        };
        let mut child = command
            .env("GIGAFACTORY_LOG", "info")
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-token",
                ADMIN_TOKEN,
            ])
            .arg("--data")
            .arg(data)
            .arg("--models")
            .arg(models)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting gigafactory serve");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (address_tx, address_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Text or JSON log: the URL runs to a space or a quote.
                if let Some(address) = line.split("listening on ").nth(1) {
                    let url = address.split([' ', '"']).next().unwrap_or_default();
                    let _ = address_tx.send(url.to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let url = match address_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the server did not start:\n{}",
                    output.lock().unwrap().join("\n")
                );
            }
        };
        Self {
            child,
            url,
            data: data.to_path_buf(),
            output,
            empty_models: None,
            ca: None,
        }
    }

    /// The server's process id (to send it signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its clients trust `ca` (a server started with `--tls-cert`).
    pub fn trusting(mut self, ca: &Path) -> Self {
        self.ca = Some(ca.to_path_buf());
        self
    }

    /// A client with `token`.
    pub fn client(&self, token: Option<&str>) -> Client {
        Client::with_ca(&self.url, token.map(str::to_string), self.ca.as_deref()).expect("a client")
    }

    /// A client with the admin token.
    pub fn admin(&self) -> Client {
        self.client(Some(ADMIN_TOKEN))
    }

    /// Creates a tenant and returns a fresh API key for it.
    pub async fn tenant(&self, name: &str) -> String {
        let admin = self.admin();
        let body = serde_json::json!({ "name": name }).to_string();
        let created = admin
            .send(
                Method::POST,
                "/v1/tenants",
                Some(("application/json", body.into())),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            created.status,
            201,
            "creating tenant {name}: {}",
            text(&created)
        );
        let key = admin
            .api(Method::POST, &format!("/v1/tenants/{name}/keys"), None)
            .await
            .unwrap();
        key["key"].as_str().expect("a key").to_string()
    }

    /// A new API key for `tenant`: the key and its public id.
    pub async fn create_key(&self, tenant: &str) -> (String, String) {
        let created = self
            .admin()
            .api(Method::POST, &format!("/v1/tenants/{tenant}/keys"), None)
            .await
            .unwrap();
        let field = |name: &str| created[name].as_str().expect("a key and an id").to_string();
        (field("key"), field("id"))
    }

    /// Revokes `tenant`'s key `id`, asserting success.
    pub async fn revoke_key(&self, tenant: &str, id: &str) {
        let revoked = self
            .admin()
            .send(
                Method::DELETE,
                &format!("/v1/tenants/{tenant}/keys/{id}"),
                None,
                &[],
            )
            .await
            .unwrap();
        assert_eq!(revoked.status, 204, "revoking {id}: {}", text(&revoked));
    }

    /// `GET /v1/whoami` with `key`.
    pub async fn whoami(&self, key: &str) -> serde_json::Value {
        self.client(Some(key))
            .api(Method::GET, "/v1/whoami", None)
            .await
            .unwrap()
    }

    /// A model as `GET /v1/models` shows it to the admin.
    pub async fn model(&self, name: &str) -> serde_json::Value {
        let models = self
            .admin()
            .api(Method::GET, "/v1/models", None)
            .await
            .unwrap();
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no model {name} in {models}"))
            .clone()
    }

    /// `/metrics` as the admin sees it.
    pub async fn metrics(&self) -> String {
        let reply = self
            .admin()
            .send(Method::GET, "/metrics", None, &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", text(&reply));
        text(&reply)
    }

    /// Sets a tenant's quota (JSON), asserting success.
    pub async fn set_quota(&self, tenant: &str, quota: serde_json::Value) {
        let reply = self
            .admin()
            .send(
                Method::PUT,
                &format!("/v1/tenants/{tenant}/quota"),
                Some(("application/json", quota.to_string().into())),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "setting the quota: {}", text(&reply));
    }

    /// Deploys `wasm` as `name` with `key`, asserting success.
    pub async fn deploy(&self, key: &str, name: &str, wasm: Vec<u8>) -> serde_json::Value {
        let reply = self.put(key, name, "application/wasm", wasm).await;
        assert!(
            reply.status.is_success(),
            "deploying {name}: {}",
            text(&reply)
        );
        serde_json::from_slice(&reply.body).unwrap()
    }

    /// `PUT /v1/functions/{name}` with `key`, returning whatever the gateway said.
    pub async fn put(&self, key: &str, name: &str, content_type: &str, body: Vec<u8>) -> Reply {
        let path = format!("/v1/functions/{name}");
        self.client(Some(key))
            .send(
                Method::PUT,
                &path,
                Some((content_type, Bytes::from(body))),
                &[],
            )
            .await
            .unwrap()
    }

    /// POSTs `body` as `content_type` to `path` with `key`.
    pub async fn post(
        &self,
        key: &str,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Reply {
        self.client(Some(key))
            .send(Method::POST, path, Some((content_type, body.into())), &[])
            .await
            .unwrap()
    }

    /// Deploys a bundle (tar) as `name` with `key`, returning the reply.
    pub async fn deploy_bundle(&self, key: &str, name: &str, tar: Vec<u8>) -> Reply {
        self.put(key, name, "application/x-tar", tar).await
    }

    /// GETs `path` with `key` and returns the body as text, asserting 200.
    pub async fn get_text(&self, key: &str, path: &str) -> String {
        let reply = self
            .client(Some(key))
            .send(Method::GET, path, None, &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "GET {path}: {}", text(&reply));
        text(&reply)
    }

    /// The server's resident memory, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// Descriptors the server holds open now.
    pub fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }

    /// The server's address (`host:port`).
    pub fn address(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// The server's log so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..200 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not stop on SIGTERM:\n{}", self.output());
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to die.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection of its own, closed when dropped: a client that leaves.
pub struct OwnConnection {
    _sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl Drop for OwnConnection {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// An HTTP/1 connection of its own to `server`: its address, the sender
/// and the task driving the connection.
async fn own_connection(
    server: &Server,
) -> (
    String,
    hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let address = server.address().to_string();
    let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    (address, sender, tokio::spawn(connection))
}

/// POSTs `body` (JSON) to `path` with `key` on a connection of its own and
/// returns the response once its head arrived, its body unread, with the
/// connection (dropping both is a client leaving mid-response).
pub async fn post_on_own_connection(
    server: &Server,
    key: &str,
    path: &str,
    body: Bytes,
) -> (hyper::Response<hyper::body::Incoming>, OwnConnection) {
    let (address, mut sender, connection) = own_connection(server).await;
    let request = hyper::Request::post(path)
        .header("host", &address)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let own = OwnConnection {
        _sender: sender,
        connection,
    };
    (response, own)
}

/// Sends a request with its path exactly as written (a URL library would
/// resolve `..` and `%2e%2e` before sending), on a connection of its own.
pub async fn send_verbatim(
    server: &Server,
    key: &str,
    method: Method,
    path: &str,
    body: Option<(&str, Bytes)>,
) -> Reply {
    use http_body_util::BodyExt as _;
    let (address, mut sender, connection) = own_connection(server).await;
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", &address)
        .header("authorization", format!("Bearer {key}"));
    let body = match body {
        Some((content_type, bytes)) => {
            request = request.header("content-type", content_type);
            bytes
        }
        None => Bytes::new(),
    };
    let response = sender
        .send_request(request.body(http_body_util::Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    connection.abort();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// How to start a server beyond its flags.
#[derive(Debug, Default)]
pub struct Launch {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// A descriptor limit (`ulimit -n`).
    pub nofile: Option<u64>,
    /// Another model repository than the repository's `models/`.
    pub models: Option<PathBuf>,
}

/// A fresh, empty database on the test PostgreSQL server, as a URL.
/// `./dev test` starts the server and sets `GIGAFACTORY_TEST_POSTGRES`;
/// without it the test fails and says so.
pub async fn postgres_database() -> String {
    let admin = std::env::var("GIGAFACTORY_TEST_POSTGRES").expect(
        "GIGAFACTORY_TEST_POSTGRES is not set: this test needs PostgreSQL. Run the suite \
         with `./dev test`, or start a server with `./dev postgres` and export the URL it prints",
    );
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
    tokio::spawn(connection);
    let mut nonce = [0u8; 6];
    getrandom::fill(&mut nonce).unwrap();
    let name = format!("gf_test_{}", hex::encode(nonce));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
    let (server, _) = admin.rsplit_once('/').expect("a URL ending in /database");
    format!("{server}/{name}")
}

/// A PostgreSQL server of one test's own, for tests that stop and start it:
/// Debian's binaries, a scratch cluster, a free loopback port. Stopped
/// when dropped.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .expect("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql (./dev test does)");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pg");
        std::fs::create_dir(&data).unwrap();
        if rustix::process::getuid().is_root() {
            // initdb refuses to run as root: the server runs as the package's user.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let status = Command::new("chown")
                .args(["postgres:"])
                .arg(&data)
                .status()
                .unwrap();
            assert!(status.success(), "chown postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Self {
            bin,
            data,
            port,
            _dir: dir,
        };
        server.run("initdb", &["-U", "postgres", "--auth=trust", "-E", "UTF8"]);
        server.start_again();
        server
    }

    /// `program` of the server's binaries on its data directory, as the
    /// package's user when this is root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if rustix::process::getuid().is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        };
        command.arg("-D").arg(&self.data);
        command
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The `postgres` database's URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-m", "fast", "-w", "stop"]);
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.data.display()
        );
        let log = self.data.join("server.log");
        let log = log.to_str().unwrap();
        self.run("pg_ctl", &["-w", "-l", log, "-o", &options, "start"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Adds (no `files`: updates) model `name` through the API with `token`:
/// each file uploaded in parts, then `POST /v1/models` (`PUT` to update).
pub async fn add_model(
    server: &Server,
    token: &str,
    name: &str,
    files: &[(&str, &[u8])],
    config: Option<&str>,
) -> Reply {
    use sha2::Digest as _;
    let client = server.client(Some(token));
    let mut refs = serde_json::Map::new();
    for (path, content) in files {
        let sha256 = hex::encode(sha2::Sha256::digest(content));
        let size = serde_json::json!({ "size": content.len() }).to_string();
        let begun = client
            .send(
                Method::PUT,
                &format!("/v1/model-files/{sha256}"),
                Some(("application/json", size.into())),
                &[],
            )
            .await
            .unwrap();
        if begun.status != 200 {
            return begun;
        }
        let part_size = json(&begun)["part_size"].as_u64().unwrap() as usize;
        for (index, part) in content.chunks(part_size).enumerate() {
            let sent = client
                .send(
                    Method::PUT,
                    &format!("/v1/model-files/{sha256}/parts/{index}"),
                    Some(("application/octet-stream", Bytes::copy_from_slice(part))),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(sent.status, 200, "{}", text(&sent));
        }
        refs.insert(
            path.to_string(),
            serde_json::json!({"sha256": sha256, "size": content.len()}),
        );
    }
    let (method, path, body) = if files.is_empty() {
        let body = serde_json::json!({ "config": config });
        (Method::PUT, format!("/v1/models/{name}"), body)
    } else {
        let body = serde_json::json!({ "name": name, "files": refs, "config": config });
        (Method::POST, "/v1/models".to_string(), body)
    };
    client
        .send(
            method,
            &path,
            Some(("application/json", body.to_string().into())),
            &[],
        )
        .await
        .unwrap()
}

/// Runs the `gigafactory` command line against `server` with `token`.
pub fn gigafactory(server: &Server, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", token)
        .output()
        .expect("running gigafactory")
}

/// A command's standard output, after asserting that it succeeded.
pub fn success(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A bundle of the `manifest_probe` guest with `manifest` and `files`.
pub fn probe_bundle(manifest: &str, files: &[(&str, &str)]) -> Vec<u8> {
    let files: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
        .collect();
    gigafactory_gateway::bundle::Bundle::pack(&wasm("manifest_probe"), Some(manifest), &files)
        .unwrap()
}

/// The versions deploys created (each reply a 201), in order.
pub fn created_versions(replies: &[Reply]) -> Vec<u64> {
    let mut numbers: Vec<u64> = replies
        .iter()
        .map(|reply| {
            assert_eq!(reply.status, 201, "{}", text(reply));
            json(reply)["active_version"].as_u64().unwrap()
        })
        .collect();
    numbers.sort_unstable();
    numbers
}

/// A reply's body as text.
pub fn text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// A reply's body as JSON.
pub fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(reply)))
}

/// Asserts a platform error: status, `error.code`, and a message.
pub fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        reply.status.as_u16(),
        status,
        "expected {status} {code}: {}",
        text(reply)
    );
    let body = json(reply);
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Runs `tests/data/<script>` with the test Python (`GIGAFACTORY_TEST_PYTHON`,
/// which `./dev test` points at a venv with the `openai` client) and parses
/// the JSON report it prints.
pub async fn run_python(script: &str, args: Vec<String>) -> serde_json::Value {
    let python = std::env::var("GIGAFACTORY_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let path = root().join("tests/data").join(script);
    let runner = python.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(runner)
            .arg(path)
            .args(args)
            .output()
            .expect("running python")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{script} failed (does {python} have `openai`? ./dev test sets it up):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// onnxruntime's all-MiniLM-L6-v2 embeddings of a few sentences
/// (`tests/data/reference.json`): text, vector, token count.
pub fn reference_embeddings() -> Vec<(String, Vec<f32>, usize)> {
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("../data/reference.json")).expect("reference.json");
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            (
                case["text"].as_str().unwrap().to_string(),
                floats(&case["embedding"]),
                case["ids"].as_array().unwrap().len(),
            )
        })
        .collect()
}

/// A JSON array of numbers.
pub fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_f64().expect("a number") as f32)
        .collect()
}

/// The largest element-wise difference of two vectors of the same length.
pub fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}
