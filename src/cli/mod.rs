//! Subcommand groups of the `fhecam` binary that live outside `main.rs`.

pub mod edge;
pub mod owner;
