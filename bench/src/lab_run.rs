//! A benchmark run's lab: `deploy/lab/lab.sh` under a prefix of this run's own, the relay host
//! routing between the other two (the kernel-only reference path), and Ctrl-C turned into an
//! orderly unwind (see [`interrupt`](crate::interrupt)) so the namespaces are always removed.

use std::path::Path;

use anyhow::Result;
use ztna_testbed::Lab;

use crate::interrupt;

pub fn up(script: &Path, tag: &str) -> Result<Lab> {
    interrupt::catch_stop_signals();
    let lab = Lab::up_tagged(script, tag)?;
    lab.enable_routing()?;
    Ok(lab)
}
