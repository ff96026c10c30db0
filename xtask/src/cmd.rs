//! Running external commands: each one that changes something is shown before it runs, and a
//! failure names the command and its exit status.

use std::{
    ffi::OsStr,
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};

/// The command line as a shell would take it, with the variables it sets in front.
pub fn display(cmd: &Command) -> String {
    let env = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), quote(v))));
    let program = std::iter::once(quote(cmd.get_program()));
    let args = cmd.get_args().map(quote);
    env.chain(program).chain(args).collect::<Vec<_>>().join(" ")
}

/// `s` quoted for a POSIX shell, only when it needs it.
pub fn quote(s: impl AsRef<OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=./,:+@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Shows `cmd`, runs it with the terminal's output, and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Like [`run`] for a cargo command with `--message-format=json-render-diagnostics`: its
/// messages (one JSON object per line on stdout) are returned, its diagnostics go to the terminal.
pub fn run_json(cmd: &mut Command) -> Result<Vec<serde_json::Value>> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|message| {
            serde_json::from_str(message)
                .with_context(|| format!("`{line}` printed a line that is not JSON: {message}"))
        })
        .collect()
}

/// Runs a read-only check quietly and returns what it printed, whatever its exit status.
pub fn query(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{}`", display(cmd)))
}

/// Like [`query`], but fails unless the command exits 0, and returns its standard output.
pub fn query_ok(cmd: &mut Command) -> Result<String> {
    let out = query(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_and_quotes_only_when_needed() {
        let mut cmd = Command::new("dpkg-query");
        cmd.args(["-W", "-f=${Status}", "it's"])
            .env("A", "/usr/lib/llvm-22");
        assert_eq!(
            display(&cmd),
            r"A=/usr/lib/llvm-22 dpkg-query -W '-f=${Status}' 'it'\''s'"
        );
    }
}
