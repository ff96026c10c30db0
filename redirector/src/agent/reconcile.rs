//! Adopting what a previous agent (or the CLI) left: the pins under the bpffs root are the truth
//! about which pods are enrolled; pods whose cgroup or network namespace is gone are
//! unenrolled, state files without a pod are removed.
use std::{collections::BTreeMap, path::Path};

use nix::sys::statfs::{statfs, NSFS_MAGIC};

use super::{
    api::{CollectReason, CollectedPod, PodRef, ReconcileReport},
    node::{Node, NodeError},
    store::PodRecord,
};
use crate::pods::{self, Redirector};

impl Node {
    /// Loads and pins the programs unless they are pinned already (then nothing is reloaded,
    /// so traffic of enrolled pods never pauses).
    pub fn install(&self) -> Result<(), NodeError> {
        Redirector::install(self.root.clone())?;
        Ok(())
    }

    /// Compares the pins, the maps and the state files with the cgroups and network namespaces
    /// that exist, and unenrolls what is gone.
    pub fn reconcile(&self) -> Result<ReconcileReport, NodeError> {
        let (enrolled, pinned) = match Redirector::open(self.root.clone())? {
            Some(redirector) => (
                redirector.pods()?,
                self.root.pinned_pods().map_err(pods::Error::from)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        let mut records: BTreeMap<u64, PodRecord> = self
            .store
            .all()?
            .into_iter()
            .map(|record| (record.cgroup_id, record))
            .collect();
        let mut report = ReconcileReport::default();
        let mut collect = |pod: PodRef, reason| -> Result<(), NodeError> {
            self.unenroll_id(pod.cgroup_id)?;
            report.collected.push(CollectedPod { pod, reason });
            Ok(())
        };
        let mut adopted = Vec::new();
        for status in &enrolled {
            let record = records.remove(&status.cgroup_id);
            let pod = PodRef {
                cgroup_id: status.cgroup_id,
                cgroup: status.cgroup.clone(),
                pod: record.as_ref().and_then(|r| r.meta.pod.clone()),
            };
            let netns = record.as_ref().and_then(|r| r.meta.netns.as_deref());
            if status.cgroup.is_none() {
                collect(pod, CollectReason::CgroupGone)?;
            } else if netns.is_some_and(netns_is_gone) {
                collect(pod, CollectReason::NetnsGone)?;
            } else {
                adopted.push(pod);
            }
        }
        for cgroup_id in pinned {
            if !enrolled.iter().any(|status| status.cgroup_id == cgroup_id) {
                let record = records.remove(&cgroup_id);
                let pod = PodRef {
                    cgroup_id,
                    cgroup: record.as_ref().map(|r| r.cgroup.clone()),
                    pod: record.and_then(|r| r.meta.pod),
                };
                collect(pod, CollectReason::Incomplete)?;
            }
        }
        for record in records.into_values() {
            collect(PodRef::from(&record), CollectReason::NotEnrolled)?;
        }
        report.adopted = adopted;
        Ok(report)
    }
}

/// A netns file the runtime has removed (or that is no longer a namespace mount). When its
/// directory is not visible at all (say, /run/netns is not mounted into the agent's container)
/// nothing can be told, and the pod is kept.
fn netns_is_gone(path: &Path) -> bool {
    let directory_visible = path.parent().is_some_and(Path::is_dir);
    directory_visible && !statfs(path).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_files_are_checked_only_where_their_directory_is_visible() {
        assert!(
            !netns_is_gone(Path::new("/proc/self/ns/net")),
            "a live netns"
        );
        let scratch = std::env::temp_dir();
        assert!(
            netns_is_gone(&scratch.join("no-such-netns")),
            "missing file"
        );
        assert!(
            !netns_is_gone(Path::new("/no-such-dir/netns/cni-1")),
            "directory not mounted here"
        );
    }
}
