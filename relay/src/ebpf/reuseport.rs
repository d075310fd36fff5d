//! The `SK_REUSEPORT` steering program: one reuseport group (the workers' sockets on the
//! relay port), one socket per worker index in a `REUSEPORT_SOCKARRAY`, and a program that
//! picks the owner's socket by the rule in `ebpf/steering.h`.

use std::net::UdpSocket;

use anyhow::{Context, Result, anyhow};
use aya::maps::{Array, MapData, PerCpuArray, ReusePortSockArray};
use aya::programs::SkReuseport;
use aya::{Ebpf, EbpfLoader};

use super::maps::{REUSEPORT_OBJECT, ztna_config};

pub struct ReuseportSteering {
    /// Holds the program and the socket array alive for the group's lifetime.
    _ebpf: Ebpf,
    _sockets: ReusePortSockArray<MapData>,
}

impl ReuseportSteering {
    /// Loads the program, fills the socket array with `sockets[i]` as worker `i`, and
    /// attaches it to the group. Attaching replaces any program an earlier relay left on a
    /// group these sockets joined. Returns the steering and its per-CPU counters.
    pub fn attach(sockets: &[UdpSocket]) -> Result<(ReuseportSteering, PerCpuArray<MapData, u64>)> {
        let workers = u8::try_from(sockets.len()).map_err(|_| anyhow!("at most 255 workers"))?;
        let mut ebpf = EbpfLoader::new().load(REUSEPORT_OBJECT).context("loading the SK_REUSEPORT program")?;
        let mut config: Array<MapData, ztna_config> =
            Array::try_from(ebpf.take_map("rp_config").context("rp_config map missing")?)?;
        config.set(0, ztna_config { workers, ..Default::default() }, 0).context("writing rp_config")?;
        let mut array: ReusePortSockArray<MapData> =
            ReusePortSockArray::try_from(ebpf.take_map("sockets").context("sockets map missing")?)?;
        for (i, s) in sockets.iter().enumerate() {
            array.set(i as u32, s, 0).with_context(|| format!("adding worker {i}'s socket to the reuseport array"))?;
        }
        let counters = PerCpuArray::try_from(ebpf.take_map("rp_counters").context("rp_counters map missing")?)?;
        let prog: &mut SkReuseport =
            ebpf.program_mut("ztna_reuseport").context("ztna_reuseport program missing")?.try_into()?;
        prog.load().context("the kernel refused the SK_REUSEPORT program")?;
        prog.attach(&sockets[0]).context("attaching the SK_REUSEPORT program to the worker sockets")?;
        Ok((ReuseportSteering { _ebpf: ebpf, _sockets: array }, counters))
    }
}
