//! The library API: enroll, unenroll and list pods on one pin root.
use std::path::{Path, PathBuf};

use aya::maps::{MapError, PerCpuValues};
use redirector_common::{ExemptOwnerKey, PodConfig, PodStats, Settings, OWNER_GID, OWNER_UID};
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{self, Cgroup, CgroupError},
    kernel::{self, KernelError},
    link::{self, CgroupHook},
    loader::{self, LoadError, Maps, Programs},
    pins::{PinError, PinRoot, RootLock},
    policy::OutboundPolicy,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("attaching {hook} to cgroup {cgroup}: {source}")]
    Attach {
        hook: &'static str,
        cgroup: PathBuf,
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// Per-pod counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub redirected: u64,
    pub exempted: u64,
    pub orig_dst_lookups: u64,
    pub orig_dst_misses: u64,
}

impl From<PodStats> for Counters {
    fn from(s: PodStats) -> Self {
        Self {
            redirected: s.redirected,
            exempted: s.exempted,
            orig_dst_lookups: s.orig_dst_lookups,
            orig_dst_misses: s.orig_dst_misses,
        }
    }
}

/// One enrolled pod as the maps describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    /// None when the cgroup no longer exists.
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: u64,
    pub proxy_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// Hooks whose link is pinned (all three while the pod is enrolled).
    pub attached: Vec<String>,
    pub counters: Counters,
}

/// Connection records currently held (they leave when their connection closes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCounts {
    pub by_cookie: usize,
    pub by_peer: usize,
}

/// An installation on one pin root, locked for the lifetime of this value.
pub struct Redirector {
    root: PinRoot,
    maps: Maps,
    _lock: RootLock,
}

impl Redirector {
    /// Opens the installation at `root`, installing it first if needed (kernel check,
    /// programs loaded and pinned, maps created).
    pub fn install(root: PinRoot) -> Result<Self, Error> {
        root.check_bpffs()?;
        kernel::check()?;
        let lock = root.create_and_lock()?;
        loader::ensure_programs_pinned(&root)?;
        let maps = Maps::open(&root)?;
        Ok(Self {
            root,
            maps,
            _lock: lock,
        })
    }

    /// Opens an existing installation; `None` when nothing is installed at `root`.
    pub fn open(root: PinRoot) -> Result<Option<Self>, Error> {
        if !root.exists() {
            return Ok(None);
        }
        root.check_bpffs()?;
        let lock = root.lock()?;
        if !root.map(redirector_common::map_names::POD_CONFIG).exists() {
            return Ok(None);
        }
        let maps = Maps::open(&root)?;
        Ok(Some(Self {
            root,
            maps,
            _lock: lock,
        }))
    }

    pub fn root(&self) -> &PinRoot {
        &self.root
    }

    /// Enrolls the pod whose cgroup is `cgroup`, or updates its policy if it is enrolled
    /// already (new connections follow the new policy; links are not re-made). On failure
    /// a new enrollment is undone completely.
    pub fn enroll(&mut self, cgroup: &Cgroup, policy: &OutboundPolicy) -> Result<(), Error> {
        let new = self.maps.pod_config.get(&cgroup.id, 0).is_err();
        let result = self
            .write_policy(cgroup.id, policy)
            .and_then(|()| self.attach_missing(cgroup));
        if result.is_err() && new {
            let _ = self.unenroll(cgroup.id);
        }
        result
    }

    fn write_policy(&mut self, pod: u64, policy: &OutboundPolicy) -> Result<(), Error> {
        if self.maps.pod_stats.get(&pod, 0).is_err() {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Cpus(e))?;
            let zeroes =
                PerCpuValues::try_from(vec![PodStats::default(); cpus]).map_err(Error::Cpus)?;
            self.maps
                .pod_stats
                .insert(pod, zeroes, 0)
                .map_err(map_error("POD_STATS"))?;
        }
        let wanted: Vec<ExemptOwnerKey> = owner_keys(pod, policy).collect();
        for key in &wanted {
            self.maps
                .exempt_owners
                .insert(*key, 1, 0)
                .map_err(map_error("EXEMPT_OWNERS"))?;
        }
        let config = PodConfig {
            proxy_port: policy.proxy_port,
            _pad: [0; 6],
        };
        self.maps
            .pod_config
            .insert(pod, config, 0)
            .map_err(map_error("POD_CONFIG"))?;
        // Owners dropped from the policy go last, so that no moment exempts nobody.
        for stale in self
            .owners_of(pod)?
            .into_iter()
            .filter(|key| !wanted.contains(key))
        {
            self.maps
                .exempt_owners
                .remove(&stale)
                .map_err(map_error("EXEMPT_OWNERS"))?;
        }
        Ok(())
    }

    fn attach_missing(&self, cgroup: &Cgroup) -> Result<(), Error> {
        let pod_dir = self.root.pod_dir(cgroup.id);
        let missing: Vec<CgroupHook> = CgroupHook::ALL
            .into_iter()
            .filter(|hook| !pod_dir.join(hook.pin_name()).exists())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&pod_dir).map_err(|source| PinError::Io {
            path: pod_dir.clone(),
            source,
        })?;
        let programs = Programs::open(&self.root)?;
        use std::os::fd::AsFd as _;
        for hook in missing {
            let attach_error = |source| Error::Attach {
                hook: hook.pin_name(),
                cgroup: cgroup.path.clone(),
                source,
            };
            let program = programs
                .fd(hook)
                .map_err(|e| attach_error(std::io::Error::other(e)))?;
            link::attach_pinned(
                program,
                cgroup.dir.as_fd(),
                hook,
                &pod_dir.join(hook.pin_name()),
            )
            .map_err(attach_error)?;
        }
        Ok(())
    }

    /// Removes a pod: its links (detached), policy and counters. Returns whether anything
    /// was there.
    pub fn unenroll(&mut self, pod: u64) -> Result<bool, Error> {
        let existed = self.root.pod_dir(pod).exists() || self.maps.pod_config.get(&pod, 0).is_ok();
        self.root.remove_pod(pod)?;
        ignore_missing(self.maps.pod_config.remove(&pod)).map_err(map_error("POD_CONFIG"))?;
        for key in self.owners_of(pod)? {
            ignore_missing(self.maps.exempt_owners.remove(&key))
                .map_err(map_error("EXEMPT_OWNERS"))?;
        }
        ignore_missing(self.maps.pod_stats.remove(&pod)).map_err(map_error("POD_STATS"))?;
        Ok(existed)
    }

    fn owners_of(&self, pod: u64) -> Result<Vec<ExemptOwnerKey>, Error> {
        let keys: Result<Vec<_>, _> = self.maps.exempt_owners.keys().collect();
        Ok(keys
            .map_err(map_error("EXEMPT_OWNERS"))?
            .into_iter()
            .filter(|key| key.pod == pod)
            .collect())
    }

    /// Every enrolled pod with its policy and counters.
    pub fn pods(&self) -> Result<Vec<PodStatus>, Error> {
        let cgroup_mount = cgroup::cgroup2_mount().ok();
        let pods: Result<Vec<_>, _> = self.maps.pod_config.iter().collect();
        let owners: Result<Vec<_>, _> = self.maps.exempt_owners.keys().collect();
        let owners = owners.map_err(map_error("EXEMPT_OWNERS"))?;
        let mut statuses = Vec::new();
        for (pod, config) in pods.map_err(map_error("POD_CONFIG"))? {
            let ids = |kind| {
                owners
                    .iter()
                    .filter(|k| k.pod == pod && k.kind == kind)
                    .map(|k| k.id)
                    .collect()
            };
            let mut total = PodStats::default();
            if let Ok(per_cpu) = self.maps.pod_stats.get(&pod, 0) {
                per_cpu.iter().for_each(|cpu| total.add(cpu));
            }
            let pod_dir = self.root.pod_dir(pod);
            statuses.push(PodStatus {
                cgroup: cgroup_mount
                    .as_deref()
                    .and_then(|mount| cgroup::find_by_id(mount, pod)),
                cgroup_id: pod,
                proxy_port: config.proxy_port,
                proxy_uids: ids(OWNER_UID),
                proxy_gids: ids(OWNER_GID),
                attached: CgroupHook::ALL
                    .into_iter()
                    .filter(|h| pod_dir.join(h.pin_name()).exists())
                    .map(|hook| hook.pin_name().to_owned())
                    .collect(),
                counters: total.into(),
            });
        }
        statuses.sort_by_key(|status| status.cgroup_id);
        Ok(statuses)
    }

    pub fn records(&self) -> RecordCounts {
        RecordCounts {
            by_cookie: self
                .maps
                .orig_by_cookie
                .keys()
                .filter(Result::is_ok)
                .count(),
            by_peer: self.maps.orig_by_peer.keys().filter(Result::is_ok).count(),
        }
    }

    /// Switches the programs' per-connection log lines on or off, node-wide.
    pub fn set_connection_logging(&mut self, on: bool) -> Result<(), Error> {
        self.maps
            .settings
            .set(
                0,
                Settings {
                    log_connections: u32::from(on),
                },
                0,
            )
            .map_err(map_error("SETTINGS"))
    }
}

fn owner_keys(pod: u64, policy: &OutboundPolicy) -> impl Iterator<Item = ExemptOwnerKey> + '_ {
    let uids = policy.proxy_uids.iter().map(move |&id| ExemptOwnerKey {
        pod,
        kind: OWNER_UID,
        id,
    });
    let gids = policy.proxy_gids.iter().map(move |&id| ExemptOwnerKey {
        pod,
        kind: OWNER_GID,
        id,
    });
    uids.chain(gids)
}

/// Deleting a key that is not there is success for an idempotent unenroll.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}

/// Enrolls the pod at `cgroup_path` on `root`, installing redirector there if needed.
/// Bad input is refused before anything is touched; a failure after that leaves the root
/// as it was (an installation this call made is removed again).
pub fn enroll(
    root: &PinRoot,
    cgroup_path: &Path,
    policy: &OutboundPolicy,
) -> Result<Cgroup, Error> {
    let cgroup = Cgroup::open(cgroup_path)?;
    let fresh = !root.exists();
    let result = Redirector::install(root.clone())
        .and_then(|mut redirector| redirector.enroll(&cgroup, policy));
    if let Err(error) = result {
        if fresh {
            let _ = root.remove_all();
        }
        return Err(error);
    }
    Ok(cgroup)
}

/// Unenrolls the pod at `cgroup_path`; returns whether it was enrolled. Idempotent.
pub fn unenroll(root: &PinRoot, cgroup_path: &Path) -> Result<bool, Error> {
    let cgroup = Cgroup::open(cgroup_path)?;
    match Redirector::open(root.clone())? {
        Some(mut redirector) => redirector.unenroll(cgroup.id),
        None => Ok(false),
    }
}

/// Removes every pin and attachment under `root`; returns whether anything was there.
pub fn uninstall(root: &PinRoot) -> Result<bool, Error> {
    if !root.exists() {
        return Ok(false);
    }
    root.check_bpffs()?;
    let _lock = root.lock()?;
    root.remove_all()?;
    Ok(true)
}
