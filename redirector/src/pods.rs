//! The library API: enroll, unenroll and list pods on one pin root.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use redirector_common::{
    InboundPod, PodConfig, PodStats, ADDR_DNS_SERVER, ADDR_EXCLUDE, ADDR_INCLUDE, ADDR_LOCAL,
    ADDR_LOOPBACK_CIDR, MAP_LAYOUT_VERSION, OWNER_GID, OWNER_UID, POLICY_CAPTURE_ALL_DNS,
    POLICY_GROUPS_EXCLUDE, POLICY_GROUPS_INCLUDE, POLICY_INBOUND_ALL, POLICY_INBOUND_FAIL_OPEN,
    POLICY_INCLUDE_ALL, POLICY_IPV4, POLICY_IPV6, POLICY_LOOPBACK_INCLUDED, POLICY_REDIRECT_DNS,
    PORT_INBOUND_EXCLUDE, PORT_INBOUND_INCLUDE, PORT_OUTBOUND_EXCLUDE, PORT_OUTBOUND_INCLUDE,
};
use serde::{Deserialize, Serialize};

pub use crate::maps::records::{Expired, RecordCounts};
use crate::{
    cgroup::{Cgroup, CgroupError},
    kernel::{self, KernelError},
    link::{self, Hook},
    loader::{self, LoadError, LoadOptions, Programs, UpgradeReport},
    maps::{inbound::address_key, policy_sets::SetsRead, MapAccessError, Maps},
    netns::{open_nsfs, NetnsError, PodNetns},
    pins::{PinError, PinRoot, RootLock},
    policy::Policy,
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
    #[error("attaching {hook} to {target}: {source}")]
    Attach {
        hook: &'static str,
        target: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Map(#[from] MapAccessError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("inbound capture (-b) needs the pod's network namespace: pass --netns")]
    InboundNeedsNetns,
    #[error("address {addr} already has inbound capture for another pod (cgroup id {other}); pod addresses must be unique on a node")]
    AddressClaimed { addr: IpAddr, other: u64 },
    #[error("the pinned maps have layout version {pinned}, this build's have {build}: this build cannot take over the pinned state in place; drain the node, run `redirector uninstall` (every pod leaves capture) and enroll the pods again, or go back to a build with layout version {pinned}")]
    LayoutVersion { pinned: u32, build: u32 },
}

/// One enrolled pod as the maps describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    /// None when the cgroup no longer exists.
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: u64,
    /// The generation of the pod's policy (one more for each policy change); 0 when the pod's
    /// settings are missing (its programs were detached).
    pub generation: u32,
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub inbound_tunnel_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// The pod's `POLICY_*` switches, by name.
    pub switches: Vec<String>,
    /// Ports with a rule, and which.
    pub ports: Vec<LabelledEntry>,
    /// Address prefixes with a rule, and which sets hold them.
    pub prefixes: Vec<LabelledEntry>,
    /// Hooks whose link is pinned (all of them while the pod is enrolled).
    pub attached: Vec<String>,
    /// Counters summed over CPUs.
    pub counters: PodStats,
}

/// A port or prefix with the names of the sets that hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelledEntry {
    pub value: String,
    pub sets: Vec<String>,
}

const SWITCH_NAMES: [(u32, &str); 10] = [
    (POLICY_IPV4, "ipv4"),
    (POLICY_IPV6, "ipv6"),
    (POLICY_INCLUDE_ALL, "include_all"),
    (POLICY_REDIRECT_DNS, "redirect_dns"),
    (POLICY_CAPTURE_ALL_DNS, "capture_all_dns"),
    (POLICY_LOOPBACK_INCLUDED, "loopback_included"),
    (POLICY_GROUPS_INCLUDE, "owner_groups_include"),
    (POLICY_GROUPS_EXCLUDE, "owner_groups_exclude"),
    (POLICY_INBOUND_ALL, "inbound_all"),
    (POLICY_INBOUND_FAIL_OPEN, "inbound_fail_open"),
];
const PORT_SET_NAMES: [(u32, &str); 4] = [
    (PORT_OUTBOUND_EXCLUDE, "outbound_exclude"),
    (PORT_OUTBOUND_INCLUDE, "outbound_include"),
    (PORT_INBOUND_INCLUDE, "inbound_include"),
    (PORT_INBOUND_EXCLUDE, "inbound_exclude"),
];
const ADDR_SET_NAMES: [(u32, &str); 5] = [
    (ADDR_LOCAL, "local"),
    (ADDR_LOOPBACK_CIDR, "loopback_cidr"),
    (ADDR_EXCLUDE, "exclude"),
    (ADDR_INCLUDE, "include"),
    (ADDR_DNS_SERVER, "dns_server"),
];

/// The names of the bits set in `bits`.
pub fn bit_names(bits: u32, names: &[(u32, &'static str)]) -> Vec<String> {
    names
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

pub fn port_set_names(bits: u32) -> Vec<String> {
    bit_names(bits, &PORT_SET_NAMES)
}

pub fn addr_set_names(bits: u32) -> Vec<String> {
    bit_names(bits, &ADDR_SET_NAMES)
}

pub fn switch_names(bits: u32) -> Vec<String> {
    bit_names(bits, &SWITCH_NAMES)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The generation after `generation`; never 0, which means "no settings".
fn next_generation(generation: u32) -> u32 {
    generation.wrapping_add(1).max(1)
}

/// An installation on one pin root, locked for the lifetime of this value.
pub struct Redirector {
    root: PinRoot,
    maps: Maps,
    /// Opened on first attach and kept: a long-lived holder (the agent, the lab) enrolls
    /// many pods without reopening the pins.
    programs: Option<Programs>,
    upgrade: Option<UpgradeReport>,
    /// None for a read-only view ([`Redirector::read_only`]).
    _lock: Option<RootLock>,
}

impl Redirector {
    /// Opens the installation at `root`, installing it first if needed (kernel check,
    /// programs loaded and pinned, maps created). The kernel is probed only when installing:
    /// probing loads test programs, too slow to repeat for every pod.
    ///
    /// Programs of another build pinned there are replaced by this build's in every pod's links
    /// (an upgrade in place, or a downgrade), when the pinned maps have this build's layout;
    /// [`Redirector::upgrade`] tells what was done.
    pub fn install(root: PinRoot, options: &LoadOptions) -> Result<Self, Error> {
        let capabilities = check_installable(&root)?;
        kernel::lift_memlock_limit();
        let lock = root.create_and_lock()?;
        let build_id = loader::build_id();
        if capabilities.is_some() {
            loader::ensure_programs_pinned(&root, options)?;
        }
        let mut maps = Maps::open(&root)?;
        let pinned = maps.switches.get()?;
        let mut upgrade = None;
        if let Some(capabilities) = capabilities {
            maps.switches.update(|settings| {
                settings.errno_writable = u32::from(capabilities.errno_writable);
                settings.layout_version = MAP_LAYOUT_VERSION;
                settings.build_id = build_id;
            })?;
        } else if pinned.build_id != build_id {
            if pinned.layout_version != MAP_LAYOUT_VERSION {
                return Err(Error::LayoutVersion {
                    pinned: pinned.layout_version,
                    build: MAP_LAYOUT_VERSION,
                });
            }
            let capabilities = kernel::check()?;
            let report = loader::upgrade_programs(&root, options)?;
            maps.switches.update(|settings| {
                settings.errno_writable = u32::from(capabilities.errno_writable);
                settings.build_id = build_id;
            })?;
            tracing::info!(
                from = %hex(&pinned.build_id),
                to = %hex(&build_id),
                pods = report.pods,
                links = report.links,
                "replaced the pinned programs with this build's in every pod's links"
            );
            upgrade = Some(report);
        }
        Ok(Self {
            root,
            maps,
            programs: None,
            upgrade,
            _lock: Some(lock),
        })
    }

    /// What [`Redirector::install`] replaced, when the pinned programs were another build's.
    pub fn upgrade(&self) -> Option<UpgradeReport> {
        self.upgrade
    }

    /// The build whose programs are pinned (a digest of their object, in hex).
    pub fn programs_build(&self) -> Result<String, Error> {
        Ok(hex(&self.maps.switches.get()?.build_id))
    }

    /// Opens an existing installation; `None` when nothing is installed at `root`.
    pub fn open(root: PinRoot) -> Result<Option<Self>, Error> {
        Self::open_with(root, true)
    }

    /// Opens an existing installation without taking the root's lock, for reading only
    /// ([`Redirector::pods`], [`Redirector::pod`], [`Redirector::enrolled_ids`],
    /// [`Redirector::records`]): a status or a scrape never waits for an enroll, nor delays
    /// one. A pod being enrolled or unenrolled meanwhile may be seen half-made.
    pub fn read_only(root: PinRoot) -> Result<Option<Self>, Error> {
        Self::open_with(root, false)
    }

    fn open_with(root: PinRoot, locked: bool) -> Result<Option<Self>, Error> {
        if !root.exists() {
            return Ok(None);
        }
        kernel::lift_memlock_limit();
        root.check_bpffs()?;
        let lock = locked.then(|| root.lock()).transpose()?;
        if !loader::programs_pinned(&root) {
            return Ok(None);
        }
        let maps = Maps::open(&root)?;
        Ok(Some(Self {
            root,
            maps,
            programs: None,
            upgrade: None,
            _lock: lock,
        }))
    }

    pub fn root(&self) -> &PinRoot {
        &self.root
    }

    /// Enrolls the pod whose cgroup is `cgroup`, or changes its policy if it is enrolled
    /// already: the new policy's sets are staged under a new generation and the pod's
    /// settings switch to them in one write, so no connection is decided by a mix of the two
    /// (links are not re-made). On failure a new enrollment is undone completely, and a
    /// policy change leaves the old policy in force. `netns` is the pod's network namespace:
    /// its addresses are the pod's local ones, and inbound capture attaches to it.
    pub fn enroll(
        &mut self,
        cgroup: &Cgroup,
        policy: &Policy,
        netns: Option<&PodNetns>,
    ) -> Result<(), Error> {
        if policy.captures_inbound() && netns.is_none() {
            return Err(Error::InboundNeedsNetns);
        }
        let pod = cgroup.id;
        let known = self.maps.counters.contains(pod);
        let previous = self.maps.settings.get(pod)?;
        let generation = next_generation(previous.map_or(0, |config| config.generation));
        let network = netns.map(|n| n.network.clone()).unwrap_or_default();
        let compiled = policy.compile(&network);
        let config = PodConfig {
            pod,
            generation,
            ..compiled.config
        };
        let inbound = netns.filter(|_| policy.captures_inbound());
        let hooks = cgroup_hooks(policy);
        let staged = self
            .maps
            .counters
            .ensure(pod)
            .map_err(Error::from)
            .and_then(|()| {
                self.maps
                    .policy_sets
                    .write(pod, generation, &compiled)
                    .map_err(Error::from)
            })
            .and_then(|()| self.check_claims(pod, inbound))
            .and_then(|()| self.attach_missing(cgroup, &hooks))
            .and_then(|()| self.set_inbound_link(pod, inbound));
        if let Err(error) = staged {
            if known {
                let _ = self
                    .maps
                    .policy_sets
                    .remove_other_generations(pod, previous.map(|c| c.generation));
            } else {
                let _ = self.unenroll(pod);
            }
            return Err(error);
        }
        // The switch. Then inbound follows, and what neither policy needs any more goes.
        self.maps.settings.set(&config)?;
        self.set_inbound_addresses(&config, inbound, known)?;
        for hook in Hook::ALL {
            if hook != Hook::Inbound && !hooks.contains(&hook) {
                self.detach(&self.root.pod_dir(pod).join(hook.pin_name()))?;
            }
        }
        // A pod enrolled for the first time has no other generation: the walk of every pod's
        // sets is skipped, so that setting up a pod does not slow down with the pods already
        // on the node.
        if known {
            self.maps
                .policy_sets
                .remove_other_generations(pod, Some(generation))?;
        }
        Ok(())
    }

    /// The pod's inbound addresses must not be another pod's.
    pub fn check_claims(&self, pod: u64, netns: Option<&PodNetns>) -> Result<(), Error> {
        for addr in inbound_addresses(netns) {
            if let Some(other) = self.maps.inbound.owner(addr).filter(|&other| other != pod) {
                return Err(Error::AddressClaimed { addr, other });
            }
        }
        Ok(())
    }

    /// The sk_lookup link on the pod's network namespace, or none. A new link is pinned beside
    /// the old one and renamed over it, so inbound capture never pauses, whichever namespace
    /// the old link was attached to.
    fn set_inbound_link(&mut self, pod: u64, netns: Option<&PodNetns>) -> Result<(), Error> {
        let pin = self.root.pod_dir(pod).join(Hook::Inbound.pin_name());
        let Some(netns) = netns else {
            return self.detach(&pin);
        };
        // bpffs refuses names with a dot.
        let staged = pin.with_file_name(format!("{}-staged", Hook::Inbound.pin_name()));
        self.root.remove_pin(&staged)?;
        let target = open_nsfs(&netns.path)?;
        link::attach_pinned(
            self.programs()?.fd(Hook::Inbound),
            target.as_fd(),
            Hook::Inbound,
            &staged,
        )
        .map_err(|source| Error::Attach {
            hook: Hook::Inbound.pin_name(),
            target: netns.path.clone(),
            source,
        })?;
        std::fs::rename(&staged, &pin).map_err(|source| PinError::Io {
            path: pin.clone(),
            source,
        })?;
        Ok(())
    }

    /// The pod's inbound addresses with its current generation; addresses it no longer has go
    /// (looked for only when the pod was `known` before: a new pod has none).
    fn set_inbound_addresses(
        &mut self,
        config: &PodConfig,
        netns: Option<&PodNetns>,
        known: bool,
    ) -> Result<(), Error> {
        let wanted = inbound_addresses(netns);
        let value = InboundPod {
            pod: config.pod,
            generation: config.generation,
            flags: config.flags,
            inbound_port: config.inbound_port,
            _pad: [0; 3],
        };
        for &addr in &wanted {
            self.maps.inbound.set(addr, value)?;
        }
        if !known {
            return Ok(());
        }
        let wanted_keys: Vec<_> = wanted.into_iter().map(address_key).collect();
        self.maps
            .inbound
            .remove_where(config.pod, |key| wanted_keys.contains(key))?;
        Ok(())
    }

    fn programs(&mut self) -> Result<&Programs, Error> {
        if self.programs.is_none() {
            self.programs = Some(Programs::open(&self.root)?);
        }
        Ok(self.programs.as_ref().expect("just opened"))
    }

    fn attach_missing(&mut self, cgroup: &Cgroup, hooks: &[Hook]) -> Result<(), Error> {
        let pod_dir = self.root.pod_dir(cgroup.id);
        let missing: Vec<Hook> = hooks
            .iter()
            .copied()
            .filter(|hook| !pod_dir.join(hook.pin_name()).exists())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&pod_dir).map_err(|source| PinError::Io {
            path: pod_dir.clone(),
            source,
        })?;
        let programs = self.programs()?;
        for hook in missing {
            link::attach_pinned(
                programs.fd(hook),
                cgroup.dir.as_fd(),
                hook,
                &pod_dir.join(hook.pin_name()),
            )
            .map_err(|source| Error::Attach {
                hook: hook.pin_name(),
                target: cgroup.path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn detach(&self, pin: &Path) -> Result<(), Error> {
        link::detach_pinned(pin).map_err(|source| {
            PinError::Io {
                path: pin.to_owned(),
                source,
            }
            .into()
        })
    }

    /// Removes a pod: its links (detached), sets, inbound addresses and counters. Returns
    /// whether anything was there.
    pub fn unenroll(&mut self, pod: u64) -> Result<bool, Error> {
        let existed = self.unenroll_leaving_sets(pod)?;
        self.maps.policy_sets.remove_other_generations(pod, None)?;
        Ok(existed)
    }

    /// [`Redirector::unenroll`] without the walk of every pod's policy sets: the pod's stay in
    /// the maps, unused (no program runs for it), until [`Redirector::remove_unused_sets`]
    /// removes those of every pod unenrolled so far in one walk. Enroll the pod again only
    /// after that: a new enrollment whose settings start over at the first generation would
    /// share it with the old sets.
    pub fn unenroll_leaving_sets(&mut self, pod: u64) -> Result<bool, Error> {
        let pod_dir = self.root.pod_dir(pod);
        let existed = pod_dir.exists() || self.maps.counters.contains(pod);
        // Links first, detached at once: then no program runs for the pod. The counters go
        // last: a pod without them has no other entries but departed sets (enroll relies on
        // that).
        for hook in Hook::ALL {
            self.detach(&pod_dir.join(hook.pin_name()))?;
        }
        self.root.remove_pod(pod)?;
        self.maps.inbound.remove_where(pod, |_| false)?;
        self.maps.counters.remove(pod)?;
        Ok(existed)
    }

    /// Removes every policy set no program can use: those of pods not enrolled (no counters),
    /// which [`Redirector::unenroll_leaving_sets`] or an interrupted unenroll left, and those
    /// of an enrolled pod's other generations. One walk of each map.
    pub fn remove_unused_sets(&mut self) -> Result<(), Error> {
        let mut in_use = BTreeMap::new();
        for pod in self.maps.counters.pods()? {
            in_use.insert(
                pod,
                self.maps.settings.get(pod)?.map(|config| config.generation),
            );
        }
        self.maps
            .policy_sets
            .remove_where(|pod, generation| match in_use.get(&pod) {
                None => true,
                // Enrolled, its settings not written: none of its sets is known to be unused.
                Some(None) => false,
                Some(&Some(current)) => current != generation,
            })?;
        Ok(())
    }

    /// The cgroup ids of the enrolled pods.
    pub fn enrolled_ids(&self) -> Result<Vec<u64>, Error> {
        let mut ids = self.maps.counters.pods()?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every enrolled pod with its policy and counters: one walk of each set map. The cgroup
    /// paths are left to the caller (`cgroup: None`): finding them means walking the cgroup
    /// tree.
    pub fn pods(&self) -> Result<Vec<PodStatus>, Error> {
        let mut sets = self.maps.policy_sets.read_all()?;
        self.enrolled_ids()?
            .into_iter()
            .map(|pod| {
                let config = self.maps.settings.get(pod)?.unwrap_or_default();
                let read = sets.remove(&(pod, config.generation)).unwrap_or_default();
                Ok(self.status_of(pod, &config, &read))
            })
            .collect()
    }

    /// One enrolled pod (None when it is not enrolled).
    pub fn pod(&self, pod: u64) -> Result<Option<PodStatus>, Error> {
        if !self.maps.counters.contains(pod) {
            return Ok(None);
        }
        let config = self.maps.settings.get(pod)?.unwrap_or_default();
        let read = self
            .maps
            .policy_sets
            .read_all()?
            .remove(&(pod, config.generation))
            .unwrap_or_default();
        Ok(Some(self.status_of(pod, &config, &read)))
    }

    fn status_of(&self, pod: u64, config: &PodConfig, read: &SetsRead) -> PodStatus {
        let ids = |kind| {
            read.owners
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, id)| *id)
                .collect()
        };
        let pod_dir = self.root.pod_dir(pod);
        PodStatus {
            cgroup: None,
            cgroup_id: pod,
            generation: config.generation,
            proxy_port: config.proxy_port,
            inbound_capture_port: config.inbound_port,
            inbound_tunnel_port: config.tunnel_port,
            proxy_uids: ids(OWNER_UID),
            proxy_gids: ids(OWNER_GID),
            switches: switch_names(config.flags),
            ports: read
                .ports
                .iter()
                .map(|(port, bits)| LabelledEntry {
                    value: port.to_string(),
                    sets: port_set_names(*bits),
                })
                .collect(),
            prefixes: read
                .prefixes
                .iter()
                .map(|(prefix, bits)| LabelledEntry {
                    value: prefix.to_string(),
                    sets: addr_set_names(*bits),
                })
                .collect(),
            attached: Hook::ALL
                .into_iter()
                .filter(|h| pod_dir.join(h.pin_name()).exists())
                .map(|hook| hook.pin_name().to_owned())
                .collect(),
            counters: self.maps.counters.total(pod),
        }
    }

    /// The record counts; `baseline` is the last [`Redirector::expire_handshakes`]'s (0
    /// without one).
    pub fn records(&self, baseline: i64) -> Result<RecordCounts, Error> {
        let overflowed = self
            .maps
            .counters
            .pods()?
            .into_iter()
            .map(|pod| self.maps.counters.total(pod).handshake_failed)
            .sum();
        Ok(self.maps.records.counts(overflowed, baseline)?)
    }

    /// Removes handshakes no proxy side took over within `age`, and counts what stays (see
    /// [`crate::maps::records::Records::expire`]).
    pub fn expire_handshakes(&mut self, age: std::time::Duration) -> Result<Expired, Error> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|now| std::time::Duration::from(now).as_nanos() as u64)
            .unwrap_or(0);
        let before = now.saturating_sub(age.as_nanos() as u64);
        Ok(self.maps.records.expire(before)?)
    }

    /// Switches the programs' per-connection log lines on or off, node-wide.
    pub fn set_connection_logging(&mut self, on: bool) -> Result<(), Error> {
        self.maps
            .switches
            .update(|settings| settings.log_connections = u32::from(on))?;
        Ok(())
    }
}

/// The hooks a policy needs on the pod's cgroup: UDP's only with DNS capture, bind's only with
/// inbound capture, so that the other pods pay nothing for them.
fn cgroup_hooks(policy: &Policy) -> Vec<Hook> {
    let mut hooks = Hook::CGROUP.to_vec();
    if policy.dns_capture_active() {
        hooks.extend(Hook::DNS);
    }
    if policy.captures_inbound() {
        hooks.extend(Hook::INBOUND_CGROUP);
    }
    hooks
}

/// The pod's own addresses that inbound capture applies to (loopback never does).
fn inbound_addresses(netns: Option<&PodNetns>) -> Vec<IpAddr> {
    netns
        .map(|netns| {
            netns
                .network
                .addresses
                .iter()
                .filter(|a| !a.to_canonical().is_loopback())
                .copied()
                .collect()
        })
        .unwrap_or_default()
}

/// Enrolls the pod at `cgroup_path` on `root`, installing redirector there if needed. The
/// pod's network namespace, when given, tells which destinations are local to the pod (its
/// own addresses) and whether IPv6 is captured, as istio-iptables decides; without it only
/// loopback is local and IPv6 is captured.
/// Bad input is refused before anything is touched; a failure after that leaves the root
/// as it was (an installation this call made is removed again).
pub fn enroll(
    root: &PinRoot,
    options: &LoadOptions,
    cgroup_path: &Path,
    policy: &Policy,
    netns: Option<&Path>,
) -> Result<Enrolled, Error> {
    let pod = read_pod(Cgroup::open(cgroup_path)?, policy, netns)?;
    enroll_read(root, options, &pod, policy)?;
    Ok(pod)
}

/// [`enroll`] of a pod [`read_pod`] has read (its addresses are known before anything is
/// touched).
pub fn enroll_read(
    root: &PinRoot,
    options: &LoadOptions,
    pod: &Enrolled,
    policy: &Policy,
) -> Result<(), Error> {
    let fresh = !root.exists();
    let result = Redirector::install(root.clone(), options)
        .and_then(|mut redirector| redirector.enroll(&pod.cgroup, policy, pod.netns.as_ref()));
    if let Err(error) = result {
        if fresh {
            let _ = root.remove_all();
        }
        return Err(error);
    }
    Ok(())
}

/// Every check [`enroll`] makes, and nothing else: a dry run. The checks are the same functions
/// enroll runs ([`read_pod`], [`check_installable`], [`Redirector::check_claims`]), so that a
/// dry run that passes means the enroll will (short of a node-wide map filling up meanwhile).
pub fn check_enroll(
    root: &PinRoot,
    cgroup_path: &Path,
    policy: &Policy,
    netns: Option<&Path>,
) -> Result<Enrolled, Error> {
    let pod = read_pod(Cgroup::open(cgroup_path)?, policy, netns)?;
    check_installable(root)?;
    let inbound_netns = pod.netns.as_ref().filter(|_| policy.captures_inbound());
    if let Some(redirector) = Redirector::read_only(root.clone())? {
        redirector.check_claims(pod.cgroup.id, inbound_netns)?;
    }
    Ok(pod)
}

/// The pod's cgroup and network namespace (with its addresses), checked against the policy.
pub fn read_pod(cgroup: Cgroup, policy: &Policy, netns: Option<&Path>) -> Result<Enrolled, Error> {
    let netns = netns.map(PodNetns::read).transpose()?;
    if policy.captures_inbound() && netns.is_none() {
        return Err(Error::InboundNeedsNetns);
    }
    Ok(Enrolled { cgroup, netns })
}

/// What installing at `root` needs: a bpffs there and, unless the programs are loaded already,
/// a kernel with every feature the programs use (then its optional capabilities are returned).
fn check_installable(root: &PinRoot) -> Result<Option<kernel::Capabilities>, Error> {
    root.check_bpffs()?;
    if loader::programs_pinned(root) {
        return Ok(None);
    }
    Ok(Some(kernel::check()?))
}

/// What [`enroll`] found and enrolled.
#[derive(Debug)]
pub struct Enrolled {
    pub cgroup: Cgroup,
    pub netns: Option<PodNetns>,
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
    for pod in root.pinned_pods()? {
        for hook in Hook::ALL {
            let pin = root.pod_dir(pod).join(hook.pin_name());
            link::detach_pinned(&pin).map_err(|source| PinError::Io { path: pin, source })?;
        }
    }
    root.remove_all()?;
    Ok(true)
}
