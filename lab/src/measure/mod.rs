//! The measurement stage: what runs on the rig and what is read from the machine while it
//! runs. Everything here produces [`crate::records`]; nothing here computes a figure.

pub mod bpf_objects;
pub mod machine;
pub mod perf;
pub mod programs;
pub mod setup;
pub mod traffic;
