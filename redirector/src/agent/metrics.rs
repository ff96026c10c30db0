//! `/metrics` in the Prometheus text format. Per-pod counters are read from the kernel's
//! per-CPU maps at each scrape (summed over CPUs, [`crate::pods::Redirector::pods`]); node
//! totals add the last counts of pods that have left since the agent started, so they never go
//! down; request latencies are histograms kept by the agent.
use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use redirector_common::MAX_PODS;

use super::api::{CniCounts, NodePod, NodeStatus};
use crate::{cni::select::Reason, loader::UpgradeReport, pods::RecordCounts};
use redirector_common::PodStats as Counters;

pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// What the agent measures itself, across scrapes.
#[derive(Debug)]
pub struct Metrics {
    enroll_seconds: Histogram,
    unenroll_seconds: Histogram,
    collected_pods: Counter,
    enrolled_from_runtime: Counter,
    reconcile_failures: Counter,
    program_upgrades: Counter,
    upgraded_links: Counter,
    addresses_followed: Counter,
    address_follow_failures: Counter,
    totals: Mutex<Totals>,
    cni: Mutex<CniCounts>,
}

/// Counts of pods that are gone, and the last counts seen of those still there.
#[derive(Debug, Default)]
struct Totals {
    departed: Counters,
    last_seen: BTreeMap<u64, Counters>,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            enroll_seconds: latency_histogram(),
            unenroll_seconds: latency_histogram(),
            collected_pods: Counter::default(),
            enrolled_from_runtime: Counter::default(),
            reconcile_failures: Counter::default(),
            program_upgrades: Counter::default(),
            upgraded_links: Counter::default(),
            addresses_followed: Counter::default(),
            address_follow_failures: Counter::default(),
            totals: Mutex::default(),
            cni: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn observe_enroll(&self, elapsed: Duration) {
        self.enroll_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn observe_unenroll(&self, elapsed: Duration) {
        self.unenroll_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn count_collected(&self, pods: usize) {
        self.collected_pods.inc_by(pods as u64);
    }

    pub fn count_enrolled_from_runtime(&self, pods: usize) {
        self.enrolled_from_runtime.inc_by(pods as u64);
    }

    pub fn count_reconcile_failure(&self) {
        self.reconcile_failures.inc();
    }

    pub fn count_upgrade(&self, upgrade: &UpgradeReport) {
        self.program_upgrades.inc();
        self.upgraded_links.inc_by(upgrade.links as u64);
    }

    pub fn count_addresses_followed(&self) {
        self.addresses_followed.inc();
    }

    pub fn count_address_follow_failure(&self) {
        self.address_follow_failures.inc();
    }

    pub fn address_follow_failures(&self) -> u64 {
        self.address_follow_failures.get()
    }

    pub fn count_cni_outcome(&self, reason: Reason) {
        self.cni
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count(reason);
    }

    pub fn cni_counts(&self) -> CniCounts {
        self.cni.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Node totals: the pods there now plus those that left.
    fn totals(&self, pods: &[NodePod]) -> Counters {
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let now: BTreeMap<u64, Counters> = pods
            .iter()
            .map(|pod| (pod.status.cgroup_id, pod.status.counters))
            .collect();
        let departed: Vec<Counters> = totals
            .last_seen
            .iter()
            .filter(|(id, _)| !now.contains_key(id))
            .map(|(_, counters)| *counters)
            .collect();
        for counters in departed {
            totals.departed.add(&counters);
        }
        let mut sum = totals.departed;
        now.values().for_each(|counters| sum.add(counters));
        totals.last_seen = now;
        sum
    }

    /// The scrape's text for `status` (taken just before, with the agent's report). Per-pod
    /// series only for the `per_pod` pods with the most connections: a node's series stay
    /// bounded whatever its number of pods.
    pub fn render(&self, status: &NodeStatus, per_pod: usize) -> String {
        let mut registry = Registry::with_prefix("redirector");
        registry.register(
            "enroll_duration_seconds",
            "Time the agent took to enroll a pod",
            self.enroll_seconds.clone(),
        );
        registry.register(
            "unenroll_duration_seconds",
            "Time the agent took to unenroll a pod",
            self.unenroll_seconds.clone(),
        );
        registry.register(
            "collected_pods",
            "Pods unenrolled because their cgroup, netns or attachment was gone",
            self.collected_pods.clone(),
        );
        registry.register(
            "enrolled_from_runtime_pods",
            "Injected pods the container runtime ran uncaptured, enrolled by reconcile",
            self.enrolled_from_runtime.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconcile passes stopped because they could not tell whether pods are gone",
            self.reconcile_failures.clone(),
        );
        registry.register(
            "program_upgrades",
            "Times the agent replaced pinned programs of another build with its own",
            self.program_upgrades.clone(),
        );
        registry.register(
            "program_upgraded_links",
            "Pod links whose program the agent replaced (BPF_LINK_UPDATE)",
            self.upgraded_links.clone(),
        );
        registry.register(
            "addresses_followed",
            "Times a pod was enrolled again because its addresses changed",
            self.addresses_followed.clone(),
        );
        registry.register(
            "address_follow_failures",
            "Failures to follow a pod's address changes (each is logged with the pod)",
            self.address_follow_failures.clone(),
        );
        let agent = status.agent.clone().unwrap_or_default();
        registry.register_collector(Box::new(Snapshot {
            totals: self.totals(&status.pods),
            enrolled: status.pods.len(),
            pods: busiest(&status.pods, per_pod),
            records: status.records,
            ready: agent.ready,
            quarantined: status.quarantined.len(),
            stuck: agent.stuck.len(),
            cni: self.cni_counts(),
        }));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

/// The `n` pods with the most connections.
fn busiest(pods: &[NodePod], n: usize) -> Vec<NodePod> {
    let connections = |pod: &NodePod| {
        let c = &pod.status.counters;
        c.redirected + c.exempted + c.inbound_captured + c.inbound_excluded
    };
    let mut pods = pods.to_vec();
    pods.sort_by_key(|pod| std::cmp::Reverse(connections(pod)));
    pods.truncate(n);
    pods
}

/// The per-scrape values.
#[derive(Debug)]
struct Snapshot {
    /// Those that get per-pod series.
    pods: Vec<NodePod>,
    enrolled: usize,
    totals: Counters,
    records: RecordCounts,
    ready: bool,
    quarantined: usize,
    stuck: usize,
    cni: CniCounts,
}

/// A counter's metric name (without prefix and `_total`), help, and value.
type CounterMetric = (&'static str, &'static str, fn(&Counters) -> u64);

const COUNTERS: [CounterMetric; 12] = [
    (
        "redirected_connections",
        "Outbound connections redirected to the proxy",
        |c| c.redirected,
    ),
    (
        "exempted_connections",
        "Outbound connections left alone (proxy UID/GID or loopback)",
        |c| c.exempted,
    ),
    (
        "original_dst_lookups",
        "SO_ORIGINAL_DST lookups answered",
        |c| c.orig_dst_lookups,
    ),
    (
        "inbound_captured_connections",
        "Inbound connections handed to the proxy's inbound listener",
        |c| c.inbound_captured,
    ),
    (
        "inbound_excluded_connections",
        "Inbound connections to a port that is not captured",
        |c| c.inbound_excluded,
    ),
    (
        "inbound_no_proxy_connections",
        "Inbound connections to capture while no proxy listened (refused, or delivered with fail-open)",
        |c| c.inbound_no_proxy,
    ),
    (
        "original_dst_misses",
        "SO_ORIGINAL_DST lookups that found no record",
        |c| c.orig_dst_misses,
    ),
    (
        "record_failures",
        "Connects refused because their record could not be stored (out of memory)",
        |c| c.record_failed,
    ),
    (
        "handshake_failures",
        "Captured connects whose record could not be handed to the proxy side",
        |c| c.handshake_failed,
    ),
    (
        "handoff_failures",
        "Proxy-side sockets of captured connections that could not take their record over",
        |c| c.handoff_failed,
    ),
    (
        "listener_failures",
        "Listening sockets on the inbound capture port that could not be registered",
        |c| c.listener_failed,
    ),
    (
        "dns_redirected",
        "UDP DNS queries sent to the proxy's DNS port (datagrams, and connects of UDP sockets)",
        |c| c.dns_redirected,
    ),
];

fn pod_labels(pod: &NodePod) -> [(&'static str, String); 4] {
    let identity = pod.meta.pod.clone().unwrap_or_default();
    [
        ("cgroup_id", pod.status.cgroup_id.to_string()),
        ("pod_uid", identity.uid),
        ("namespace", identity.namespace),
        ("pod", identity.name),
    ]
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "ready",
            "1 once programs are loaded and state reconciled",
            i64::from(self.ready),
        )?;
        gauge(&mut encoder, "pods", "Enrolled pods", self.enrolled as i64)?;
        gauge(
            &mut encoder,
            "quarantined_state_files",
            "Pod state files that could not be read or parsed, moved aside",
            self.quarantined as i64,
        )?;
        gauge(
            &mut encoder,
            "stuck_operations",
            "Requests or passes running longer than the deadline (/healthz fails meanwhile)",
            self.stuck as i64,
        )?;
        gauge(
            &mut encoder,
            "pods_capacity",
            "Most pods the per-pod maps hold",
            i64::from(MAX_PODS),
        )?;
        gauge(
            &mut encoder,
            "handshakes_in_flight",
            "Captured connections whose proxy side does not exist yet (open connections keep their records in socket storage)",
            self.records.in_flight as i64,
        )?;
        gauge(
            &mut encoder,
            "handshakes_capacity",
            "Capacity of the handshake map",
            i64::from(self.records.capacity),
        )?;
        gauge(
            &mut encoder,
            "handshakes_overflowed",
            "Captured connections of the enrolled pods whose record could not be kept for their proxy (the handshake map was full)",
            self.records.overflowed as i64,
        )?;
        for (name, help, failing, counts) in [
            (
                "cni_pods_skipped",
                "Pods the CNI plugin passed through uncaptured, by reason",
                false,
                &self.cni.skipped,
            ),
            (
                "cni_adds_failed",
                "CNI ADDs failed before enrolling (no annotations from the runtime, an unsupported or malformed annotation), by reason",
                true,
                &self.cni.failed,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            // Every reason from zero, so that rates and alerts need no absent-series handling.
            for reason in Reason::ALL.into_iter().filter(|r| r.fails_add() == failing) {
                ConstCounter::new(counts.get(&reason).copied().unwrap_or(0))
                    .encode(family.encode_family(&[("reason", reason.name())])?)?;
            }
        }
        for (name, help, value) in COUNTERS {
            let total = ConstCounter::new(value(&self.totals));
            total.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
            let pod_name = format!("pod_{name}");
            let mut family = encoder.encode_descriptor(
                &pod_name,
                &format!("{help}, per pod"),
                None,
                MetricType::Counter,
            )?;
            for pod in &self.pods {
                ConstCounter::new(value(&pod.status.counters))
                    .encode(family.encode_family(&pod_labels(pod))?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "pod_addresses_followed",
            "Times the pod was enrolled again because its addresses changed",
            None,
            MetricType::Counter,
        )?;
        for pod in &self.pods {
            ConstCounter::new(pod.addresses_followed)
                .encode(family.encode_family(&pod_labels(pod))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::store::{PodIdentity, PodMeta},
        pods::PodStatus,
    };

    fn pod(cgroup_id: u64, redirected: u64) -> NodePod {
        NodePod {
            status: PodStatus {
                cgroup: Some(format!("/sys/fs/cgroup/pod{cgroup_id}").into()),
                cgroup_id,
                generation: 1,
                proxy_port: 15001,
                inbound_capture_port: 15006,
                inbound_tunnel_port: 15008,
                proxy_uids: vec![1337],
                proxy_gids: vec![1337],
                switches: vec![],
                ports: vec![],
                prefixes: vec![],
                attached: vec![],
                counters: Counters {
                    redirected,
                    exempted: 1,
                    orig_dst_lookups: redirected,
                    dns_redirected: redirected + 1,
                    ..Counters::default()
                },
            },
            meta: PodMeta {
                pod: Some(PodIdentity {
                    uid: format!("uid-{cgroup_id}"),
                    namespace: "default".into(),
                    name: "web".into(),
                }),
                ..PodMeta::default()
            },
            addresses_followed: cgroup_id,
            sandboxed: None,
        }
    }

    fn status(pods: Vec<NodePod>) -> NodeStatus {
        NodeStatus {
            pods,
            records: RecordCounts {
                in_flight: 2,
                capacity: 65536,
                overflowed: 0,
            },
            agent: Some(crate::agent::api::AgentReport {
                ready: true,
                ..Default::default()
            }),
            ..NodeStatus::default()
        }
    }

    #[test]
    fn renders_pods_totals_and_occupancy() {
        let metrics = Metrics::default();
        metrics.observe_enroll(Duration::from_millis(3));
        metrics.count_addresses_followed();
        for reason in [
            Reason::NotInjected,
            Reason::NotInjected,
            Reason::NoAnnotations,
        ] {
            metrics.count_cni_outcome(reason);
        }
        let counts = metrics.cni_counts();
        assert_eq!(counts.skipped.get(&Reason::NotInjected), Some(&2));
        assert_eq!(counts.failed.get(&Reason::NoAnnotations), Some(&1));
        let text = metrics.render(&status(vec![pod(7, 5), pod(9, 2)]), 10);
        for line in [
            "redirector_ready 1",
            "redirector_pods 2",
            "redirector_handshakes_in_flight 2",
            "redirector_handshakes_capacity 65536",
            "redirector_handshakes_overflowed 0",
            "redirector_redirected_connections_total 7",
            r#"redirector_pod_redirected_connections_total{cgroup_id="7",pod_uid="uid-7",namespace="default",pod="web"} 5"#,
            "redirector_dns_redirected_total 9",
            r#"redirector_pod_dns_redirected_total{cgroup_id="7",pod_uid="uid-7",namespace="default",pod="web"} 6"#,
            "redirector_enroll_duration_seconds_count 1",
            "redirector_addresses_followed_total 1",
            "redirector_address_follow_failures_total 0",
            r#"redirector_pod_addresses_followed_total{cgroup_id="9",pod_uid="uid-9",namespace="default",pod="web"} 9"#,
            "# TYPE redirector_pod_original_dst_misses_total counter",
            r#"redirector_cni_pods_skipped_total{reason="not_injected"} 2"#,
            r#"redirector_cni_pods_skipped_total{reason="istio_init"} 0"#,
            r#"redirector_cni_adds_failed_total{reason="no_annotations"} 1"#,
            r#"redirector_cni_adds_failed_total{reason="unsupported"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
    }

    /// A node with many pods exports per-pod series for the busiest few only (none by default).
    #[test]
    fn per_pod_series_are_bounded() {
        let pods: Vec<NodePod> = (1..=50).map(|id| pod(id, id)).collect();
        let series = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with("redirector_pod_redirected_connections_total{"))
                .count()
        };
        let metrics = Metrics::default();
        assert_eq!(series(&metrics.render(&status(pods.clone()), 0)), 0);
        let text = metrics.render(&status(pods), 3);
        assert_eq!(series(&text), 3, "{text}");
        assert!(
            text.contains(r#"cgroup_id="50""#),
            "the busiest pod: {text}"
        );
        assert!(text.lines().any(|l| l == "redirector_pods 50"), "{text}");
    }

    #[test]
    fn totals_keep_the_counts_of_pods_that_left() {
        let metrics = Metrics::default();
        metrics.render(&status(vec![pod(7, 5), pod(9, 2)]), 10);
        let text = metrics.render(&status(vec![pod(9, 4)]), 10);
        assert!(
            text.lines()
                .any(|l| l == "redirector_redirected_connections_total 9"),
            "{text}"
        );
    }
}
