//! The ZTNA relay ("Intermediate"): authenticates agents and connectors over QUIC with
//! mutual TLS, reports their observed addresses (QAD), brokers sessions, and forwards the
//! opaque DATA frames of their end-to-end tunnels on one pinned worker per core.

pub mod admin;
pub mod config;
pub mod core;
pub mod ebpf;
pub mod io;
pub mod metrics;
pub mod nat_test;
pub mod pki;
pub mod policy;
pub mod ratelimit;
pub mod registry;
pub mod reset;
pub mod retry;
pub mod sessions;
pub mod shared;
pub mod tls;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::policy::Policy;
use crate::shared::{Mailbox, Shared};

/// A running relay: its workers and admin endpoint.
pub struct Relay {
    pub shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    admin: Option<ztna_metrics_http::Endpoint>,
    nat_test: Option<nat_test::NatTestResponder>,
}

impl Relay {
    /// Binds every worker's socket and the admin endpoint, then starts the workers.
    pub fn start(mut config: Config) -> Result<Relay> {
        config.validate()?;
        // Resolved once (one warning on fallback); workers then read the concrete backend.
        config.io = io::resolve(config.io)?;
        let n = config.worker_count()?;
        let policy = Policy::load(&config.policy)?;
        // Fail fast on unreadable TLS material, before binding anything.
        tls::server_config(&config)?;

        let first = io::bind_worker_socket(config.listen)?;
        let local_addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..n {
            // Same port for every worker (resolved if the config asked for port 0).
            sockets.push(io::bind_worker_socket(local_addr)?);
        }
        let mut mailboxes = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for _ in 0..n {
            let (mb, inbox) = Mailbox::new().context("creating worker mailbox")?;
            mailboxes.push(mb);
            inboxes.push(inbox);
        }
        let admin_addr = config.admin;
        let cores = if config.pin_workers { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
        let core_of = |i: usize| (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let worker_cpus: Vec<Option<usize>> = (0..n).map(|i| core_of(i).map(|c| c.id)).collect();
        let (kernel, kernel_counters) = ebpf::attach(&config, &sockets, local_addr.port(), &worker_cpus)?;
        let shared = Arc::new(Shared::new(config, local_addr, policy, n as u8, mailboxes, kernel, kernel_counters));
        shared.metrics.set_io_backend(shared.config.io.as_str());
        let admin = ztna_metrics_http::Endpoint::start(admin_addr, shared.clone())?;
        let nat_test = match shared.config.nat_test.enabled() {
            true => Some(nat_test::NatTestResponder::start(&shared.config.nat_test, &shared.metrics)?),
            false => None,
        };

        let mut workers = Vec::with_capacity(n);
        for (i, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
            let w = worker::Worker::new(i as u8, shared.clone(), socket, inbox)?;
            let core = core_of(i);
            let handle = std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
                if let Some(core) = core
                    && !core_affinity::set_for_current(core)
                {
                    tracing::warn!(worker = i, core = core.id, "could not pin worker to its core");
                }
                w.run()
            })?;
            workers.push(handle);
        }
        tracing::info!(listen = %local_addr, admin = %admin.addr, workers = n, io = %shared.config.io, "relay started");
        Ok(Relay { shared, workers, admin: Some(admin), nat_test })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The NAT-test responder's primary address, when it runs.
    pub fn nat_test_addr(&self) -> Option<SocketAddr> {
        self.nat_test.as_ref().map(|n| n.primary)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// SIGHUP: reload the policy and check the TLS files; workers pick both up.
    pub fn reload(&self) -> Result<()> {
        let cfg = &self.shared.config;
        let result = tls::server_config(cfg).and_then(|_| Policy::load(&cfg.policy));
        let label = |r: &str| metrics::ReasonLabel { reason: r.into() };
        match result {
            Ok(policy) => {
                self.shared.set_policy(policy);
                self.shared.generation.fetch_add(1, Ordering::Relaxed);
                self.shared.wake_all();
                self.shared.metrics.reloads.get_or_create(&label("ok")).inc();
                tracing::info!("reloaded certificates and policy");
                Ok(())
            }
            Err(e) => {
                self.shared.metrics.reloads.get_or_create(&label("failed")).inc();
                Err(e.context("reload failed; keeping the running configuration"))
            }
        }
    }

    /// SIGTERM: close every connection (clients see "relay shutting down"), wait for the
    /// workers up to the drain timeout, and return.
    pub fn drain(mut self) {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.wake_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.nat_test.take();
        self.admin.take();
    }
}
