//! aerekos storage-manager (work in progress).
