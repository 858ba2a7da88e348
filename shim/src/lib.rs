//! `containerd-shim-flox-v2`: runs a container inside a Flox environment served by kof.
//!
//! This crate will mount the FUSE view as a container's root file system, activate the
//! environment and hand the container to runc. It is filled by the containerd-shim issue; today it
//! holds no code.
