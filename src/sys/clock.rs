//! The server's clock: CLOCK_MONOTONIC, as the device model's [`Clock`] sees it.
//!
//! [`MonotonicClock::now`] is the raw CLOCK_MONOTONIC reading (its origin is the clock's own, not
//! the process start), so a deadline the model computes on it is directly an absolute time for a
//! `timerfd` with `TFD_TIMER_ABSTIME` on the same clock (see [`crate::sys::timerfd`]).

use std::time::Duration;

use vgpu_model::bus::Clock;

/// CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

/// Reads CLOCK_MONOTONIC.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into a live local; CLOCK_MONOTONIC always exists on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(r, 0, "clock_gettime(CLOCK_MONOTONIC)");
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        monotonic_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_is_monotonic_and_agrees_with_std() {
        let c = MonotonicClock;
        let (a, std_a) = (c.now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        let (b, std_b) = (c.now(), std::time::Instant::now());
        assert!(b > a);
        let ours = b - a;
        let theirs = std_b - std_a;
        let skew = ours.abs_diff(theirs);
        assert!(skew < Duration::from_millis(2), "{ours:?} vs {theirs:?}");
    }
}
