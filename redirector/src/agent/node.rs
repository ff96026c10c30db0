//! One node's redirector state: the bpffs pins (programs, maps, links) and the pod state files.
//! Every API request is carried out here, by the agent or, when none runs, by the CLI itself.
use std::{
    collections::{BTreeSet, HashMap},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex,
    },
};

use nix::sys::statfs::{statfs, NSFS_MAGIC};

use super::{
    api::{
        CollectReason, CollectedPod, EnrollRequest, EnrolledPod, ErrorKind, FailedPod, GcReport,
        GcRequest, NodePod, NodeStatus, PodRef, PodSelector, Reply, Request, StatusQuery,
        Unenrolled, STATUS_PAGE,
    },
    evidence::EvidenceError,
    pod_cgroup::{self, PodCgroups},
    server::lock,
    store::{Attachment, FileId, Follow, PodRecord, PodStore, RecordedIdentity, StoreError},
};
use crate::{
    atomic_file::{self, Durability},
    cgroup::{self, Cgroup, CgroupError},
    loader::LoadOptions,
    netns::NetnsError,
    pins::PinRoot,
    pods::{self, RecordCounts, Redirector},
    policy::Policy,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Redirector(#[from] pods::Error),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot tell which pods are gone: {0}")]
    Evidence(EvidenceError),
    #[error(transparent)]
    NotAPod(#[from] pod_cgroup::NotAPod),
    #[error("pending CNI DEL {path}: {source}")]
    Pending { path: PathBuf, source: io::Error },
}

impl NodeError {
    /// Whether the caller asked for something wrong, or carrying out a fine request failed.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Cgroup(_)
            | Self::Redirector(pods::Error::Cgroup(_))
            | Self::Redirector(pods::Error::Netns(
                NetnsError::NotNsfs { .. } | NetnsError::NotNetns { .. },
            ))
            | Self::NotAPod(_) => ErrorKind::InvalidInput,
            _ => ErrorKind::Internal,
        }
    }
}

/// Where a node keeps its state.
#[derive(Clone, Debug)]
pub struct Node {
    pub root: PinRoot,
    pub store: PodStore,
    /// Which cgroups are pods.
    pub pod_cgroups: PodCgroups,
    /// CNI DELs the plugin could not hand to an agent, carried out by the next one.
    pub pending: Option<PendingDeletes>,
    /// How the maps are made when this node installs redirector.
    pub load: LoadOptions,
    /// What the handshake map's tally misses, as the agent's last walk of the map found
    /// (see [`crate::maps::records::Expired`]); 0 for a node that never walked it (the CLI
    /// without an agent).
    pub handshake_baseline: Arc<AtomicI64>,
    /// Pods unenrolled whose policy sets were left in the maps, for one walk to remove them all
    /// ([`Node::remove_unused_sets`]; the agent's). None: every unenroll walks the maps.
    pub departed: Option<Arc<Mutex<BTreeSet<u64>>>>,
}

impl Node {
    pub fn new(root: PinRoot, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            root,
            store: PodStore::new(state_dir),
            pod_cgroups: PodCgroups::default(),
            pending: None,
            load: LoadOptions::default(),
            handshake_baseline: Arc::default(),
            departed: None,
        }
    }

    /// Whether pods left policy sets for [`Node::remove_unused_sets`].
    pub fn has_departed_sets(&self) -> bool {
        self.departed
            .as_ref()
            .is_some_and(|departed| !lock(departed).is_empty())
    }

    /// Removes every policy set no program can use (those unenrolled pods left, first), in one
    /// walk of each map.
    pub fn remove_unused_sets(&self) -> Result<(), NodeError> {
        if let Some(mut redirector) = Redirector::open(self.root.clone())? {
            redirector.remove_unused_sets()?;
        }
        if let Some(departed) = &self.departed {
            lock(departed).clear();
        }
        Ok(())
    }

    /// Carries out one API request; pods enrolled without a policy get `default_policy`.
    pub fn handle(&self, request: &Request, default_policy: &Policy) -> Result<Reply, NodeError> {
        Ok(match request {
            Request::Enroll(enroll) => Reply::Enrolled(self.enroll(enroll, default_policy)?),
            Request::Unenroll(selector) => Reply::Unenrolled(Unenrolled {
                cgroup_id: self.unenroll(selector)?,
            }),
            Request::Status(query) => Reply::Status(self.status(query)?),
            Request::Pod(selector) => Reply::Pod(self.pod(selector)?),
            Request::Gc(gc) => Reply::Collected(self.gc(gc)?),
            // Only an agent counts these; with none running there is nothing to keep them in.
            Request::CniOutcome(_) => Reply::Counted,
        })
    }

    /// Enrolls a pod (or updates an enrolled one) and records what the request tells about it.
    /// On failure the pod's state is as before. An address still claimed by a pod whose CNI DEL
    /// is pending is released first (not by a dry run, which runs the same checks and changes
    /// nothing).
    pub fn enroll(
        &self,
        request: &EnrollRequest,
        default_policy: &Policy,
    ) -> Result<EnrolledPod, NodeError> {
        self.enroll_counting(request, default_policy, false)
    }

    /// [`Node::enroll`]; `address_change` counts it in the pod's record as one made because
    /// the pod's addresses changed.
    pub(super) fn enroll_counting(
        &self,
        request: &EnrollRequest,
        default_policy: &Policy,
        address_change: bool,
    ) -> Result<EnrolledPod, NodeError> {
        match self.enroll_once(request, default_policy, address_change) {
            Err(NodeError::Redirector(pods::Error::AddressClaimed { .. }))
                if !request.dry_run && self.run_pending_deletes()? > 0 =>
            {
                self.enroll_once(request, default_policy, address_change)
            }
            result => result,
        }
    }

    fn enroll_once(
        &self,
        request: &EnrollRequest,
        default_policy: &Policy,
        address_change: bool,
    ) -> Result<EnrolledPod, NodeError> {
        let cgroup = Cgroup::open(&request.cgroup)?;
        self.pod_cgroups.check(&cgroup.path)?;
        if let Some(runtime) = pod_cgroup::sandboxed_runtime(&cgroup.path) {
            return Err(pod_cgroup::NotAPod::Sandboxed {
                path: cgroup.path,
                runtime,
            }
            .into());
        }
        let node_policy = request.policy.as_ref().unwrap_or(default_policy);
        let pod_policy = request
            .pod_settings
            .as_ref()
            .map(|settings| settings.apply(node_policy));
        let policy = pod_policy.as_ref().unwrap_or(node_policy);
        let previous = self.store.get(cgroup.id)?;
        let meta = previous
            .as_ref()
            .map(|record| record.meta.clone())
            .unwrap_or_default()
            .updated_with(&request.meta);
        if request.dry_run {
            let pod = pods::check_enroll(&self.root, &cgroup.path, policy, meta.netns.as_deref())?;
            return Ok(EnrolledPod::new(&pod, policy.clone()));
        }
        let before = previous
            .as_ref()
            .map(|record| record.follow.clone())
            .unwrap_or_default();
        let identity = identity(&cgroup, meta.netns.as_deref())?;
        // Read first (the addresses too), so that one write records the pod before anything
        // is touched.
        let pod = pods::read_pod(cgroup, policy, meta.netns.as_deref())?;
        let enrolled = EnrolledPod::new(&pod, policy.clone());
        let mut follow = Follow {
            policy: Some(policy.clone()),
            ..before.clone()
        };
        follow.count += u64::from(address_change);
        if enrolled.addresses != before.addresses || address_change {
            follow.addresses.clone_from(&enrolled.addresses);
        }
        let record = PodRecord {
            cgroup_id: pod.cgroup.id,
            cgroup: pod.cgroup.path.clone(),
            identity: Some(identity),
            meta,
            follow,
        };
        self.store.put(&record)?;
        // Sets an unenroll of this very cgroup left go first. They are another generation while
        // the cgroup's storage keeps the pod's settings (the next walk would take them), but
        // would share the new generation where the storage went with the links. Without an
        // agent's list of them, any pod's may be left (by an agent that stopped before it
        // removed them).
        let departed = match &self.departed {
            Some(departed) => lock(departed).contains(&pod.cgroup.id),
            None => true,
        };
        if departed {
            self.remove_unused_sets()?;
        }
        if let Err(error) = pods::enroll_read(&self.root, &self.load, &pod, policy) {
            let restored = match &previous {
                Some(record) => self.store.put(record),
                None => self.store.remove(pod.cgroup.id),
            };
            if let Err(restore_error) = restored {
                tracing::warn!(cgroup_id = pod.cgroup.id, %restore_error, "restoring the pod's state file");
            }
            return Err(error.into());
        }
        Ok(enrolled)
    }

    /// Unenrolls a pod; returns its cgroup id when there was one. Idempotent.
    pub fn unenroll(&self, selector: &PodSelector) -> Result<Option<u64>, NodeError> {
        let Some(cgroup_id) = self.selected(selector)? else {
            return Ok(None);
        };
        Ok(self.unenroll_id(cgroup_id)?.then_some(cgroup_id))
    }

    fn selected(&self, selector: &PodSelector) -> Result<Option<u64>, NodeError> {
        Ok(match selector {
            PodSelector::Cgroup(path) => Some(Cgroup::open(path)?.id),
            PodSelector::ContainerId(container_id) => self
                .store
                .find_container(container_id)?
                .map(|record| record.cgroup_id),
        })
    }

    /// Removes a pod's pins and map entries, then its state file.
    pub(super) fn unenroll_id(&self, cgroup_id: u64) -> Result<bool, NodeError> {
        let was_enrolled = match (Redirector::open(self.root.clone())?, &self.departed) {
            (Some(mut redirector), Some(departed)) => {
                let was_enrolled = redirector.unenroll_leaving_sets(cgroup_id)?;
                lock(departed).insert(cgroup_id);
                was_enrolled
            }
            (Some(mut redirector), None) => redirector.unenroll(cgroup_id)?,
            (None, _) => false,
        };
        let had_record = self.store.get(cgroup_id)?.is_some();
        self.store.remove(cgroup_id)?;
        Ok(was_enrolled || had_record)
    }

    /// A page of the enrolled pods with what the state files know about them. Reads the maps
    /// without the root's lock (an enroll never waits for a status).
    pub fn status(&self, query: &StatusQuery) -> Result<NodeStatus, NodeError> {
        let limit = query.limit.unwrap_or(STATUS_PAGE) as usize;
        let Some(redirector) = Redirector::read_only(self.root.clone())? else {
            return Ok(NodeStatus {
                quarantined: self.store.quarantined()?,
                ..NodeStatus::default()
            });
        };
        let records = match query.after {
            None => redirector.records(self.handshake_baseline.load(Ordering::Relaxed))?,
            Some(_) => RecordCounts::default(),
        };
        let programs_build = Some(redirector.programs_build()?);
        let mut pods: Vec<_> = match limit {
            0 => Vec::new(),
            _ => redirector
                .pods()?
                .into_iter()
                .filter(|pod| query.after.is_none_or(|after| pod.cgroup_id > after))
                .collect(),
        };
        drop(redirector);
        let next = (pods.len() > limit).then(|| pods[limit - 1].cgroup_id);
        pods.truncate(limit);
        let pods = self.with_records(pods)?;
        Ok(NodeStatus {
            pods,
            records,
            programs_build,
            agent: None,
            quarantined: self.store.quarantined()?,
            next,
        })
    }

    /// One pod, by cgroup or by the CNI container that enrolled it.
    pub fn pod(&self, selector: &PodSelector) -> Result<Option<NodePod>, NodeError> {
        let Some(cgroup_id) = self.selected(selector)? else {
            return Ok(None);
        };
        let status = match Redirector::read_only(self.root.clone())? {
            Some(redirector) => redirector.pod(cgroup_id)?,
            None => None,
        };
        Ok(self.with_records(status.into_iter().collect())?.pop())
    }

    /// The pods' statuses with their state files: the cgroup path comes from the record (if the
    /// cgroup there is still the pod's), or from a walk of the cgroup tree for the others.
    fn with_records(&self, pods: Vec<pods::PodStatus>) -> Result<Vec<NodePod>, NodeError> {
        let mut unplaced = Vec::new();
        let mut out = Vec::with_capacity(pods.len());
        for mut status in pods {
            let record = self.store.get(status.cgroup_id)?;
            status.cgroup = record
                .as_ref()
                .map(|record| &record.cgroup)
                .filter(|path| fs::metadata(path).is_ok_and(|m| m.ino() == status.cgroup_id))
                .cloned();
            if status.cgroup.is_none() {
                unplaced.push(status.cgroup_id);
            }
            let sandboxed = status
                .cgroup
                .as_deref()
                .and_then(pod_cgroup::sandboxed_runtime);
            let (meta, follow) = record
                .map(|record| (record.meta, record.follow))
                .unwrap_or_default();
            out.push(NodePod {
                status,
                meta,
                addresses_followed: follow.count,
                sandboxed,
            });
        }
        if !unplaced.is_empty() {
            let found: HashMap<u64, PathBuf> = cgroup::cgroup2_mount()
                .map(|mount| cgroup::paths_by_id(&mount, &unplaced))
                .unwrap_or_default();
            for pod in &mut out {
                if pod.status.cgroup.is_none() {
                    pod.status.cgroup = found.get(&pod.status.cgroup_id).cloned();
                }
            }
        }
        Ok(out)
    }

    /// CNI GC: unenrolls the pods `network` attached whose container the runtime no longer
    /// lists. Goes on past a pod it fails to unenroll, and reports each.
    pub fn gc(&self, request: &GcRequest) -> Result<GcReport, NodeError> {
        let mut report = GcReport::default();
        for record in self.store.all()? {
            let Some(attachment) = &record.meta.attachment else {
                continue;
            };
            if attachment.network != request.network
                || request
                    .valid_container_ids
                    .contains(&attachment.container_id)
            {
                continue;
            }
            let pod = PodRef::from(&record);
            match self.unenroll_id(record.cgroup_id) {
                Ok(_) => report.collected.push(CollectedPod {
                    pod,
                    reason: CollectReason::NotAttached,
                }),
                Err(error) => report.failed.push(FailedPod {
                    pod,
                    error: error.to_string(),
                }),
            }
        }
        Ok(report)
    }

    /// Carries out the pending CNI DELs; returns how many were done (those that fail stay).
    pub fn run_pending_deletes(&self) -> Result<usize, NodeError> {
        let Some(pending) = &self.pending else {
            return Ok(0);
        };
        let mut done = 0;
        for (path, delete) in pending.list()? {
            match self.unenroll(&PodSelector::ContainerId(delete.container_id.clone())) {
                Ok(cgroup_id) => {
                    tracing::info!(container = %delete.container_id, ?cgroup_id, "carried out a pending CNI DEL");
                    fs::remove_file(&path).map_err(|source| NodeError::Pending {
                        path: path.clone(),
                        source,
                    })?;
                    done += 1;
                }
                Err(error) => {
                    tracing::warn!(container = %delete.container_id, %error, "a pending CNI DEL failed; kept for later")
                }
            }
        }
        Ok(done)
    }

    /// Switches the programs' per-connection log lines on or off (nothing to do when nothing is
    /// installed).
    pub fn set_connection_logging(&self, on: bool) -> Result<(), NodeError> {
        if let Some(mut redirector) = Redirector::open(self.root.clone())? {
            redirector.set_connection_logging(on)?;
        }
        Ok(())
    }

    /// Removes every pin and attachment, and the state files of the pods they held.
    pub fn uninstall(&self) -> Result<bool, NodeError> {
        let mut enrolled = Vec::new();
        if let Some(redirector) = Redirector::open(self.root.clone())? {
            enrolled.extend(redirector.enrolled_ids()?);
            enrolled.extend(self.root.pinned_pods().map_err(pods::Error::from)?);
            // Uninstalling takes the root's lock, which this handle holds.
            drop(redirector);
        }
        let was_installed = pods::uninstall(&self.root)?;
        for cgroup_id in enrolled {
            self.store.remove(cgroup_id)?;
        }
        Ok(was_installed)
    }
}

/// The cgroup's filesystem and the netns file's identity, for reconcile's later proof.
fn identity(cgroup: &Cgroup, netns: Option<&Path>) -> Result<RecordedIdentity, NodeError> {
    let metadata = cgroup.dir.metadata().map_err(|source| CgroupError::Io {
        path: cgroup.path.clone(),
        source,
    })?;
    let netns_id = netns
        .filter(|path| statfs(*path).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC))
        .and_then(|path| fs::metadata(path).ok())
        .map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        });
    let netns_dir_dev = netns_id
        .and(netns)
        .and_then(Path::parent)
        .and_then(|dir| fs::metadata(dir).ok())
        .map(|m| m.dev());
    Ok(RecordedIdentity {
        cgroup_dev: metadata.dev(),
        netns: netns_id,
        netns_dir_dev,
    })
}

/// A CNI DEL the plugin could not hand to a ready agent: the attachment to unenroll.
pub type PendingDelete = Attachment;

/// The queue of pending CNI DELs: one file per container in a directory beside the agent's
/// socket (`<socket>.pending-del/`), which both the plugin and the agent know.
#[derive(Clone, Debug)]
pub struct PendingDeletes {
    dir: PathBuf,
}

impl PendingDeletes {
    pub fn beside(socket: &Path) -> Self {
        Self {
            dir: super::api::beside(socket, ".pending-del"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a DEL (atomically; recording one twice is fine).
    pub fn add(&self, delete: &PendingDelete) -> Result<PathBuf, NodeError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| NodeError::Pending { path, source }
        };
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let path = self.dir.join(file_name_of(&delete.container_id));
        let text = serde_json::to_vec(delete).expect("pending deletes serialize");
        atomic_file::replace(&path, &text, 0o600, Durability::ThisBoot).map_err(io(&path))?;
        Ok(path)
    }

    /// The recorded DELs; unreadable entries are skipped with a warning.
    pub fn list(&self) -> Result<Vec<(PathBuf, PendingDelete)>, NodeError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(NodeError::Pending {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut deletes = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| NodeError::Pending {
                    path: self.dir.clone(),
                    source,
                })?
                .path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            {
                Ok(delete) => deletes.push((path, delete)),
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "an unreadable pending CNI DEL")
                }
            }
        }
        deletes.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(deletes)
    }
}

/// A container id as a file name (the runtime's ids are hex; anything else is escaped).
fn file_name_of(container_id: &str) -> String {
    let safe: String = container_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.json")
}

impl From<&PodRecord> for PodRef {
    fn from(record: &PodRecord) -> Self {
        PodRef {
            cgroup_id: record.cgroup_id,
            cgroup: Some(record.cgroup.clone()),
            pod: record.meta.pod.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::store::PodMeta;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("redirector-node-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn attached(cgroup_id: u64, container: &str) -> PodRecord {
        PodRecord {
            cgroup_id,
            cgroup: format!("/sys/fs/cgroup/kubepods/pod{cgroup_id}").into(),
            identity: None,
            meta: PodMeta {
                attachment: Some(Attachment {
                    network: "net".into(),
                    container_id: container.into(),
                    ifname: "eth0".into(),
                }),
                ..PodMeta::default()
            },
            follow: Default::default(),
        }
    }

    /// The pin root is not on a bpffs, so unenrolling any pod fails: GC reports each failure
    /// instead of stopping at the first.
    #[test]
    fn gc_goes_on_past_a_failure_and_reports_every_one() {
        let dir = scratch("gc");
        let node = Node::new(PinRoot::new(&dir), dir.join("pods"));
        for (id, container) in [(1, "a"), (2, "b"), (3, "keep")] {
            node.store.put(&attached(id, container)).unwrap();
        }
        let report = node
            .gc(&GcRequest {
                network: "net".into(),
                valid_container_ids: vec!["keep".into()],
            })
            .unwrap();
        let failed: Vec<u64> = report.failed.iter().map(|f| f.pod.cgroup_id).collect();
        assert_eq!(failed, [1, 2], "{report:?}");
        assert!(report.failed[0].error.contains("bpffs"), "{report:?}");
        assert_eq!(report.collected, vec![]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pending_deletes_are_recorded_beside_the_socket_and_listed() {
        let dir = scratch("pending");
        let pending = PendingDeletes::beside(&dir.join("agent.sock"));
        assert_eq!(pending.dir(), dir.join("agent.sock.pending-del"));
        assert_eq!(pending.list().unwrap(), vec![]);
        let delete = PendingDelete {
            network: "net".into(),
            container_id: "../abc".into(),
            ifname: "eth0".into(),
        };
        let path = pending.add(&delete).unwrap();
        pending.add(&delete).unwrap();
        assert_eq!(path.parent(), Some(pending.dir()));
        assert_eq!(pending.list().unwrap(), vec![(path, delete)]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
