//! Logs written to a pipe or a file (`kubectl logs`, a CNI runtime's capture) carry no terminal
//! colour codes: the binaries colour only a terminal.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const ESC: char = '\x1b';

/// A folder of this test's own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("redirector-{tag}-{}", std::process::id()));
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `redirector ARGS` with stderr to a pipe, as a colour-capable terminal would run it
/// otherwise (TERM set, NO_COLOR unset), and returns stderr.
fn stderr_of(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_redirector"))
        .args(args)
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_plain(stderr: &str, expected: &str) {
    assert!(stderr.contains(expected), "no {expected:?} in {stderr:?}");
    assert!(
        !stderr.contains(ESC),
        "escape codes in logs to a pipe: {stderr:?}"
    );
}

#[test]
fn the_cli_logs_plain_text_to_a_pipe() {
    let scratch = Scratch::new("cli-logs");
    let (bin, conf) = (scratch.0.join("bin"), scratch.0.join("net.d"));
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir_all(&conf).unwrap();
    fs::write(
        conf.join("10-test.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "test", "plugins": [{"type": "bridge"}]}"#,
    )
    .unwrap();
    let plugin = scratch.0.join("redirector-cni");
    fs::write(&plugin, b"").unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let stderr = stderr_of(&[
        "install-cni",
        "--cni-bin-dir",
        &path(&bin),
        "--cni-conf-dir",
        &path(&conf),
        "--plugin-binary",
        &path(&plugin),
    ]);
    assert_plain(&stderr, "redirector-cni installed and chained");
}

#[test]
fn the_agent_logs_plain_text_to_a_pipe() {
    // The socket's folder cannot be made below a file: the agent logs its start, then stops.
    let stderr = stderr_of(&["agent", "--socket", "/dev/null/agent.sock"]);
    assert_plain(&stderr, "starting");
}
