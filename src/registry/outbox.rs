//! The keepalive driver's send queue.

use std::collections::{HashSet, VecDeque};

/// Renewals waiting to be sent, each lease at most once: a renewal still waiting when the
/// lease is due again is the same request. Without that, a stream that sends slower than
/// renewals fall due (a renewal deficit) would queue every lease again each interval and
/// grow without bound.
#[derive(Default)]
pub(super) struct Outbox {
    queue: VecDeque<i64>,
    queued: HashSet<i64>,
}

impl Outbox {
    pub(super) fn push(&mut self, lease: i64) {
        if self.queued.insert(lease) {
            self.queue.push_back(lease);
        }
    }

    pub(super) fn front(&self) -> Option<i64> {
        self.queue.front().copied()
    }

    pub(super) fn pop_front(&mut self) {
        if let Some(lease) = self.queue.pop_front() {
            self.queued.remove(&lease);
        }
    }

    pub(super) fn clear(&mut self) {
        self.queue.clear();
        self.queued.clear();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_due_again_before_its_renewal_was_sent_is_queued_once() {
        let mut outbox = Outbox::default();
        // A renewal deficit: 1,000 leases fall due three times while nothing can be sent.
        for _ in 0..3 {
            for lease in 0..1_000 {
                outbox.push(lease);
            }
        }
        assert_eq!(outbox.len(), 1_000);
        // In the order first queued; once sent, a lease may be queued again.
        assert_eq!(outbox.front(), Some(0));
        outbox.pop_front();
        outbox.push(0);
        outbox.push(1);
        assert_eq!((outbox.len(), outbox.front()), (1_000, Some(1)));
        outbox.clear();
        assert!(outbox.is_empty());
        outbox.push(1);
        assert_eq!(outbox.len(), 1);
    }
}
