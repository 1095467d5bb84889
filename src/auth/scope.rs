//! Scopes: what a principal may do. One explicit string per variant, both directions,
//! so an unknown value in the database fails to load instead of becoming free-form.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "jobs:create")]
    JobsCreate,
    #[serde(rename = "jobs:update")]
    JobsUpdate,
    #[serde(rename = "jobs:read")]
    JobsRead,
    #[serde(rename = "health:read")]
    HealthRead,
    #[serde(rename = "stitcher:webhook")]
    StitcherWebhook,
    #[serde(rename = "stitcher:dispatch")]
    StitcherDispatch,
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 7] = [
        Scope::JobsCreate,
        Scope::JobsUpdate,
        Scope::JobsRead,
        Scope::HealthRead,
        Scope::StitcherWebhook,
        Scope::StitcherDispatch,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::JobsCreate => "jobs:create",
            Scope::JobsUpdate => "jobs:update",
            Scope::JobsRead => "jobs:read",
            Scope::HealthRead => "health:read",
            Scope::StitcherWebhook => "stitcher:webhook",
            Scope::StitcherDispatch => "stitcher:dispatch",
            Scope::Admin => "admin",
        }
    }

    /// The 403 detail when a principal lacks this scope (names the scope needed).
    pub fn missing(self) -> &'static str {
        match self {
            Scope::JobsCreate => "missing scope jobs:create for this route",
            Scope::JobsUpdate => "missing scope jobs:update for this route",
            Scope::JobsRead => "missing scope jobs:read for this route",
            Scope::HealthRead => "missing scope health:read for this route",
            Scope::StitcherWebhook => "missing scope stitcher:webhook for this route",
            Scope::StitcherDispatch => "missing scope stitcher:dispatch for this route",
            Scope::Admin => "missing scope admin for this route",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|sc| sc.as_str() == s)
    }

    /// Parse a comma- or space-separated list; `all` or `*` means every scope.
    pub fn parse_list(s: &str) -> Result<Vec<Scope>, String> {
        let mut out = Vec::new();
        for part in s.split([',', ' ']).map(str::trim).filter(|p| !p.is_empty()) {
            if part == "all" || part == "*" {
                return Ok(Scope::ALL.to_vec());
            }
            let sc = Scope::parse(part).ok_or_else(|| format!("unknown scope `{part}`"))?;
            if !out.contains(&sc) {
                out.push(sc);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The storage form of a scope list.
    pub fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::json!(s.as_str()))
            );
        }
        assert_eq!(Scope::parse("jobs:write"), None);
    }

    #[test]
    fn lists() {
        assert_eq!(
            Scope::parse_list("jobs:read, admin").ok(),
            Some(vec![Scope::JobsRead, Scope::Admin])
        );
        assert_eq!(Scope::parse_list("all").ok(), Some(Scope::ALL.to_vec()));
        assert!(Scope::parse_list("jobs:read,nope").is_err());
        assert_eq!(
            Scope::join(&[Scope::JobsRead, Scope::Admin]),
            "jobs:read,admin"
        );
    }
}
