//! What the maps cannot hold about an enrolled pod (who it is, its netns, its CNI attachment),
//! one JSON file per pod: `<state dir>/<cgroup id>.json`.
//!
//! Why files under /run (default `/run/redirector/pods`): they outlive the agent, so a restarted
//! agent knows the pods it adopts, and they vanish at reboot together with the bpffs pins they
//! describe. bpffs itself cannot hold them (it only holds BPF objects and directories).
//!
//! Order makes crashes harmless: a record is written before a pod's pins and removed after
//! them, so the worst leftover is a record without pins, which reconcile removes.
use std::{
    fs, io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::atomic_file;

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
#[serde(deny_unknown_fields)]
pub struct PodIdentity {
    pub uid: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
}

/// The CNI attachment that enrolled a pod: DEL and GC find the pod by it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(flatten)]
    pub meta: PodMeta,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct PodStore {
    dir: PathBuf,
}

impl PodStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, cgroup_id: u64) -> PathBuf {
        self.dir.join(format!("{cgroup_id}.json"))
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
        atomic_file::replace(&path, &text, 0o600).map_err(io(&path))
    }

    pub fn get(&self, cgroup_id: u64) -> Result<Option<PodRecord>, StoreError> {
        let path = self.path(cgroup_id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Removes a record; a missing one is fine.
    pub fn remove(&self, cgroup_id: u64) -> Result<(), StoreError> {
        let path = self.path(cgroup_id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::Io { path, source: e })
            }
            _ => Ok(()),
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
        for entry in entries.filter_map(Result::ok) {
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
        Ok(self.all()?.into_iter().find(|record| {
            record
                .meta
                .attachment
                .as_ref()
                .is_some_and(|attachment| attachment.container_id == container_id)
        }))
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
        fs::write(store.dir().join("9.json"), "{").unwrap();
        let message = store.all().unwrap_err().to_string();
        assert!(message.contains("9.json"), "{message}");
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
