//! One node's redirector state: the bpffs pins (programs, maps, links) and the pod state files.
//! Every API request is carried out here, by the agent or, when none runs, by the CLI itself.
use std::path::PathBuf;

use super::{
    api::{
        CollectReason, CollectedPod, EnrollRequest, EnrolledPod, ErrorKind, GcRequest, NodePod,
        NodeStatus, PodRef, PodSelector, Reply, Request, Unenrolled,
    },
    store::{PodRecord, PodStore, StoreError},
};
use crate::{
    cgroup::{Cgroup, CgroupError},
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
}

impl NodeError {
    /// Whether the caller asked for something wrong, or carrying out a fine request failed.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Cgroup(_) | Self::Redirector(pods::Error::Cgroup(_)) => ErrorKind::InvalidInput,
            _ => ErrorKind::Internal,
        }
    }
}

/// Where a node keeps its state.
#[derive(Clone, Debug)]
pub struct Node {
    pub root: PinRoot,
    pub store: PodStore,
}

impl Node {
    pub fn new(root: PinRoot, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            root,
            store: PodStore::new(state_dir),
        }
    }

    /// Carries out one API request; pods enrolled without a policy get `default_policy`.
    pub fn handle(&self, request: &Request, default_policy: &Policy) -> Result<Reply, NodeError> {
        Ok(match request {
            Request::Enroll(enroll) => Reply::Enrolled(self.enroll(enroll, default_policy)?),
            Request::Unenroll(selector) => Reply::Unenrolled(Unenrolled {
                cgroup_id: self.unenroll(selector)?,
            }),
            Request::Status => Reply::Status(self.status()?),
            Request::Gc(gc) => Reply::Collected(self.gc(gc)?),
        })
    }

    /// Enrolls a pod (or updates an enrolled one) and records what the request tells about it.
    /// On failure the pod's state is as before.
    pub fn enroll(
        &self,
        request: &EnrollRequest,
        default_policy: &Policy,
    ) -> Result<EnrolledPod, NodeError> {
        let cgroup = Cgroup::open(&request.cgroup)?;
        let policy = request.policy.as_ref().unwrap_or(default_policy);
        let previous = self.store.get(cgroup.id)?;
        let meta = previous
            .as_ref()
            .map(|record| record.meta.clone())
            .unwrap_or_default()
            .updated_with(&request.meta);
        self.store.put(&PodRecord {
            cgroup_id: cgroup.id,
            cgroup: cgroup.path.clone(),
            meta: meta.clone(),
        })?;
        if let Err(error) = pods::enroll(&self.root, &cgroup.path, policy, meta.netns.as_deref()) {
            let restored = match &previous {
                Some(record) => self.store.put(record),
                None => self.store.remove(cgroup.id),
            };
            if let Err(restore_error) = restored {
                tracing::warn!(cgroup_id = cgroup.id, %restore_error, "restoring the pod's state file");
            }
            return Err(error.into());
        }
        Ok(EnrolledPod {
            cgroup: cgroup.path,
            cgroup_id: cgroup.id,
            policy: policy.clone(),
        })
    }

    /// Unenrolls a pod; returns its cgroup id when there was one. Idempotent.
    pub fn unenroll(&self, selector: &PodSelector) -> Result<Option<u64>, NodeError> {
        let cgroup_id = match selector {
            PodSelector::Cgroup(path) => Cgroup::open(path)?.id,
            PodSelector::ContainerId(container_id) => {
                match self.store.find_container(container_id)? {
                    Some(record) => record.cgroup_id,
                    None => return Ok(None),
                }
            }
        };
        Ok(self.unenroll_id(cgroup_id)?.then_some(cgroup_id))
    }

    /// Removes a pod's pins and map entries, then its state file.
    pub(super) fn unenroll_id(&self, cgroup_id: u64) -> Result<bool, NodeError> {
        let was_enrolled = match Redirector::open(self.root.clone())? {
            Some(mut redirector) => redirector.unenroll(cgroup_id)?,
            None => false,
        };
        let had_record = self.store.get(cgroup_id)?.is_some();
        self.store.remove(cgroup_id)?;
        Ok(was_enrolled || had_record)
    }

    /// Every enrolled pod with what the state files know about it.
    pub fn status(&self) -> Result<NodeStatus, NodeError> {
        let (pods, records) = match Redirector::open(self.root.clone())? {
            Some(redirector) => (redirector.pods()?, redirector.records()),
            None => (Vec::new(), RecordCounts::default()),
        };
        let pods = pods
            .into_iter()
            .map(|status| {
                let meta = self
                    .store
                    .get(status.cgroup_id)?
                    .map(|record| record.meta)
                    .unwrap_or_default();
                Ok(NodePod { status, meta })
            })
            .collect::<Result<_, NodeError>>()?;
        Ok(NodeStatus {
            pods,
            records,
            agent: None,
        })
    }

    /// CNI GC: unenrolls the pods `network` attached whose container the runtime no longer lists.
    pub fn gc(&self, request: &GcRequest) -> Result<Vec<CollectedPod>, NodeError> {
        let mut collected = Vec::new();
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
            self.unenroll_id(record.cgroup_id)?;
            collected.push(CollectedPod {
                pod: PodRef::from(&record),
                reason: CollectReason::NotAttached,
            });
        }
        Ok(collected)
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
            enrolled.extend(redirector.pods()?.iter().map(|pod| pod.cgroup_id));
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

impl From<&PodRecord> for PodRef {
    fn from(record: &PodRecord) -> Self {
        PodRef {
            cgroup_id: record.cgroup_id,
            cgroup: Some(record.cgroup.clone()),
            pod: record.meta.pod.clone(),
        }
    }
}
