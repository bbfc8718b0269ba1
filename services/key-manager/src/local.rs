//! key-manager's side of the worker's local API. The client, the audit
//! queue and the reporter thread live in `service_runtime` (shared with
//! storage-manager and db-manager); this module says what key-manager
//! reports: metrics every report interval (`keys`, `encrypts`, `decrypts`,
//! `datakeys`, `denied`, `errors`, `audit_dropped`), refused requests, and
//! where refreshed client keys go.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use service_runtime::audit::{sample, Reported};
use service_runtime::Clients;

use crate::kms::Kms;

impl Reported for Kms {
    fn metrics(&self) -> BTreeMap<&'static str, i64> {
        let n = |c: &AtomicU64| sample(c.load(Ordering::Relaxed));
        let s = &self.stats;
        [
            ("keys", sample(self.store().len() as u64)),
            ("encrypts", n(&s.encrypts)),
            ("decrypts", n(&s.decrypts)),
            ("datakeys", n(&s.datakeys)),
            ("denied", n(&s.denied)),
            ("errors", n(&s.errors)),
            ("audit_dropped", sample(self.audit().dropped())),
        ]
        .into_iter()
        .collect()
    }

    fn denied(&self) -> u64 {
        self.stats.denied.load(Ordering::Relaxed)
    }

    fn set_clients(&self, clients: Clients) -> bool {
        Kms::set_clients(self, clients)
    }
}
