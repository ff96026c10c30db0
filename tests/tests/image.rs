//! The image `cargo xtask image` writes, under real runtimes: a private containerd (Debian's, with
//! runc) imports the archive under the name the DaemonSet uses, and both binaries start in the
//! image's otherwise empty root filesystem (no base image: they are statically linked); Debian's
//! podman, on a store of its own, and Debian's docker, a dockerd of the test's own, load it
//! under that name and run its entrypoint.
//!
//! `cargo xtask test` builds the image and names it in `REDIRECTOR_IMAGE`. Host only: the VM
//! carries no containerd, podman or docker.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use redirector_tests::{
    cgroup::{cgroup2_mount, cgroup_v1_mounts},
    container_cli::ContainerCli,
    containerd::{mounts_below, redirector_image_archive},
    docker::{self, Docker},
    plain_containerd::Containerd,
    podman::{Podman, BLOB_INFO_CACHE},
    redirector,
};

/// `redirector --version` of the `redirector` built with these tests (`redirector 0.1.0`) and
/// the name the image of that version carries.
fn version_and_image_name() -> Result<(String, String)> {
    let line = redirector(["--version"])?.ensure_success()?.stdout;
    let line = line.trim().to_owned();
    let version = line
        .strip_prefix("redirector ")
        .with_context(|| format!("`redirector --version` printed {line:?}"))?;
    let name = format!("localhost/redirector:{version}");
    Ok((line, name))
}

#[test]
fn containerd_imports_the_image_and_runs_both_binaries_in_it() -> Result<()> {
    let archive = redirector_image_archive()?;
    let (version_line, name) = version_and_image_name()?;
    let containerd = Containerd::start()?;
    let images = containerd.import(&archive)?;
    ensure!(
        images.contains(&name),
        "importing {} gave {images:?}, not {name}",
        archive.display()
    );

    let version = containerd
        .run(
            &name,
            "redirector-version",
            &[],
            &["redirector", "--version"],
        )?
        .ensure_success()?;
    ensure!(
        version.stdout.trim() == version_line,
        "`redirector --version` in the image printed {:?}, the host's build {version_line:?}",
        version.stdout
    );

    // The CNI plugin answers the runtime's VERSION query as it would on a node.
    let cni = containerd
        .run(
            &name,
            "redirector-cni-version",
            &["CNI_COMMAND=VERSION"],
            &["redirector-cni"],
        )?
        .ensure_success()?;
    let answer: serde_json::Value = serde_json::from_str(&cni.stdout)
        .with_context(|| format!("redirector-cni VERSION printed {:?}", cni.stdout))?;
    ensure!(
        answer["supportedVersions"].is_array(),
        "redirector-cni VERSION answered {answer}"
    );

    // The image holds nothing but the binaries: there is no shell to run.
    let shell = containerd.run(&name, "no-shell", &[], &["/bin/sh"])?;
    ensure!(
        !shell.success() && shell.stderr.contains("/bin/sh"),
        "/bin/sh in the image: {shell:?}"
    );
    Ok(())
}

/// `engine` loads the archive under the name the DaemonSet runs, and no other, and runs its
/// entrypoint, `redirector`, with `--version`: it prints what the host's build prints.
fn loads_the_image_and_runs_its_entrypoint(engine: &impl ContainerCli, what: &str) -> Result<()> {
    let archive = redirector_image_archive()?;
    let (version_line, name) = version_and_image_name()?;
    let images = engine.load(&archive)?;
    ensure!(
        images == [name.as_str()],
        "{what} load of {} gave {images:?}, not {name}",
        archive.display()
    );
    let version = engine.run(&name, &["--version"])?.ensure_success()?;
    ensure!(
        version.stdout.trim() == version_line,
        "`redirector --version` in the image under {what} printed {:?}, the host's build \
         {version_line:?}",
        version.stdout
    );
    Ok(())
}

/// What an engine's guard must have removed once dropped: the folder of its store, the mounts
/// below it, and the containers' cgroup in every hierarchy (runc makes it in the v1 ones too).
fn ensure_removed(store: &Path, cgroup: &Path) -> Result<()> {
    ensure!(!store.exists(), "the store {} is left", store.display());
    let mounts = mounts_below(store)?;
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    let relative = cgroup.strip_prefix(cgroup2_mount()?)?;
    for hierarchy in std::iter::once(cgroup2_mount()?).chain(cgroup_v1_mounts()?) {
        let left = hierarchy.join(relative);
        ensure!(
            !left.exists(),
            "the containers' cgroup {} is left",
            left.display()
        );
    }
    Ok(())
}

#[test]
fn podman_loads_the_image_and_runs_its_entrypoint() -> Result<()> {
    let cache_before = Path::new(BLOB_INFO_CACHE).exists();
    let podman = Podman::new()?;
    loads_the_image_and_runs_its_entrypoint(&podman, "podman")?;
    let (store, cgroup) = (podman.path(), podman.cgroup());
    drop(podman);
    ensure_removed(&store, &cgroup)?;
    ensure!(
        cache_before || !Path::new(BLOB_INFO_CACHE).exists(),
        "podman's blob info cache {BLOB_INFO_CACHE} is left"
    );
    Ok(())
}

#[test]
fn docker_loads_the_image_and_runs_its_entrypoint() -> Result<()> {
    // Where dockerd would have written, had its flags not pointed it elsewhere.
    let hierarchies: Vec<PathBuf> = std::iter::once(cgroup2_mount()?)
        .chain(cgroup_v1_mounts()?)
        .collect();
    let defaults: Vec<PathBuf> = docker::DEFAULT_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(
            hierarchies
                .iter()
                .map(|hierarchy| hierarchy.join(docker::DEFAULT_CGROUP_PARENT)),
        )
        .filter(|path| !path.exists())
        .collect();

    let mut docker = Docker::start()?;
    loads_the_image_and_runs_its_entrypoint(&docker, "docker")?;
    let (store, cgroup, made_outside) = (docker.path(), docker.cgroup(), docker.made_outside());
    docker.stop()?;
    drop(docker);
    ensure_removed(&store, &cgroup)?;
    for path in made_outside {
        ensure!(
            !Path::new(path).exists(),
            "{path}, which dockerd made, is left"
        );
    }
    let written: Vec<&PathBuf> = defaults.iter().filter(|path| path.exists()).collect();
    ensure!(
        written.is_empty(),
        "dockerd wrote its default paths {written:?}"
    );
    Ok(())
}

#[test]
fn the_daemonset_runs_the_image_the_archive_carries() -> Result<()> {
    let (_, name) = version_and_image_name()?;
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let daemonset =
        std::fs::read_to_string(manifest).with_context(|| format!("reading {manifest}"))?;
    let images: Vec<&str> = daemonset
        .lines()
        .filter_map(|line| line.trim().strip_prefix("image:"))
        .map(|image| image.split('#').next().unwrap_or_default().trim())
        .collect();
    ensure!(
        !images.is_empty() && images.iter().all(|image| *image == name),
        "{manifest} runs {images:?}, the archive carries {name}"
    );
    Ok(())
}
