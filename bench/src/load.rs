//! The built-in load generator: closed loop over keep-alive HTTP/1.1
//! connections, each sending its next request when the previous one is
//! answered; a warm-up period is discarded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use tokio::net::TcpStream;

/// What to send.
#[derive(Debug, Clone)]
pub struct Load {
    /// `GET` or `POST`.
    pub method: Method,
    /// The request path.
    pub path: String,
    /// A bearer token, if the server wants one.
    pub key: Option<String>,
    /// `(content type, body)` pairs sent in turn; none: no body.
    pub bodies: Vec<(&'static str, Bytes)>,
    /// Concurrent connections.
    pub connections: usize,
    /// Discarded seconds before measuring.
    pub warmup: Duration,
    /// Measured seconds.
    pub seconds: Duration,
}

/// What one measured run gave.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Successful requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Responses that were not 200.
    pub errors: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(address: &SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One GET on a fresh connection; its status.
pub(super) async fn request_once(address: &SocketAddr, path: &str) -> Result<u16> {
    let mut sender = connect(address).await?;
    let request = hyper::Request::get(path)
        .header("host", address.to_string())
        .body(Full::default())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

impl Load {
    /// Runs the load against `address`.
    pub async fn run(&self, address: SocketAddr) -> Result<Stats> {
        let warm_until = Instant::now() + self.warmup;
        let end = warm_until + self.seconds;
        let mut tasks = Vec::new();
        for connection in 0..self.connections {
            let load = self.clone();
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(&address).await?;
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                for turn in connection.. {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    let (status, latency) = load.send(&mut sender, &address, turn).await?;
                    if now >= warm_until {
                        if status == 200 {
                            latencies.push(latency);
                        } else {
                            errors += 1;
                        }
                    }
                }
                anyhow::Ok((latencies, errors))
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (mine, my_errors) = task.await??;
            latencies.extend(mine);
            errors += my_errors;
        }
        if latencies.is_empty() {
            bail!("no successful requests to {}", self.path);
        }
        latencies.sort();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        Ok(Stats {
            rps: latencies.len() as f64 / self.seconds.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            errors,
        })
    }

    async fn send(
        &self,
        sender: &mut Sender,
        address: &SocketAddr,
        turn: usize,
    ) -> Result<(u16, Duration)> {
        let mut request = hyper::Request::builder()
            .method(self.method.clone())
            .uri(&self.path)
            .header("host", address.to_string());
        if let Some(key) = &self.key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let body = match self.bodies.get(turn % self.bodies.len().max(1)) {
            Some((content_type, body)) => {
                request = request.header("content-type", *content_type);
                Full::new(body.clone())
            }
            None => Full::default(),
        };
        let started = Instant::now();
        sender.ready().await?;
        let response = sender.send_request(request.body(body)?).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok((status, started.elapsed()))
    }
}
