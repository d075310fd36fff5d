//! The admin endpoint every ZTNA program serves: `/metrics` (OpenMetrics for scrapers that
//! ask for it, else the Prometheus 0.0.4 text format that promtool and older scrapers read)
//! and `/healthz`, on a thread of its own so scrapes never touch the data path.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Result, anyhow};
use prometheus_client::registry::Registry;
use tiny_http::{Header, Response, Server};

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoint serves.
pub trait Source: Send + Sync + 'static {
    fn registry(&self) -> &Registry;
    fn healthy(&self) -> bool {
        true
    }
}

/// OpenMetrics text of a registry.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Converts OpenMetrics text to the Prometheus 0.0.4 text format: counter families are
/// named by their `_total` sample name in HELP/TYPE, and `# UNIT` / `# EOF` go away.
pub fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + 64 * counters.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

pub struct Endpoint {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Endpoint {
    pub fn start(addr: SocketAddr, source: Arc<dyn Source>) -> Result<Endpoint> {
        let server = Arc::new(Server::http(addr).map_err(|e| anyhow!("binding metrics endpoint {addr}: {e}"))?);
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let s = server.clone();
        let thread = std::thread::Builder::new().name("metrics-http".into()).spawn(move || serve(&s, &*source))?;
        Ok(Endpoint { server, thread: Some(thread), addr: bound })
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &Server, source: &dyn Source) {
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let response = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => {
                let wants_openmetrics = req
                    .headers()
                    .iter()
                    .any(|h| h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text"));
                let text = encode(source.registry());
                let (body, ctype) = if wants_openmetrics {
                    (text, OPENMETRICS_CONTENT_TYPE)
                } else {
                    (openmetrics_to_prometheus(&text), PROMETHEUS_CONTENT_TYPE)
                };
                let mut r = Response::from_string(body);
                if let Ok(h) = Header::from_bytes("Content-Type", ctype) {
                    r.add_header(h);
                }
                r
            }
            (tiny_http::Method::Get, "/healthz") => {
                if source.healthy() {
                    Response::from_string("ok\n")
                } else {
                    Response::from_string("unavailable\n").with_status_code(503)
                }
            }
            _ => Response::from_string("not found\n").with_status_code(404),
        };
        let _ = req.respond(response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total 3\n# HELP d Dur.\n# TYPE d_seconds histogram\n# UNIT d_seconds seconds\n# EOF\n";
        let p = openmetrics_to_prometheus(om);
        assert_eq!(p, "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total 3\n# HELP d Dur.\n# TYPE d_seconds histogram\n");
    }
}
