//! Installing the plugin on a node: `redirector-cni` goes into the CNI bin directory, and an
//! entry for it at the end of the plugin chain of the node's network config list (the first
//! `.conflist` in the conf directory, as the container runtime picks it). Uninstalling removes
//! exactly that entry and the binary; every other plugin and key stays as it was.
//!
//! Files are replaced by rename, so a runtime reading them concurrently sees the old or the new
//! version, never a partial one.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{config::PluginConfig, PLUGIN_NAME};
use crate::{
    agent::config::{ConfigError, ConfigFile, ConfigFlags, NodeConfig, NodeFlags},
    atomic_file,
};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not JSON: {source}")]
    NotJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not a network config list: {reason}")]
    NotAConflist { path: PathBuf, reason: &'static str },
    #[error("no .conflist file in {dir}: the primary CNI plugin has not written its config yet (only .conflist files can chain plugins)")]
    NoConflist { dir: PathBuf },
    #[error(
        "the plugin binary {path} does not exist: build redirector-cni or give --plugin-binary"
    )]
    NoPluginBinary { path: PathBuf },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The conflist entry for the plugin: its `type`, then its settings.
pub fn plugin_entry(config: &PluginConfig) -> Value {
    let mut entry = serde_json::Map::new();
    entry.insert("type".into(), PLUGIN_NAME.into());
    if let Value::Object(settings) = serde_json::to_value(config).expect("configs serialize") {
        entry.extend(settings);
    }
    Value::Object(entry)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_NAME)
}

fn plugins_mut<'a>(
    conflist: &'a mut Value,
    path: &Path,
) -> Result<&'a mut Vec<Value>, InstallError> {
    let not_a_conflist = |reason| InstallError::NotAConflist {
        path: path.to_owned(),
        reason,
    };
    conflist
        .as_object_mut()
        .ok_or_else(|| not_a_conflist("not a JSON object"))?
        .get_mut("plugins")
        .ok_or_else(|| not_a_conflist("no \"plugins\" list"))?
        .as_array_mut()
        .ok_or_else(|| not_a_conflist("\"plugins\" is not a list"))
}

/// `conflist` with `entry` last in its chain (an earlier entry of ours is replaced).
pub fn with_plugin(mut conflist: Value, entry: Value, path: &Path) -> Result<Value, InstallError> {
    let plugins = plugins_mut(&mut conflist, path)?;
    plugins.retain(|plugin| !is_ours(plugin));
    plugins.push(entry);
    Ok(conflist)
}

/// `conflist` without our entry.
pub fn without_plugin(mut conflist: Value, path: &Path) -> Result<Value, InstallError> {
    plugins_mut(&mut conflist, path)?.retain(|plugin| !is_ours(plugin));
    Ok(conflist)
}

/// The network config list the runtime uses: the first `.conflist` in name order.
pub fn find_conflist(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut lists: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io_error(conf_dir))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "conflist"))
        .collect();
    lists.sort();
    lists
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConflist {
            dir: conf_dir.to_owned(),
        })
}

fn read_conflist(path: &Path) -> Result<Value, InstallError> {
    let text = fs::read(path).map_err(io_error(path))?;
    serde_json::from_slice(&text).map_err(|source| InstallError::NotJson {
        path: path.to_owned(),
        source,
    })
}

/// Pretty JSON with a final newline, as the conflists of most CNI plugins are written.
pub fn render(conflist: &Value) -> String {
    let mut text = serde_json::to_string_pretty(conflist).expect("JSON values serialize");
    text.push('\n');
    text
}

fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    atomic_file::replace(path, bytes, mode).map_err(io_error(path))
}

/// `redirector install-cni` and `uninstall-cni`.
#[derive(Clone, Debug, clap::Args)]
pub struct InstallCniFlags {
    #[command(flatten)]
    pub config: ConfigFlags,
    /// The container runtime's CNI plugin directory [default: /opt/cni/bin].
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// The directory of network configs [default: /etc/cni/net.d].
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// The conflist to edit [default: the first .conflist in --cni-conf-dir].
    #[arg(long)]
    pub conflist: Option<PathBuf>,
    /// The redirector-cni binary to copy [default: next to this redirector binary].
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallSetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("locating the running redirector binary: {0}")]
    CurrentExe(io::Error),
}

/// What to install where.
#[derive(Clone, Debug)]
pub struct Installation {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// A conflist to edit; None: the one the runtime uses ([`find_conflist`]).
    pub conflist: Option<PathBuf>,
    pub plugin_binary: PathBuf,
    pub config: PluginConfig,
}

/// Where an installation put or removed things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReport {
    pub binary: PathBuf,
    pub conflist: PathBuf,
}

impl Installation {
    /// From the node's config file and flags: the entry points the plugin at the agent's socket
    /// and carries the node's cgroup layout and skipped namespaces.
    pub fn from_flags(
        node: &NodeFlags,
        flags: &InstallCniFlags,
    ) -> Result<Self, InstallSetupError> {
        let file = ConfigFile::load(flags.config.config.as_deref())?;
        let config = NodeConfig::resolve(&file, node, &flags.config)?;
        let plugin_binary = match &flags.plugin_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(InstallSetupError::CurrentExe)?
                .with_file_name(PLUGIN_NAME),
        };
        Ok(Self {
            bin_dir: flags.cni_bin_dir.clone().unwrap_or(config.cni_bin_dir),
            conf_dir: flags.cni_conf_dir.clone().unwrap_or(config.cni_conf_dir),
            conflist: flags.conflist.clone(),
            plugin_binary,
            config: PluginConfig {
                agent_socket: config.socket,
                cgroup_root: Some(config.cgroup_root),
                cgroup_driver: config.cgroup_driver,
                skip_namespaces: config.skip_namespaces,
                policy: None,
                log_file: None,
                log_level: None,
                timeout_seconds: None,
            },
        })
    }

    fn conflist(&self) -> Result<PathBuf, InstallError> {
        match &self.conflist {
            Some(path) => Ok(path.clone()),
            None => find_conflist(&self.conf_dir),
        }
    }

    /// Copies the binary, then chains the plugin (in that order: the runtime must find the
    /// binary as soon as the conflist names it).
    pub fn install(&self) -> Result<InstallReport, InstallError> {
        let conflist_path = self.conflist()?;
        let conflist = read_conflist(&conflist_path)?;
        let chained = with_plugin(conflist, plugin_entry(&self.config), &conflist_path)?;
        let binary = fs::read(&self.plugin_binary).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => InstallError::NoPluginBinary {
                path: self.plugin_binary.clone(),
            },
            _ => io_error(&self.plugin_binary)(e),
        })?;
        let installed = self.bin_dir.join(PLUGIN_NAME);
        replace_file(&installed, &binary, 0o755)?;
        replace_file(&conflist_path, render(&chained).as_bytes(), 0o644)?;
        Ok(InstallReport {
            binary: installed,
            conflist: conflist_path,
        })
    }

    /// Unchains the plugin, then removes the binary. Idempotent.
    pub fn uninstall(&self) -> Result<InstallReport, InstallError> {
        let conflist_path = self.conflist()?;
        let conflist = read_conflist(&conflist_path)?;
        let chained = plugins_mut(&mut conflist.clone(), &conflist_path)?
            .iter()
            .any(is_ours);
        if chained {
            let unchained = without_plugin(conflist, &conflist_path)?;
            replace_file(&conflist_path, render(&unchained).as_bytes(), 0o644)?;
        }
        let installed = self.bin_dir.join(PLUGIN_NAME);
        match fs::remove_file(&installed) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(&installed)(e)),
            _ => {}
        }
        Ok(InstallReport {
            binary: installed,
            conflist: conflist_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::cgroup::CgroupDriver;

    /// Golden files: `<case>.conflist` and what installing gives, `<case>.installed.conflist`.
    fn golden(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/cni")
            .join(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn node_config() -> PluginConfig {
        PluginConfig::from_keys(
            &serde_json::from_value(serde_json::json!({
                "agentSocket": "/run/redirector/agent.sock",
                "cgroupRoot": "/sys/fs/cgroup",
                "cgroupDriver": "systemd",
                "skipNamespaces": ["kube-system"],
            }))
            .unwrap(),
        )
        .unwrap()
    }

    fn installed(before: &str) -> String {
        let conflist = serde_json::from_str(before).unwrap();
        render(&with_plugin(conflist, plugin_entry(&node_config()), Path::new("x")).unwrap())
    }

    fn uninstalled(after: &str) -> String {
        let conflist = serde_json::from_str(after).unwrap();
        render(&without_plugin(conflist, Path::new("x")).unwrap())
    }

    #[test]
    fn goes_last_in_a_chain_with_portmap_and_comes_out_again() {
        let before = golden("bridge-portmap.conflist");
        let after = golden("bridge-portmap.installed.conflist");
        assert_eq!(installed(&before), after);
        assert_eq!(installed(&after), after, "installing twice changes nothing");
        assert_eq!(uninstalled(&after), before);
        assert_eq!(
            uninstalled(&before),
            before,
            "uninstalling twice changes nothing"
        );
    }

    #[test]
    fn an_older_entry_is_replaced_and_moved_last() {
        let stale = golden("stale-entry.conflist");
        let after = golden("stale-entry.installed.conflist");
        assert_eq!(installed(&stale), after);
    }

    #[test]
    fn a_single_plugin_chain() {
        let before = golden("flannel.conflist");
        let after = golden("flannel.installed.conflist");
        assert_eq!(installed(&before), after);
        assert_eq!(uninstalled(&after), before);
    }

    #[test]
    fn what_is_not_a_conflist_is_refused() {
        for (text, reason) in [
            ("[]", "not a JSON object"),
            (
                r#"{"cniVersion":"1.0.0","type":"bridge"}"#,
                "no \"plugins\" list",
            ),
            (r#"{"plugins":{}}"#, "is not a list"),
        ] {
            let conflist = serde_json::from_str(text).unwrap();
            let message = with_plugin(conflist, Value::Null, Path::new("10-x.conflist"))
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(reason) && message.contains("10-x.conflist"),
                "{message}"
            );
        }
    }

    #[test]
    fn installs_into_directories_and_uninstalls() {
        let scratch =
            std::env::temp_dir().join(format!("redirector-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        let (bin_dir, conf_dir) = (scratch.join("bin"), scratch.join("net.d"));
        fs::create_dir_all(&bin_dir).unwrap();
        fs::create_dir_all(&conf_dir).unwrap();
        let plugin_binary = scratch.join("redirector-cni-built");
        fs::write(&plugin_binary, b"#!/bin/true\n").unwrap();
        let before = golden("bridge-portmap.conflist");
        fs::write(conf_dir.join("10-bridge.conflist"), &before).unwrap();
        fs::write(conf_dir.join("99-other.conflist"), &before).unwrap();
        fs::write(conf_dir.join("05-single.conf"), "{}").unwrap();
        let installation = Installation {
            bin_dir: bin_dir.clone(),
            conf_dir: conf_dir.clone(),
            conflist: None,
            plugin_binary: plugin_binary.clone(),
            config: PluginConfig {
                cgroup_driver: CgroupDriver::Systemd,
                ..node_config()
            },
        };

        let report = installation.install().unwrap();
        assert_eq!(report.conflist, conf_dir.join("10-bridge.conflist"));
        assert_eq!(
            fs::read_to_string(&report.conflist).unwrap(),
            golden("bridge-portmap.installed.conflist")
        );
        assert_eq!(
            fs::read_to_string(conf_dir.join("99-other.conflist")).unwrap(),
            before
        );
        assert_eq!(fs::read(&report.binary).unwrap(), b"#!/bin/true\n");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&report.binary).unwrap().permissions().mode() & 0o777,
            0o755
        );

        installation.uninstall().unwrap();
        installation.uninstall().unwrap();
        assert_eq!(fs::read_to_string(&report.conflist).unwrap(), before);
        assert!(!report.binary.exists());
        let leftovers: Vec<_> = fs::read_dir(&conf_dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 3, "no temporary files left: {leftovers:?}");

        let missing_binary = Installation {
            plugin_binary: scratch.join("nope"),
            ..installation.clone()
        };
        let message = missing_binary.install().unwrap_err().to_string();
        assert!(message.contains("nope"), "{message}");
        assert_eq!(
            fs::read_to_string(&report.conflist).unwrap(),
            before,
            "nothing half-applied"
        );
        let empty = Installation {
            conf_dir: bin_dir.clone(),
            ..installation
        };
        assert!(matches!(
            empty.install(),
            Err(InstallError::NoConflist { .. })
        ));
        fs::remove_dir_all(&scratch).unwrap();
    }
}
