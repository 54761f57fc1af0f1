//! Subcommand groups of the `fhecam` binary that live outside `main.rs`.

pub mod agent;
#[cfg(feature = "owner-tools")]
pub mod bench;
#[cfg(feature = "cockpit")]
pub mod cockpit;
#[cfg(feature = "owner-tools")]
pub mod demo;
pub mod edge;
pub mod fleet;
#[cfg(feature = "owner-tools")]
pub mod import;
pub mod owner;
pub mod selftest;
#[cfg(feature = "owner-tools")]
pub mod train;

/// A token cancelled by SIGTERM or Ctrl-C (a service's one way to stop); call within a
/// tokio runtime.
pub fn stop_on_signals() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping");
            token.cancel();
        }
    });
    shutdown
}

/// `--input-mode` on the command line.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum InputModeArg {
    /// Encrypt the frame with the owner's public key (the default).
    #[default]
    Encrypted,
    /// Keep the frame in the clear on this machine: the first layer's products need no
    /// PBS; everything computed from the frame stays encrypted.
    DeviceClear,
}

impl From<InputModeArg> for fhecam::fhe::eval::InputMode {
    fn from(a: InputModeArg) -> Self {
        match a {
            InputModeArg::Encrypted => Self::Encrypted,
            InputModeArg::DeviceClear => Self::DeviceClear,
        }
    }
}
