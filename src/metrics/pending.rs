//! Samples a VM thread has taken and not yet handed to its shared recorder:
//! the recorder's lock is taken once per batch, not once per request.

use std::time::Duration;

use super::latency::RunSink;
use crate::vm::Outcome;

/// Samples held before they are handed over: a VM thread that is busy, or
/// idle but still spinning for the next request, shows its latest requests
/// in its metrics this many requests late at most.
const BATCH: usize = 32;

/// One request as its VM thread saw it.
#[derive(Clone, Copy)]
pub(crate) struct Sample {
    /// How its run returned (`None`: it suspended).
    pub(crate) outcome: Option<Outcome>,
    pub(crate) queue_wait: Duration,
    pub(crate) run_time: Duration,
}

/// A VM thread's samples not yet in its recorder. The thread hands them
/// over when it holds [`BATCH`], and must [`flush`](Self::flush) before it
/// goes to sleep or ends.
#[derive(Default)]
pub(crate) struct Pending {
    samples: Vec<Sample>,
}

impl Pending {
    pub(crate) fn push(&mut self, sample: Sample, sink: &impl RunSink) {
        self.samples.push(sample);
        if self.samples.len() >= BATCH {
            self.flush(sink);
        }
    }

    /// Hands every sample held to `sink`.
    pub(crate) fn flush(&mut self, sink: &impl RunSink) {
        if !self.samples.is_empty() {
            sink.ran(&self.samples);
            self.samples.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Remembers the size of each batch it is handed.
    #[derive(Default)]
    struct Batches(RefCell<Vec<usize>>);

    impl RunSink for Batches {
        fn ran(&self, samples: &[Sample]) {
            self.0.borrow_mut().push(samples.len());
        }
    }

    #[test]
    fn samples_go_over_a_batch_at_a_time_and_on_flush() {
        let sink = Batches::default();
        let mut pending = Pending::default();
        let sample = Sample {
            outcome: Some(Outcome::Completed),
            queue_wait: Duration::from_micros(1),
            run_time: Duration::from_micros(2),
        };
        for _ in 0..BATCH + 3 {
            pending.push(sample, &sink);
        }
        assert_eq!(*sink.0.borrow(), [BATCH]);
        pending.flush(&sink);
        pending.flush(&sink); // nothing left: no empty batch
        assert_eq!(*sink.0.borrow(), [BATCH, 3]);
    }
}
