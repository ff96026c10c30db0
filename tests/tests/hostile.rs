//! The agent's API under hostile or broken peers: malformed and overlong lines, half requests
//! that stall, floods of connections, and paths that are not what they claim. Each test checks
//! that the agent keeps serving a normal client meanwhile, keeps its memory bounded, and leaves
//! no state behind. They need root and fail (never skip) without it:
//!
//! ```text
//! cargo xtask test --host-only -- hostile
//! ```

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::{Agent, AgentSetup, Cgroup, Sandbox, TempDir};
use serde_json::Value;

/// Far longer than the agent takes to answer or to drop a stalled peer (5 s).
const WAIT: Duration = Duration::from_secs(30);
/// The agent's longest request line.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A sandbox (bpffs root, cgroup subtree), a scratch directory and an agent working there.
/// Fields drop in order: the agent first, then its directories.
struct TestNode {
    agent: Agent,
    scratch: TempDir,
    sandbox: Sandbox,
}

impl TestNode {
    fn start(tag: &str) -> Result<TestNode> {
        let sandbox = Sandbox::new(tag)?;
        let scratch = TempDir::create(tag)?;
        let agent = Agent::start(&AgentSetup::new(&sandbox, &scratch)?)?;
        Ok(TestNode {
            agent,
            scratch,
            sandbox,
        })
    }

    fn setup(&self) -> &AgentSetup {
        &self.agent.setup
    }

    fn connect(&self) -> Result<UnixStream> {
        let stream = UnixStream::connect(&self.setup().socket)
            .with_context(|| format!("connecting to {}", self.setup().socket.display()))?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        Ok(stream)
    }

    /// `redirector enroll --cgroup CGROUP [--netns NETNS]` through the agent.
    fn enroll(&self, cgroup: &Path, netns: Option<&Path>) -> Result<redirector_tests::Output> {
        let mut args = vec![OsString::from("enroll"), "--cgroup".into(), cgroup.into()];
        if let Some(netns) = netns {
            args.extend([OsString::from("--netns"), netns.into()]);
        }
        self.setup().redirector(&args)
    }

    /// A normal client is served: a status, and an enroll and unenroll of a fresh pod.
    fn serves_a_normal_client(&self, pod: &Cgroup) -> Result<()> {
        let status = self.setup().status()?;
        ensure!(
            status.agent.is_some(),
            "the status did not come from the agent"
        );
        self.enroll(pod.path(), None)?.ensure_success()?;
        self.setup()
            .redirector(&[
                OsString::from("unenroll"),
                "--cgroup".into(),
                pod.path().into(),
            ])?
            .ensure_success()?;
        Ok(())
    }

    /// No pod enrolled, no state file written.
    fn holds_no_pod(&self) -> Result<()> {
        let status = self.setup().status()?;
        ensure!(status.pods.is_empty(), "pods enrolled: {:?}", status.pods);
        let files = self.setup().state_files()?;
        ensure!(files.is_empty(), "state files left: {files:?}");
        Ok(())
    }

    /// The agent's resident memory, from /proc/PID/status.
    fn rss_kib(&self) -> Result<u64> {
        let pid = self.agent.process.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
    }
}

/// The one reply line on `stream`, parsed, after which the agent must close the connection.
fn reply_then_close(stream: &UnixStream) -> Result<Value> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .context("reading the agent's reply")?;
    let reply = serde_json::from_str(&line).with_context(|| format!("parsing reply {line:?}"))?;
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        // A peer that closes with our bytes unread resets the connection: also a close.
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        read => {
            read.context("waiting for the agent to close the connection")?;
        }
    }
    ensure!(rest.is_empty(), "more than one reply line: {rest:?}");
    Ok(reply)
}

/// The error a reply carries: (kind, message).
fn error_of(reply: &Value) -> Result<(String, String)> {
    let error = reply
        .get("error")
        .with_context(|| format!("not an error reply: {reply}"))?;
    Ok((
        error["kind"].as_str().unwrap_or_default().to_owned(),
        error["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Lines that are not requests (not JSON, not UTF-8, unknown operations and fields, a request
/// longer than the bound) each get an error reply and a closed connection, and change nothing.
#[test]
fn malformed_and_overlong_lines_are_refused_and_change_nothing() -> Result<()> {
    let test = TestNode::start("hostile-lines")?;
    let pod = test.sandbox.cgroup("pod")?;
    let malformed: [&[u8]; 5] = [
        b"not json\n",
        b"\xff\xfe\x00garbage\n",
        b"{\"request\":{\"op\":\"format_disk\",\"args\":{}}}\n",
        b"{\"request\":{\"op\":\"enroll\",\"args\":{\"cgroup\":\"/x\",\"colour\":1}}}\n",
        b"\n",
    ];
    for line in malformed {
        let mut stream = test.connect()?;
        stream.write_all(line)?;
        let (kind, message) = error_of(&reply_then_close(&stream)?)?;
        assert_eq!(kind, "invalid_input", "{line:?}: {message}");
        assert!(message.contains("not a request"), "{line:?}: {message}");
    }

    // A line of 1 MiB without a newline: the agent stops reading at its bound and says so.
    let stream = test.connect()?;
    let mut writer = stream.try_clone()?;
    let flood = std::thread::spawn(move || {
        // The agent closes once it has answered; the rest of the write then fails.
        let _ = writer.write_all(&vec![b'x'; 1024 * 1024]);
    });
    let (kind, message) = error_of(&reply_then_close(&stream)?)?;
    assert_eq!(kind, "invalid_input", "{message}");
    assert!(
        message.contains(&format!("at most {MAX_REQUEST_BYTES} bytes")),
        "{message}"
    );
    flood.join().expect("the flooding writer does not panic");
    stream.shutdown(std::net::Shutdown::Both)?;

    test.holds_no_pod()?;
    test.serves_a_normal_client(&pod)?;
    Ok(())
}

/// A peer that sends half a request and stalls, and one that sends a request and never reads
/// the reply: others are served meanwhile, and the stalled peer is answered and dropped.
#[test]
fn stalled_peers_are_dropped_and_others_are_served_meanwhile() -> Result<()> {
    let test = TestNode::start("hostile-stall")?;
    let pod = test.sandbox.cgroup("pod")?;
    let mut half = test.connect()?;
    half.write_all(br#"{"request":{"op":"enroll","args":{"cgroup":""#)?;
    half.write_all(pod.path().to_string_lossy().as_bytes())?;
    let mut deaf = test.connect()?;
    deaf.write_all(b"{\"request\":{\"op\":\"status\",\"args\":{}}}\n")?;

    test.serves_a_normal_client(&pod)?;

    // The half request is never carried out: the agent answers that it timed out, and closes.
    let (kind, message) = error_of(&reply_then_close(&half)?)?;
    assert_eq!(kind, "invalid_input", "{message}");
    assert!(message.contains("no complete request line"), "{message}");
    test.holds_no_pod()?;
    drop(deaf);
    test.serves_a_normal_client(&pod)?;
    Ok(())
}

/// Many connections at once, each stalled part-way through a long request line: the agent's
/// memory stays bounded (those past its connection bound are refused at once, the others are
/// dropped after a timeout), and a normal client is served meanwhile.
#[test]
fn a_flood_of_stalled_connections_keeps_memory_bounded_and_others_served() -> Result<()> {
    const CONNECTIONS: usize = 500;
    /// What the flood may add to the agent's RSS: its connection bound (64) times a full line
    /// and its buffers is a few MiB; without a bound, 500 of them are about 40 MiB.
    const RSS_BOUND_KIB: u64 = 16 * 1024;
    let test = TestNode::start("hostile-flood")?;
    let pod = test.sandbox.cgroup("pod")?;
    test.serves_a_normal_client(&pod)?;
    let before = test.rss_kib()?;

    let mut partial = br#"{"request":{"op":"status","args":{"after":""#.to_vec();
    partial.resize(MAX_REQUEST_BYTES - 1024, b'7');
    let mut flood = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut stream = test.connect()?;
        // A refused connection is closed by the agent: its write fails, which is fine.
        let _ = stream.write_all(&partial);
        flood.push(stream);
    }
    // A normal client's several requests come after the whole flood was written and accepted:
    // by then the agent has read what it will of it.
    test.serves_a_normal_client(&pod)?;
    let during = test.rss_kib()?;
    eprintln!("agent RSS: {before} KiB before the flood, {during} KiB during it");
    assert!(
        during.saturating_sub(before) < RSS_BOUND_KIB,
        "the agent's RSS grew from {before} KiB to {during} KiB with {CONNECTIONS} stalled connections"
    );
    drop(flood);
    test.holds_no_pod()?;
    test.serves_a_normal_client(&pod)?;
    Ok(())
}

/// A netns path that is a regular file, a FIFO (whose open would block) or another kind of
/// namespace, and a cgroup path that is a plain directory, a file or a FIFO: each enroll is
/// refused at once with an error naming the path, and leaves no state.
#[test]
fn paths_that_are_not_what_they_claim_are_refused_by_name_and_leave_no_state() -> Result<()> {
    let test = TestNode::start("hostile-paths")?;
    let pod = test.sandbox.cgroup("pod")?;
    let scratch = test.scratch.path();
    let file = scratch.join("not-a-netns");
    std::fs::write(&file, "netns")?;
    let fifo = scratch.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let plain_dir = scratch.join("not-a-cgroup");
    std::fs::create_dir(&plain_dir)?;
    let mount_ns = Path::new("/proc/self/ns/mnt");

    let netns_cases = [
        (file.as_path(), "is not a namespace file"),
        (fifo.as_path(), "is not a namespace file"),
        (mount_ns, "is not a network namespace"),
    ];
    for (netns, why) in netns_cases {
        let output = test.enroll(pod.path(), Some(netns))?;
        assert!(!output.success(), "{output:?}");
        let named = format!("{} {why}", netns.display());
        assert!(output.stderr.contains(&named), "{named:?} in {output:?}");
        test.holds_no_pod()?;
    }
    let cgroup_cases = [
        (plain_dir.as_path(), "is not a cgroup v2 directory"),
        (file.as_path(), "not a directory"),
        (fifo.as_path(), "not a directory"),
    ];
    for (cgroup, why) in cgroup_cases {
        let output = test.enroll(cgroup, None)?;
        assert!(!output.success(), "{output:?}");
        assert!(
            output.stderr.contains(&cgroup.display().to_string()) && output.stderr.contains(why),
            "{cgroup:?} and {why:?} in {output:?}"
        );
        test.holds_no_pod()?;
    }
    test.serves_a_normal_client(&pod)?;
    Ok(())
}
