//! Everything the lab runs on. The traffic rig: one server netns, and one client "pod" (a
//! netns and a cgroup, with a veth to the server netns) per way of reaching the server (see
//! [`pods`]). Every variant runs at the same time in its own pod, so the rounds can interleave
//! variants without reconfiguring anything between runs. The setup rig ([`kube_node`]) is a
//! node with an agent and pods in bulk.

pub mod cpus;
pub mod istio;
pub mod kube_node;
mod pods;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use redirector_tests::{
    binary, spawn_in_pod, wait_for_tcp_listener, Cgroup, Child, Identity, Netns, Sandbox, TempDir,
    VethPair,
};

use crate::rig::cpus::{pinned, CpuPlan};
use crate::rig::pods::{
    haproxy_config, server_listen_address, Interception, Pod, PodKind, ProxyKind, ProxySpec,
};
use crate::turns::Turns;
use crate::variant::{Family, Variant, Workload};
use crate::wire::LoadReport;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Process start, connection set-up and the stats request, on top of the run itself.
const LOAD_SLACK: Duration = Duration::from_secs(30);
/// How much longer than its slice a turn may take: the client's I/O timeouts, plus slack.
const TURN_SLACK: Duration = Duration::from_secs(15);

/// Fields drop in order: the server, the pods, the server's cgroup and netns, the HAProxy
/// configuration, and last the sandbox (bpffs root, cgroups).
pub struct Rig {
    server: Child,
    pods: Vec<Pod>,
    /// Held only to be removed (after the server inside it has been killed).
    _server_cgroup: Cgroup,
    server_netns: Netns,
    haproxy_configs: TempDir,
    sandbox: Sandbox,
    cpus: CpuPlan,
    variants: Vec<Variant>,
}

impl Rig {
    pub fn build(variants: &[Variant], cpus: CpuPlan) -> Result<Rig> {
        let sandbox = Sandbox::new("lab")?;
        let server_netns = Netns::create("labsrv")?;
        let server_cgroup = sandbox.cgroup("server")?;
        let listen: Vec<String> = variants
            .iter()
            .map(|&variant| server_listen_address(variant).to_string())
            .collect();
        let serve = pinned(
            cpus.proxy_and_server,
            vec![
                binary("redirector-lab")?.into(),
                "serve".into(),
                "--listen".into(),
                listen.join(",").into(),
            ],
        );
        let server = spawn_in_pod(&server_netns, &server_cgroup, Identity::APP, &serve)?;
        server
            .wait_for_line(|line| line == "listening", STARTUP_TIMEOUT)
            .context("waiting for the lab server")?;
        let mut rig = Rig {
            server,
            pods: Vec::new(),
            _server_cgroup: server_cgroup,
            server_netns,
            haproxy_configs: TempDir::create("labhaproxy")?,
            sandbox,
            cpus,
            variants: variants.to_vec(),
        };
        let mut kinds: Vec<PodKind> = Vec::new();
        for kind in variants.iter().map(|&variant| PodKind::of(variant)) {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        for kind in kinds {
            let pod = rig.pod(kind)?;
            rig.pods.push(pod);
        }
        Ok(rig)
    }

    /// The bpffs root redirector pins its programs under.
    pub fn pin_root(&self) -> &Path {
        self.sandbox.root()
    }

    /// The cgroup every process of the lab runs in.
    pub fn lab_cgroup(&self) -> &Path {
        self.sandbox.cgroups.path()
    }

    /// Makes a pod with its proxies running and its interception in place.
    fn pod(&self, kind: PodKind) -> Result<Pod> {
        eprintln!("lab: setting up pod {}", kind.tag());
        let netns = Netns::create(kind.tag())?;
        let veth = VethPair::connect(&netns, &self.server_netns)?;
        let cgroup = self.sandbox.cgroup(kind.tag())?;
        let mut pod = Pod {
            kind,
            proxies: Vec::new(),
            cgroup,
            veth,
            netns,
        };
        for spec in pod.proxy_specs(&self.variants) {
            let proxy = self.start_proxy(&pod, &spec)?;
            pod.proxies.push(proxy);
        }
        match kind.interception() {
            Interception::None => {}
            Interception::Iptables => {
                for family in self.families_of(kind) {
                    istio::apply(&pod.netns.path(), family)?;
                    istio::ensure_applied(&pod.netns, family)?;
                }
            }
            Interception::Redirector { excluded_port } => {
                let port = excluded_port.map(|port| port.to_string());
                let flags: Vec<&str> = port.iter().flat_map(|port| ["-o", port]).collect();
                self.sandbox.enroll_with(&pod.cgroup, &flags)?;
                istio::ensure_no_nat_rule(&pod.netns)?;
            }
        }
        Ok(pod)
    }

    /// The address families the chosen variants use in pods of `kind`.
    fn families_of(&self, kind: PodKind) -> Vec<Family> {
        let mut families: Vec<Family> = Vec::new();
        for variant in self.variants.iter().filter(|&&v| PodKind::of(v) == kind) {
            if !families.contains(&variant.family()) {
                families.push(variant.family());
            }
        }
        families
    }

    fn start_proxy(&self, pod: &Pod, spec: &ProxySpec) -> Result<Child> {
        let command: Vec<OsString> = match spec.kind {
            ProxyKind::Redirector => {
                let mut command: Vec<OsString> =
                    vec![binary("redirector-proxy")?.into(), "--quiet".into()];
                for listen in &spec.listen {
                    command.extend(["--listen".into(), listen.to_string().into()]);
                }
                if let Some(upstream) = spec.fixed_upstream {
                    command.extend(["--fixed-upstream".into(), upstream.to_string().into()]);
                }
                command
            }
            ProxyKind::Haproxy => {
                let [listen] = spec.listen[..] else {
                    bail!(
                        "an HAProxy of the lab listens on one address: {:?}",
                        spec.listen
                    );
                };
                let config = self.haproxy_configs.path().join(format!(
                    "{}-{}.cfg",
                    pod.kind.tag(),
                    spec.port()
                ));
                std::fs::write(&config, haproxy_config(listen, spec.fixed_upstream))
                    .with_context(|| format!("writing {}", config.display()))?;
                vec!["haproxy".into(), "-db".into(), "-f".into(), config.into()]
            }
        };
        let command = pinned(self.cpus.proxy_and_server, command);
        let proxy = spawn_in_pod(&pod.netns, &pod.cgroup, Identity::PROXY, &command)?;
        wait_for_tcp_listener(proxy.pid(), spec.port(), STARTUP_TIMEOUT).with_context(|| {
            format!(
                "waiting for {:?} in pod {} to listen{}",
                spec.kind,
                pod.kind.tag(),
                proxy.diagnostics()
            )
        })?;
        Ok(proxy)
    }

    fn pod_of(&self, variant: Variant) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|pod| pod.kind == PodKind::of(variant))
            .with_context(|| format!("no pod for variant {}", variant.name()))
    }

    /// Runs one load generator for `variant` in its pod (as an application UID), for `warmup`
    /// and then `duration`, and returns its report.
    pub fn run_load(
        &self,
        variant: Variant,
        workload: Workload,
        warmup: Duration,
        duration: Duration,
    ) -> Result<LoadReport> {
        let duration_arg: [OsString; 2] = [
            "--duration-ms".into(),
            duration.as_millis().to_string().into(),
        ];
        let client = self.spawn_load(variant, workload, warmup, &duration_arg)?;
        load_report(&client, variant, workload, warmup + duration)
    }

    /// Runs the load generators of all `variants` at once, taking turns of `slice` (see
    /// [`Turns`]) until each has had `warmup` and then `duration`; the order of the turns
    /// rotates every cycle. Returns the reports in the order of `variants`.
    pub fn run_in_turns(
        &self,
        variants: &[Variant],
        workload: Workload,
        warmup: Duration,
        duration: Duration,
        slice: Duration,
    ) -> Result<Vec<LoadReport>> {
        let mut turns = Turns::new(variants.len())?;
        let clients = variants
            .iter()
            .enumerate()
            .map(|(i, &variant)| {
                let seat = turns.seat(i);
                let turn_args: [OsString; 6] = [
                    "--go".into(),
                    seat.go_path.clone().into(),
                    "--done".into(),
                    seat.done_path.clone().into(),
                    "--slice-ms".into(),
                    slice.as_millis().to_string().into(),
                ];
                self.spawn_load(variant, workload, warmup, &turn_args)
            })
            .collect::<Result<Vec<_>>>()?;
        let cycles = ((warmup + duration).as_secs_f64() / slice.as_secs_f64()).ceil() as usize;
        for cycle in 0..cycles {
            for k in 0..variants.len() {
                let i = (cycle + k) % variants.len();
                turns.turn(i, slice + TURN_SLACK).with_context(|| {
                    format!(
                        "{} {} in turns{}",
                        variants[i].name(),
                        workload.name(),
                        clients[i].diagnostics()
                    )
                })?;
            }
        }
        // Closing the FIFOs ends the clients' runs.
        drop(turns);
        variants
            .iter()
            .zip(&clients)
            .map(|(&variant, client)| load_report(client, variant, workload, Duration::ZERO))
            .collect()
    }

    /// Starts `redirector-lab load` for `variant` in its pod, with `schedule` arguments.
    fn spawn_load(
        &self,
        variant: Variant,
        workload: Workload,
        warmup: Duration,
        schedule: &[OsString],
    ) -> Result<Child> {
        let pod = self.pod_of(variant)?;
        let mut command: Vec<OsString> = vec![
            binary("redirector-lab")?.into(),
            "load".into(),
            "--to".into(),
            pod.destination(variant).to_string().into(),
            "--pattern".into(),
            workload.pattern_arg().into(),
            "--size".into(),
            workload.size().to_string().into(),
            "--warmup-ms".into(),
            warmup.as_millis().to_string().into(),
        ];
        command.extend(schedule.iter().cloned());
        spawn_in_pod(
            &pod.netns,
            &pod.cgroup,
            Identity::APP,
            &pinned(self.cpus.client, command),
        )
    }

    /// Proof that the intercepting pods intercepted: connections redirected per pod (iptables:
    /// the REDIRECT rule's packet counter, per family; eBPF: redirector's counter). Also checks
    /// again that the eBPF pods have no nat rule, and that the not-captured pod redirected
    /// nothing.
    pub fn interception_evidence(&self) -> Result<Vec<(String, u64)>> {
        let mut evidence = Vec::new();
        for pod in &self.pods {
            match pod.kind.interception() {
                Interception::None => {}
                Interception::Iptables => {
                    for family in self.families_of(pod.kind) {
                        let name = match family {
                            Family::V4 => pod.kind.tag().to_owned(),
                            Family::V6 => format!("{}/v6", pod.kind.tag()),
                        };
                        evidence.push((name, istio::redirected_connections(&pod.netns, family)?));
                    }
                }
                Interception::Redirector { excluded_port } => {
                    istio::ensure_no_nat_rule(&pod.netns)?;
                    let redirected = self.sandbox.counters(&pod.cgroup)?.redirected;
                    if excluded_port.is_some() {
                        ensure!(
                            redirected == 0,
                            "pod {} redirected {redirected} connections, though all its traffic goes to the port its policy excludes",
                            pod.kind.tag()
                        );
                    } else {
                        evidence.push((pod.kind.tag().to_owned(), redirected));
                    }
                }
            }
        }
        Ok(evidence)
    }

    /// The server is still up (a crash would show as failed runs, but say why).
    pub fn check_server(&self) -> Result<()> {
        self.server.ensure_running()
    }
}

/// Waits for a load generator that has `left` of its run to go, and parses its report.
fn load_report(
    client: &Child,
    variant: Variant,
    workload: Workload,
    left: Duration,
) -> Result<LoadReport> {
    let output = client
        .wait_exit(left + LOAD_SLACK)?
        .ensure_success()
        .with_context(|| format!("{} {} run", variant.name(), workload.name()))?;
    let last = output.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("parsing the load report {last:?}"))
}
