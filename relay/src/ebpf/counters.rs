//! The programs' per-CPU counters, summed over CPUs at scrape time (no cost on the packet
//! path beyond one per-CPU increment) and exposed as Prometheus counters.

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use super::maps::*;

/// (counter index, label) of the XDP program's `counters`.
pub const XDP_RESULTS: [(u32, &str); 12] = [
    (ZTNA_XDP_FORWARD_TX, "forwarded_tx"),
    (ZTNA_XDP_FORWARD_REDIRECT, "forwarded_redirect"),
    (ZTNA_XDP_STEER_CPU, "steered_cpu"),
    (ZTNA_XDP_PASS, "passed"),
    (ZTNA_XDP_PASS_FAMILY, "passed_family_change"),
    (ZTNA_XDP_PASS_NO_ROUTE, "passed_no_route"),
    (ZTNA_XDP_PASS_UNMIRRORED, "passed_unmirrored"),
    (ZTNA_XDP_DROP_MALFORMED, "dropped_malformed"),
    (ZTNA_XDP_DROP_FRAGMENT, "dropped_fragment"),
    (ZTNA_XDP_DROP_BLOCKED, "dropped_blocklisted"),
    (ZTNA_XDP_DROP_UNKNOWN_SESSION, "dropped_unknown_session"),
    (ZTNA_XDP_DROP_SPOOFED, "dropped_unbound_source"),
];

/// (counter index, label) of the SK_REUSEPORT program's `rp_counters`.
pub const REUSEPORT_RESULTS: [(u32, &str); 4] = [
    (ZTNA_RP_BY_ID, "by_id"),
    (ZTNA_RP_BY_HASH, "by_dcid_hash"),
    (ZTNA_RP_DEFAULT, "kernel_default"),
    (ZTNA_RP_NO_SOCKET, "no_socket"),
];

#[derive(Default)]
pub struct KernelCounters {
    pub xdp: Option<PerCpuArray<MapData, u64>>,
    pub reuseport: Option<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounters").field("xdp", &self.xdp.is_some()).field("reuseport", &self.reuseport.is_some()).finish()
    }
}

/// Sum of one counter over every CPU (0 if the map cannot be read).
pub fn total(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
}

impl KernelCounters {
    /// Current XDP totals by label, for tests and tools.
    pub fn xdp_totals(&self) -> Vec<(&'static str, u64)> {
        let Some(m) = &self.xdp else { return Vec::new() };
        XDP_RESULTS.iter().map(|&(i, name)| (name, total(m, i))).collect()
    }
}

fn encode_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    map: &PerCpuArray<MapData, u64>,
    results: &[(u32, &'static str)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for &(index, label) in results {
        let labels = [("result", label)];
        let family = metric.encode_family(&labels)?;
        ConstCounter::new(total(map, index)).encode(family)?;
    }
    Ok(())
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(m) = &self.xdp {
            encode_family(&mut encoder, "xdp_packets", "Packets to the relay port seen by the XDP program, by result (summed over CPUs)", m, &XDP_RESULTS)?;
        }
        if let Some(m) = &self.reuseport {
            encode_family(&mut encoder, "reuseport_steering", "Datagrams the SK_REUSEPORT program placed, by how the worker was chosen", m, &REUSEPORT_RESULTS)?;
        }
        Ok(())
    }
}
