//! aerekos db-manager (work in progress).
