//! The guest's whole userland, as an initramfs: busybox, the host tools the suites call with the
//! libraries `ldd` lists, the kernel's modules, the workspace's binaries and test executables at
//! their host paths (the tests find the binaries beside themselves and their data through paths
//! compiled in), and the init script with the run's plan.
//!
//! An initramfs rather than a disk image: the cloud kernels have virtio-blk and every filesystem
//! as modules, and the guest would need them before it could mount anything; an initramfs needs
//! nothing and the kernel unpacks it into memory. Debug info is stripped from the workspace's
//! binaries to keep it small (panic locations are not debug info: they stay).

use std::{
    collections::BTreeSet,
    env, fs,
    io::{ErrorKind, Read},
    os::unix::fs::{symlink, PermissionsExt},
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{display, query, run},
    vm::kernel::Kernel,
};

/// The guest's /init: mounts, modules, then the plan (see init.sh).
const INIT: &str = include_str!("init.sh");

/// Host files the tools read (users and groups by name, protocol names for iptables).
const ETC_FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/protocols",
    "/etc/services",
];

/// What goes into the image besides busybox and the modules.
pub struct Contents<'a> {
    /// Host programs found in PATH (their symlink chains are kept: iptables-nft dispatches on
    /// its name).
    pub tools: &'a [&'a str],
    /// Host folders copied whole (plugins loaded at run time, which `ldd` cannot see).
    pub folders: Vec<PathBuf>,
    /// Executables built by the workspace: stripped of debug info, same path as on the host.
    pub workspace_binaries: Vec<PathBuf>,
    /// The guest's plan, a busybox sh script sourced by /init.
    pub plan: String,
}

/// Builds the initramfs for `kernel` under `work` and returns its path.
pub fn build(work: &Path, kernel: &Kernel, contents: &Contents) -> Result<PathBuf> {
    let root = work.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let mut image = Image {
        root,
        added: BTreeSet::new(),
    };
    image.mirror_usr_merge()?;
    for tool in contents.tools {
        let path = which(tool)?;
        image.add(&path)?;
    }
    for folder in &contents.folders {
        image.add(folder)?;
    }
    for file in ETC_FILES {
        image.add(Path::new(file))?;
    }
    for binary in &contents.workspace_binaries {
        image.add_stripped(binary)?;
    }
    image.add_busybox()?;
    image.add_modules(kernel)?;
    for dir in ["proc", "sys", "dev", "run", "tmp", "root", "var", "etc"] {
        image.mkdir(Path::new(dir))?;
    }
    symlink("../run", image.root.join("var/run"))?;
    // The guest has no network; the DNS suite bind-mounts each pod's own resolv.conf over
    // this one, which must exist for that.
    image.write(
        Path::new("etc/resolv.conf"),
        "# no nameserver: the guest has no network\n",
        0o644,
    )?;
    image.write(Path::new("init"), INIT, 0o755)?;
    image.write(Path::new("vm/plan"), &contents.plan, 0o644)?;
    image.write(
        Path::new(&format!("boot/config-{}", kernel.release)),
        &fs::read_to_string(kernel.config())?,
        0o644,
    )?;
    let initrd = work.join("initrd.cpio");
    image.pack(&initrd)?;
    Ok(initrd)
}

/// `program` as the host's PATH finds it.
fn which(program: &str) -> Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{program} is not in PATH; the VM carries the host's copy (`cargo xtask setup` installs it)"))
}

struct Image {
    root: PathBuf,
    /// Host paths already in the image.
    added: BTreeSet<PathBuf>,
}

impl Image {
    /// Where host path `path` (absolute) lands in the image.
    fn at(&self, path: &Path) -> PathBuf {
        let relative: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.root.join(relative)
    }

    fn mkdir(&self, dir: &Path) -> Result<()> {
        let path = self.at(&Path::new("/").join(dir));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))
    }

    fn write(&self, path: &Path, text: &str, mode: u32) -> Result<()> {
        let dest = self.at(&Path::new("/").join(path));
        self.create_parent(&dest)?;
        fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    fn create_parent(&self, dest: &Path) -> Result<()> {
        let parent = dest.parent().expect("image paths have a parent");
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
    }

    /// The host's top-level symlinks (/bin -> usr/bin ...), so that a path and its merged
    /// twin are the same file in the guest too.
    fn mirror_usr_merge(&mut self) -> Result<()> {
        fs::create_dir_all(&self.root)?;
        for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            let host = Path::new("/").join(top);
            if let Ok(target) = fs::read_link(&host) {
                symlink(&target, self.root.join(top))?;
                self.added.insert(host);
            }
        }
        Ok(())
    }

    /// Adds a host file, folder or symlink chain at the same path, and for each ELF file the
    /// libraries `ldd` lists.
    fn add(&mut self, path: &Path) -> Result<()> {
        // Resolve the folders on the way (e.g. /lib64 -> usr/lib64), keep the last component.
        let parent = path.parent().context("adding /")?;
        let parent =
            fs::canonicalize(parent).with_context(|| format!("resolving {}", parent.display()))?;
        let path = parent.join(path.file_name().context("a path ending in ..")?);
        if !self.added.insert(path.clone()) {
            return Ok(());
        }
        let dest = self.at(&path);
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            self.create_parent(&dest)?;
            symlink(&target, &dest)?;
            return self.add(&parent.join(target));
        }
        if meta.is_dir() {
            fs::create_dir_all(&dest)?;
            for entry in fs::read_dir(&path)? {
                self.add(&entry?.path())?;
            }
            return Ok(());
        }
        self.create_parent(&dest)?;
        fs::copy(&path, &dest)
            .with_context(|| format!("copying {} to {}", path.display(), dest.display()))?;
        self.add_libraries(&path)
    }

    /// A workspace binary without its debug info (a debug build's test executable shrinks
    /// from about 28 MB to a few).
    fn add_stripped(&mut self, path: &Path) -> Result<()> {
        if !self.added.insert(path.to_owned()) {
            return Ok(());
        }
        let dest = self.at(path);
        self.create_parent(&dest)?;
        run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(path)
            .arg(&dest))?;
        self.add_libraries(path)
    }

    fn add_libraries(&mut self, path: &Path) -> Result<()> {
        if !is_elf(path)? {
            return Ok(());
        }
        for library in ldd_libraries(path)? {
            self.add(&library)?;
        }
        Ok(())
    }

    /// busybox-static for everything the copied tools do not provide (sh, mount, insmod...).
    fn add_busybox(&mut self) -> Result<()> {
        let busybox = Path::new("/usr/bin/busybox");
        let dest = self.at(busybox);
        self.create_parent(&dest)?;
        fs::copy("/bin/busybox", &dest).context("copying /bin/busybox (busybox-static)")?;
        let out = query(Command::new("/bin/busybox").arg("--list"))?;
        for applet in String::from_utf8_lossy(&out.stdout).lines() {
            let taken = ["usr/bin", "usr/sbin"]
                .iter()
                .any(|dir| fs::symlink_metadata(self.root.join(dir).join(applet)).is_ok());
            if !taken && applet != "busybox" {
                symlink("busybox", self.root.join("usr/bin").join(applet))?;
            }
        }
        Ok(())
    }

    /// The kernel's modules with depmod's index, hard-linked from the unpacked package.
    fn add_modules(&self, kernel: &Kernel) -> Result<()> {
        let dest = self.at(Path::new("/lib/modules")).join(&kernel.release);
        link_tree(&kernel.modules(), &dest)
    }

    /// Writes the image as an uncompressed newc cpio: the kernel unpacks it in a fraction of
    /// the time a compressed one takes under emulation.
    fn pack(&self, initrd: &Path) -> Result<()> {
        let file =
            fs::File::create(initrd).with_context(|| format!("creating {}", initrd.display()))?;
        let mut find = Command::new("find");
        find.args([".", "-print0"])
            .current_dir(&self.root)
            .stdout(Stdio::piped());
        let mut finder = find
            .spawn()
            .with_context(|| format!("could not start `{}`", display(&find)))?;
        let names = finder.stdout.take().expect("piped");
        let mut cpio = Command::new("cpio");
        cpio.args([
            "--null",
            "--create",
            "--format=newc",
            "--owner=0:0",
            "--quiet",
        ])
        .current_dir(&self.root)
        .stdin(names)
        .stdout(file);
        let status = cpio
            .status()
            .with_context(|| format!("could not start `{}`", display(&cpio)))?;
        let found = finder.wait()?;
        if !status.success() || !found.success() {
            bail!(
                "packing {} into {} failed (find: {found}, cpio: {status})",
                self.root.display(),
                initrd.display()
            );
        }
        Ok(())
    }
}

fn is_elf(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"\x7fELF"),
        Err(err) if err.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// The libraries (and the loader) that the ELF executable `path` needs, as `ldd` lists them.
pub(crate) fn ldd_libraries(path: &Path) -> Result<Vec<PathBuf>> {
    let out = query(Command::new("ldd").arg(path))?;
    // A static executable makes ldd exit 1 ("not a dynamic executable"): no libraries.
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(libraries_in_ldd_output(&String::from_utf8_lossy(
        &out.stdout,
    )))
}

/// The absolute paths in `ldd` output: `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x..)`
/// and the loader `/lib64/ld-linux-x86-64.so.2 (0x..)`; the vDSO has no file.
fn libraries_in_ldd_output(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let path = line.rsplit("=>").next()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Hard-links every file of `from` into `to` (same filesystem: the target dir), copying when
/// linking is refused.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            link_tree(&src, &dest)?;
        } else if fs::hard_link(&src, &dest).is_err() {
            fs::copy(&src, &dest)
                .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x00007fa0)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007fa0)\n";
        assert_eq!(
            libraries_in_ldd_output(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libelf.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
