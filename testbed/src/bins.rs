//! Where the workspace's binaries are: next to the running executable (a benchmark binary in
//! `target/release/`), or one directory up (a test executable in `target/<profile>/deps/`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The command that builds every binary the tests start.
pub const BUILD_HINT: &str = "cargo build --workspace --bins (add --release for ztna-bench's binaries)";

/// Path of workspace binary `name`, from the running executable's directory or its parent.
pub fn find(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let dir = exe.parent().context("the running executable has no parent directory")?;
    let candidates = [Some(dir), dir.parent()];
    for d in candidates.into_iter().flatten() {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("the {name} binary is missing next to {}: build it first with `{BUILD_HINT}`", exe.display())
}

/// `explicit` when given (it must exist), [`find`] otherwise.
pub fn find_or(explicit: Option<&Path>, name: &str) -> Result<PathBuf> {
    match explicit {
        Some(p) if p.is_file() => Ok(p.to_path_buf()),
        Some(p) => bail!("{name} binary {} does not exist", p.display()),
        None => find(name),
    }
}

/// Whether `program` is on PATH (an external tool: trafgen, nft, ...).
pub fn on_path(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Path of `ztna-delayline` (testbed/src/bin/ztna-delayline.rs), the user-space layer-2 delay
/// line that labs put on a link for a one-way delay (the kernel here has no `tc netem`).
pub fn delayline() -> Result<PathBuf> {
    find("ztna-delayline")
}
