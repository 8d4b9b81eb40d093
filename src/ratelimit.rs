//! Rate limiting for log lines a guest or a client can trigger at will.

use std::time::{Duration, Instant};

/// Allows `burst` events per `window`; counts the rest and reports them with the next allowed
/// event.
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    start: Instant,
    seen: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `burst` events per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            window,
            burst,
            start: Instant::now(),
            seen: 0,
            suppressed: 0,
        }
    }

    /// Whether to log this event at `now`; `Some(n)` carries how many were suppressed since
    /// the last logged one.
    pub fn check_at(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.start) >= self.window {
            self.start = now;
            self.seen = 0;
        }
        if self.seen < self.burst {
            self.seen += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// [`RateLimit::check_at`] now.
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }
}

impl Default for RateLimit {
    /// 10 lines per 5 seconds.
    fn default() -> Self {
        RateLimit::new(10, Duration::from_secs(5))
    }
}

/// Logs at `level` through `limit`, appending the suppressed count.
#[macro_export]
macro_rules! log_limited {
    ($limit:expr, $level:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.check() {
            if suppressed > 0 {
                log::log!($level, "{} ({} similar messages suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::log!($level, $($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports() {
        let mut r = RateLimit::new(2, Duration::from_secs(1));
        let t0 = r.start;
        assert_eq!(r.check_at(t0), Some(0));
        assert_eq!(r.check_at(t0), Some(0));
        assert_eq!(r.check_at(t0), None);
        assert_eq!(r.check_at(t0 + Duration::from_millis(500)), None);
        assert_eq!(r.check_at(t0 + Duration::from_secs(1)), Some(2));
    }
}
