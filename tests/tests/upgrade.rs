//! End-to-end tests of upgrades in place (issue 14): a build whose programs differ replaces the
//! pinned ones in every pod's links while connections run, and a build that cannot read the
//! pinned maps is refused without touching anything. Root only; they fail, never skip, without
//! it.
//!
//! "A build whose programs differ" is this build run with `REDIRECTOR_TEST_PROGRAM_REVISION`
//! set: it tells its programs apart from the pinned ones as another build would, and loads them
//! anew.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use redirector_tests::{
    attached_programs, binary, client_result, files_below, run, spawn_in_pod, wait_for, Child,
    ConnectOptions, ConnectSummary, Counters, HoldOpened, HoldOptions, HoldReport, Identity,
    Output, PinnedMapInfo, Pod, Proxy, ProxyEvent, ProxySettings, Sandbox, Status, TempDir,
};

/// The variable that makes this build's programs another build's (see the module comment).
const TEST_REVISION_ENV: &str = "REDIRECTOR_TEST_PROGRAM_REVISION";
const OTHER_REVISION: &str = "upgrade-test";
/// What `redirector enroll` logs when it replaced the pinned programs.
const UPGRADE_LOG: &str = "replaced the pinned programs with this build's in every pod's links";
const SERVER_PORT: u16 = 8080;
/// Connections opened before the first swap and used after the second.
const HELD: u32 = 8;
/// Bound of the connection loop's count; it stops at the stop file, once both swaps are done.
const LOOP_BOUND: u32 = 50_000;
/// New connections the loop makes under each set of programs before the test goes on.
const LOOP_PROGRESS: usize = 50;
/// Bound of every wait.
const WAIT: Duration = Duration::from_secs(60);
/// Bound of each phase of the held connections (opening, waiting for the go, exchanging): the
/// wait for the go spans both swaps, which load and verify every program twice (slow in an
/// emulated VM).
const HOLD_PHASE: Duration = Duration::from_secs(300);

/// `redirector enroll` of the pod with its netns, run by this build (`revision` None) or by
/// the build `revision` names.
fn enroll_as(sandbox: &Sandbox, pod: &Pod, revision: Option<&str>) -> Result<Output> {
    let args: [OsString; 5] = [
        "enroll".into(),
        "--cgroup".into(),
        pod.cgroup.path().into(),
        "--netns".into(),
        pod.netns.path().into(),
    ];
    let env: Vec<(&str, &str)> = revision
        .map(|revision| (TEST_REVISION_ENV, revision))
        .into_iter()
        .collect();
    sandbox.redirector_with_env(&args, &env)
}

/// (link id, program id) of every bpf_link on the pod's cgroup, sorted.
fn links(pod: &Pod) -> Result<Vec<(u64, u64)>> {
    let mut links = attached_programs(pod.cgroup.path())?
        .iter()
        .map(|link| {
            let field = |name: &str| {
                link[name]
                    .as_u64()
                    .with_context(|| format!("a link without {name}: {link}"))
            };
            Ok((field("id")?, field("prog_id")?))
        })
        .collect::<Result<Vec<_>>>()?;
    links.sort_unstable();
    Ok(links)
}

fn programs_build(sandbox: &Sandbox) -> Result<String> {
    sandbox
        .status()?
        .programs_build
        .context("status names no programs build")
}

/// Every counter of `after` is at least that of `before`: they went on, none was reset.
fn ensure_counters_continue(before: &Counters, after: &Counters) -> Result<()> {
    let fields = |c: &Counters| {
        [
            c.redirected,
            c.exempted,
            c.orig_dst_lookups,
            c.orig_dst_misses,
            c.record_failed,
            c.handshake_failed,
            c.handoff_failed,
        ]
    };
    ensure!(
        fields(before)
            .iter()
            .zip(fields(after))
            .all(|(b, a)| *b <= a),
        "the pod's counters went back: {before:?} -> {after:?}"
    );
    Ok(())
}

/// Waits until the proxy has forwarded `count` connections; returns how many it has.
fn wait_for_forwards(proxy: &Proxy, count: usize, what: &str) -> Result<usize> {
    wait_for(what, WAIT, || {
        let forwarded = proxy.forward_events().len();
        Ok((forwarded >= count).then_some(forwarded))
    })
}

/// `e2e-helper hold`: `HELD` connections to `server`, open until `go_file` appears.
fn hold_connections(pod: &Pod, server: SocketAddr, go_file: &Path) -> Result<Child> {
    let options = HoldOptions {
        to: vec![server],
        count: HELD,
        go_file: go_file.to_owned(),
        phase_s: HOLD_PHASE.as_secs(),
        in_handshake: false,
    };
    let mut command = vec![binary("e2e-helper")?.into_os_string(), "hold".into()];
    command.extend(options.to_args().into_iter().map(OsString::from));
    spawn_in_pod(&pod.netns, &pod.cgroup, Identity::APP, &command)
}

/// With new connections opening in a loop and long-lived ones held open, all through
/// redirector-proxy, the programs are swapped for another build's and back with
/// `BPF_LINK_UPDATE`: every connection reached the server through the proxy, the held ones
/// still report their original destination (getpeername on the application's side,
/// SO_ORIGINAL_DST on the proxy's, both asked after the swaps), the links stayed while their
/// programs changed, and the pod's counters went on.
#[test]
fn programs_swap_and_back_under_live_traffic() -> Result<()> {
    let started = Instant::now();
    let sandbox = Sandbox::new("upgrade")?;
    let pod = sandbox.pod("upg", SERVER_PORT)?;
    let server = pod.server.addr;
    let proxy = pod.start_proxy_with(&ProxySettings {
        ask_again_at_end: true,
        ..ProxySettings::default()
    })?;
    enroll_as(&sandbox, &pod, None)?.ensure_success()?;
    let first_build = programs_build(&sandbox)?;
    let counters_at_start = sandbox.counters(&pod.cgroup)?;

    let files = TempDir::create("upgrade")?;
    let go_file = files.path().join("go");
    let holder = hold_connections(&pod, server, &go_file)?;
    let opened: HoldOpened = holder.wait_for_json(|_: &HoldOpened| true, WAIT)?;
    ensure!(
        opened.opened == u64::from(HELD),
        "held connections: {opened:?}"
    );
    wait_for_forwards(
        &proxy,
        HELD as usize,
        "the proxy to take the held connections",
    )?;
    let held_peers: BTreeSet<SocketAddr> = proxy.forward_events().iter().map(|f| f.peer).collect();

    let stop_file = files.path().join("stop");
    let looper = pod.spawn_client(
        &pod.cgroup,
        Identity::APP,
        &ConnectOptions::to(server)
            .count(LOOP_BOUND)
            .stop_file(&stop_file),
    )?;
    let mut forwarded = wait_for_forwards(
        &proxy,
        HELD as usize + LOOP_PROGRESS,
        "the loop's first connections",
    )?;

    let mut swap_durations = Vec::new();
    for (revision, expected_build) in [(Some(OTHER_REVISION), None), (None, Some(&first_build))] {
        let links_before = links(&pod)?;
        let counters_before = sandbox.counters(&pod.cgroup)?;
        let build_before = programs_build(&sandbox)?;
        let swap_started = Instant::now();
        let output = enroll_as(&sandbox, &pod, revision)?.ensure_success()?;
        swap_durations.push(swap_started.elapsed());
        ensure!(
            output.stderr.contains(UPGRADE_LOG),
            "enroll as build {revision:?} did not replace the programs: {}",
            output.stderr
        );
        let links_after = links(&pod)?;
        let link_ids = |links: &[(u64, u64)]| links.iter().map(|l| l.0).collect::<Vec<_>>();
        let program_ids = |links: &[(u64, u64)]| links.iter().map(|l| l.1).collect::<BTreeSet<_>>();
        ensure!(
            !links_before.is_empty() && link_ids(&links_before) == link_ids(&links_after),
            "the links changed instead of their programs: {links_before:?} -> {links_after:?}"
        );
        ensure!(
            program_ids(&links_before).is_disjoint(&program_ids(&links_after)),
            "a link kept its program: {links_before:?} -> {links_after:?}"
        );
        let build_after = programs_build(&sandbox)?;
        ensure!(
            build_after != build_before && expected_build.is_none_or(|b| *b == build_after),
            "programs build {build_before} -> {build_after} (first {first_build})"
        );
        ensure_counters_continue(&counters_before, &sandbox.counters(&pod.cgroup)?)?;
        forwarded = wait_for_forwards(
            &proxy,
            forwarded + LOOP_PROGRESS,
            "the loop's connections under the new programs",
        )?;
    }

    std::fs::write(&stop_file, "")?;
    let summary: ConnectSummary = client_result(&looper, WAIT)?;
    ensure!(
        summary.failed == 0,
        "connections of the loop failed: {summary:?}"
    );
    std::fs::write(&go_file, "")?;
    let held: HoldReport = client_result(&holder, HOLD_PHASE)?;
    ensure!(
        held.wrong_peer == 0 && held.bad_replies == 0 && held.replies_ok == u64::from(HELD),
        "held connections after the swaps: {held:?}"
    );

    // Every connection went through the proxy: as many forwards as connections, and the server
    // answered no other. A connection that skipped the proxy would be answered without one.
    let connections = u64::from(HELD) + summary.ok;
    let dones = wait_for("the proxy to finish every connection", WAIT, || {
        let dones: Vec<_> = proxy
            .events()
            .into_iter()
            .filter_map(|event| match event {
                ProxyEvent::Done(done) => Some(done),
                _ => None,
            })
            .collect();
        Ok((dones.len() as u64 >= connections).then_some(dones))
    })?;
    let forwards = proxy.forward_events();
    let answered = pod.server.answered().len() as u64;
    ensure!(
        forwards.len() as u64 == connections && answered == connections,
        "{connections} connections, {} forwarded by the proxy, {answered} answered by the server",
        forwards.len()
    );
    let astray: Vec<_> = forwards.iter().filter(|f| f.orig_dst != server).collect();
    ensure!(astray.is_empty(), "forwarded elsewhere: {astray:?}");
    let server_text = server.to_string();
    let wrong_at_end: Vec<_> = dones
        .iter()
        .filter(|done| done.orig_dst_at_end.as_deref() != Some(server_text.as_str()))
        .collect();
    ensure!(
        wrong_at_end.is_empty(),
        "SO_ORIGINAL_DST asked at the end was not {server}: {wrong_at_end:?}"
    );
    let done_peers: BTreeSet<SocketAddr> = dones.iter().map(|done| done.peer).collect();
    ensure!(
        held_peers.is_subset(&done_peers),
        "held connections the proxy did not finish: {held_peers:?}, finished {done_peers:?}"
    );

    let counters_at_end = sandbox.counters(&pod.cgroup)?;
    ensure_counters_continue(&counters_at_start, &counters_at_end)?;
    ensure!(
        counters_at_end.redirected - counters_at_start.redirected == connections
            && counters_at_end.orig_dst_misses == counters_at_start.orig_dst_misses,
        "{connections} connections: counters {counters_at_start:?} -> {counters_at_end:?}"
    );
    eprintln!(
        "  {connections} connections ({HELD} held across both swaps), swaps took {swap_durations:?}, \
         the test {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The pinned `SETTINGS` value's bytes, read with bpftool.
fn pinned_settings(pin: &Path) -> Result<Vec<u8>> {
    let mut command = Command::new("bpftool");
    command
        .args(["-j", "map", "lookup", "pinned"])
        .arg(pin)
        .args(["key", "0", "0", "0", "0"]);
    let output = run("bpftool", command, WAIT)?.ensure_success()?;
    let entry: serde_json::Value = serde_json::from_str(&output.stdout)
        .with_context(|| format!("bpftool's lookup: {}", output.stdout))?;
    entry["value"]
        .as_array()
        .context("no value in bpftool's lookup")?
        .iter()
        .map(|byte| {
            let text = byte.as_str().context("a value byte that is not a string")?;
            u8::from_str_radix(text.trim_start_matches("0x"), 16)
                .with_context(|| format!("value byte {text}"))
        })
        .collect()
}

fn set_pinned_settings(pin: &Path, value: &[u8]) -> Result<()> {
    let mut command = Command::new("bpftool");
    command
        .args(["map", "update", "pinned"])
        .arg(pin)
        .args(["key", "0", "0", "0", "0", "value"])
        .args(value.iter().map(u8::to_string));
    run("bpftool", command, WAIT)?.ensure_success().map(drop)
}

/// Where standalone commands keep the pods' state files: redirector's default (the sandbox
/// passes no `--state-dir`).
const STATE_DIR: &str = "/run/redirector/pods";

/// What an enroll could change: every pin, the pods' links and programs, the pods as status
/// shows them (policy, counters) with the programs build, the node-wide settings, and the
/// pods' state files.
#[derive(Debug, PartialEq)]
struct NodeState {
    pins: Vec<std::path::PathBuf>,
    links: Vec<(u64, u64)>,
    status: Status,
    settings: Vec<u8>,
    state_files: Vec<Option<String>>,
}

fn node_state(sandbox: &Sandbox, pods: &[&Pod]) -> Result<NodeState> {
    let state_file = |pod: &&Pod| -> Result<Option<String>> {
        let path = Path::new(STATE_DIR).join(format!("{}.json", pod.cgroup.id()?));
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
        }
    };
    Ok(NodeState {
        pins: files_below(sandbox.root())?,
        links: pods
            .iter()
            .map(|pod| links(pod))
            .collect::<Result<Vec<_>>>()?
            .concat(),
        status: sandbox.status()?,
        settings: pinned_settings(&sandbox.root().join("maps/SETTINGS"))?,
        state_files: pods.iter().map(state_file).collect::<Result<_>>()?,
    })
}

/// The pinned maps say another layout version: a build with other programs refuses to take
/// them over, for an enrolled pod (policy change) and a new one alike, says what to do, and
/// changes nothing; capture goes on with the pinned programs.
#[test]
fn a_map_layout_mismatch_is_refused_and_changes_nothing() -> Result<()> {
    /// Where `Settings::layout_version` sits in the value (after two u32 switches).
    const LAYOUT_VERSION_BYTES: std::ops::Range<usize> = 8..12;
    let sandbox = Sandbox::new("layout")?;
    let pod = sandbox.pod("layout", SERVER_PORT)?;
    let newcomer = sandbox.pod("newcomer", SERVER_PORT)?;
    let proxy = pod.start_proxy()?;
    enroll_as(&sandbox, &pod, None)?.ensure_success()?;
    let report = pod.connect(Identity::APP, &ConnectOptions::to(pod.server.addr))?;
    proxy.check_redirected(pod.server.addr, &report)?;

    let settings_pin = sandbox.root().join("maps/SETTINGS");
    let mut settings = pinned_settings(&settings_pin)?;
    let version_bytes = settings
        .get(LAYOUT_VERSION_BYTES)
        .context("SETTINGS is shorter than its layout version")?;
    let pinned_version = u32::from_le_bytes(version_bytes.try_into()?);
    let other_version = pinned_version + 1;
    settings[LAYOUT_VERSION_BYTES].copy_from_slice(&other_version.to_le_bytes());
    set_pinned_settings(&settings_pin, &settings)?;
    let before = node_state(&sandbox, &[&pod, &newcomer])?;
    ensure!(
        before.state_files[0].is_some() && before.state_files[1].is_none(),
        "state files before the attempts: {:?}",
        before.state_files
    );

    let attempts: [(&Pod, &[&str]); 2] = [(&pod, &["-x", "10.0.0.0/8"]), (&newcomer, &[])];
    for (target, flags) in attempts {
        let mut args = vec![
            OsStr::new("enroll"),
            "--cgroup".as_ref(),
            target.cgroup.path().as_os_str(),
        ];
        args.extend(flags.iter().map(OsStr::new));
        let output = sandbox.redirector_with_env(&args, &[(TEST_REVISION_ENV, OTHER_REVISION)])?;
        ensure!(
            !output.success(),
            "enroll with maps of layout version {other_version} succeeded: {}",
            output.stderr
        );
        for words in [
            format!("layout version {other_version}"),
            "redirector uninstall".into(),
            format!("go back to a build with layout version {other_version}"),
        ] {
            ensure!(
                output.stderr.contains(&words),
                "the refusal does not say {words:?}: {}",
                output.stderr
            );
        }
        let after = node_state(&sandbox, &[&pod, &newcomer])?;
        ensure!(
            after == before,
            "a refused enroll changed the node: {before:#?} -> {after:#?}"
        );
    }

    let report = pod.connect(Identity::APP, &ConnectOptions::to(pod.server.addr))?;
    proxy.check_redirected(pod.server.addr, &report)?;
    Ok(())
}

/// `bpftool map show` of a pinned map: (type, key size, value size, entries).
fn pinned_map_shape(pin: &Path) -> Result<(String, u64, u64, u64)> {
    let map = PinnedMapInfo::read(pin)?;
    Ok((
        map.text("type")?.to_owned(),
        map.number("bytes_key")?,
        map.number("bytes_value")?,
        map.number("max_entries")?,
    ))
}

/// One pinned map is another shape than this build's (here: its key is 8 bytes longer, a map
/// of the same name made by bpftool stands at its pin): a build with other programs refuses to
/// take the maps over, names the map and says what to do, and changes nothing.
#[test]
fn a_pinned_map_of_another_shape_is_refused_naming_it() -> Result<()> {
    let sandbox = Sandbox::new("map-shape")?;
    let pod = sandbox.pod("shape", SERVER_PORT)?;
    let proxy = pod.start_proxy()?;
    enroll_as(&sandbox, &pod, None)?.ensure_success()?;
    let before = node_state(&sandbox, &[&pod])?;
    // What can be read while a map of another shape is pinned (status cannot read it).
    let pins_and_links = || -> Result<_> {
        Ok((
            files_below(sandbox.root())?,
            links(&pod)?,
            pinned_settings(&sandbox.root().join("maps/SETTINGS"))?,
        ))
    };
    let mut refusals = Vec::new();
    for map in ["LISTENERS", "PORTS"] {
        let pin = sandbox.root().join("maps").join(map);
        // Set aside (bpffs renames pins) and put back after: the programs keep the real map.
        let aside = sandbox.root().join("maps").join(format!("{map}-aside"));
        let (kind, key, value, entries) = pinned_map_shape(&pin)?;
        std::fs::rename(&pin, &aside)?;
        let mut create = Command::new("bpftool");
        create
            .args(["map", "create"])
            .arg(&pin)
            .args(["type", &kind, "key", &(key + 8).to_string()])
            .args(["value", &value.to_string(), "entries", &entries.to_string()])
            .args(["name", map]);
        let created = run("bpftool", create, WAIT)?.ensure_success();
        let attempt = created.and_then(|_| {
            let tampered = pins_and_links()?;
            let output = enroll_as(&sandbox, &pod, Some(OTHER_REVISION))?;
            Ok((output, pins_and_links()? == tampered))
        });
        let _ = std::fs::remove_file(&pin);
        std::fs::rename(&aside, &pin)?;
        let (output, unchanged) = attempt?;
        ensure!(
            !output.success() && unchanged,
            "with a {map} of another shape, enroll succeeded ({}) or changed the node ({}): {}",
            output.success(),
            !unchanged,
            output.stderr
        );
        refusals.push((map, output.stderr));
    }
    let unhelpful: Vec<_> = refusals
        .iter()
        .filter(|(map, stderr)| {
            !stderr.contains(&format!("pinned map {map} has another layout"))
                || !stderr.contains("redirector uninstall")
        })
        .collect();
    ensure!(
        unhelpful.is_empty(),
        "refusals that do not name the map and what to do: {unhelpful:#?}"
    );
    let after = node_state(&sandbox, &[&pod])?;
    ensure!(
        after == before,
        "the refused enrolls changed the node: {before:#?} -> {after:#?}"
    );

    let report = pod.connect(Identity::APP, &ConnectOptions::to(pod.server.addr))?;
    proxy.check_redirected(pod.server.addr, &report)?;
    Ok(())
}
