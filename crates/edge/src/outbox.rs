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
/// What a bad entry is renamed to (kept for the operator, never read again).
const BAD_SUFFIX: &str = ".bad";
const NEXT_SEQ_FILE: &str = "next_seq";
const EPOCH_FILE: &str = "epoch";

pub struct Outbox {
    dir: PathBuf,
    max_entries: usize,
    max_entry_bytes: u64,
    entries: BTreeSet<u64>,
    next_seq: u64,
    /// The value of `next_seq` last written to disk: behind `next_seq` after a failed write.
    saved_next: u64,
    epoch: u64,
    /// Entries set aside by `open` (not files): for the caller's counters.
    quarantined_at_open: u64,
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

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one. A
/// failed write (a full disk) removes its temporary file, so it holds no space.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), OutboxError> {
    let tmp = path.with_extension("tmp");
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(io_err(&tmp))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err(path)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
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

/// A temporary file only this outbox writes (`<seq>.tmp`, `next_seq.tmp`, `epoch.tmp`):
/// nothing else in the directory is ever deleted.
fn own_tmp(name: &str) -> bool {
    name.strip_suffix(".tmp").is_some_and(|stem| {
        stem == NEXT_SEQ_FILE
            || stem == EPOCH_FILE
            || (!stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Renames `path` to `path.bad`; an entry already gone is not an error.
fn set_aside(path: &Path) -> Result<(), OutboxError> {
    let mut to = path.as_os_str().to_owned();
    to.push(BAD_SUFFIX);
    match fs::rename(path, &to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

impl Outbox {
    /// Opens (creating, mode 0700) the outbox directory and indexes what a previous run
    /// left in it. An entry that is not a regular file is set aside (`*.bad`) and logged.
    pub fn open(dir: &Path, max_entries: usize, max_entry_bytes: u64) -> Result<Self, OutboxError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let mut entries = BTreeSet::new();
        let mut quarantined_at_open = 0;
        // numbers of entries set aside are not given again either
        let mut highest = None;
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name
                .strip_suffix(SUFFIX)
                .and_then(|s| s.parse::<u64>().ok())
            {
                highest = highest.max(Some(seq));
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    entries.insert(seq);
                } else {
                    set_aside(&e.path())?;
                    quarantined_at_open += 1;
                    tracing::error!(
                        "outbox entry {} is not a regular file: set aside as {name}{BAD_SUFFIX}",
                        e.path().display()
                    );
                }
            } else if own_tmp(&name) {
                // a write interrupted by a crash: never acknowledged, never complete
                let _ = fs::remove_file(e.path());
            }
        }
        let stored = match fs::read_to_string(dir.join(NEXT_SEQ_FILE)) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(_) => 0,
        };
        let next_seq = stored.max(highest.map_or(0, |s| s + 1));
        let epoch = read_or_make_epoch(dir)?;
        Ok(Outbox {
            dir: dir.into(),
            max_entries,
            max_entry_bytes,
            entries,
            next_seq,
            saved_next: stored,
            epoch,
            quarantined_at_open,
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

    /// How many entries `open` set aside (reported once).
    pub fn take_quarantined_at_open(&mut self) -> u64 {
        std::mem::take(&mut self.quarantined_at_open)
    }

    fn save_counter(&mut self) -> Result<(), OutboxError> {
        let n = self.next_seq;
        write_durable(&self.dir.join(NEXT_SEQ_FILE), format!("{n}\n").as_bytes())?;
        self.saved_next = n;
        Ok(())
    }

    /// Stores an entry under the next sequence number, built by `make(seq)`. Returns the
    /// sequence number and how many old entries were dropped to make room. The number is
    /// taken only once the entry is written: a failed write (a full disk) leaves the
    /// outbox as it was, and the same entry can be offered again.
    pub fn push(&mut self, make: impl FnOnce(u64) -> Vec<u8>) -> Result<(u64, usize), OutboxError> {
        let seq = self.next_seq;
        let bytes = make(seq);
        let mut dropped = 0;
        while self.entries.len() >= self.max_entries {
            let oldest = *self.entries.first().expect("non-empty");
            self.remove(oldest)?;
            dropped += 1;
        }
        // the entry first: after a crash before the counter, `open` counts from the entry
        write_durable(&self.path(seq), &bytes)?;
        self.entries.insert(seq);
        self.next_seq = seq + 1;
        if let Err(e) = self.save_counter() {
            // the entry on disk keeps the number taken; the counter is written again
            // before that entry is removed
            tracing::warn!("{e}; the sequence counter is written again later");
        }
        Ok((seq, dropped))
    }

    /// Gives up the next sequence number without an entry: an inference that could not be
    /// stored leaves a gap the backend sees. Only in memory if the disk refuses the write
    /// (a gap forgotten by a restart before any later entry is written is counted in
    /// `outbox_dropped`).
    pub fn skip(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let _ = self.save_counter();
        seq
    }

    /// Removes an acknowledged (or dropped) entry; unknown ones are ignored. If the
    /// counter on disk is behind, the newest entry's file stands for it: it is kept (and
    /// sent once more after a restart) unless the counter can be written first, so
    /// sequence numbers never repeat. The entry leaves the index in any case.
    pub fn remove(&mut self, seq: u64) -> Result<(), OutboxError> {
        if !self.entries.remove(&seq) {
            return Ok(());
        }
        if self.saved_next < self.next_seq && self.entries.last().is_none_or(|&l| l < seq) {
            self.save_counter()?;
        }
        let p = self.path(seq);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p)(e)),
        }
        Ok(())
    }

    /// Sets a bad entry aside (renamed `*.env.bad`, or gone already) and forgets it.
    /// Returns the path it had.
    pub fn quarantine(&mut self, seq: u64) -> Result<PathBuf, OutboxError> {
        self.entries.remove(&seq);
        if self.saved_next < self.next_seq {
            // a renamed entry no longer holds the counter up at the next open
            let _ = self.save_counter();
        }
        let p = self.path(seq);
        set_aside(&p)?;
        Ok(p)
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.entries.contains(&seq)
    }

    /// When the oldest waiting entry was written (unix ms; 0 when none is waiting or its
    /// file cannot be read).
    pub fn oldest_written_unix_ms(&self) -> u64 {
        let Some(&seq) = self.entries.first() else {
            return 0;
        };
        std::fs::metadata(self.path(seq))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
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

    /// Reads an entry back (size-limited, regular files only: the directory is ours, but
    /// a disk can rot and an operator can err).
    pub fn read(&self, seq: u64) -> Result<Vec<u8>, OutboxError> {
        use fhecam_proto::files::ReadError;
        let p = self.path(seq);
        crate::files::read_regular(&p, self.max_entry_bytes).map_err(|e| match e {
            ReadError::TooLarge { size, limit } => OutboxError::TooLarge {
                path: p.display().to_string(),
                size,
                limit,
            },
            ReadError::Io(source) => OutboxError::Io {
                path: p.display().to_string(),
                source,
            },
        })
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
    fn bad_entries_are_set_aside_and_numbers_never_repeat() {
        let d = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(d.path(), 10, 4).unwrap();
        let (a, _) = o.push(|_| vec![1; 8]).unwrap(); // over the 4-byte limit
        let (b, _) = o.push(|_| vec![2]).unwrap();
        assert!(matches!(o.read(a), Err(OutboxError::TooLarge { .. })));
        let name = o.quarantine(a).unwrap();
        assert!(PathBuf::from(format!("{}.bad", name.display())).exists());
        assert_eq!(o.pending(), vec![b]);
        // deleted by hand while running: reading fails, quarantining it is not an error
        std::fs::remove_file(o.path(b)).unwrap();
        assert!(o.read(b).is_err());
        o.quarantine(b).unwrap();
        assert!(o.is_empty());
        // a directory where an entry should be is set aside at open; a foreign *.tmp stays
        std::fs::create_dir(d.path().join(format!("{:020}.env", 7))).unwrap();
        std::fs::write(d.path().join("notes.tmp"), b"x").unwrap();
        drop(o);
        let mut o = Outbox::open(d.path(), 10, 4).unwrap();
        assert_eq!(o.take_quarantined_at_open(), 1);
        assert!(d.path().join(format!("{:020}.env.bad", 7)).is_dir());
        assert!(d.path().join("notes.tmp").exists());
        assert!(o.is_empty());
        assert_eq!(o.next_seq(), 8);
        // a skipped number stays skipped
        assert_eq!(o.skip(), 8);
        assert_eq!(o.push(|_| vec![3]).unwrap().0, 9);
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
