//! A ring of staging buffers for asynchronous host-to-device copies, and the ordering rules
//! that keep a buffer alive and untouched while a copy may still read it.
//!
//! `CudaSink` (with the `cuda` feature) runs it over pinned host buffers and a CUDA stream; the
//! tests run the same code over a queue that only completes a copy when it is waited for, and
//! check every rule:
//! - a buffer is refilled only after the copy that last read it is over (its event, or the
//!   whole queue when no event could be recorded for it);
//! - a buffer is marked in use *before* its copy is issued, so a failure between issuing the
//!   copy and recording its event still leaves it waited for;
//! - dropping the ring (a load that failed midway) waits for the whole queue before any buffer
//!   is freed; if even that wait fails, the buffers are leaked rather than freed under a copy.

use crate::error::Result;

/// What the ring needs from a device queue.
pub trait CopyQueue {
    /// One staging buffer (pinned host memory on CUDA).
    type Staging;
    /// A marker recorded on the queue after a copy; waiting for it waits for the copy.
    type Event;
    /// Writes `bytes` at the start of `staging` (nothing may read it now) and issues an
    /// asynchronous copy of them to device address `to`.
    ///
    /// # Safety
    /// `to..to + bytes.len()` must be device memory that stays allocated until the copy is over.
    unsafe fn copy_async(&mut self, staging: &mut Self::Staging, bytes: &[u8], to: u64) -> Result<()>;
    /// Records an event after the copies issued so far.
    fn record(&mut self) -> Result<Self::Event>;
    /// Waits until `event`'s copies are over.
    fn wait(&mut self, event: &Self::Event) -> Result<()>;
    /// Waits until every copy issued so far is over.
    fn wait_all(&mut self) -> Result<()>;
}

/// What may still read a staging buffer.
enum Use<E> {
    Free,
    /// A copy that is over once this event is.
    Copy(E),
    /// A copy was (or may have been) issued but no event was recorded for it: only waiting
    /// for the whole queue frees the buffer.
    Unknown,
}

/// Staging buffers used in turn; each holds at most `chunk` bytes.
pub struct StagingRing<Q: CopyQueue> {
    queue: Q,
    slots: Vec<(Q::Staging, Use<Q::Event>)>,
    chunk: usize,
    next: usize,
}

impl<Q: CopyQueue> StagingRing<Q> {
    /// A ring over `buffers`, each at least `chunk` bytes long.
    pub fn new(queue: Q, buffers: Vec<Q::Staging>, chunk: usize) -> Self {
        let slots = buffers.into_iter().map(|b| (b, Use::Free)).collect();
        Self { queue, slots, chunk: chunk.max(1), next: 0 }
    }

    /// Copies `bytes` to device address `to` through the ring, `chunk` bytes per buffer.
    ///
    /// # Safety
    /// `to..to + bytes.len()` must be device memory that stays allocated until
    /// [`StagingRing::wait_all`] returns or the ring is dropped.
    pub unsafe fn send(&mut self, bytes: &[u8], to: u64) -> Result<()> {
        let mut at = to;
        for part in bytes.chunks(self.chunk) {
            let i = self.next;
            self.next = (i + 1) % self.slots.len().max(1);
            self.reclaim(i)?;
            let Some((staging, use_)) = self.slots.get_mut(i) else {
                return Err(crate::LoadError::Device("a staging ring without buffers".into()));
            };
            *use_ = Use::Unknown;
            // SAFETY: the caller vouches for the destination; the buffer is free (reclaimed
            // above) and is marked in use before the copy is issued.
            unsafe { self.queue.copy_async(staging, part, at)? };
            *use_ = Use::Copy(self.queue.record()?);
            at += part.len() as u64;
        }
        Ok(())
    }

    /// Waits for whatever may still read buffer `i`; it is free after an `Ok`.
    fn reclaim(&mut self, i: usize) -> Result<()> {
        let Some((_, use_)) = self.slots.get_mut(i) else { return Ok(()) };
        match std::mem::replace(use_, Use::Unknown) {
            Use::Free => {}
            Use::Copy(event) => {
                if let Err(e) = self.queue.wait(&event) {
                    if let Some(slot) = self.slots.get_mut(i) {
                        slot.1 = Use::Copy(event);
                    }
                    return Err(e);
                }
            }
            Use::Unknown => self.wait_all()?,
        }
        if let Some(slot) = self.slots.get_mut(i) {
            slot.1 = Use::Free;
        }
        Ok(())
    }

    /// Waits for every copy issued so far; every buffer is free after an `Ok`.
    pub fn wait_all(&mut self) -> Result<()> {
        self.queue.wait_all()?;
        self.slots.iter_mut().for_each(|s| s.1 = Use::Free);
        Ok(())
    }
}

impl<Q: CopyQueue> Drop for StagingRing<Q> {
    fn drop(&mut self) {
        if self.slots.iter().all(|s| matches!(s.1, Use::Free)) {
            return;
        }
        if let Err(e) = self.wait_all() {
            // A copy may still read the buffers: freeing them could corrupt memory that is
            // reused at once. Leak them (the device is most likely lost anyway).
            tracing::error!(error = %e, "could not wait for the weight copies in flight; leaking their staging buffers");
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::LoadError;

    /// A queue that completes a copy only when it is waited for (the slowest a device can
    /// be): a copy reads its buffer when it completes, as a DMA engine may. It records every
    /// rule a ring could break.
    #[derive(Default)]
    struct Log {
        /// (buffer, length, destination) of copies not yet over, in issue order.
        pending: Vec<(usize, usize, u64)>,
        buffers: Vec<Vec<u8>>,
        device: Vec<u8>,
        freed: Vec<usize>,
        violations: Vec<String>,
        recorded: usize,
        fail_record_at: Option<usize>,
        copies: usize,
        fail_wait_all: bool,
    }

    impl Log {
        /// Completes the first `n` pending copies: the bytes move now.
        fn complete(&mut self, n: usize) {
            for (buf, len, to) in self.pending.drain(..n).collect::<Vec<_>>() {
                let to = to as usize;
                let bytes = self.buffers[buf][..len].to_vec();
                self.device[to..to + len].copy_from_slice(&bytes);
            }
        }
    }

    struct Buf {
        id: usize,
        log: Rc<RefCell<Log>>,
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            let mut log = self.log.borrow_mut();
            if log.pending.iter().any(|p| p.0 == self.id) {
                log.violations.push(format!("buffer {} freed while a copy reads it", self.id));
            }
            log.freed.push(self.id);
        }
    }

    struct Queue(Rc<RefCell<Log>>);

    impl CopyQueue for Queue {
        type Staging = Buf;
        type Event = usize; // how many copies were issued before it

        unsafe fn copy_async(&mut self, staging: &mut Buf, bytes: &[u8], to: u64) -> Result<()> {
            let mut log = self.0.borrow_mut();
            if log.pending.iter().any(|p| p.0 == staging.id) {
                log.violations.push(format!("buffer {} refilled while a copy reads it", staging.id));
            }
            log.buffers[staging.id][..bytes.len()].copy_from_slice(bytes);
            log.pending.push((staging.id, bytes.len(), to));
            log.copies += 1;
            Ok(())
        }

        fn record(&mut self) -> Result<usize> {
            let mut log = self.0.borrow_mut();
            log.recorded += 1;
            if log.fail_record_at == Some(log.recorded) {
                return Err(LoadError::Device("record_event failed (injected)".into()));
            }
            Ok(log.copies)
        }

        fn wait(&mut self, event: &usize) -> Result<()> {
            let mut log = self.0.borrow_mut();
            let done = log.copies - log.pending.len();
            let n = event.saturating_sub(done).min(log.pending.len());
            log.complete(n);
            Ok(())
        }

        fn wait_all(&mut self) -> Result<()> {
            let mut log = self.0.borrow_mut();
            if log.fail_wait_all {
                return Err(LoadError::Device("synchronize failed (injected)".into()));
            }
            let n = log.pending.len();
            log.complete(n);
            Ok(())
        }
    }

    fn ring(buffers: usize, chunk: usize, device: usize) -> (StagingRing<Queue>, Rc<RefCell<Log>>) {
        let log = Rc::new(RefCell::new(Log {
            buffers: vec![vec![0; chunk]; buffers],
            device: vec![0; device],
            ..Log::default()
        }));
        let bufs = (0..buffers).map(|id| Buf { id, log: log.clone() }).collect();
        (StagingRing::new(Queue(log.clone()), bufs, chunk), log)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn every_byte_arrives_and_no_buffer_is_refilled_under_a_copy() -> Result<()> {
        let (mut ring, log) = ring(4, 8, 1000);
        let data = pattern(1000, 1);
        for (i, part) in data.chunks(37).enumerate() {
            // SAFETY: the fake device is 1000 bytes and owned by the log.
            unsafe { ring.send(part, (i * 37) as u64)? };
        }
        ring.wait_all()?;
        let log = log.borrow();
        assert!(log.violations.is_empty(), "{:?}", log.violations);
        assert_eq!(log.device, data);
        Ok(())
    }

    /// Finding 4 of issue 20: a load that fails midway drops the ring with copies in flight;
    /// nothing is freed until they are over.
    #[test]
    fn a_load_aborted_midway_frees_no_buffer_a_copy_still_reads() -> Result<()> {
        let (mut ring, log) = ring(4, 8, 100);
        // SAFETY: the fake device is 100 bytes.
        unsafe { ring.send(&pattern(30, 2), 0)? };
        assert!(!log.borrow().pending.is_empty(), "the test needs copies in flight");
        drop(ring); // as a failed `fetch_streaming` drops its sink
        let log = log.borrow();
        assert!(log.violations.is_empty(), "{:?}", log.violations);
        assert_eq!(log.freed.len(), 4);
        assert_eq!(&log.device[..30], &pattern(30, 2)[..]);
        Ok(())
    }

    /// A copy issued without an event (record failed) is still waited for: on the buffer's
    /// next use and when the ring is dropped.
    #[test]
    fn a_copy_whose_event_could_not_be_recorded_is_still_waited_for() -> Result<()> {
        let (mut ring, log) = ring(2, 8, 100);
        log.borrow_mut().fail_record_at = Some(1);
        // SAFETY: the fake device is 100 bytes.
        let failed = unsafe { ring.send(&pattern(8, 3), 0) };
        assert!(failed.is_err());
        // The caller may go on (or give up): buffer 0 is reused two sends later.
        // SAFETY: within the fake device's 100 bytes.
        unsafe { ring.send(&pattern(16, 4), 8)? };
        // SAFETY: within the fake device's 100 bytes.
        unsafe { ring.send(&pattern(8, 5), 24)? };
        drop(ring);
        let log = log.borrow();
        assert!(log.violations.is_empty(), "{:?}", log.violations);
        assert_eq!(&log.device[8..24], &pattern(16, 4)[..]);
        Ok(())
    }

    /// When even waiting for the queue fails, the buffers are leaked, not freed under a copy.
    #[test]
    fn buffers_are_leaked_when_the_queue_cannot_be_waited_for() -> Result<()> {
        let (mut ring, log) = ring(2, 8, 100);
        // SAFETY: the fake device is 100 bytes.
        unsafe { ring.send(&pattern(10, 6), 0)? };
        log.borrow_mut().fail_wait_all = true;
        drop(ring);
        let log = log.borrow();
        assert!(log.violations.is_empty(), "{:?}", log.violations);
        assert!(log.freed.is_empty(), "freed {:?}", log.freed);
        Ok(())
    }
}
