//! Adopting what a previous agent (or the CLI) left, collecting pods that are gone, and
//! enrolling the injected pods a container runtime runs uncaptured. The pins and maps under
//! the bpffs root say which pods are enrolled; a [`PodSource`] says which still exist. A pod is only collected on positive proof that it is gone, seen in two passes
//! in a row ([`Suspects`]); any doubt stops the whole pass before anything is collected.
//!
//! A pass reads the maps without the root's lock and the files without the agent's; only the
//! unenrolls it decides take them.
use std::collections::BTreeMap;

use super::{
    api::{CollectReason, CollectedPod, PodRef, ReconcileReport},
    evidence::{EvidenceError, PodSource, Presence},
    node::{Node, NodeError},
    runtime::RunningPod,
    store::{PodRecord, RecordedIdentity},
};
use crate::{
    cgroup,
    loader::UpgradeReport,
    pods::{self, RecordCounts, Redirector},
    policy::Policy,
};

/// Pods found gone in the last pass, waiting for a second sighting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suspects(BTreeMap<u64, CollectReason>);

impl Suspects {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Splits this pass's `candidates` into those to collect now (seen gone, for the same
    /// reason, in the previous pass too) and the next pass's suspects.
    fn confirm(&mut self, candidates: Vec<(PodRef, CollectReason)>) -> Vec<CollectedPod> {
        let previous = std::mem::take(&mut self.0);
        let mut confirmed = Vec::new();
        for (pod, reason) in candidates {
            if previous.get(&pod.cgroup_id) == Some(&reason) {
                confirmed.push(CollectedPod { pod, reason });
            } else {
                self.0.insert(pod.cgroup_id, reason);
            }
        }
        confirmed
    }
}

/// One pass's findings: what to adopt, what to collect and what to enroll.
#[derive(Debug, Default)]
pub struct Plan {
    pub adopted: Vec<PodRef>,
    pub collect: Vec<CollectedPod>,
    /// Running pods the CNI plugin would capture that are not enrolled.
    pub enroll: Vec<RunningPod>,
}

/// How long after its connect a handshake no proxy took over is removed: well past the
/// client's SYN retries (about two minutes by default).
pub const HANDSHAKE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(300);

impl Node {
    /// Loads and pins the programs unless they are pinned already (then nothing is reloaded,
    /// so traffic of enrolled pods never pauses); pinned programs of another build are
    /// replaced in every pod's links, which is reported.
    pub fn install(&self) -> Result<Option<UpgradeReport>, NodeError> {
        Ok(Redirector::install(self.root.clone(), &self.load)?.upgrade())
    }

    /// Removes handshakes no proxy took over within [`HANDSHAKE_EXPIRY`], and returns how many
    /// went and how full the handshake map is.
    pub fn maintain_records(&self) -> Result<(usize, RecordCounts), NodeError> {
        let Some(mut redirector) = Redirector::open(self.root.clone())? else {
            return Ok((0, RecordCounts::default()));
        };
        let expired = redirector.expire_handshakes(HANDSHAKE_EXPIRY)?;
        self.handshake_baseline
            .store(expired.baseline, std::sync::atomic::Ordering::Relaxed);
        Ok((expired.removed, redirector.records(expired.baseline)?))
    }

    /// Looks at every enrolled pod, pin and state file, and decides (with `suspects`, the
    /// previous pass's sightings) what to collect. Changes nothing but `suspects` and the
    /// records it rebuilds for enrolled pods that had none; an error means nothing is to be
    /// collected.
    pub fn reconcile_plan(
        &self,
        source: &dyn PodSource,
        suspects: &mut Suspects,
    ) -> Result<Plan, NodeError> {
        let (enrolled, pinned) = match Redirector::read_only(self.root.clone())? {
            Some(redirector) => (
                redirector.enrolled_ids()?,
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
        source.check().map_err(NodeError::Evidence)?;
        let mut candidates = Vec::new();
        let mut adopted = Vec::new();
        let mut unrecorded = Vec::new();
        for &cgroup_id in &enrolled {
            let Some(record) = records.remove(&cgroup_id) else {
                unrecorded.push(cgroup_id);
                continue;
            };
            let pod = PodRef::from(&record);
            match source.presence(&record).map_err(NodeError::Evidence)? {
                Presence::Present => adopted.push(pod),
                Presence::Gone(reason) => candidates.push((pod, reason)),
            }
        }
        adopted.extend(self.rebuild_records(&unrecorded)?);
        for cgroup_id in pinned {
            if enrolled.binary_search(&cgroup_id).is_err() {
                let pod = match records.remove(&cgroup_id) {
                    Some(record) => PodRef::from(&record),
                    None => PodRef {
                        cgroup_id,
                        cgroup: None,
                        pod: None,
                    },
                };
                candidates.push((pod, CollectReason::Incomplete));
            }
        }
        for record in records.into_values() {
            candidates.push((PodRef::from(&record), CollectReason::NotEnrolled));
        }
        let enroll: Vec<RunningPod> = source
            .running()
            .into_iter()
            .filter(|pod| enrolled.binary_search(&pod.cgroup_id).is_err())
            .collect();
        // The stale state file of a pod about to be enrolled is rewritten, not collected.
        candidates.retain(|(pod, _)| enroll.iter().all(|e| e.cgroup_id != pod.cgroup_id));
        Ok(Plan {
            adopted,
            collect: suspects.confirm(candidates),
            enroll,
        })
    }

    /// Enrolled pods without a state file (it was quarantined, or they were enrolled by the
    /// library): their cgroup is looked up by id, and a record is written so that a later pass
    /// can prove them gone. Those not found are kept, and adopted without a path.
    fn rebuild_records(&self, ids: &[u64]) -> Result<Vec<PodRef>, NodeError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mount = cgroup::cgroup2_mount()
            .map_err(|e| NodeError::Evidence(EvidenceError(e.to_string())))?;
        let found = cgroup::paths_by_id(&mount, ids);
        let mut adopted = Vec::new();
        for &cgroup_id in ids {
            let Some(path) = found.get(&cgroup_id) else {
                tracing::warn!(
                    cgroup_id,
                    "an enrolled pod has no state file and its cgroup was not found; kept"
                );
                adopted.push(PodRef {
                    cgroup_id,
                    cgroup: None,
                    pod: None,
                });
                continue;
            };
            let record = PodRecord {
                cgroup_id,
                cgroup: path.clone(),
                identity: std::fs::metadata(path)
                    .ok()
                    .map(|metadata| RecordedIdentity {
                        cgroup_dev: std::os::unix::fs::MetadataExt::dev(&metadata),
                        ..RecordedIdentity::default()
                    }),
                meta: Default::default(),
                follow: Default::default(),
            };
            self.store.put(&record)?;
            tracing::info!(cgroup_id, cgroup = %path.display(), "rebuilt the state file of an enrolled pod");
            adopted.push(PodRef::from(&record));
        }
        Ok(adopted)
    }

    /// Unenrolls what a plan collects and enrolls what it enrolls (pods without a policy of
    /// their own get `default_policy`); those that fail are left for the next pass.
    pub fn apply(&self, plan: Plan, default_policy: &Policy) -> ReconcileReport {
        let mut collected = Vec::new();
        for pod in plan.collect {
            match self.unenroll_id(pod.pod.cgroup_id) {
                Ok(_) => collected.push(pod),
                Err(error) => {
                    tracing::warn!(cgroup_id = pod.pod.cgroup_id, %error, "collecting a gone pod")
                }
            }
        }
        let mut enrolled = Vec::new();
        for pod in plan.enroll {
            let pod_ref = PodRef {
                cgroup_id: pod.cgroup_id,
                cgroup: Some(pod.request.cgroup.clone()),
                pod: pod.request.meta.pod.clone(),
            };
            match self.enroll(&pod.request, default_policy) {
                Ok(_) => enrolled.push(pod_ref),
                Err(error) => {
                    tracing::warn!(cgroup_id = pod.cgroup_id, pod = ?pod_ref.pod, %error, "enrolling a running injected pod")
                }
            }
        }
        ReconcileReport {
            adopted: plan.adopted,
            collected,
            enrolled,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::{agent::store::PodMeta, pins::PinRoot};

    fn pod(cgroup_id: u64) -> PodRef {
        PodRef {
            cgroup_id,
            cgroup: None,
            pod: None,
        }
    }

    #[test]
    fn pods_are_collected_when_seen_gone_twice_in_a_row_for_the_same_reason() {
        let mut suspects = Suspects::default();
        let first = suspects.confirm(vec![
            (pod(1), CollectReason::CgroupGone),
            (pod(2), CollectReason::NotEnrolled),
        ]);
        assert!(first.is_empty(), "{first:?}");
        let second = suspects.confirm(vec![
            (pod(1), CollectReason::CgroupGone),
            (pod(2), CollectReason::NetnsGone),
            (pod(3), CollectReason::CgroupGone),
        ]);
        assert_eq!(
            second.iter().map(|c| c.pod.cgroup_id).collect::<Vec<_>>(),
            [1]
        );
        // Pod 3 came back: it is no longer suspected.
        let third = suspects.confirm(vec![(pod(2), CollectReason::NetnsGone)]);
        assert_eq!(
            third.iter().map(|c| c.pod.cgroup_id).collect::<Vec<_>>(),
            [2]
        );
        assert!(suspects.is_empty());
    }

    /// A source that cannot tell (or says every pod is gone).
    struct Doubtful(AtomicBool);

    impl PodSource for Doubtful {
        fn check(&self) -> Result<(), EvidenceError> {
            if self.0.load(Ordering::Relaxed) {
                Err(EvidenceError("mountinfo: EMFILE".into()))
            } else {
                Ok(())
            }
        }
        fn presence(&self, _: &PodRecord) -> Result<Presence, EvidenceError> {
            Ok(Presence::Gone(CollectReason::CgroupGone))
        }
    }

    #[test]
    fn a_pass_that_cannot_tell_collects_nothing_and_a_stale_record_goes_after_two_passes() {
        let scratch =
            std::env::temp_dir().join(format!("redirector-reconcile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let node = Node::new(PinRoot::new(scratch.join("no-bpffs")), scratch.join("pods"));
        node.store
            .put(&PodRecord {
                cgroup_id: 5,
                cgroup: "/sys/fs/cgroup/kubepods/pod5".into(),
                identity: None,
                meta: PodMeta::default(),
                follow: Default::default(),
            })
            .unwrap();
        let source = Doubtful(AtomicBool::new(true));
        let mut suspects = Suspects::default();
        for _ in 0..3 {
            let error = node.reconcile_plan(&source, &mut suspects).unwrap_err();
            assert!(error.to_string().contains("EMFILE"), "{error}");
        }
        assert!(suspects.is_empty());
        assert_eq!(node.store.all().unwrap().len(), 1);

        source.0.store(false, Ordering::Relaxed);
        let plan = node.reconcile_plan(&source, &mut suspects).unwrap();
        assert!(plan.collect.is_empty());
        assert_eq!(node.apply(plan, &Policy::default()).collected, vec![]);
        let plan = node.reconcile_plan(&source, &mut suspects).unwrap();
        let report = node.apply(plan, &Policy::default());
        assert_eq!(report.collected.len(), 1, "{report:?}");
        assert_eq!(report.collected[0].reason, CollectReason::NotEnrolled);
        assert_eq!(node.store.all().unwrap(), vec![]);
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    /// A runtime that runs one injected pod no one enrolled, whose stale state file is there.
    struct RunsOne;

    impl PodSource for RunsOne {
        fn check(&self) -> Result<(), EvidenceError> {
            Ok(())
        }
        fn presence(&self, _: &PodRecord) -> Result<Presence, EvidenceError> {
            Ok(Presence::Present)
        }
        fn running(&self) -> Vec<RunningPod> {
            vec![RunningPod {
                cgroup_id: 7,
                request: crate::agent::api::EnrollRequest {
                    cgroup: "/sys/fs/cgroup/kubepods/pod7".into(),
                    meta: PodMeta::default(),
                    policy: None,
                    pod_settings: None,
                    dry_run: false,
                },
            }]
        }
    }

    #[test]
    fn running_pods_not_enrolled_are_planned_for_enroll_and_their_stale_file_is_kept() {
        let scratch =
            std::env::temp_dir().join(format!("redirector-reconcile-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let node = Node::new(PinRoot::new(scratch.join("no-bpffs")), scratch.join("pods"));
        node.store
            .put(&PodRecord {
                cgroup_id: 7,
                cgroup: "/sys/fs/cgroup/kubepods/pod7".into(),
                identity: None,
                meta: PodMeta::default(),
                follow: Default::default(),
            })
            .unwrap();
        let mut suspects = Suspects::default();
        for _ in 0..2 {
            let plan = node.reconcile_plan(&RunsOne, &mut suspects).unwrap();
            assert_eq!(
                plan.enroll
                    .iter()
                    .map(|pod| pod.cgroup_id)
                    .collect::<Vec<_>>(),
                [7]
            );
            assert!(plan.collect.is_empty(), "{:?}", plan.collect);
        }
        assert!(suspects.is_empty());
        std::fs::remove_dir_all(&scratch).unwrap();
    }
}
