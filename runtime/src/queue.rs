//! A bounded queue's admission count, in all and per tenant: a tenant may
//! hold only its share of the queue, so one tenant flooding a model leaves
//! room for the others. Shared by the tensor batcher and the text scheduler.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Entries waiting in a queue, counted in all and per tenant.
#[derive(Debug)]
pub struct Waiting {
    max: usize,
    max_per_tenant: usize,
    counts: Mutex<(usize, HashMap<Arc<str>, usize>)>,
}

impl Waiting {
    /// At most `max` waiting, and `per_tenant` of one tenant (default: half).
    pub fn new(max: usize, per_tenant: Option<usize>) -> Self {
        Self {
            max,
            max_per_tenant: per_tenant.unwrap_or(max / 2).clamp(1, max.max(1)),
            counts: Mutex::default(),
        }
    }

    /// Counts an entry in, or says why the queue cannot take it.
    pub fn enter(&self, tenant: &Arc<str>) -> Result<(), String> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (total, tenants) = &mut *counts;
        let mine = tenants.get(tenant).copied().unwrap_or(0);
        if *total >= self.max {
            return Err(format!("its queue is full ({} waiting)", self.max));
        }
        if mine >= self.max_per_tenant {
            return Err(format!(
                "this tenant already has {mine} waiting, its share of the queue"
            ));
        }
        *total += 1;
        tenants.insert(tenant.clone(), mine + 1);
        Ok(())
    }

    /// Counts an entry out (taken, cancelled, or never queued).
    pub fn leave(&self, tenant: &Arc<str>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (total, tenants) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(count) = tenants.get_mut(tenant) {
            *count -= 1;
            if *count == 0 {
                tenants.remove(tenant);
            }
        }
    }

    /// Entries waiting now.
    pub fn total(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_gets_its_share_and_the_total_is_bounded() {
        let waiting = Waiting::new(4, None);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert!(waiting.enter(&a).is_ok() && waiting.enter(&a).is_ok());
        assert!(waiting.enter(&a).unwrap_err().contains("its share"));
        assert!(waiting.enter(&b).is_ok() && waiting.enter(&b).is_ok());
        assert!(waiting.enter(&c).unwrap_err().contains("queue is full"));
        waiting.leave(&a);
        assert!(waiting.enter(&c).is_ok());
        assert_eq!(waiting.total(), 4);
    }
}
