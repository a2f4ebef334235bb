//! What one invocation may use beyond computing: environment, read-only
//! files, models, outbound hosts. Everything defaults to nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The grants of a function's invocation; [`Capabilities::default`] grants nothing.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    /// Whose request this is: batches are filled round-robin across tenants.
    pub tenant: Arc<str>,
    /// Environment variables the guest sees.
    pub env: Vec<(String, String)>,
    /// A host directory the guest sees read-only as `/`.
    pub files: Option<PathBuf>,
    /// Which repository models `load-by-name` may open.
    pub models: ModelAccess,
    /// Other names `load-by-name` knows repository models by (as
    /// WasmEdge's `--nn-preload` names them, e.g. `default`).
    pub model_aliases: Arc<BTreeMap<String, String>>,
    /// Which hosts outbound `wasi:http` requests may reach.
    pub outbound: OutboundAccess,
    /// Who pays for model compute, and whether there is budget left.
    pub compute: Option<Arc<dyn ComputeBudget>>,
    /// Bytes the tenant's own `load`ed graphs may keep cached (0: none may load).
    pub graph_memory: u64,
}

impl Capabilities {
    /// The repository model `name` stands for: an alias's target, or itself.
    pub fn model_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.model_aliases.get(name).map_or(name, String::as_str)
    }
}

/// A budget of model work — compute time and generated tokens — usually
/// the tenant's quota.
pub trait ComputeBudget: Send + Sync + std::fmt::Debug {
    /// `Err(why)` when no compute is left.
    fn check(&self) -> Result<(), String>;
    /// Records compute time spent.
    fn charge(&self, spent: Duration);
    /// `Err(why)` when no more tokens may be generated for now.
    fn check_tokens(&self) -> Result<(), String>;
    /// Records generated tokens.
    fn charge_tokens(&self, tokens: u64);
    /// Records the prompt tokens a generation was given (metered, not
    /// capped).
    fn charge_prompt_tokens(&self, tokens: u64);
}

/// Model permissions: those the tenant may see at all, and those this
/// function may load. A model outside `visible` does not exist for the
/// guest (`not-found`); one visible but not `allowed` is `security`.
#[derive(Debug, Clone, Default)]
pub struct ModelAccess {
    /// Models the tenant may use; `None`: all of them.
    pub visible: Option<Arc<BTreeSet<String>>>,
    /// Models the function may load; `None`: every visible one.
    pub allowed: Option<Arc<BTreeSet<String>>>,
}

impl ModelAccess {
    /// Every model, for tests and single-tenant use.
    pub fn all() -> Self {
        Self::default()
    }

    pub(crate) fn is_visible(&self, model: &str) -> bool {
        self.visible.as_ref().is_none_or(|set| set.contains(model))
    }

    pub(crate) fn is_allowed(&self, model: &str) -> bool {
        self.allowed.as_ref().is_none_or(|set| set.contains(model))
    }
}

/// Hosts outbound requests may reach: `host` (any port) or `host:port`.
/// Whatever the rules say, a request whose host resolves to a loopback,
/// unspecified or local address (the gateway itself) is refused unless
/// the operator allowed it, and the tenant's open outbound connections
/// are capped.
#[derive(Debug, Clone, Default)]
pub struct OutboundAccess {
    allowed: Arc<[String]>,
    /// Whether loopback and the machine's own addresses may be reached.
    pub allow_local: bool,
    /// The tenant's outbound connections: one permit each, held until the
    /// connection closes. `None`: no cap.
    pub connections: Option<Arc<tokio::sync::Semaphore>>,
}

impl OutboundAccess {
    /// Allows exactly `hosts` (lower-cased).
    pub fn hosts(hosts: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        Self {
            allowed: hosts
                .into_iter()
                .map(|h| h.as_ref().to_ascii_lowercase())
                .collect(),
            ..Self::default()
        }
    }

    /// Whether a request to `host` on `port` may go out.
    pub fn permits(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let with_port = format!("{host}:{port}");
        self.allowed
            .iter()
            .any(|rule| *rule == host || *rule == with_port)
    }
}

/// Whether `ip` is this machine: loopback, unspecified, or an address of
/// one of its interfaces (binding to it succeeds only then). Any other
/// failure to tell (out of descriptors …) counts as local: refused.
pub fn is_local_address(ip: std::net::IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.to_canonical().is_loopback() {
        return true;
    }
    match std::net::UdpSocket::bind(std::net::SocketAddr::new(ip, 0)) {
        Ok(_) => true,
        Err(error) => error.kind() != std::io::ErrorKind::AddrNotAvailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_rules_match_host_or_host_and_port() {
        let access = OutboundAccess::hosts(["API.example.com", "127.0.0.1:9000"]);
        assert!(access.permits("api.example.com", 443));
        assert!(access.permits("api.example.com", 80));
        assert!(access.permits("127.0.0.1", 9000));
        assert!(!access.permits("127.0.0.1", 9001));
        assert!(!access.permits("example.com", 443));
        assert!(!OutboundAccess::default().permits("localhost", 80));
    }

    #[test]
    fn local_addresses_are_recognised() {
        for local in [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "0.0.0.0",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_local_address(local.parse().unwrap()), "{local}");
        }
        assert!(!is_local_address("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn model_access_separates_visible_from_allowed() {
        let set = |names: &[&str]| Some(Arc::new(names.iter().map(|n| n.to_string()).collect()));
        let access = ModelAccess {
            visible: set(&["a", "b"]),
            allowed: set(&["a"]),
        };
        assert!(access.is_visible("b") && !access.is_allowed("b"));
        assert!(!access.is_visible("c"));
        assert!(ModelAccess::all().is_allowed("anything"));
    }
}
