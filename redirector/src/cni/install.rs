//! Installing the plugin on a node: `redirector-cni` goes into the CNI bin directory, and an
//! entry for it at the end of the plugin chain of the network config the container runtime uses:
//! the lexically first `.conf`, `.conflist` or `.json` file of the conf directory (libcni's
//! `ConfFiles` and a sort, as containerd and CRI-O pick it; files that do not parse are skipped,
//! as CRI-O does). A single-plugin `.conf` (Multus' `00-multus.conf`, OVN-Kubernetes) becomes a
//! `.conflist` holding that plugin and ours, as istio-cni does. Uninstalling removes exactly our
//! entry and the binary; every other plugin and key stays as it was.
//!
//! Primary CNIs rewrite their config when they restart, dropping our entry: the agent's
//! `chain_cni` watches the directory ([`watch`]) and chains again. Every rewrite is a
//! compare-and-swap that never loses a concurrent write of the primary: the new version is
//! swapped in with `renameat2(RENAME_EXCHANGE)`, and if what came out is not what was read, that
//! newer version is chained and swapped in in turn. Writes go through a symlink to its target
//! and keep the file's mode. A runtime reading concurrently sees a whole version, never a part.
use std::{
    fs, io,
    os::{
        fd::AsFd as _,
        unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::{
    errno::Errno,
    fcntl::{renameat2, RenameFlags, AT_FDCWD},
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};
use serde_json::Value;

use super::{annotations, config::PluginConfig, PLUGIN_NAME};
use crate::{
    agent::config::{ConfigError, ConfigFile, ConfigFlags, NodeConfig, NodeFlags},
    atomic_file::{self, Durability},
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
    #[error("no network config (.conf, .conflist or .json) in {dir}: the primary CNI plugin has not written its config yet")]
    NoConflist { dir: PathBuf },
    #[error("{path} kept changing while it was being chained; will try again")]
    Contended { path: PathBuf },
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

/// The conflist entry for the plugin: its `type`, the capability that has the runtime pass
/// the pod's annotations, then its settings.
pub fn plugin_entry(config: &PluginConfig) -> Value {
    let mut entry = serde_json::Map::new();
    entry.insert("type".into(), PLUGIN_NAME.into());
    entry.insert(
        "capabilities".into(),
        serde_json::json!({ annotations::CAPABILITY: true }),
    );
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

/// The extensions libcni's `ConfFiles` takes, as containerd and CRI-O call it.
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The network config the runtime uses: the first `.conf`, `.conflist` or `.json` file in name
/// order that is a valid config (a list with plugins, or one plugin with a `type`).
pub fn find_conflist(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(conf_dir).map_err(io_error(conf_dir))? {
        let entry = entry.map_err(io_error(conf_dir))?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| CONFIG_EXTENSIONS.contains(&ext));
        // libcni skips directories (a symlink to a file is a file).
        if wanted && !entry.file_type().is_ok_and(|t| t.is_dir()) {
            files.push(path);
        }
    }
    files.sort();
    files
        .into_iter()
        .find(|path| match read_conflist(path).map(|config| kind_of(&config)) {
            Ok(Some(_)) => true,
            Ok(None) | Err(_) => {
                tracing::warn!(file = %path.display(), "not a network config; the runtime skips it too");
                false
            }
        })
        .ok_or_else(|| InstallError::NoConflist {
            dir: conf_dir.to_owned(),
        })
}

/// A network config list, or a single plugin's config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConfigKind {
    List,
    Single,
}

fn kind_of(config: &Value) -> Option<ConfigKind> {
    let object = config.as_object()?;
    if object
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|plugins| !plugins.is_empty())
    {
        Some(ConfigKind::List)
    } else if object.get("type").and_then(Value::as_str).is_some() {
        Some(ConfigKind::Single)
    } else {
        None
    }
}

/// A single plugin's config as a list holding it, with the list's name and version taken from
/// it (libcni's `ConfListFromConf`).
fn as_list(single: Value) -> Value {
    serde_json::json!({
        "cniVersion": single.get("cniVersion").cloned().unwrap_or(Value::Null),
        "name": single.get("name").cloned().unwrap_or(Value::Null),
        "plugins": [single],
    })
}

/// What chaining did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chained {
    /// Our entry was there already, as wanted.
    Already(PathBuf),
    /// The file was rewritten with our entry.
    Rewritten(PathBuf),
    /// A single plugin's `.conf` was replaced by this `.conflist`.
    Converted { from: PathBuf, to: PathBuf },
}

/// Most rounds of a compare-and-swap before giving up until the next change.
const SWAP_ROUNDS: usize = 8;

/// Chains `entry` into the network config at `path` (see the module's doc).
pub fn chain(path: &Path, entry: &Value) -> Result<Chained, InstallError> {
    chain_with(path, entry, &mut || {})
}

/// [`chain`], with `between` called after reading and before swapping (tests race it).
fn chain_with(
    path: &Path,
    entry: &Value,
    between: &mut dyn FnMut(),
) -> Result<Chained, InstallError> {
    let config = read_conflist(path)?;
    match kind_of(&config) {
        Some(ConfigKind::Single) => convert(path, entry),
        _ => {
            let changed = swap(path, between, &mut |config| {
                let chained = with_plugin(config.clone(), entry.clone(), path)?;
                Ok((chained != *config).then_some(chained))
            })?;
            Ok(if changed {
                Chained::Rewritten(path.to_owned())
            } else {
                Chained::Already(path.to_owned())
            })
        }
    }
}

/// Replaces a single plugin's `.conf` by a `.conflist` with it and our entry: the list is
/// written first (the runtime still reads the `.conf`, lexically before it), then the `.conf`
/// is removed if it is still what was converted; if it changed meanwhile it is put back.
fn convert(path: &Path, entry: &Value) -> Result<Chained, InstallError> {
    let original = fs::read(path).map_err(io_error(path))?;
    let single: Value =
        serde_json::from_slice(&original).map_err(|source| InstallError::NotJson {
            path: path.to_owned(),
            source,
        })?;
    let list = with_plugin(as_list(single), entry.clone(), path)?;
    let to = path.with_extension("conflist");
    let mode = fs::metadata(path)
        .map_err(io_error(path))?
        .permissions()
        .mode()
        & 0o7777;
    replace_file(&to, render(&list).as_bytes(), mode)?;
    let aside = hidden(path, "converted");
    fs::rename(path, &aside).map_err(io_error(path))?;
    let removed = fs::read(&aside).map_err(io_error(&aside))?;
    if removed == original {
        fs::remove_file(&aside).map_err(io_error(&aside))?;
        return Ok(Chained::Converted {
            from: path.to_owned(),
            to,
        });
    }
    // The primary wrote a new .conf meanwhile: it goes back (unless an even newer one is
    // there), and the next round converts that.
    match renameat2(
        AT_FDCWD,
        &aside,
        AT_FDCWD,
        path,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => {}
        Err(Errno::EEXIST) => fs::remove_file(&aside).map_err(io_error(&aside))?,
        Err(errno) => return Err(io_error(path)(errno.into())),
    }
    Err(InstallError::Contended {
        path: path.to_owned(),
    })
}

fn hidden(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Rewrites the file at `path` (through a symlink, keeping its mode) with `transform`'s output
/// until no concurrent write was displaced; false when `transform` had nothing to change.
fn swap(
    path: &Path,
    between: &mut dyn FnMut(),
    transform: &mut dyn FnMut(&Value) -> Result<Option<Value>, InstallError>,
) -> Result<bool, InstallError> {
    let target = fs::canonicalize(path).map_err(io_error(path))?;
    let mode = fs::metadata(&target)
        .map_err(io_error(&target))?
        .permissions()
        .mode()
        & 0o7777;
    let mut expected = fs::read(&target).map_err(io_error(&target))?;
    let mut base = expected.clone();
    let mut changed = false;
    for _ in 0..SWAP_ROUNDS {
        let config: Value =
            serde_json::from_slice(&base).map_err(|source| InstallError::NotJson {
                path: path.to_owned(),
                source,
            })?;
        let Some(desired) = transform(&config)? else {
            return Ok(changed);
        };
        let desired = render(&desired).into_bytes();
        let temporary = hidden(&target, "swap");
        write_new(&temporary, &desired, mode)?;
        between();
        let exchanged = renameat2(
            AT_FDCWD,
            &temporary,
            AT_FDCWD,
            &target,
            RenameFlags::RENAME_EXCHANGE,
        );
        if let Err(errno) = exchanged {
            let _ = fs::remove_file(&temporary);
            return Err(io_error(&target)(errno.into()));
        }
        changed = true;
        let displaced = fs::read(&temporary).map_err(io_error(&temporary))?;
        fs::remove_file(&temporary).map_err(io_error(&temporary))?;
        if displaced == expected {
            return Ok(true);
        }
        // A concurrent write came out of the file: chain it in turn, expecting ours back.
        tracing::info!(file = %target.display(), "the network config changed while being chained; chaining the new version");
        base = displaced;
        expected = desired;
    }
    Err(InstallError::Contended {
        path: path.to_owned(),
    })
}

/// A new file with `bytes`, synced, mode `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(path))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(bytes))
        .and_then(|()| file.sync_all())
        .map_err(io_error(path))
}

/// Keeps redirector chained in `conf_dir` until `stop` is set: chains now, then again whenever
/// a file of the directory changes (and every `resync`, in case an event was missed).
pub fn watch(
    conf_dir: &Path,
    entry: &Value,
    resync: Duration,
    stop: &AtomicBool,
    on_chained: &dyn Fn(Result<&Chained, &InstallError>),
) -> Result<(), InstallError> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| io_error(conf_dir)(e.into()))?;
    inotify
        .add_watch(
            conf_dir,
            AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_ATTRIB,
        )
        .map_err(|e| io_error(conf_dir)(e.into()))?;
    let mut last_sync = std::time::Instant::now() - resync;
    let mut dirty = true;
    while !stop.load(Ordering::Relaxed) {
        if dirty || last_sync.elapsed() >= resync {
            let result = find_conflist(conf_dir).and_then(|path| chain(&path, entry));
            on_chained(result.as_ref());
            last_sync = std::time::Instant::now();
        }
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let ready =
            poll(&mut fds, PollTimeout::from(500u16)).map_err(|e| io_error(conf_dir)(e.into()))?;
        // Our own writes come back as events too: the next round finds the entry in place.
        dirty = ready > 0 && inotify.read_events().is_ok_and(|events| !events.is_empty());
    }
    Ok(())
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
    atomic_file::replace(path, bytes, mode, Durability::AcrossReboots).map_err(io_error(path))
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
            bin_dir: flags
                .cni_bin_dir
                .clone()
                .unwrap_or(config.cni_bin_dir.clone()),
            conf_dir: flags
                .cni_conf_dir
                .clone()
                .unwrap_or(config.cni_conf_dir.clone()),
            conflist: flags.conflist.clone(),
            plugin_binary,
            config: Self::plugin_config(&config),
        })
    }

    /// The plugin's conflist entry for a node: the agent's socket, the cgroup layout and the
    /// skipped namespaces.
    pub fn plugin_config(config: &NodeConfig) -> PluginConfig {
        PluginConfig {
            agent_socket: config.socket.clone(),
            cgroup_root: Some(config.cgroup_root.clone()),
            cgroup_driver: config.cgroup_driver,
            skip_namespaces: config.skip_namespaces.clone(),
            pod_selection: config.pod_selection,
            policy: None,
            log_file: None,
            log_level: None,
            timeout_seconds: None,
        }
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
        if kind_of(&conflist).is_none() {
            with_plugin(conflist, Value::Null, &conflist_path)?;
        }
        let binary = fs::read(&self.plugin_binary).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => InstallError::NoPluginBinary {
                path: self.plugin_binary.clone(),
            },
            _ => io_error(&self.plugin_binary)(e),
        })?;
        let installed = self.bin_dir.join(PLUGIN_NAME);
        replace_file(&installed, &binary, 0o755)?;
        let conflist = match chain(&conflist_path, &plugin_entry(&self.config))? {
            Chained::Already(path) | Chained::Rewritten(path) => path,
            Chained::Converted { to, .. } => to,
        };
        Ok(InstallReport {
            binary: installed,
            conflist,
        })
    }

    /// Unchains the plugin, then removes the binary. Idempotent.
    pub fn uninstall(&self) -> Result<InstallReport, InstallError> {
        let conflist_path = self.conflist()?;
        let conflist = read_conflist(&conflist_path)?;
        if kind_of(&conflist) == Some(ConfigKind::List) {
            swap(&conflist_path, &mut || {}, &mut |config| {
                let unchained = without_plugin(config.clone(), &conflist_path)?;
                Ok((unchained != *config).then_some(unchained))
            })?;
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

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("redirector-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry() -> Value {
        plugin_entry(&node_config())
    }

    /// The runtime's choice: the first .conf, .conflist or .json by name, whatever the kind.
    #[test]
    fn the_runtimes_config_is_chosen_and_a_single_plugin_conf_is_converted() {
        let dir = scratch("multus");
        let multus = serde_json::json!({
            "cniVersion": "0.3.1", "name": "multus-cni-network", "type": "multus",
            "kubeconfig": "/etc/cni/net.d/multus.d/multus.kubeconfig",
            "delegates": [{"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": [{"type": "calico"}]}]
        });
        fs::write(dir.join("00-multus.conf"), multus.to_string()).unwrap();
        fs::write(dir.join("10-calico.conflist"), golden("flannel.conflist")).unwrap();
        fs::write(dir.join(".00-a.conf.new"), "{}").unwrap();
        fs::create_dir(dir.join("000.conf")).unwrap();
        let chosen = find_conflist(&dir).unwrap();
        assert_eq!(chosen, dir.join("00-multus.conf"));
        assert_eq!(
            chain(&chosen, &entry()).unwrap(),
            Chained::Converted {
                from: dir.join("00-multus.conf"),
                to: dir.join("00-multus.conflist")
            }
        );
        assert!(!dir.join("00-multus.conf").exists());
        assert_eq!(find_conflist(&dir).unwrap(), dir.join("00-multus.conflist"));
        let list = read_conflist(&dir.join("00-multus.conflist")).unwrap();
        assert_eq!(list["name"], "multus-cni-network");
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["plugins"][0], multus);
        assert_eq!(list["plugins"][1], entry());
        assert_eq!(
            chain(&dir.join("00-multus.conflist"), &entry()).unwrap(),
            Chained::Already(dir.join("00-multus.conflist"))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A primary that rewrites its config drops our entry; chaining again writes through the
    /// symlink and keeps the mode.
    #[test]
    fn rechaining_writes_through_symlinks_and_keeps_the_mode() {
        let dir = scratch("symlink");
        let real = dir.join("real");
        fs::create_dir(&real).unwrap();
        let target = real.join("10-flannel.conflist");
        fs::write(&target, golden("flannel.conflist")).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("10-flannel.conflist");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(
            chain(&link, &entry()).unwrap(),
            Chained::Rewritten(link.clone())
        );
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            installed(&golden("flannel.conflist"))
        );
        // The primary restarts and writes its own version again.
        fs::write(&target, golden("flannel.conflist")).unwrap();
        assert_eq!(
            chain(&link, &entry()).unwrap(),
            Chained::Rewritten(link.clone())
        );
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            installed(&golden("flannel.conflist"))
        );
        assert_eq!(
            fs::read_dir(&real).unwrap().count(),
            1,
            "no temporary files left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The primary writes a new version between our read and our swap: its version is not lost
    /// but chained in turn.
    #[test]
    fn a_concurrent_write_of_the_primary_is_not_lost() {
        let dir = scratch("race");
        let path = dir.join("10-bridge.conflist");
        fs::write(&path, golden("bridge-portmap.conflist")).unwrap();
        let newer = golden("flannel.conflist");
        let mut raced = false;
        let outcome = chain_with(&path, &entry(), &mut || {
            if !raced {
                raced = true;
                // As primaries write: a temporary file renamed over the config.
                let temporary = dir.join("primary.tmp");
                fs::write(&temporary, &newer).unwrap();
                fs::rename(&temporary, &path).unwrap();
            }
        })
        .unwrap();
        assert_eq!(outcome, Chained::Rewritten(path.clone()));
        assert_eq!(fs::read_to_string(&path).unwrap(), installed(&newer));
        fs::remove_dir_all(&dir).unwrap();
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
        fs::write(conf_dir.join("05-broken.conf"), "{}").unwrap();
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
