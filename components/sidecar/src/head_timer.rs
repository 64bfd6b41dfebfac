//! hyper's header-read timeout with one tokio timer per client connection.
//!
//! hyper asks its timer for a new sleep each time it starts reading a request head and drops it
//! once the head is in. With hyper-util's `TokioTimer` that is a boxed tokio `Sleep` put into and
//! taken out of the runtime's timer wheel for every request of a keep-alive connection. The
//! sleeps [`HeadTimer`] hands to hyper only record their deadline; the connection's own task
//! polls one tokio `Sleep` ([`HeadTimer::driver`]), armed at the deadline it saw and moved on
//! lazily when it fires before the current one. A busy connection touches the timer wheel about
//! once per timeout period instead of twice per request, and the timeout still fires at the
//! deadline hyper asked for.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// The timer given to one connection's hyper server (`Builder::timer`).
#[derive(Clone, Default)]
pub(crate) struct HeadTimer {
    slot: Arc<Mutex<Slot>>,
}

#[derive(Default)]
struct Slot {
    /// The latest sleep handed to hyper (generations start at 1).
    generation: u64,
    /// Its deadline while it is alive (hyper is reading a head).
    deadline: Option<Instant>,
    /// The generation whose deadline has passed (0: none).
    expired: u64,
    /// The task polling the latest sleep.
    waker: Option<Waker>,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // Nothing panics while holding the lock; a poisoned slot is still consistent.
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let mut slot = lock(&self.slot);
        slot.generation += 1;
        slot.deadline = Some(Instant::from_std(deadline));
        slot.waker = None;
        Box::pin(HeadSleep {
            slot: Arc::clone(&self.slot),
            generation: slot.generation,
        })
    }

    fn now(&self) -> std::time::Instant {
        // tokio's clock, so paused and simulated time apply (as with `TokioTimer`).
        Instant::now().into_std()
    }
}

/// A sleep handed to hyper: ready once the driver saw its deadline pass.
struct HeadSleep {
    slot: Arc<Mutex<Slot>>,
    generation: u64,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = lock(&self.slot);
        if slot.expired == self.generation {
            return Poll::Ready(());
        }
        if slot.generation == self.generation
            && !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            slot.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        let mut slot = lock(&self.slot);
        if slot.generation == self.generation {
            slot.deadline = None;
            slot.waker = None;
        }
    }
}

impl HeadTimer {
    /// Wakes hyper when the head it is reading is late. Never completes; the connection's task
    /// must poll it after each poll of the connection (a new deadline is picked up then).
    pub(crate) fn driver(&self) -> impl Future<Output = ()> + Send + 'static {
        let slot = Arc::clone(&self.slot);
        let mut sleep: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut armed: Option<Instant> = None;
        std::future::poll_fn(move |cx| {
            let mut slot = lock(&slot);
            let Some(deadline) = slot.deadline else {
                // No head being read. An armed sleep may still wake the task once; harmless.
                return Poll::Pending;
            };
            if slot.expired == slot.generation {
                return Poll::Pending;
            }
            loop {
                if let (Some(at), Some(timer)) = (armed, sleep.as_mut())
                    && at <= deadline
                {
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    armed = None;
                    if at == deadline {
                        slot.expired = slot.generation;
                        if let Some(waker) = slot.waker.take() {
                            waker.wake();
                        }
                        return Poll::Pending;
                    }
                    // Fired at an older deadline: move on to the current one.
                }
                match sleep.as_mut() {
                    Some(timer) => timer.as_mut().reset(deadline),
                    None => sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                armed = Some(deadline);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use hyper::rt::Timer;

    use super::*;

    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll<F: Future + ?Sized>(f: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(waker))
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_fires_at_its_deadline_only_while_it_is_the_current_one() {
        let timer = HeadTimer::default();
        let driver = timer.driver();
        tokio::pin!(driver);
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&wakes));
        let noop = Waker::noop();

        // Requests keep coming: each head's sleep is dropped before its deadline.
        for _ in 0..5 {
            let mut sleep = timer.sleep(Duration::from_secs(30));
            assert!(poll(sleep.as_mut(), &waker).is_pending());
            assert!(poll(driver.as_mut(), noop).is_pending());
            tokio::time::advance(Duration::from_secs(20)).await;
            assert!(poll(driver.as_mut(), noop).is_pending());
            assert!(poll(sleep.as_mut(), &waker).is_pending());
            drop(sleep);
        }
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);

        // The next head never comes: ready exactly at its deadline, not before.
        let start = Instant::now();
        let mut sleep = timer.sleep(Duration::from_secs(30));
        assert!(poll(sleep.as_mut(), &waker).is_pending());
        assert!(poll(driver.as_mut(), noop).is_pending());
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert!(poll(driver.as_mut(), noop).is_pending());
        assert!(poll(sleep.as_mut(), &waker).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(poll(driver.as_mut(), noop).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "hyper's task is woken");
        assert!(poll(sleep.as_mut(), &waker).is_ready());
        assert_eq!(Instant::now() - start, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn the_driver_sleeps_on_the_runtime_timer_until_the_deadline() {
        let timer = HeadTimer::default();
        let start = Instant::now();
        let mut sleep = timer.sleep(Duration::from_secs(3));
        let driver = timer.driver();
        // The driver and the sleep polled by one task, like the connection's task does.
        tokio::select! {
            biased;
            () = &mut sleep => {}
            () = driver => unreachable!("the driver never completes"),
        }
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }
}
