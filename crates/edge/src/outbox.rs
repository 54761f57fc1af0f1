//! The on-disk outbox: every encrypted inference is written here (fsynced) before it is
//! published and removed only when the broker acknowledges it, so neither a broker outage
//! nor a killed daemon loses one. Bounded: when full, the oldest entries are dropped and
//! counted. Entries are files named by sequence number, so order survives restarts.
//! Synchronous and single-owner: the publisher task is its only user.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("outbox entry {path} is {size} bytes, over the {limit}-byte limit")]
    TooLarge { path: String, size: u64, limit: u64 },
}

const SUFFIX: &str = ".env";
const NEXT_SEQ_FILE: &str = "next_seq";
const EPOCH_FILE: &str = "epoch";

pub struct Outbox {
    dir: PathBuf,
    max_entries: usize,
    max_entry_bytes: u64,
    entries: BTreeSet<u64>,
    next_seq: u64,
    epoch: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Makes a rename or removal in `dir` durable: without it a power cut can lose the new
/// directory entry even though the file's data was synced.
fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), OutboxError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The outbox's epoch, drawn (non-zero) the first time the directory is used.
fn read_or_make_epoch(dir: &Path) -> Result<u64, OutboxError> {
    let p = dir.join(EPOCH_FILE);
    if let Some(e) = fs::read_to_string(&p)
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .filter(|&e| e != 0)
    {
        return Ok(e);
    }
    let e = rand::random::<u64>().max(1);
    write_durable(&p, format!("{e:016x}\n").as_bytes())?;
    Ok(e)
}

impl Outbox {
    /// Opens (creating, mode 0700) the outbox directory and indexes what a previous run
    /// left in it.
    pub fn open(dir: &Path, max_entries: usize, max_entry_bytes: u64) -> Result<Self, OutboxError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let mut entries = BTreeSet::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name
                .strip_suffix(SUFFIX)
                .and_then(|s| s.parse::<u64>().ok())
            {
                entries.insert(seq);
            } else if name.ends_with(".tmp") {
                // a write interrupted by a crash: never acknowledged, never complete
                let _ = fs::remove_file(e.path());
            }
        }
        let stored = match fs::read_to_string(dir.join(NEXT_SEQ_FILE)) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(_) => 0,
        };
        let next_seq = stored.max(entries.last().map_or(0, |s| s + 1));
        let epoch = read_or_make_epoch(dir)?;
        Ok(Outbox {
            dir: dir.into(),
            max_entries,
            max_entry_bytes,
            entries,
            next_seq,
            epoch,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// This outbox's epoch (see `Envelope::epoch`): it changes only when the directory is
    /// lost and made anew.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number the next entry will get (sequences never repeat, across
    /// restarts too).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Stores an entry under the next sequence number, built by `make(seq)`. Returns the
    /// sequence number and how many old entries were dropped to make room.
    pub fn push(&mut self, make: impl FnOnce(u64) -> Vec<u8>) -> Result<(u64, usize), OutboxError> {
        let seq = self.next_seq;
        let bytes = make(seq);
        // the counter first: a crash after it wastes a number, never reuses one
        write_durable(
            &self.dir.join(NEXT_SEQ_FILE),
            format!("{}\n", seq + 1).as_bytes(),
        )?;
        self.next_seq = seq + 1;
        let mut dropped = 0;
        while self.entries.len() >= self.max_entries {
            let oldest = *self.entries.first().expect("non-empty");
            self.remove(oldest)?;
            dropped += 1;
        }
        write_durable(&self.path(seq), &bytes)?;
        self.entries.insert(seq);
        Ok((seq, dropped))
    }

    /// Removes an acknowledged (or dropped) entry; unknown ones are ignored.
    pub fn remove(&mut self, seq: u64) -> Result<(), OutboxError> {
        if self.entries.remove(&seq) {
            let p = self.path(seq);
            match fs::remove_file(&p) {
                Ok(()) => sync_dir(&self.dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(())
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.entries.contains(&seq)
    }

    /// Sequence numbers waiting, oldest first.
    pub fn pending(&self) -> Vec<u64> {
        self.entries.iter().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Reads an entry back (size-limited: the directory is ours, but a disk can rot).
    pub fn read(&self, seq: u64) -> Result<Vec<u8>, OutboxError> {
        let p = self.path(seq);
        let size = fs::metadata(&p).map_err(io_err(&p))?.len();
        if size > self.max_entry_bytes {
            return Err(OutboxError::TooLarge {
                path: p.display().to_string(),
                size,
                limit: self.max_entry_bytes,
            });
        }
        fs::read(&p).map_err(io_err(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_keeps_order_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(d.path(), 3, 1 << 20).unwrap();
        for i in 0..3u8 {
            let (seq, dropped) = o.push(|s| vec![i, s as u8]).unwrap();
            assert_eq!((seq, dropped), (i as u64, 0));
        }
        o.remove(1).unwrap();
        drop(o);
        let mut o = Outbox::open(d.path(), 3, 1 << 20).unwrap();
        assert_eq!(o.pending(), vec![0, 2]);
        assert_eq!(o.read(2).unwrap(), vec![2, 2]);
        assert_eq!(o.next_seq(), 3);
        // full: the oldest goes
        o.push(|_| vec![9]).unwrap();
        let (seq, dropped) = o.push(|_| vec![10]).unwrap();
        assert_eq!((seq, dropped), (4, 1));
        assert_eq!(o.pending(), vec![2, 3, 4]);
        // sequence numbers never repeat, even when everything was acknowledged
        for s in o.pending() {
            o.remove(s).unwrap();
        }
        drop(o);
        let o = Outbox::open(d.path(), 3, 1 << 20).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.next_seq(), 5);
    }

    #[test]
    fn epoch_is_kept_and_a_new_directory_gets_a_new_one() {
        let d = tempfile::tempdir().unwrap();
        let e = Outbox::open(d.path(), 3, 1 << 20).unwrap().epoch();
        assert_ne!(e, 0);
        assert_eq!(Outbox::open(d.path(), 3, 1 << 20).unwrap().epoch(), e);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Outbox::open(other.path(), 3, 1 << 20).unwrap().epoch(), e);
    }
}
