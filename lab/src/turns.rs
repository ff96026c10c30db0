//! The lab's side of taking turns (see [`crate::load::Schedule::Turns`]): a pair of FIFOs per
//! client, one to start a client's turn and one on which it hands the turn back. Only one
//! client sends at a time, and turns are short, so that every variant meets the same machine:
//! slow drifts of a shared VM fall on all of them alike instead of on whichever ran then.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use nix::unistd::mkfifo;
use redirector_tests::TempDir;

/// One client's pair of FIFOs. This side holds both open read-write: opening never blocks, and
/// closing `go` is the end of file that ends the client's run.
pub struct Seat {
    pub go_path: PathBuf,
    pub done_path: PathBuf,
    go: File,
    done: File,
}

/// The FIFOs of a session; removed with their directory on drop.
pub struct Turns {
    seats: Vec<Seat>,
    _dir: TempDir,
}

impl Turns {
    pub fn new(clients: usize) -> Result<Turns> {
        let dir = TempDir::create("labturns")?;
        let seats = (0..clients)
            .map(|i| {
                let go_path = fifo(dir.path(), &format!("go-{i}"))?;
                let done_path = fifo(dir.path(), &format!("done-{i}"))?;
                Ok(Seat {
                    go: open_read_write(&go_path)?,
                    done: open_read_write(&done_path)?,
                    go_path,
                    done_path,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Turns { seats, _dir: dir })
    }

    pub fn seat(&self, client: usize) -> &Seat {
        &self.seats[client]
    }

    /// Gives `client` a turn and waits, at most `timeout`, until it hands the turn back.
    pub fn turn(&mut self, client: usize, timeout: Duration) -> Result<()> {
        let seat = &mut self.seats[client];
        seat.go.write_all(b"g").context("starting a turn")?;
        let mut fds = [PollFd::new(seat.done.as_fd(), PollFlags::POLLIN)];
        let ready = poll(
            &mut fds,
            PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
        )
        .context("waiting for the end of a turn")?;
        if ready == 0 {
            bail!("client {client} did not hand its turn back within {timeout:?}");
        }
        seat.done
            .read_exact(&mut [0u8])
            .context("reading the end of a turn")
    }
}

fn fifo(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    mkfifo(&path, Mode::from_bits_truncate(0o600))
        .with_context(|| format!("creating FIFO {}", path.display()))?;
    // The clients run as an application UID.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("opening FIFO {} to the clients", path.display()))?;
    Ok(path)
}

fn open_read_write(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening FIFO {}", path.display()))
}
