//! Local forwards: `-L [bind:]port:service` (TCP) and `-U [bind:]port:service` (UDP), like
//! `ssh -L`. Each accepted TCP connection becomes one stream of the service's tunnel; each
//! UDP client address becomes one flow of QUIC DATAGRAMs.

use std::collections::HashMap;
use std::net::SocketAddr;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use ztna_client::engine::agent::AgentEvent;
use ztna_client::tunnel::UDP_FLOW_IDLE;

/// Flow ids are unique across every UDP forward of this agent, so replies find their owner.
static NEXT_FLOW: AtomicU32 = AtomicU32::new(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub bind: SocketAddr,
    pub service: String,
}

/// Parses `[bind:]port:service`; the bind address defaults to 127.0.0.1 and may be an
/// IPv6 address in brackets.
pub fn parse(spec: &str) -> Result<Forward> {
    let (addr, service) = spec.rsplit_once(':').with_context(|| format!("{spec:?}: expected [bind:]port:service"))?;
    if !ztna_proto::control::valid_service_name(service) {
        bail!("{spec:?}: invalid service name {service:?}");
    }
    let bind = if let Ok(port) = addr.parse::<u16>() {
        SocketAddr::from(([127, 0, 0, 1], port))
    } else {
        addr.parse::<SocketAddr>().with_context(|| format!("{spec:?}: bad bind address {addr:?}"))?
    };
    Ok(Forward { bind, service: service.to_owned() })
}

pub async fn serve_tcp(fwd: Forward, events: mpsc::UnboundedSender<AgentEvent>) -> Result<()> {
    let listener = TcpListener::bind(fwd.bind).await.with_context(|| format!("listening on {}", fwd.bind))?;
    tracing::info!(bind = %fwd.bind, service = %fwd.service, "TCP forward ready");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, service = %fwd.service, "local connection");
                    if events.send(AgentEvent::NewTcp { service: fwd.service.clone(), stream }).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            }
        }
    });
    Ok(())
}

pub async fn serve_udp(fwd: Forward, events: mpsc::UnboundedSender<AgentEvent>) -> Result<()> {
    let socket = UdpSocket::bind(fwd.bind).await.with_context(|| format!("binding UDP {}", fwd.bind))?;
    tracing::info!(bind = %fwd.bind, service = %fwd.service, "UDP forward ready");
    let (tx, mut replies) = mpsc::channel::<(u32, Vec<u8>)>(1024);
    events.send(AgentEvent::UdpReturn { service: fwd.service.clone(), tx }).ok().context("engine stopped")?;
    tokio::spawn(async move {
        let mut flows: HashMap<SocketAddr, (u32, Instant)> = HashMap::new();
        let mut peers: HashMap<u32, SocketAddr> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        let mut sweep = tokio::time::interval(UDP_FLOW_IDLE);
        loop {
            tokio::select! {
                _ = sweep.tick() => {
                    let now = Instant::now();
                    flows.retain(|_, (flow, seen)| {
                        let live = now.duration_since(*seen) < UDP_FLOW_IDLE;
                        if !live {
                            peers.remove(flow);
                        }
                        live
                    });
                }
                r = socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    let entry = flows.entry(from).or_insert_with(|| (NEXT_FLOW.fetch_add(1, Ordering::Relaxed), Instant::now()));
                    entry.1 = Instant::now();
                    let flow = entry.0;
                    peers.insert(flow, from);
                    let ev = AgentEvent::UdpIn { service: fwd.service.clone(), flow, data: buf[..n].to_vec() };
                    if events.send(ev).is_err() {
                        return;
                    }
                }
                Some((flow, data)) = replies.recv() => {
                    if let Some(peer) = peers.get(&flow) {
                        let _ = socket.send_to(&data, peer).await;
                    }
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        assert_eq!(parse("8080:web").unwrap(), Forward { bind: "127.0.0.1:8080".parse().unwrap(), service: "web".into() });
        assert_eq!(parse("0.0.0.0:80:web").unwrap().bind, "0.0.0.0:80".parse().unwrap());
        assert_eq!(parse("[::1]:53:dns").unwrap().bind, "[::1]:53".parse().unwrap());
        assert!(parse("web").is_err());
        assert!(parse("80:Web").is_err());
        assert!(parse("x:80:web").is_err());
    }
}
