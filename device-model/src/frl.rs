//! The frame-rate limiter: one absolute-time tick per instance, at the type's FRL.
//!
//! Tick `k` is at `origin + k * (1 s / frl)`, computed from `k` in nanoseconds (never by adding
//! periods up, so nothing drifts); the origin is the clock's time when the clock is attached.
//! The limiter only keeps time, the completions it holds and the per-head counters; what a held
//! completion is (a descriptor chain of the control queue) and how it is completed is the
//! transport's business.
//!
//! A completion held at time `t` is due at the first tick strictly after `t`; the limiter
//! releases, oldest first, every held completion whose tick is not after now. It asks for a
//! wake-up ([`Limiter::deadline`]) only while it holds something: an idle instance costs
//! nothing. It holds nothing while it is off (the runtime knob), while the type's FRL is 0, or
//! before a clock is attached.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bus::Clock;

/// Per-head frame counters of the limiter, as `status` reports them.
///
/// `submitted` = `presented` + `dropped` + `discarded` + what is held now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadFrames {
    /// Head index.
    pub head: u32,
    /// Frames the guest submitted (fenced flushes of a resource this head shows).
    pub submitted: u64,
    /// Frames presented: completed on a tick (or at once with the limiter off).
    pub presented: u64,
    /// Frames merged into a later one by the limiter (several submitted within one tick).
    pub dropped: u64,
    /// Frames presented over the last second, per second.
    pub present_rate: f64,
    /// Frames held when the device was reset or the client went away: dropped without being
    /// completed (the guest's driver starts over).
    #[serde(default)]
    pub discarded: u64,
}

/// Presentation times kept per head for [`HeadFrames::present_rate`].
pub const RATE_RING: usize = 128;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// One completion the limiter holds: a control-queue descriptor chain, answered but not yet
/// put in the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Head index of the descriptor chain.
    pub desc: u16,
    /// Bytes written into the chain's device-writable part.
    pub len: u32,
    /// The request's fence id.
    pub fence: u64,
    /// Heads whose frame this completion presents (bit n = head n; 0: held only to keep
    /// fence order, or a flush that showed nothing).
    pub heads: u32,
    /// When it was held, on the limiter's clock.
    pub held_at: Duration,
    /// Order of the fenced request among all fenced control requests since the device was
    /// created (completions keep it).
    pub seq: u64,
}

#[derive(Clone, Debug, Default)]
struct HeadState {
    counters: HeadFrames,
    /// Recent presentation times, oldest first, at most [`RATE_RING`].
    recent: VecDeque<Duration>,
}

/// The limiter of one instance.
#[derive(Debug)]
pub struct Limiter {
    frl: u32,
    enabled: bool,
    clock: Option<Arc<dyn Clock>>,
    origin: Duration,
    held: VecDeque<Held>,
    heads: Vec<HeadState>,
}

impl Limiter {
    /// A limiter at `frl` frames per second (0: it never holds anything) for `heads` heads
    /// (at most 32 are counted), on, with no clock yet.
    pub fn new(frl: u32, heads: u32) -> Limiter {
        let heads = heads.min(32);
        Limiter {
            frl,
            enabled: true,
            clock: None,
            origin: Duration::ZERO,
            held: VecDeque::new(),
            heads: (0..heads)
                .map(|head| HeadState {
                    counters: HeadFrames {
                        head,
                        ..HeadFrames::default()
                    },
                    recent: VecDeque::new(),
                })
                .collect(),
        }
    }

    /// The FRL in frames per second (0: off).
    pub fn frl(&self) -> u32 {
        self.frl
    }

    /// Gives the limiter its clock; tick 0 is now. The caller completes what was held first
    /// (a new clock does not measure the old times).
    pub fn attach_clock(&mut self, clock: Arc<dyn Clock>) {
        self.origin = clock.now();
        self.clock = Some(clock);
    }

    /// The runtime knob. The caller completes what was held when it turns the limiter off.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Whether the knob is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether completions are held now: the knob is on, the FRL is not 0, a clock is attached.
    pub fn active(&self) -> bool {
        self.enabled && self.frl > 0 && self.clock.is_some()
    }

    /// Now on the attached clock.
    pub fn now(&self) -> Option<Duration> {
        self.clock.as_ref().map(|c| c.now())
    }

    /// Tick 0.
    pub fn origin(&self) -> Duration {
        self.origin
    }

    /// The time of tick `k`: `origin + floor(k * 1e9 / frl)` ns (`None` with FRL 0 or beyond
    /// what a `Duration` holds).
    pub fn tick_time(&self, k: u64) -> Option<Duration> {
        if self.frl == 0 {
            return None;
        }
        let ns = u128::from(k).checked_mul(NANOS_PER_SEC)? / u128::from(self.frl);
        let ns = u64::try_from(ns).ok()?;
        self.origin.checked_add(Duration::from_nanos(ns))
    }

    /// The first tick strictly after `t`.
    pub fn next_tick_after(&self, t: Duration) -> Option<Duration> {
        if self.frl == 0 {
            return None;
        }
        let Some(since) = t.checked_sub(self.origin) else {
            // Before tick 0.
            return Some(self.origin);
        };
        // k0 = floor(since * frl / 1e9) has tick(k0) <= t; the next tick after t is k0 + 1,
        // or k0 + 2 when flooring tick(k0 + 1) to whole nanoseconds lands it on t.
        let k0 = since.as_nanos().checked_mul(u128::from(self.frl))? / NANOS_PER_SEC;
        let mut k = u64::try_from(k0).ok()?.checked_add(1)?;
        loop {
            let at = self.tick_time(k)?;
            if at > t {
                return Some(at);
            }
            k = k.checked_add(1)?;
        }
    }

    /// When [`Limiter::release_due`] next has something to release: the first tick after the
    /// oldest held completion was held. `None` while nothing is held.
    pub fn deadline(&self) -> Option<Duration> {
        let first = self.held.front()?;
        self.next_tick_after(first.held_at)
    }

    /// Completions held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The held completions, oldest first.
    pub fn held_iter(&self) -> impl Iterator<Item = &Held> {
        self.held.iter()
    }

    /// Counts a frame the guest submitted on `heads` (bit n = head n).
    pub fn submitted(&mut self, heads: u32) {
        for h in self.heads_in(heads) {
            h.counters.submitted = h.counters.submitted.saturating_add(1);
        }
    }

    /// Holds a completion (the caller checked [`Limiter::active`] and the bound); its time is
    /// now on the clock.
    pub fn hold(&mut self, desc: u16, len: u32, fence: u64, heads: u32, seq: u64) {
        let held_at = self.now().unwrap_or(self.origin);
        // A clock that went back (it must not) still keeps the queue in time order.
        let held_at = self.held.back().map_or(held_at, |b| held_at.max(b.held_at));
        self.held.push_back(Held {
            desc,
            len,
            fence,
            heads,
            held_at,
            seq,
        });
    }

    /// Takes, oldest first, the held completions due at or before now, and counts them as
    /// presented at one tick: per head one frame presented, the rest merged.
    pub fn release_due(&mut self) -> Vec<Held> {
        let Some(now) = self.now() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(first) = self.held.front() {
            match self.next_tick_after(first.held_at) {
                Some(at) if at <= now => {}
                _ => break,
            }
            if let Some(h) = self.held.pop_front() {
                out.push(h);
            }
        }
        self.count_presented(&out, now);
        out
    }

    /// Takes every held completion (the knob was turned off), counted as presented now.
    pub fn release_all(&mut self) -> Vec<Held> {
        let out: Vec<Held> = self.held.drain(..).collect();
        let now = self.now().unwrap_or(self.origin);
        self.count_presented(&out, now);
        out
    }

    /// Counts a frame on `heads` completed at once (not held).
    pub fn presented_now(&mut self, heads: u32) {
        let now = self.now();
        for h in self.heads_in(heads) {
            h.counters.presented = h.counters.presented.saturating_add(1);
            if let Some(now) = now {
                h.record(now);
            }
        }
    }

    /// Drops every held completion without completing it (reset, client gone). Returns how
    /// many.
    pub fn discard(&mut self) -> usize {
        let n = self.held.len();
        for held in std::mem::take(&mut self.held) {
            for h in self.heads_in(held.heads) {
                h.counters.discarded = h.counters.discarded.saturating_add(1);
            }
        }
        n
    }

    /// Per-head counters, the present rate measured at now.
    pub fn counters(&self) -> Vec<HeadFrames> {
        let now = self.now();
        self.heads
            .iter()
            .map(|h| HeadFrames {
                present_rate: now.map_or(0.0, |now| h.rate(now)),
                ..h.counters
            })
            .collect()
    }

    fn count_presented(&mut self, released: &[Held], now: Duration) {
        let mut frames = [0u64; 32];
        for held in released {
            for (i, n) in frames.iter_mut().enumerate() {
                if held.heads & (1 << i) != 0 {
                    *n += 1;
                }
            }
        }
        for (h, &n) in self.heads.iter_mut().zip(frames.iter()) {
            if n > 0 {
                h.counters.presented = h.counters.presented.saturating_add(1);
                h.counters.dropped = h.counters.dropped.saturating_add(n - 1);
                h.record(now);
            }
        }
    }

    fn heads_in(&mut self, mask: u32) -> impl Iterator<Item = &mut HeadState> {
        self.heads
            .iter_mut()
            .enumerate()
            .filter(move |(i, _)| mask & (1 << i) != 0)
            .map(|(_, h)| h)
    }
}

impl HeadState {
    fn record(&mut self, at: Duration) {
        if self.recent.len() >= RATE_RING {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
    }

    /// Presentations in the second before `now`, per second. When the ring holds only that
    /// second (a rate above [`RATE_RING`] per second), the rate is estimated from its span.
    fn rate(&self, now: Duration) -> f64 {
        let from = now.saturating_sub(Duration::from_secs(1));
        let n = self
            .recent
            .iter()
            .filter(|&&t| t > from && t <= now)
            .count();
        if n == RATE_RING {
            if let (Some(first), Some(last)) = (self.recent.front(), self.recent.back()) {
                let span = last.saturating_sub(*first).as_secs_f64();
                if span > 0.0 {
                    return (RATE_RING - 1) as f64 / span;
                }
            }
        }
        n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::ManualClock;

    fn limiter(frl: u32, start: Duration) -> (Limiter, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(start));
        let mut l = Limiter::new(frl, 2);
        l.attach_clock(clock.clone());
        (l, clock)
    }

    #[test]
    fn ticks_are_on_an_absolute_grid_without_drift() {
        let start = Duration::new(12_345, 678_901_234);
        let (l, _) = limiter(60, start);
        assert_eq!(l.tick_time(0), Some(start));
        assert_eq!(
            l.tick_time(1),
            Some(start + Duration::from_nanos(16_666_666))
        );
        // 10 000 ticks at 60 fps are exactly 10000/60 s after the origin, to the nanosecond.
        assert_eq!(
            l.tick_time(10_000),
            Some(start + Duration::from_nanos(166_666_666_666))
        );
        assert_eq!(
            l.tick_time(60 * 3600),
            Some(start + Duration::from_secs(3600))
        );
        let (l45, _) = limiter(45, start);
        assert_eq!(
            l45.tick_time(45_000),
            Some(start + Duration::from_secs(1000))
        );
        // The tick after a time is the next grid point, also right on a tick.
        for k in [0u64, 1, 2, 59, 60, 9_999, 10_000, 1_000_000] {
            let at = l.tick_time(k).unwrap();
            assert_eq!(l.next_tick_after(at), l.tick_time(k + 1), "on tick {k}");
            let mid = at + Duration::from_millis(5);
            assert_eq!(l.next_tick_after(mid), l.tick_time(k + 1), "after tick {k}");
            let just_before = at - Duration::from_nanos(1);
            assert_eq!(l.next_tick_after(just_before), Some(at), "before tick {k}");
        }
        assert_eq!(l.next_tick_after(Duration::ZERO), Some(start));
        let (off, _) = limiter(0, start);
        assert_eq!(off.tick_time(1), None);
        assert_eq!(off.next_tick_after(start), None);
        assert!(!off.active());
    }

    #[test]
    fn every_fps_rounds_consistently() {
        for frl in [1u32, 7, 24, 30, 45, 59, 60, 61, 144, 1000] {
            let (l, _) = limiter(frl, Duration::from_nanos(999));
            let mut prev = l.tick_time(0).unwrap();
            for k in 1..2_000u64 {
                let t = l.tick_time(k).unwrap();
                assert!(t > prev);
                assert_eq!(l.next_tick_after(prev), Some(t), "{frl} fps tick {k}");
                assert_eq!(l.next_tick_after(t - Duration::from_nanos(1)), Some(t));
                prev = t;
            }
        }
    }

    #[test]
    fn holds_until_the_next_tick_and_counts_merged_frames() {
        let (mut l, clock) = limiter(50, Duration::from_secs(100));
        assert_eq!(l.deadline(), None, "idle: no wake-up");
        clock.advance(Duration::from_millis(3));
        l.submitted(0b01);
        l.hold(0, 24, 1, 0b01, 0);
        clock.advance(Duration::from_millis(4));
        l.submitted(0b11);
        l.hold(2, 24, 2, 0b11, 1);
        let tick1 = Duration::from_secs(100) + Duration::from_millis(20);
        assert_eq!(l.deadline(), Some(tick1));
        clock.set(tick1 - Duration::from_nanos(1));
        assert!(l.release_due().is_empty());
        clock.set(tick1);
        let out = l.release_due();
        assert_eq!(out.iter().map(|h| h.fence).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(l.deadline(), None);
        let c = l.counters();
        assert_eq!((c[0].submitted, c[0].presented, c[0].dropped), (2, 1, 1));
        assert_eq!((c[1].submitted, c[1].presented, c[1].dropped), (1, 1, 0));
        assert_eq!(c[0].present_rate, 1.0);
        // Held at tick time exactly: the next tick.
        l.hold(4, 24, 3, 0b01, 2);
        assert_eq!(l.deadline(), Some(tick1 + Duration::from_millis(20)));
        assert_eq!(l.discard(), 1);
        assert_eq!(l.counters()[0].discarded, 1);
        assert_eq!(l.deadline(), None);
    }

    #[test]
    fn present_rate_over_the_last_second() {
        let (mut l, clock) = limiter(60, Duration::from_secs(5));
        for _ in 0..120 {
            clock.advance(Duration::from_nanos(16_666_667));
            l.presented_now(0b1);
        }
        let r = l.counters()[0].present_rate;
        assert_eq!(r, 60.0);
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.counters()[0].present_rate, 30.0);
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.counters()[0].present_rate, 0.0);
        // Faster than the ring: estimated from its span.
        for _ in 0..1000 {
            clock.advance(Duration::from_millis(1));
            l.presented_now(0b1);
        }
        let r = l.counters()[0].present_rate;
        assert!((r - 1000.0).abs() < 1.0, "{r}");
        assert_eq!(l.counters()[1].present_rate, 0.0);
    }
}
