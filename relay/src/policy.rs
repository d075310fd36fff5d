//! The access policy: for each service, which agent identities may reach it and which
//! connector identities may serve it. Deny by default: an identity or service the file does
//! not name gets nothing.
//!
//! ```toml
//! [services.web]
//! agents = ["ztna://agent/alice", "ztna://agent/*"]   # "*" matches any name of that kind
//! connectors = ["ztna://connector/web-1"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use ztna_proto::control::valid_service_name;
use ztna_proto::identity::{Identity, Kind};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    services: BTreeMap<String, ServiceRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceRule {
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    connectors: Vec<String>,
}

/// One entry of an allow list: a single identity or every identity of a kind.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(Identity),
    AnyOf(Kind),
}

impl Pattern {
    fn parse(s: &str, kind: Kind) -> Result<Self> {
        let any = format!("ztna://{}/*", kind.name());
        if s == any {
            return Ok(Pattern::AnyOf(kind));
        }
        let id = Identity::parse(s).with_context(|| format!("policy entry {s:?}"))?;
        if id.kind != kind {
            bail!("policy entry {s:?} is a {}, listed where a {} belongs", id.kind.name(), kind.name());
        }
        Ok(Pattern::Exact(id))
    }

    fn matches(&self, id: &Identity) -> bool {
        match self {
            Pattern::Exact(p) => p == id,
            Pattern::AnyOf(k) => *k == id.kind,
        }
    }
}

#[derive(Debug, Default)]
pub struct Policy {
    /// service -> (agents, connectors)
    services: BTreeMap<String, (Vec<Pattern>, Vec<Pattern>)>,
}

/// The answer to "may this identity use this service".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    UnknownService,
    NotAuthorized,
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading policy {}", path.display()))?;
        Policy::parse(&text).with_context(|| format!("in policy {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Policy> {
        let file: PolicyFile = toml::from_str(text)?;
        let mut services = BTreeMap::new();
        for (name, rule) in file.services {
            if !valid_service_name(&name) {
                bail!("invalid service name {name:?} (1-63 of a-z 0-9 . _ -)");
            }
            let agents = rule.agents.iter().map(|s| Pattern::parse(s, Kind::Agent)).collect::<Result<_>>()?;
            let connectors =
                rule.connectors.iter().map(|s| Pattern::parse(s, Kind::Connector)).collect::<Result<_>>()?;
            services.insert(name, (agents, connectors));
        }
        Ok(Policy { services })
    }

    /// May `id` use `service` in its role (reach it as an agent, serve it as a connector)?
    pub fn decide(&self, id: &Identity, service: &str) -> Decision {
        let Some((agents, connectors)) = self.services.get(service) else { return Decision::UnknownService };
        let list = match id.kind {
            Kind::Agent => agents,
            Kind::Connector => connectors,
            Kind::Relay => return Decision::NotAuthorized,
        };
        if list.iter().any(|p| p.matches(id)) { Decision::Allow } else { Decision::NotAuthorized }
    }

    /// Every service `id` may use in its role, sorted.
    pub fn services_for(&self, id: &Identity) -> Vec<String> {
        self.services.keys().filter(|s| self.decide(id, s) == Decision::Allow).cloned().collect()
    }

    /// Whether the policy names this identity at all (an unknown identity is refused outright).
    pub fn knows(&self, id: &Identity) -> bool {
        !self.services_for(id).is_empty()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[services.web]
agents = ["ztna://agent/alice"]
connectors = ["ztna://connector/web-1", "ztna://connector/web-2"]
[services.db]
agents = ["ztna://agent/*"]
connectors = ["ztna://connector/db-1"]
"#;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    #[test]
    fn decisions() {
        let p = Policy::parse(POLICY).unwrap();
        assert_eq!(p.decide(&id("ztna://agent/alice"), "web"), Decision::Allow);
        assert_eq!(p.decide(&id("ztna://agent/bob"), "web"), Decision::NotAuthorized);
        assert_eq!(p.decide(&id("ztna://agent/bob"), "db"), Decision::Allow);
        assert_eq!(p.decide(&id("ztna://agent/bob"), "mail"), Decision::UnknownService);
        assert_eq!(p.decide(&id("ztna://connector/web-2"), "web"), Decision::Allow);
        assert_eq!(p.decide(&id("ztna://connector/web-2"), "db"), Decision::NotAuthorized);
        assert_eq!(p.services_for(&id("ztna://agent/alice")), vec!["db".to_string(), "web".to_string()]);
        assert!(!p.knows(&id("ztna://connector/mallory")));
    }

    #[test]
    fn rejects_bad_files() {
        assert!(Policy::parse("[services.Web]\nagents=[]").is_err());
        assert!(Policy::parse("[services.web]\nagents=[\"ztna://connector/x\"]").is_err());
        assert!(Policy::parse("[services.web]\nagent=[]").is_err());
    }
}
