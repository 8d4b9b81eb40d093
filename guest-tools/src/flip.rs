//! Page-flip timing of one head: statistics over the timestamps of its flip-complete events.
//!
//! The kernel stamps each `DRM_EVENT_FLIP_COMPLETE` with `tv_sec`/`tv_usec` on the monotonic
//! clock. A head's run starts when its first flip is asked for (the same clock, read by the
//! tool) and ends with its last event; the interval of flip `i` is its event minus the previous
//! one (for the first flip: minus the start).

use std::fmt;
use std::time::Duration;

/// What one head's flips took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlipStats {
    /// Flips completed.
    pub count: usize,
    /// From the first request to the last event.
    pub seconds: f64,
    /// Flips per second over `seconds`.
    pub rate: f64,
    /// Shortest, mean and longest interval between consecutive completions, in milliseconds.
    pub min_ms: f64,
    pub avg_ms: f64,
    pub max_ms: f64,
}

/// The events' resolution: a run shorter than this is counted as this long.
const RESOLUTION: Duration = Duration::from_micros(1);

impl FlipStats {
    /// The statistics of flips asked for from `start` on and completed at `events` (in order,
    /// the same clock); `None` when no flip completed. A timestamp earlier than the one before
    /// it counts as an interval of zero.
    pub fn from_timestamps(start: Duration, events: &[Duration]) -> Option<FlipStats> {
        let last = *events.last()?;
        let mut previous = start;
        let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
        for &t in events {
            let interval = t.saturating_sub(previous);
            min = min.min(interval);
            max = max.max(interval);
            previous = previous.max(t);
        }
        let total = last.saturating_sub(start).max(RESOLUTION);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let count = events.len();
        Some(FlipStats {
            count,
            seconds: total.as_secs_f64(),
            rate: count as f64 / total.as_secs_f64(),
            min_ms: ms(min),
            avg_ms: ms(total) / count as f64,
            max_ms: ms(max),
        })
    }
}

impl fmt::Display for FlipStats {
    /// `count=C seconds=S rate=R min_ms= avg_ms= max_ms=`, as the `flips` line prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "count={} seconds={:.3} rate={:.2} min_ms={:.3} avg_ms={:.3} max_ms={:.3}",
            self.count, self.seconds, self.rate, self.min_ms, self.avg_ms, self.max_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn steady_sixty_hertz() {
        // 60 flips, one every 16.667 ms (in microseconds, as the events carry them).
        let start = Duration::from_secs(1000);
        let events: Vec<Duration> = (1..=60)
            .map(|i| start + Duration::from_micros(i * 16_667))
            .collect();
        let s = FlipStats::from_timestamps(start, &events).unwrap();
        assert_eq!(s.count, 60);
        assert!((s.seconds - 1.00002).abs() < 1e-9, "{s:?}");
        assert!((s.rate - 59.9988).abs() < 1e-3, "{s:?}");
        assert!((s.min_ms - 16.667).abs() < 1e-9, "{s:?}");
        assert!((s.max_ms - 16.667).abs() < 1e-9, "{s:?}");
        assert!((s.avg_ms - 16.667).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn uneven_intervals_from_the_start() {
        // First flip 5 ms after the request, then 1, 10 and 4 ms.
        let s = FlipStats::from_timestamps(ms(100), &[ms(105), ms(106), ms(116), ms(120)]).unwrap();
        assert_eq!(s.count, 4);
        assert!((s.seconds - 0.020).abs() < 1e-12);
        assert!((s.rate - 200.0).abs() < 1e-9);
        assert!((s.min_ms - 1.0).abs() < 1e-9);
        assert!((s.avg_ms - 5.0).abs() < 1e-9);
        assert!((s.max_ms - 10.0).abs() < 1e-9);
        assert_eq!(
            s.to_string(),
            "count=4 seconds=0.020 rate=200.00 min_ms=1.000 avg_ms=5.000 max_ms=10.000"
        );
    }

    #[test]
    fn nothing_completed_and_degenerate_clocks() {
        assert_eq!(FlipStats::from_timestamps(ms(5), &[]), None);
        // All at the start instant: counted over the clock's resolution, no division by zero.
        let s = FlipStats::from_timestamps(ms(5), &[ms(5), ms(5)]).unwrap();
        assert_eq!((s.count, s.min_ms, s.max_ms), (2, 0.0, 0.0));
        assert!(s.rate.is_finite() && s.rate > 0.0);
        // A timestamp going backwards is an interval of zero, and the next is measured from
        // the latest one seen.
        let s = FlipStats::from_timestamps(ms(0), &[ms(10), ms(8), ms(12)]).unwrap();
        assert_eq!((s.min_ms, s.max_ms), (0.0, 10.0));
        assert!((s.seconds - 0.012).abs() < 1e-12);
    }
}
