//! Gigafactory's gateway: the hyper server with the control-plane API and
//! the data plane, authentication, the sled store, function logs and the
//! `gigafactory` command line.

pub mod auth;
pub mod bundle;
pub mod cli;
pub mod logs;
pub mod manifest;
pub mod quota;
pub mod server;
pub mod store;
pub mod usage;
