//! Reading files the daemon does not control (bundles, dropped files, outbox entries)
//! without blocking: a FIFO or a device put in place of a file must not hang a stage.

use fhecam_proto::files::ReadError;
use std::path::Path;

/// Reads a regular file of at most `limit` bytes. It is opened non-blocking (a FIFO opens
/// at once instead of waiting for a writer) and checked with `fstat` before any read:
/// anything but a regular file is refused. The read itself is capped in case the file
/// grows meanwhile. Blocking I/O: call it from a blocking thread.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(ReadError::Io)?;
    let m = f.metadata().map_err(ReadError::Io)?;
    if !m.is_file() {
        return Err(ReadError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    fhecam_proto::files::read_opened(f, m.len(), limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("f");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo, 10).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(read_regular(d.path(), 10).is_err());
        let f = d.path().join("x");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"12345");
        assert!(matches!(
            read_regular(&f, 4),
            Err(ReadError::TooLarge { size: 5, limit: 4 })
        ));
    }
}
