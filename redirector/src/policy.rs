//! A pod's outbound capture settings and the parsing of their istio-iptables-style flags.
use std::fmt;

pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_PROXY_ID: u32 = 1337;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid port {value:?}: {reason}")]
    Port { value: String, reason: &'static str },
    #[error("invalid {kind} list {value:?}: {reason}")]
    IdList {
        kind: IdKind,
        value: String,
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Uid,
    Gid,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uid => "UID",
            Self::Gid => "GID",
        })
    }
}

/// What a pod captures: outbound TCP goes to `proxy_port` on loopback, except connections
/// made by the proxy's own UIDs or GIDs.
///
/// It also reads from the agent's config file, the CNI plugin's network config and the agent
/// API: keys left out take the defaults, unknown keys and bad values are refused by name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundPolicy {
    #[serde(deserialize_with = "serde_checked::port")]
    pub proxy_port: u16,
    #[serde(deserialize_with = "serde_checked::uids")]
    pub proxy_uids: Vec<u32>,
    #[serde(deserialize_with = "serde_checked::gids")]
    pub proxy_gids: Vec<u32>,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        Self {
            proxy_port: DEFAULT_PROXY_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
        }
    }
}

/// A TCP port, 1 to 65535.
pub fn parse_port(value: &str) -> Result<u16, PolicyError> {
    let error = |reason| PolicyError::Port {
        value: value.to_owned(),
        reason,
    };
    match value.trim().parse::<u32>() {
        Ok(0) => Err(error("port 0 is not a port to listen on; use 1 to 65535")),
        Ok(port) => u16::try_from(port).map_err(|_| error("ports go up to 65535")),
        Err(_) => Err(error("not a number; use 1 to 65535")),
    }
}

/// A comma-separated list of numeric UIDs or GIDs, as istio-iptables' `-u`/`-g` take them.
pub fn parse_id_list(kind: IdKind, value: &str) -> Result<Vec<u32>, PolicyError> {
    let error = |reason: String| PolicyError::IdList {
        kind,
        value: value.to_owned(),
        reason,
    };
    if value.trim().is_empty() {
        return Err(error(format!("empty; give at least one numeric {kind}")));
    }
    let mut ids = Vec::new();
    for item in value.split(',').map(str::trim) {
        match item.parse::<u32>() {
            // (uid_t)-1 means "no id" to the kernel; it can never be a process's owner.
            Ok(u32::MAX) | Err(_) => {
                return Err(error(format!(
                    "{item:?} is not a numeric {kind} (0 to 4294967294)"
                )))
            }
            Ok(id) if !ids.contains(&id) => ids.push(id),
            Ok(_) => {}
        }
    }
    Ok(ids)
}

/// Deserializers that hold structured input (TOML, JSON) to the same rules as the flags.
mod serde_checked {
    use serde::{de::Error as _, Deserialize, Deserializer};

    use super::{parse_id_list, parse_port, IdKind};

    pub fn port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
        let port = i64::deserialize(deserializer)?;
        parse_port(&port.to_string()).map_err(D::Error::custom)
    }

    pub fn uids<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        ids(IdKind::Uid, deserializer)
    }

    pub fn gids<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        ids(IdKind::Gid, deserializer)
    }

    /// A list of numbers, checked as the comma-separated flag value it stands for.
    fn ids<'de, D: Deserializer<'de>>(kind: IdKind, deserializer: D) -> Result<Vec<u32>, D::Error> {
        let ids = Vec::<i64>::deserialize(deserializer)?;
        let joined: Vec<String> = ids.iter().map(i64::to_string).collect();
        parse_id_list(kind, &joined.join(",")).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_in_range_parse() {
        assert_eq!(parse_port("15001"), Ok(15001));
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
    }

    #[test]
    fn ports_out_of_range_or_not_numbers_are_refused() {
        for bad in ["0", "65536", "70000", "-1", "", "http", "15001,15002"] {
            let message = parse_port(bad).unwrap_err().to_string();
            assert!(message.contains("invalid port"), "{bad}: {message}");
        }
    }

    #[test]
    fn id_lists_parse_and_drop_repeats() {
        assert_eq!(parse_id_list(IdKind::Uid, "1337"), Ok(vec![1337]));
        assert_eq!(
            parse_id_list(IdKind::Uid, "1337, 0,1337"),
            Ok(vec![1337, 0])
        );
    }

    #[test]
    fn bad_id_lists_are_refused_naming_the_kind() {
        for bad in [
            "",
            " ",
            "abc",
            "1337,",
            "1337,,1",
            "-1",
            "4294967295",
            "99999999999",
        ] {
            let message = parse_id_list(IdKind::Gid, bad).unwrap_err().to_string();
            assert!(
                message.starts_with("invalid GID list"),
                "{bad:?}: {message}"
            );
        }
    }

    #[test]
    fn structured_policies_take_defaults_and_refuse_bad_values_by_name() {
        let partial: OutboundPolicy = serde_json::from_str(r#"{"proxy_port": 15006}"#).unwrap();
        assert_eq!(
            partial,
            OutboundPolicy {
                proxy_port: 15006,
                ..OutboundPolicy::default()
            }
        );
        for (bad, expected) in [
            (r#"{"proxy_port": 0}"#, "invalid port"),
            (r#"{"proxy_port": 70000}"#, "invalid port"),
            (r#"{"proxy_uids": []}"#, "invalid UID list"),
            (r#"{"proxy_gids": [-1]}"#, "invalid GID list"),
            (r#"{"proxy_gids": [4294967295]}"#, "invalid GID list"),
            (r#"{"proxy_prot": 15001}"#, "unknown field `proxy_prot`"),
        ] {
            let message = serde_json::from_str::<OutboundPolicy>(bad)
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{bad}: {message}");
        }
    }
}
