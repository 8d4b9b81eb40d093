//! The per-instance runtime: the frame-rate limiter's tick, off the register path.
//!
//! One thread per instance sleeps until the limiter's next deadline (an absolute
//! CLOCK_MONOTONIC time the model computes as `origin + k / frl`), with a `timerfd` armed with
//! `TFD_TIMER_ABSTIME`: a late wake-up delays that one tick, never the ones after it. It then
//! takes the instance lock, runs the tick (which completes the held virtqueue work and raises
//! its interrupts through the device's non-blocking interrupt sink), reads the next deadline,
//! lets go of the lock and sleeps again. It never sleeps, nor arms its timer, with the lock held.
//!
//! While the limiter holds nothing (no deadline) the timer is disarmed and the thread blocks in
//! `poll` on its timer and its [`Waker`] with no timeout: an idle instance costs no wake-up at
//! all. Whoever can make the deadline appear or move earlier wakes it: the connection thread
//! after a device write (only then: one eventfd write, never blocking), the knob.
//!
//! The thread works on anything [`Paced`] (the [`Instance`]; a fake in the tests).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{warn, Level};
use serde::{Deserialize, Serialize};

use crate::instance::Instance;
use crate::log_limited;
use crate::ratelimit::RateLimit;
use crate::sys::clock::monotonic_now;
use crate::sys::eventfd::Notifier;
use crate::sys::timerfd::TimerFd;

/// What the runtime drives: the limiter's deadline and tick, on CLOCK_MONOTONIC.
pub trait Paced: Send + 'static {
    /// When the next tick is due (absolute CLOCK_MONOTONIC time), or `None` while nothing is
    /// held.
    fn frl_deadline(&self) -> Option<Duration>;
    /// Runs the tick: releases what is due by now; returns how many completions it released.
    fn frl_tick(&mut self) -> usize;
    /// Where the interrupts a tick raised wait to be written once the lock is released.
    fn interrupts(&self) -> Option<Arc<crate::vfio_user::irq::MsixSink>> {
        None
    }
}

impl Paced for Instance {
    fn frl_deadline(&self) -> Option<Duration> {
        self.device.frl_deadline()
    }

    fn frl_tick(&mut self) -> usize {
        self.device.frl_tick()
    }

    fn interrupts(&self) -> Option<Arc<crate::vfio_user::irq::MsixSink>> {
        self.msix.clone()
    }
}

/// If a tick left the deadline where it was (it should have moved past the tick), the runtime
/// looks again this much later instead of spinning on a deadline that is always due.
const STALL_BACKOFF: Duration = Duration::from_millis(1);

/// The runtime's counters, as `status` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeCounters {
    /// Times the runtime thread woke up (timer or waker): 0 for an instance that never held
    /// anything.
    pub wakeups: u64,
    /// Ticks run.
    pub ticks: u64,
    /// Completions the ticks released.
    pub released: u64,
    /// Longest delay between a tick's due time and its run, microseconds.
    pub max_lateness_us: u64,
    /// Median tick lateness, microseconds (to the histogram's 25 us buckets: the bucket's top).
    #[serde(default)]
    pub p50_lateness_us: u64,
    /// 99th-percentile tick lateness, microseconds (likewise).
    #[serde(default)]
    pub p99_lateness_us: u64,
    /// The tick thread runs at real-time priority (SCHED_FIFO 1): the process was allowed to.
    #[serde(default)]
    pub realtime: bool,
}

/// Width of a lateness histogram bucket, microseconds.
const LATENESS_BUCKET_US: u64 = 25;
/// Lateness buckets: 0-25 us, 25-50 us, ... up to 5 ms; the last one takes everything later.
const LATENESS_BUCKETS: usize = 201;

/// Lateness histogram: counts per bucket (atomics, read without the instance lock).
#[derive(Debug)]
struct Lateness([AtomicU64; LATENESS_BUCKETS]);

impl Default for Lateness {
    fn default() -> Self {
        Lateness(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Lateness {
    fn record(&self, us: u64) {
        let i = ((us / LATENESS_BUCKET_US) as usize).min(LATENESS_BUCKETS - 1);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The top of the bucket holding quantile `q` (0 when nothing was recorded).
    fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want {
                return (i as u64 + 1) * LATENESS_BUCKET_US;
            }
        }
        LATENESS_BUCKETS as u64 * LATENESS_BUCKET_US
    }
}

/// Puts the calling thread in SCHED_FIFO at priority 1 when the process may (root,
/// `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least 1), and says whether it did. A tick thread
/// runs for some 20 us per tick and sleeps on an absolute timer in between; in the fair
/// scheduler it waited up to milliseconds behind busy tasks for its turn once its timer fired
/// (BENCHMARKS.md, "Flips and the frame-rate limiter"), while at the lowest real-time priority
/// it runs at once. Without the permission it stays in the default policy.
fn request_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads one sched_param from our stack; pid 0 is the calling
    // thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// The live counters behind [`RuntimeCounters`] (atomics: read without the instance lock).
#[derive(Debug, Default)]
pub struct RuntimeStats {
    realtime: std::sync::atomic::AtomicBool,
    wakeups: AtomicU64,
    ticks: AtomicU64,
    released: AtomicU64,
    max_lateness_us: AtomicU64,
    lateness: Lateness,
}

impl RuntimeStats {
    /// A snapshot.
    pub fn get(&self) -> RuntimeCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RuntimeCounters {
            wakeups: g(&self.wakeups),
            ticks: g(&self.ticks),
            released: g(&self.released),
            max_lateness_us: g(&self.max_lateness_us),
            p50_lateness_us: self.lateness.quantile(0.50),
            p99_lateness_us: self.lateness.quantile(0.99),
            realtime: self.realtime.load(Ordering::Relaxed),
        }
    }
}

/// Wakes a runtime so it reads the deadline again. Never blocks.
#[derive(Debug)]
pub struct Waker(Notifier);

impl Waker {
    /// Wakes the runtime (one eventfd write; a wake-up already pending absorbs it).
    pub fn wake(&self) {
        self.0.notify();
    }
}

/// Whether the deadline `after` a device call comes sooner than the one `before` it (appeared,
/// or moved earlier): the runtime sleeps until `before`, so it must be woken.
pub fn sooner(before: Option<Duration>, after: Option<Duration>) -> bool {
    match (before, after) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(b), Some(a)) => a < b,
    }
}

/// A running runtime thread; stopping (or dropping) it joins the thread.
#[derive(Debug)]
pub struct Runtime {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runtime {
    /// Starts the runtime of `target` on a thread named `name`, counting into `stats`.
    pub fn spawn<T: Paced>(
        name: &str,
        target: Arc<Mutex<T>>,
        stats: Arc<RuntimeStats>,
    ) -> io::Result<Runtime> {
        let timer = TimerFd::new()?;
        let waker = Arc::new(Waker(Notifier::new()?));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (waker, stop) = (waker.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || {
                    let realtime = request_realtime();
                    stats.realtime.store(realtime, Ordering::Relaxed);
                    run(&*target, &timer, &waker, &stop, &stats)
                })?
        };
        Ok(Runtime {
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The runtime's waker.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Stops the thread and waits for it (it never waits on anything but its own poll, and
    /// holds the instance lock only around a tick).
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the frame-rate limiter's runtime thread panicked");
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The thread: tick what is due, arm the timer for the next deadline (or disarm it), sleep.
fn run<T: Paced>(
    target: &Mutex<T>,
    timer: &TimerFd,
    waker: &Waker,
    stop: &AtomicBool,
    stats: &RuntimeStats,
) {
    let mut armed: Option<Duration> = None;
    let mut log = RateLimit::default();
    while !stop.load(Ordering::SeqCst) {
        let mut ticked = None;
        let (raised, next) = {
            let mut t = lock(target);
            let raised = t.interrupts();
            let next = match t.frl_deadline() {
                Some(due) => {
                    let now = monotonic_now();
                    if due <= now {
                        let released = t.frl_tick();
                        ticked = Some((due, now, released));
                        t.frl_deadline()
                    } else {
                        Some(due)
                    }
                }
                None => None,
            };
            (raised, next)
        };
        // The completions' interrupts, written with the lock released.
        if let Some(sink) = raised {
            sink.flush();
        }
        let mut next = next;
        if let Some((due, now, released)) = ticked {
            stats.ticks.fetch_add(1, Ordering::Relaxed);
            stats.released.fetch_add(released as u64, Ordering::Relaxed);
            let late = (now - due).as_micros().min(u128::from(u64::MAX)) as u64;
            stats.max_lateness_us.fetch_max(late, Ordering::Relaxed);
            stats.lateness.record(late);
            if next.is_some_and(|n| n <= due) {
                log_limited!(
                    log,
                    Level::Warn,
                    "frame-rate limiter: a tick left its deadline in place; looking again in {STALL_BACKOFF:?}"
                );
                next = Some(monotonic_now() + STALL_BACKOFF);
            }
        }
        let armed_ok = match next {
            Some(at) if armed != Some(at) => timer.arm_at(at).map(|()| armed = Some(at)),
            None if armed.is_some() => timer.disarm().map(|()| armed = None),
            _ => Ok(()),
        };
        if let Err(e) = armed_ok {
            log_limited!(log, Level::Warn, "frame-rate limiter timer: {e}");
            // Without a timer, poll for the deadline instead (bounded, and only while
            // something is held).
            armed = None;
        }
        let timeout = match (&armed, next) {
            (None, Some(_)) => STALL_BACKOFF.as_millis() as i32,
            _ => -1,
        };
        let mut fds = [
            libc::pollfd {
                fd: timer.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: waker.0.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two live pollfds on the stack; both descriptors outlive the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log_limited!(log, Level::Warn, "frame-rate limiter poll: {e}");
                std::thread::sleep(STALL_BACKOFF);
            }
            continue;
        }
        stats.wakeups.fetch_add(1, Ordering::Relaxed);
        if fds[0].revents != 0 && timer.read_expirations() > 0 {
            // The one-shot timer fired: it is disarmed now.
            armed = None;
        }
        if fds[1].revents != 0 {
            waker.0.drain();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A limiter stand-in: a deadline set by the test; each tick clears it and counts.
    #[derive(Debug, Default)]
    struct Fake {
        deadline: Option<Duration>,
        ticks: Vec<Duration>,
        /// Ticks leave the deadline in place (a broken limiter).
        stuck: bool,
    }

    impl Paced for Fake {
        fn frl_deadline(&self) -> Option<Duration> {
            self.deadline
        }
        fn frl_tick(&mut self) -> usize {
            self.ticks.push(monotonic_now());
            if !self.stuck {
                self.deadline = None;
            }
            1
        }
    }

    fn start(fake: Fake) -> (Arc<Mutex<Fake>>, Arc<RuntimeStats>, Runtime) {
        let fake = Arc::new(Mutex::new(fake));
        let stats = Arc::new(RuntimeStats::default());
        let rt = Runtime::spawn("frl-test", fake.clone(), stats.clone()).unwrap();
        (fake, stats, rt)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn an_idle_runtime_never_wakes() {
        let (_fake, stats, rt) = start(Fake::default());
        std::thread::sleep(Duration::from_millis(300));
        let c = stats.get();
        assert_eq!(
            (c.wakeups, c.ticks, c.released, c.max_lateness_us),
            (0, 0, 0, 0),
            "{c:?}"
        );
        rt.stop();
    }

    #[test]
    fn a_deadline_wakes_it_once_at_its_time() {
        let (fake, stats, rt) = start(Fake::default());
        let due = monotonic_now() + Duration::from_millis(50);
        lock(&fake).deadline = Some(due);
        rt.waker().wake();
        wait_for("the tick", || stats.get().ticks == 1);
        let ticked = lock(&fake).ticks.clone();
        assert_eq!(ticked.len(), 1);
        assert!(ticked[0] >= due, "not before its time");
        // Nothing held any more: it goes back to sleep for good.
        std::thread::sleep(Duration::from_millis(200));
        let c = stats.get();
        assert_eq!((c.ticks, c.released), (1, 1));
        // One wake-up for the waker, one for the timer.
        assert_eq!(c.wakeups, 2, "{c:?}");
        assert!(c.max_lateness_us < 1_000_000);
        assert!(c.p50_lateness_us <= c.p99_lateness_us);
        rt.stop();
    }

    #[test]
    fn a_deadline_moved_earlier_is_honoured() {
        let (fake, stats, rt) = start(Fake::default());
        lock(&fake).deadline = Some(monotonic_now() + Duration::from_secs(3600));
        rt.waker().wake();
        wait_for("the first wake-up", || stats.get().wakeups == 1);
        let due = monotonic_now() + Duration::from_millis(20);
        lock(&fake).deadline = Some(due);
        rt.waker().wake();
        wait_for("the earlier tick", || stats.get().ticks == 1);
        assert!(lock(&fake).ticks[0] >= due);
        rt.stop();
    }

    #[test]
    fn a_deadline_already_past_ticks_at_once_and_a_stuck_one_backs_off() {
        let (fake, stats, rt) = start(Fake {
            deadline: Some(Duration::from_nanos(1)),
            ..Fake::default()
        });
        wait_for("the tick", || stats.get().ticks == 1);
        // A limiter whose tick never moves its deadline: looked at about once a millisecond,
        // not in a spin.
        {
            let mut f = lock(&fake);
            f.stuck = true;
            f.deadline = Some(Duration::from_nanos(1));
        }
        rt.waker().wake();
        std::thread::sleep(Duration::from_millis(100));
        let ticks = stats.get().ticks;
        assert!((2..=150).contains(&ticks), "{ticks} ticks in 100 ms");
        rt.stop();
    }

    #[test]
    fn stop_joins_it_and_lets_go_of_the_target() {
        let (fake, _stats, rt) = start(Fake {
            deadline: Some(monotonic_now() + Duration::from_secs(3600)),
            ..Fake::default()
        });
        let started = Instant::now();
        rt.stop();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(Arc::strong_count(&fake), 1, "the thread is gone");
        // Dropping stops too.
        let (fake, _stats, rt) = start(Fake::default());
        drop(rt);
        assert_eq!(Arc::strong_count(&fake), 1);
    }

    #[test]
    fn sooner_is_appeared_or_earlier() {
        let s = Duration::from_secs;
        assert!(sooner(None, Some(s(1))));
        assert!(sooner(Some(s(2)), Some(s(1))));
        assert!(!sooner(Some(s(1)), Some(s(1))));
        assert!(!sooner(Some(s(1)), Some(s(2))));
        assert!(!sooner(Some(s(1)), None));
        assert!(!sooner(None, None));
    }

    #[test]
    fn lateness_quantiles_come_from_the_histogram() {
        let l = Lateness::default();
        assert_eq!(l.quantile(0.5), 0);
        for us in 0..98 {
            l.record(us % 20);
        }
        l.record(260);
        l.record(1_000_000);
        assert_eq!(l.quantile(0.50), 25);
        assert_eq!(l.quantile(0.99), 275);
        assert_eq!(
            l.quantile(1.0),
            LATENESS_BUCKETS as u64 * LATENESS_BUCKET_US
        );
    }
}
