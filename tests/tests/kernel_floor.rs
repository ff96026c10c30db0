//! redirector's kernel floor, end to end: on a kernel that lacks a feature the programs need,
//! `redirector enroll` refuses with one error that names the feature and the Linux release that
//! brought it, before anything is loaded, pinned or attached.
//!
//! Debian's archive serves no kernel below the floor (5.10) any more, so the probes are made to
//! fail instead: `REDIRECTOR_TEST_PRETEND_MISSING=<feature>` makes the probe of that feature
//! report it missing, exactly where a kernel without it would. Each case then enrolls for real
//! without the variable, so a refusal for any other reason cannot pass for this one. This runs
//! on the host and in every VM run (5.10, 6.1, 6.12).

use std::ffi::OsStr;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use redirector_tests::{attached_programs, Sandbox};

const PRETEND_MISSING: &str = "REDIRECTOR_TEST_PRETEND_MISSING";

/// (feature as the probes name it, the minimum release the error must name).
const CASES: &[(&str, &str)] = &[
    ("sockops programs", "4.13"),
    ("sk_lookup programs", "5.9"),
    ("socket-local storage", "5.2"),
    ("cgroup storage shared by every program of a cgroup", "5.9"),
    ("bpf_sk_storage_get in sockops", "5.3"),
    ("the socket field of sockops programs", "5.10"),
];

#[test]
fn a_missing_kernel_feature_is_refused_by_name_before_anything_is_pinned() -> Result<()> {
    let mut failures = Vec::new();
    for &(feature, since) in CASES {
        if let Err(error) = refused_cleanly(feature, since) {
            failures.push(format!("{feature}: {error:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn refused_cleanly(feature: &str, since: &str) -> Result<()> {
    let sandbox = Sandbox::new("floor")?;
    let pod = sandbox.cgroup("pod")?;
    let enroll = [
        OsStr::new("enroll"),
        "--cgroup".as_ref(),
        pod.path().as_os_str(),
    ];
    let output = sandbox.redirector_with_env(&enroll, &[(PRETEND_MISSING, feature)])?;
    ensure!(
        !output.success(),
        "`{}` succeeded although {feature} was reported missing",
        output.command_line
    );
    let message = output.stderr.trim();
    ensure!(
        message.contains(feature),
        "the error does not name {feature:?}: {message:?}"
    );
    ensure!(
        message.contains(&format!("Linux >= {since}")),
        "the error does not name the minimum `Linux >= {since}`: {message:?}"
    );
    ensure!(
        message
            .lines()
            .filter(|line| line.contains("Linux >="))
            .count()
            == 1,
        "more than one error line: {message:?}"
    );
    ensure!(
        empty_or_absent(sandbox.root())?,
        "a refused enroll left {} behind: {:?}",
        sandbox.root().display(),
        std::fs::read_dir(sandbox.root())?.collect::<Vec<_>>()
    );
    let programs = attached_programs(pod.path())?;
    ensure!(
        programs.is_empty(),
        "a refused enroll left programs attached to {}: {programs:?}",
        pod.path().display()
    );
    // The same enroll without the pretence succeeds: the refusal above was the probe's.
    sandbox
        .redirector(&enroll)?
        .ensure_success()
        .context("the enroll without the pretended missing feature")?;
    Ok(())
}

fn empty_or_absent(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(error) => Err(error).with_context(|| format!("listing {}", dir.display())),
    }
}
