//! docs/BENCHMARKS.md as the benchmarks write it: each result section sits between a begin
//! and an end marker and is replaced in place when its command runs again; a missing section
//! is appended under its heading, a missing file is created with an introduction.

use std::path::Path;

use anyhow::{Context, Result};

/// Where a section goes: its markers and the heading it is appended under when new.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    pub begin: &'static str,
    pub end: &'static str,
    pub heading: &'static str,
}

const INTRO: &str = "# Benchmarks\n\n\
Measured results for the relay, each section produced by a command in `bench/` (the `ztna-bench` load \
generator) and rewritten in place between its markers when that command runs again. Every run is on the lab \
topology (`deploy/lab/lab.sh`: agent, relay and connector hosts as network namespaces on this machine, joined \
by veth pairs, documentation addresses only), with each process in its host; every run is bounded in time. \
See `bench/README.md` for the commands and what each one measures.\n";

/// Replaces each section in `path` with its text (markers included), or appends it under its
/// heading; creates the file with an intro if it is missing.
pub fn write(path: &Path, sections: &[(Section, String)]) -> Result<()> {
    let mut doc = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => INTRO.to_string(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for (s, text) in sections {
        doc = splice(&doc, s, text);
    }
    std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))
}

fn splice(old: &str, s: &Section, section: &str) -> String {
    let (begin, end) = (s.begin, s.end);
    if let (Some(b), Some(e)) = (old.find(begin), old.find(end))
        && b < e
    {
        let mut tail = &old[e + end.len()..];
        tail = tail.strip_prefix('\n').unwrap_or(tail);
        return format!("{}{}{}", &old[..b], section, tail);
    }
    let mut out = old.to_string();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
    out.push_str(s.heading);
    out.push_str("\n\n");
    out.push_str(section);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_between_markers() {
        let cp = Section { begin: "<!-- a:begin -->", end: "<!-- a:end -->", heading: "## A" };
        let (begin, end) = (cp.begin, cp.end);
        let section = format!("{begin}\nnew\n{end}\n");
        let appended = splice("# Benchmarks\n\nintro\n", &cp, &section);
        assert!(appended.starts_with("# Benchmarks\n\nintro\n\n## A\n\n"));
        assert!(appended.ends_with(&section));
        let doc = format!("head\n{begin}\nold\nstuff\n{end}\ntail\n");
        assert_eq!(splice(&doc, &cp, &section), format!("head\n{begin}\nnew\n{end}\ntail\n"));
        // Idempotent.
        let once = splice(&doc, &cp, &section);
        assert_eq!(splice(&once, &cp, &section), once);
        // A second section lands after the first and leaves it alone.
        let tunnel = Section { begin: "<!-- b:begin -->", end: "<!-- b:end -->", heading: "## B" };
        let t = format!("{}\nt\n{}\n", tunnel.begin, tunnel.end);
        let both = splice(&once, &tunnel, &t);
        assert!(both.starts_with(&once));
        assert!(both.ends_with(&format!("{}\n\n{t}", tunnel.heading)));
        assert_eq!(splice(&both, &tunnel, &t), both);
    }
}
