//! A development PKI: the CA, the relay's certificate and client identities that
//! `ztna-relay pki init` writes into one directory, and the relay's policy file beside them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use ztna_client::ClientTls;

use crate::tempdir::TempDir;

/// Who `ztna-relay pki init` makes certificates for.
#[derive(Debug, Clone, Copy)]
pub struct Identities<'a> {
    pub agents: &'a [&'a str],
    pub connectors: &'a [&'a str],
}

pub struct Pki {
    dir: PathBuf,
    /// Set when the PKI lives in a directory of its own, removed with it.
    _owned: Option<TempDir>,
}

impl Pki {
    /// `ztna-relay pki init` (with `relay_bin`) in a new temporary directory, removed on drop.
    /// Logs of the processes a test starts go there too.
    pub fn create(relay_bin: &Path, tag: &str, ids: Identities) -> Result<Pki> {
        let tmp = TempDir::new(tag)?;
        init(relay_bin, tmp.path(), ids)?;
        Ok(Pki { dir: tmp.path().to_path_buf(), _owned: Some(tmp) })
    }

    /// `ztna-relay pki init` in `dir` (created if missing, kept on drop).
    pub fn create_in(relay_bin: &Path, dir: &Path, ids: Identities) -> Result<Pki> {
        init(relay_bin, dir, ids)?;
        Ok(Pki::open(dir))
    }

    /// A PKI someone else made (e.g. a `--pki-dir` option).
    pub fn open(dir: &Path) -> Pki {
        Pki { dir: dir.to_path_buf(), _owned: None }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A file of the PKI (`relay.pem`, `ca.pem`, `policy.toml`, ...).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Replaces the relay's policy.
    pub fn set_policy(&self, text: &str) -> Result<()> {
        let path = self.file("policy.toml");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The client identity `kind`/`name` (`agent`/`alice`); errors name the missing file.
    pub fn tls(&self, kind: &str, name: &str) -> Result<ClientTls> {
        let tls = ClientTls::from_pki_dir(&self.dir, kind, name);
        for (what, p) in [("certificate", &tls.cert), ("key", &tls.key), ("CA", &tls.ca)] {
            if !p.exists() {
                bail!(
                    "{kind} {name}: {what} {} does not exist (create the PKI with `ztna-relay pki init --dir {} --{kind} {name}`)",
                    p.display(),
                    self.dir.display()
                );
            }
        }
        Ok(tls)
    }
}

fn init(relay_bin: &Path, dir: &Path, ids: Identities) -> Result<()> {
    let mut cmd = Command::new(relay_bin);
    cmd.args(["pki", "init", "--dir"]).arg(dir);
    for a in ids.agents {
        cmd.args(["--agent", a]);
    }
    for c in ids.connectors {
        cmd.args(["--connector", c]);
    }
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {} pki init", relay_bin.display()))?;
    if !out.status.success() {
        bail!("`{} pki init --dir {}` failed ({}): {}", relay_bin.display(), dir.display(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
