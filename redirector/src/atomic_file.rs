//! Replacing a file so that a concurrent reader sees the old content or the new, never a part.
use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// How long the new content must outlive a crash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Across a reboot (the CNI config and plugin): synced to disk before the rename.
    AcrossReboots,
    /// Until the next boot only: the state of kernel objects (links, maps, cgroups) that a
    /// reboot removes anyway. A crash of the process keeps the page cache, and after a crash of
    /// the kernel a file left empty or torn is quarantined when read. Not synced: on a node
    /// whose state directory is on disk, a sync costs about a millisecond per write here.
    ThisBoot,
}

/// Writes `bytes` to a hidden file next to `path` (`.<name>.new`), syncs it as `durability`
/// asks, and renames it over `path`.
pub(crate) fn replace(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.new"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)?;
    file.write_all(bytes)?;
    if durability == Durability::AcrossReboots {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(&temporary, path)
}
