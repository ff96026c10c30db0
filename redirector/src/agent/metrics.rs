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
use redirector_common::{MAX_PODS, MAX_TRACKED_CONNECTIONS};

use super::api::{NodePod, NodeStatus};
use crate::pods::RecordCounts;
use redirector_common::PodStats as Counters;

pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// What the agent measures itself, across scrapes.
#[derive(Debug)]
pub struct Metrics {
    enroll_seconds: Histogram,
    unenroll_seconds: Histogram,
    collected_pods: Counter,
    totals: Mutex<Totals>,
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
            totals: Mutex::default(),
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

    /// The scrape's text for `status` (taken just before).
    pub fn render(&self, status: &NodeStatus, ready: bool) -> String {
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
        registry.register_collector(Box::new(Snapshot {
            totals: self.totals(&status.pods),
            pods: status.pods.clone(),
            records: status.records,
            ready,
        }));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

/// The per-scrape values.
#[derive(Debug)]
struct Snapshot {
    pods: Vec<NodePod>,
    totals: Counters,
    records: RecordCounts,
    ready: bool,
}

/// A counter's metric name (without prefix and `_total`), help, and value.
type CounterMetric = (&'static str, &'static str, fn(&Counters) -> u64);

const COUNTERS: [CounterMetric; 7] = [
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
        gauge(
            &mut encoder,
            "pods",
            "Enrolled pods",
            self.pods.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "pods_capacity",
            "Most pods the per-pod maps hold",
            i64::from(MAX_PODS),
        )?;
        let mut records = encoder.encode_descriptor(
            "connection_records",
            "Entries in the connection-record maps",
            None,
            MetricType::Gauge,
        )?;
        for (map, count) in [
            ("by_cookie", self.records.by_cookie),
            ("by_peer", self.records.by_peer),
        ] {
            ConstGauge::new(count as i64).encode(records.encode_family(&[("map", map)])?)?;
        }
        gauge(
            &mut encoder,
            "connection_records_capacity",
            "Size of each connection-record map (LRU)",
            i64::from(MAX_TRACKED_CONNECTIONS),
        )?;
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
        }
    }

    fn status(pods: Vec<NodePod>) -> NodeStatus {
        NodeStatus {
            pods,
            records: RecordCounts {
                by_cookie: 2,
                by_peer: 1,
            },
            agent: None,
        }
    }

    #[test]
    fn renders_pods_totals_and_occupancy() {
        let metrics = Metrics::default();
        metrics.observe_enroll(Duration::from_millis(3));
        let text = metrics.render(&status(vec![pod(7, 5), pod(9, 2)]), true);
        for line in [
            "redirector_ready 1",
            "redirector_pods 2",
            r#"redirector_connection_records{map="by_cookie"} 2"#,
            "redirector_connection_records_capacity 65536",
            "redirector_redirected_connections_total 7",
            r#"redirector_pod_redirected_connections_total{cgroup_id="7",pod_uid="uid-7",namespace="default",pod="web"} 5"#,
            "redirector_enroll_duration_seconds_count 1",
            "# TYPE redirector_pod_original_dst_misses_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn totals_keep_the_counts_of_pods_that_left() {
        let metrics = Metrics::default();
        metrics.render(&status(vec![pod(7, 5), pod(9, 2)]), true);
        let text = metrics.render(&status(vec![pod(9, 4)]), true);
        assert!(
            text.lines()
                .any(|l| l == "redirector_redirected_connections_total 9"),
            "{text}"
        );
    }
}
