//! Identities: a URI SAN of the form `ztna://<role>/<name>` in an X.509 certificate issued by
//! the deployment's private CA. The relay authorizes on this string alone.

use std::fmt;

use thiserror::Error;

use crate::control::Role;

pub const SCHEME: &str = "ztna://";

/// Who a certificate speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Agent,
    Connector,
    Relay,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Connector => "connector",
            Kind::Relay => "relay",
        }
    }

    pub fn role(self) -> Option<Role> {
        match self {
            Kind::Agent => Some(Role::Agent),
            Kind::Connector => Some(Role::Connector),
            Kind::Relay => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kind: Kind,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("certificate could not be parsed")]
    BadCertificate,
    #[error("certificate has no ztna:// URI subject alternative name")]
    Missing,
    #[error("certificate has more than one ztna:// URI subject alternative name")]
    Ambiguous,
    #[error("invalid identity URI {0:?} (expected ztna://agent|connector|relay/<name>)")]
    Invalid(String),
}

impl Identity {
    pub fn new(kind: Kind, name: &str) -> Result<Self, IdentityError> {
        Self::parse(&format!("{SCHEME}{}/{name}", kind.name()))
    }

    /// Parses `ztna://<kind>/<name>`; names are 1..=64 of `[a-z0-9._-]`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let invalid = || IdentityError::Invalid(uri.chars().take(100).collect());
        let rest = uri.strip_prefix(SCHEME).ok_or_else(invalid)?;
        let (kind, name) = rest.split_once('/').ok_or_else(invalid)?;
        let kind = match kind {
            "agent" => Kind::Agent,
            "connector" => Kind::Connector,
            "relay" => Kind::Relay,
            _ => return Err(invalid()),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            return Err(invalid());
        }
        Ok(Identity { kind, name: name.to_owned() })
    }

    /// The identity in a DER certificate's URI SANs. Exactly one `ztna://` URI is allowed.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::BadCertificate)?;
        let san = cert.subject_alternative_name().map_err(|_| IdentityError::BadCertificate)?;
        let mut found = None;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(SCHEME)
            {
                if found.is_some() {
                    return Err(IdentityError::Ambiguous);
                }
                found = Some(Identity::parse(uri)?);
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.kind.name(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let id = Identity::parse("ztna://agent/alice").unwrap();
        assert_eq!(id.kind, Kind::Agent);
        assert_eq!(id.to_string(), "ztna://agent/alice");
        assert_eq!(Identity::parse("ztna://connector/web-1").unwrap().kind, Kind::Connector);
        for bad in ["ztna://agent/", "ztna://admin/x", "http://agent/a", "ztna://agent/A", "ztna://agent/a/b", "ztna://agent"] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}
