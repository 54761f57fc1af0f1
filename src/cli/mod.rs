//! Subcommand groups of the `fhecam` binary that live outside `main.rs`.

pub mod agent;
pub mod demo;
pub mod edge;
pub mod import;
pub mod owner;
pub mod selftest;
