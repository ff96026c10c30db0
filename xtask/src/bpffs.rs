//! /sys/fs/bpf for a run of the host's end-to-end suites. This machine kind does not mount it at
//! boot; when the run finds it unmounted, it mounts it for the run and unmounts it after, so that
//! neither the mount nor what the kernel's BPF preload puts in a fresh bpffs (`maps.debug`,
//! `progs.debug`) outlives the run. A bpffs that was there before is left as it is.

use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::run;

const BPFFS: &str = "/sys/fs/bpf";

/// The mount of the run, if the run made it; unmounted on drop.
pub struct BpffsForRun {
    mounted_here: bool,
}

impl BpffsForRun {
    pub fn ensure() -> Result<BpffsForRun> {
        if is_mounted()? {
            return Ok(BpffsForRun {
                mounted_here: false,
            });
        }
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        Ok(BpffsForRun { mounted_here: true })
    }
}

impl Drop for BpffsForRun {
    fn drop(&mut self) {
        if self.mounted_here {
            if let Err(error) = run(Command::new("umount").arg(BPFFS)) {
                eprintln!("cleanup: unmounting the bpffs this run mounted: {error:#}");
            }
        }
    }
}

/// Whether a bpffs is mounted at /sys/fs/bpf (mountinfo: field 5 is the mount point, the first
/// field after " - " the filesystem type).
fn is_mounted() -> Result<bool> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mountinfo.lines().any(|line| {
        let mount_point = line.split(' ').nth(4);
        let fs_type = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next());
        mount_point == Some(BPFFS) && fs_type == Some("bpf")
    }))
}
