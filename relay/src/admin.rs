//! The admin endpoint: `/metrics` (Prometheus/OpenMetrics text) and `/healthz`, served by a
//! thread of its own so scrapes never touch the workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Result, anyhow};
use tiny_http::{Header, Response, Server};

use crate::shared::Shared;

pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Admin {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl Admin {
    pub fn start(addr: SocketAddr, shared: Arc<Shared>) -> Result<Admin> {
        let server = Arc::new(Server::http(addr).map_err(|e| anyhow!("binding admin endpoint {addr}: {e}"))?);
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let s = server.clone();
        let thread = std::thread::Builder::new().name("admin".into()).spawn(move || serve(&s, &shared))?;
        Ok(Admin { server, thread: Some(thread), addr: bound })
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &Server, shared: &Shared) {
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let response = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => {
                // Content negotiation: OpenMetrics for scrapers that ask for it, else the
                // classic Prometheus text format.
                let wants_openmetrics = req
                    .headers()
                    .iter()
                    .any(|h| h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text"));
                let (body, ctype) = if wants_openmetrics {
                    (shared.metrics.encode(), METRICS_CONTENT_TYPE)
                } else {
                    (shared.metrics.encode_prometheus(), PROMETHEUS_CONTENT_TYPE)
                };
                let header = Header::from_bytes("Content-Type", ctype).ok();
                let mut r = Response::from_string(body);
                if let Some(h) = header {
                    r.add_header(h);
                }
                r
            }
            (tiny_http::Method::Get, "/healthz") => {
                if shared.healthy() {
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
