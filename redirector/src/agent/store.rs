//! What the maps cannot hold about an enrolled pod (who it is, its netns, its CNI attachment),
//! one JSON file per pod: `<state dir>/<cgroup id>.json`.
//!
//! Why files under /run (default `/run/redirector/pods`): they outlive the agent, so a restarted
//! agent knows the pods it adopts, and they vanish at reboot together with the bpffs pins they
//! describe. bpffs itself cannot hold them (it only holds BPF objects and directories).
//!
//! Order makes crashes harmless: a record is written before a pod's pins and removed after
//! them, so the worst leftover is a record without pins, which reconcile removes.
//!
//! A file that cannot be read or parsed (a truncated write, a downgrade after a field changed
//! type) never stops the node: it is moved aside into `<state dir>/quarantine/` with a warning,
//! and counted in status and metrics. Unknown fields are ignored, so an older agent reads what
//! a newer one wrote (no `deny_unknown_fields` on anything stored here).
use std::{
    collections::HashMap,
    fs, io,
    net::IpAddr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use serde::{Deserialize, Serialize};

use crate::{
    atomic_file::{self, Durability},
    policy::Policy,
};

pub const DEFAULT_STATE_DIR: &str = "/run/redirector/pods";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("pod state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pod state {path} is not a valid pod record: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The Kubernetes pod a cgroup belongs to (from the runtime's K8S_POD_* CNI arguments).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    pub uid: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
}

/// The CNI attachment that enrolled a pod: DEL and GC find the pod by it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

/// Everything known about a pod besides its policy. (No `deny_unknown_fields`: serde does
/// not support it on flattened structs, and records and statuses flatten this one.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    #[serde(default)]
    pub pod: Option<PodIdentity>,
    /// The pod's network namespace file (e.g. `/var/run/netns/cni-…`).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub attachment: Option<Attachment>,
}

impl PodMeta {
    /// `newer`'s fields where it has them, ours elsewhere: re-enrolling from the CLI keeps
    /// what the CNI plugin told about the pod.
    pub fn updated_with(self, newer: &PodMeta) -> PodMeta {
        PodMeta {
            pod: newer.pod.clone().or(self.pod),
            netns: newer.netns.clone().or(self.netns),
            attachment: newer.attachment.clone().or(self.attachment),
        }
    }
}

/// One state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub cgroup_id: u64,
    /// The cgroup's path when it was enrolled.
    pub cgroup: PathBuf,
    /// What the pod's cgroup and netns were at enroll, so that reconcile's proof that a pod is
    /// gone is about these very objects (None in records of older versions).
    #[serde(default)]
    pub identity: Option<RecordedIdentity>,
    #[serde(flatten)]
    pub meta: PodMeta,
    #[serde(default)]
    pub follow: Follow,
}

/// What the agent needs to follow the pod's addresses (see [`super::addrwatch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follow {
    /// The policy of the last enroll, the pod's annotations applied: an address change
    /// enrolls the pod again with it. None in records of older versions.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// The pod's addresses as the last enroll read them.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Times the pod was enrolled again because its addresses changed.
    #[serde(default)]
    pub count: u64,
}

/// Device numbers and inodes recorded at enroll.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedIdentity {
    /// `st_dev` of the cgroup2 filesystem the cgroup was on.
    pub cgroup_dev: u64,
    /// The netns file's nsfs inode (the namespace's inode number) and device.
    #[serde(default)]
    pub netns: Option<FileId>,
    /// `st_dev` of the directory holding the netns file (e.g. the tmpfs of /run/netns): a
    /// missing file only proves the namespace gone when seen in that same directory.
    #[serde(default)]
    pub netns_dir_dev: Option<u64>,
}

/// A file's identity: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct PodStore {
    dir: PathBuf,
    containers: ContainerIndex,
}

/// Container id → cgroup id of every record, so that a CNI DEL finds its pod without reading
/// every record (most DELs on a node are of pods never enrolled, which no record names). Made
/// by one read of every record on first use, then kept by [`PodStore::put`] and
/// [`PodStore::remove`] of this process (and its clones): while an agent runs, every record is
/// written through it. A hit is checked against the record it names.
#[derive(Clone, Debug, Default)]
struct ContainerIndex(Arc<Mutex<Option<HashMap<String, u64>>>>);

impl ContainerIndex {
    fn lock(&self) -> MutexGuard<'_, Option<HashMap<String, u64>>> {
        super::server::lock(&self.0)
    }

    fn note(&self, record: &PodRecord) {
        if let (Some(index), Some(attachment)) = (self.lock().as_mut(), &record.meta.attachment) {
            index.insert(attachment.container_id.clone(), record.cgroup_id);
        }
    }

    fn forget(&self, cgroup_id: u64) {
        if let Some(index) = self.lock().as_mut() {
            index.retain(|_, id| *id != cgroup_id);
        }
    }
}

impl PodStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            containers: ContainerIndex::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, cgroup_id: u64) -> PathBuf {
        self.dir.join(format!("{cgroup_id}.json"))
    }

    /// Whether the pod has a record (its file exists; it is not read).
    pub fn contains(&self, cgroup_id: u64) -> bool {
        self.path(cgroup_id).exists()
    }

    /// Writes the record atomically (a reader sees the old file or the new one, never half).
    pub fn put(&self, record: &PodRecord) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let path = self.path(record.cgroup_id);
        let text = serde_json::to_vec_pretty(record).expect("pod records always serialize");
        atomic_file::replace(&path, &text, 0o600, Durability::ThisBoot).map_err(io(&path))?;
        self.containers.note(record);
        Ok(())
    }

    /// The record of a pod; None when there is none, or when its file was unreadable and has
    /// been quarantined.
    pub fn get(&self, cgroup_id: u64) -> Result<Option<PodRecord>, StoreError> {
        let path = self.path(cgroup_id);
        let problem = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<PodRecord>(&bytes) {
                Ok(record) if record.cgroup_id == cgroup_id => return Ok(Some(record)),
                Ok(record) => format!("it names cgroup id {}", record.cgroup_id),
                Err(source) => StoreError::Corrupt {
                    path: path.clone(),
                    source,
                }
                .to_string(),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => StoreError::Io {
                path: path.clone(),
                source,
            }
            .to_string(),
        };
        self.quarantine(&path, &problem)?;
        Ok(None)
    }

    fn quarantine_dir(&self) -> PathBuf {
        self.dir.join("quarantine")
    }

    /// Moves an unusable state file aside (keeping it for a human to look at).
    fn quarantine(&self, path: &Path, problem: &str) -> Result<(), StoreError> {
        let dir = self.quarantine_dir();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let aside = dir.join(format!("{name}.{stamp}"));
        fs::rename(path, &aside).map_err(io(path))?;
        tracing::warn!(file = %path.display(), moved_to = %aside.display(), problem, "quarantined an unusable pod state file");
        Ok(())
    }

    /// The files quarantined so far.
    pub fn quarantined(&self) -> Result<Vec<PathBuf>, StoreError> {
        let dir = self.quarantine_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Io { path: dir, source }),
        };
        let mut paths = entries
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| StoreError::Io { path: dir, source })?;
        paths.sort();
        Ok(paths)
    }

    /// Removes a record; a missing one is fine.
    pub fn remove(&self, cgroup_id: u64) -> Result<(), StoreError> {
        let path = self.path(cgroup_id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::Io { path, source: e })
            }
            _ => {
                self.containers.forget(cgroup_id);
                Ok(())
            }
        }
    }

    /// Every record, by cgroup id (none when the directory does not exist).
    pub fn all(&self) -> Result<Vec<PodRecord>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Io {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|name| name.strip_suffix(".json"))
                .and_then(|id| id.parse().ok())
            else {
                continue;
            };
            records.extend(self.get(id)?);
        }
        records.sort_by_key(|record| record.cgroup_id);
        Ok(records)
    }

    /// The pod a CNI attachment enrolled.
    pub fn find_container(&self, container_id: &str) -> Result<Option<PodRecord>, StoreError> {
        let indexed = self
            .containers
            .lock()
            .as_ref()
            .map(|index| index.get(container_id).copied());
        let attached = |record: &PodRecord| {
            record
                .meta
                .attachment
                .as_ref()
                .is_some_and(|attachment| attachment.container_id == container_id)
        };
        match indexed {
            Some(Some(cgroup_id)) => Ok(self.get(cgroup_id)?.filter(attached)),
            Some(None) => Ok(None),
            None => {
                let records = self.all()?;
                *self.containers.lock() = Some(
                    records
                        .iter()
                        .filter_map(|record| {
                            let attachment = record.meta.attachment.as_ref()?;
                            Some((attachment.container_id.clone(), record.cgroup_id))
                        })
                        .collect(),
                );
                Ok(records.into_iter().find(|record| attached(record)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PodStore {
        let dir =
            std::env::temp_dir().join(format!("redirector-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        PodStore::new(dir)
    }

    fn record(cgroup_id: u64, container_id: &str) -> PodRecord {
        PodRecord {
            cgroup_id,
            cgroup: format!("/sys/fs/cgroup/kubepods/pod{cgroup_id}").into(),
            identity: None,
            meta: PodMeta {
                pod: Some(PodIdentity {
                    uid: format!("uid-{cgroup_id}"),
                    namespace: "default".into(),
                    name: "app".into(),
                }),
                netns: Some("/var/run/netns/cni-1".into()),
                attachment: Some(Attachment {
                    network: "k8s-pod-network".into(),
                    container_id: container_id.into(),
                    ifname: "eth0".into(),
                }),
            },
            // The policy and addresses round-trip, so that the agent can enroll the pod
            // again with the same settings.
            follow: Follow {
                policy: Some(Policy::default()),
                addresses: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                count: 2,
            },
        }
    }

    #[test]
    fn records_round_trip_and_are_found_by_container() {
        let store = scratch("round-trip");
        assert_eq!(store.all().unwrap(), vec![]);
        store.put(&record(7, "abc")).unwrap();
        store.put(&record(3, "def")).unwrap();
        assert_eq!(store.get(7).unwrap(), Some(record(7, "abc")));
        assert_eq!(
            store.all().unwrap(),
            vec![record(3, "def"), record(7, "abc")]
        );
        assert_eq!(store.find_container("def").unwrap(), Some(record(3, "def")));
        assert_eq!(store.find_container("nope").unwrap(), None);
        store.remove(7).unwrap();
        store.remove(7).unwrap();
        assert_eq!(store.get(7).unwrap(), None);
        fs::remove_dir_all(store.dir()).unwrap();
    }

    /// Once a DEL has looked for a container, the next ones read only the record they find:
    /// a file the scan would have read (and quarantined) stays untouched. Records put, moved to
    /// another container and removed afterwards are found, or not, as they are.
    #[test]
    fn containers_are_found_without_reading_every_record() {
        let store = scratch("index");
        store.put(&record(3, "def")).unwrap();
        assert_eq!(store.find_container("nope").unwrap(), None);
        fs::write(store.dir().join("9.json"), "{").unwrap();
        store.put(&record(7, "abc")).unwrap();
        assert_eq!(store.find_container("abc").unwrap(), Some(record(7, "abc")));
        assert_eq!(store.find_container("def").unwrap(), Some(record(3, "def")));
        assert_eq!(store.find_container("nope").unwrap(), None);
        assert_eq!(store.quarantined().unwrap(), Vec::<PathBuf>::new());
        store.put(&record(3, "ghi")).unwrap();
        assert_eq!(store.find_container("def").unwrap(), None);
        assert_eq!(store.find_container("ghi").unwrap(), Some(record(3, "ghi")));
        store.remove(7).unwrap();
        assert_eq!(store.find_container("abc").unwrap(), None);
        // Another process's view (the CLI's, with no agent) reads every record once.
        let fresh = PodStore::new(store.dir());
        assert_eq!(fresh.find_container("ghi").unwrap(), Some(record(3, "ghi")));
        assert_eq!(fresh.quarantined().unwrap().len(), 1);
        fs::remove_dir_all(store.dir()).unwrap();
    }

    /// A truncated write, a file of a newer version's layout that fails to parse, or one that
    /// cannot be read: each is set aside, and every other record is still served.
    #[test]
    fn a_bad_state_file_is_quarantined_and_the_others_served() {
        let store = scratch("quarantine");
        store.put(&record(3, "def")).unwrap();
        fs::write(store.dir().join("9.json"), "{").unwrap();
        fs::write(store.dir().join("10.json"), r#"{"cgroup_id":"ten"}"#).unwrap();
        fs::create_dir(store.dir().join("11.json")).unwrap();
        assert_eq!(store.all().unwrap(), vec![record(3, "def")]);
        assert_eq!(store.get(9).unwrap(), None);
        assert_eq!(store.find_container("def").unwrap(), Some(record(3, "def")));
        let quarantined: Vec<String> = store
            .quarantined()
            .unwrap()
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(quarantined.len(), 3, "{quarantined:?}");
        for name in ["9.json", "10.json", "11.json"] {
            assert!(
                quarantined.iter().any(|q| q.starts_with(name)),
                "{name} not in {quarantined:?}"
            );
            assert!(!store.dir().join(name).exists(), "{name} left in place");
        }
        fs::remove_dir_all(store.dir()).unwrap();
    }

    /// A downgrade: a newer agent wrote fields this one does not know.
    #[test]
    fn state_files_with_unknown_fields_are_read() {
        let store = scratch("unknown-fields");
        let mut json = serde_json::to_value(record(5, "abc")).unwrap();
        json["added_later"] = serde_json::json!({"x": 1});
        json["pod"]["colour"] = "blue".into();
        json["attachment"]["mtu"] = 1500.into();
        fs::create_dir_all(store.dir()).unwrap();
        fs::write(store.dir().join("5.json"), json.to_string()).unwrap();
        assert_eq!(store.get(5).unwrap(), Some(record(5, "abc")));
        assert_eq!(store.quarantined().unwrap(), Vec::<PathBuf>::new());
        fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn newer_metadata_wins_where_it_has_some() {
        let cni = record(1, "abc").meta;
        let cli = PodMeta::default();
        assert_eq!(cni.clone().updated_with(&cli), cni);
        let moved = PodMeta {
            netns: Some("/var/run/netns/cni-2".into()),
            ..PodMeta::default()
        };
        let updated = cni.clone().updated_with(&moved);
        assert_eq!(updated.netns, moved.netns);
        assert_eq!(updated.pod, cni.pod);
    }
}
