//! The read-only lazy FUSE view of kof environments.
//!
//! This crate will present each prepared environment as a complete root file system whose
//! metadata comes from the kof store at once and whose file contents are fetched only when read.
//! It is filled by the lazy-environments issue; today it holds no code.
