//! Placeholder: being extracted from key-manager (see services/key-manager/src/local.rs).
