//! A mosquitto of fhecam's own on loopback: the demo's broker (`fhecam demo` without
//! `--broker`) and the integration tests' (a real broker on a free port, never a mock).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long mosquitto may take to listen after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("writing the broker's configuration {path}: {source}")]
    Config {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start mosquitto ({0}): install it (scripts/setup.sh does)")]
    Spawn(std::io::Error),
    #[error("mosquitto did not listen on 127.0.0.1:{0} within 10 s")]
    NotListening(u16),
}

/// A mosquitto listening on 127.0.0.1, killed on drop (or stopped with [`LocalBroker::stop`]).
pub struct LocalBroker {
    child: Child,
    port: u16,
}

impl LocalBroker {
    /// Starts mosquitto on 127.0.0.1:`port`, its configuration (`conf`: the lines after the
    /// listener) written to `dir`, and waits until it accepts connections.
    pub fn start(dir: &Path, port: u16, conf: &str) -> Result<LocalBroker, BrokerError> {
        let path = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(&path, format!("listener {port} 127.0.0.1\n{conf}")).map_err(|source| {
            BrokerError::Config {
                path: path.display().to_string(),
                source,
            }
        })?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(BrokerError::Spawn)?;
        let broker = LocalBroker { child, port };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t.elapsed() > START_TIMEOUT {
                return Err(BrokerError::NotListening(port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGTERM, then waits: mosquitto saves its persistent sessions and exits.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid; it has not been waited for yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port on 127.0.0.1 that was free a moment ago (the OS's choice for port 0).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
