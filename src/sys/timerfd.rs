//! A `timerfd` on CLOCK_MONOTONIC armed at absolute times (`TFD_TIMER_ABSTIME`): a deadline
//! computed as `origin + k / rate` fires at that instant however late the previous wake-up was,
//! so sleep overshoot never accumulates into drift.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A non-blocking CLOCK_MONOTONIC timerfd.
#[derive(Debug)]
pub struct TimerFd(OwnedFd);

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

impl TimerFd {
    /// A disarmed timer.
    pub fn new() -> io::Result<TimerFd> {
        // SAFETY: timerfd_create takes two ints and returns a new descriptor or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        Ok(TimerFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn settime(&self, flags: i32, value: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: timespec(Duration::ZERO),
            it_value: timespec(value),
        };
        // SAFETY: reads one live itimerspec; the old value is not asked for (null).
        let r = unsafe {
            libc::timerfd_settime(self.0.as_raw_fd(), flags, &spec, std::ptr::null_mut())
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Arms the timer to expire once at `at` on CLOCK_MONOTONIC (a time already past expires at
    /// once). A zero `at` would disarm it, so it is raised to 1 ns.
    pub fn arm_at(&self, at: Duration) -> io::Result<()> {
        self.settime(libc::TFD_TIMER_ABSTIME, at.max(Duration::from_nanos(1)))
    }

    /// Disarms the timer (and drops an expiry not yet read).
    pub fn disarm(&self) -> io::Result<()> {
        self.settime(0, Duration::ZERO)?;
        self.read_expirations();
        Ok(())
    }

    /// Reads (and clears) the expirations since the last read; 0 when none (never blocks).
    pub fn read_expirations(&self) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer, without blocking.
        let n = unsafe { libc::read(self.0.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if n == 8 {
            u64::from_ne_bytes(b)
        } else {
            0
        }
    }
}

impl AsFd for TimerFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::clock::monotonic_now;

    fn wait_readable(t: &TimerFd, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: t.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
    }

    #[test]
    fn fires_at_an_absolute_time_and_disarms() {
        let t = TimerFd::new().unwrap();
        assert_eq!(t.read_expirations(), 0);
        let at = monotonic_now() + Duration::from_millis(20);
        t.arm_at(at).unwrap();
        assert!(wait_readable(&t, 2000));
        assert!(monotonic_now() >= at, "not before its time");
        assert_eq!(t.read_expirations(), 1);
        // Past times expire at once; disarming drops the expiry.
        t.arm_at(Duration::from_nanos(1)).unwrap();
        assert!(wait_readable(&t, 2000));
        t.disarm().unwrap();
        assert!(!wait_readable(&t, 0));
        t.arm_at(monotonic_now() + Duration::from_secs(3600))
            .unwrap();
        t.disarm().unwrap();
        assert!(!wait_readable(&t, 50));
    }
}
