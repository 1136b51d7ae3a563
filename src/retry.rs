//! The one retry policy of imagefs: how often, how far apart and for how long a failed
//! operation is tried again.
//!
//! Transports make a single attempt (one registry request, one blob fetch); their callers
//! wrap them in [`RetryPolicy::run`] and say, per error, whether another attempt may succeed
//! ([`Verdict`]). Nothing here knows HTTP beyond the format of a `Retry-After` value
//! ([`retry_after`]), which callers hand over as a [`Verdict::RetryAfter`].

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

/// What a failed attempt's error means for the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Trying again cannot help (or was already done below): the error is returned.
    Permanent,
    /// The network or the server had a bad moment: worth another attempt after the backoff.
    Transient,
    /// Transient, and the server said when to come back (`Retry-After`).
    RetryAfter(Duration),
}

/// When, if at all, to make attempt `n + 1` after attempt `n` (1-based) failed and its error
/// was classified as `verdict`:
///
/// - [`Verdict::Permanent`]: never; the error is returned.
/// - Otherwise only while `n < attempts`, and, with a `deadline`, only while the first
///   attempt started less than `deadline` ago (an attempt against a silent host can itself
///   last a whole timeout: the deadline bounds the retries, not each attempt).
/// - [`Verdict::RetryAfter`]`(d)`: after exactly `d` if `d ≤ retry_after_max`; a longer wait
///   is not waited for, the error is returned at once.
/// - [`Verdict::Transient`]: after the exponential backoff with equal jitter: with
///   `b = min(first_backoff · 2^(n−1), max_backoff)`, a uniformly random delay in `[b/2, b]`.
///
/// When no further attempt is made, the last attempt's error is returned unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included (0 is taken as 1).
    pub attempts: u32,
    /// Nominal delay before the second attempt; doubled for each further one.
    pub first_backoff: Duration,
    /// Cap of the nominal delay.
    pub max_backoff: Duration,
    /// No retry once the first attempt started this long ago; `None`: no such bound.
    pub deadline: Option<Duration>,
    /// The longest `Retry-After` waited for.
    pub retry_after_max: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms doubling up to 5 s, no deadline, `Retry-After` up to 30 s.
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            deadline: None,
            retry_after_max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry (a pull mirror: a dead one must not cost the origin's budget).
    pub fn once() -> RetryPolicy {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The nominal backoff after failed attempt `n` (1-based), before jitter.
    fn nominal(&self, n: u32) -> Duration {
        self.first_backoff
            .saturating_mul(1 << n.saturating_sub(1).min(20))
            .min(self.max_backoff)
    }

    /// The wait before attempt `n + 1`, or `None` to give up; `elapsed` is the time since the
    /// first attempt started and `jitter` a number in `[0, 1)` (see the type's doc).
    fn delay(&self, n: u32, verdict: Verdict, elapsed: Duration, jitter: f64) -> Option<Duration> {
        if verdict == Verdict::Permanent
            || n >= self.attempts.max(1)
            || self.deadline.is_some_and(|d| elapsed >= d)
        {
            return None;
        }
        match verdict {
            Verdict::RetryAfter(wait) if wait > self.retry_after_max => None,
            Verdict::RetryAfter(wait) => Some(wait),
            _ => {
                let b = self.nominal(n);
                Some(b / 2 + (b / 2).mul_f64(jitter.clamp(0.0, 1.0)))
            }
        }
    }

    /// Run `op` (called with the attempt number, from 1) until it succeeds or the policy
    /// gives up; `classify` tells what an error means.
    pub async fn run<T, E, Op, Fut>(
        &self,
        op: Op,
        classify: impl FnMut(&E) -> Verdict,
    ) -> Result<T, E>
    where
        E: fmt::Display,
        Op: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_observed(op, classify, |_, _, _| {}).await
    }

    /// [`run`](Self::run), calling `on_retry(error, attempt, delay)` before each wait (for
    /// progress reports; every retry is also logged at debug level).
    pub async fn run_observed<T, E, Op, Fut>(
        &self,
        mut op: Op,
        mut classify: impl FnMut(&E) -> Verdict,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E>
    where
        E: fmt::Display,
        Op: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = tokio::time::Instant::now();
        let mut attempt = 1;
        loop {
            let error = match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let verdict = classify(&error);
            let Some(delay) = self.delay(attempt, verdict, started.elapsed(), fastrand::f64())
            else {
                return Err(error);
            };
            tracing::debug!(%error, attempt, ?delay, "retrying");
            on_retry(&error, attempt, delay);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3) as a wait from `now`: delay-seconds, or an
/// HTTP-date (IMF-fixdate, and the obsolete RFC 850 and asctime forms) — a date in the past is
/// no wait. `None` for anything else.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 8,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_equal_jitter() {
        let p = policy();
        let nominal = [100, 200, 400, 800, 1600, 3200, 5000];
        for (i, b) in nominal.into_iter().enumerate() {
            let n = i as u32 + 1;
            let at = |jitter| p.delay(n, Verdict::Transient, Duration::ZERO, jitter);
            assert_eq!(at(0.0), Some(MS(b / 2)), "attempt {n}, least jitter");
            assert_eq!(at(1.0), Some(MS(b)), "attempt {n}, most jitter");
            for _ in 0..100 {
                let d = at(fastrand::f64()).unwrap();
                assert!(MS(b / 2) <= d && d <= MS(b), "attempt {n}: {d:?}");
            }
        }
        assert_eq!(
            p.delay(8, Verdict::Transient, Duration::ZERO, 0.0),
            None,
            "8 attempts in all"
        );
        let huge = RetryPolicy {
            attempts: u32::MAX,
            ..policy()
        };
        assert_eq!(
            huge.delay(u32::MAX - 1, Verdict::Transient, Duration::ZERO, 1.0),
            Some(MS(5000))
        );
    }

    #[test]
    fn retry_after_is_honoured_up_to_its_cap_and_permanent_errors_are_not_retried() {
        let p = policy();
        let d = |v| p.delay(1, v, Duration::ZERO, 0.5);
        assert_eq!(d(Verdict::RetryAfter(MS(0))), Some(MS(0)));
        assert_eq!(
            d(Verdict::RetryAfter(Duration::from_secs(7))),
            Some(Duration::from_secs(7)),
            "exactly, no jitter"
        );
        assert_eq!(
            d(Verdict::RetryAfter(Duration::from_secs(30))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(d(Verdict::RetryAfter(Duration::from_secs(31))), None);
        assert_eq!(d(Verdict::Permanent), None);
    }

    #[test]
    fn no_retry_once_the_deadline_passed() {
        let p = RetryPolicy {
            deadline: Some(Duration::from_secs(2)),
            ..policy()
        };
        for (elapsed, want) in [(MS(0), true), (MS(1999), true), (MS(2000), false)] {
            for v in [Verdict::Transient, Verdict::RetryAfter(MS(1))] {
                assert_eq!(
                    p.delay(1, v, elapsed, 0.0).is_some(),
                    want,
                    "{elapsed:?} {v:?}"
                );
            }
        }
    }

    #[test]
    fn retry_after_values() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let cases = [
            ("1", Some(Duration::from_secs(1))),
            (" 30 ", Some(Duration::from_secs(30))),
            ("0", Some(Duration::ZERO)),
            (
                "Wed, 21 Oct 2015 07:28:42 GMT",
                Some(Duration::from_secs(42)),
            ),
            (
                "Wed, 21 Oct 2015 08:28:00 GMT",
                Some(Duration::from_secs(3600)),
            ),
            (
                "Wednesday, 21-Oct-15 07:29:00 GMT",
                Some(Duration::from_secs(60)),
            ),
            ("Wed, 21 Oct 2015 07:27:00 GMT", Some(Duration::ZERO)),
            ("-1", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
        ];
        for (value, want) in cases {
            assert_eq!(retry_after(value, now), want, "{value:?}");
        }
    }

    /// `run` on a paused clock: the number of attempts, the waits and the error returned.
    async fn run(
        p: &RetryPolicy,
        fail: u32,
        verdict: Verdict,
    ) -> (Result<u32, String>, u32, Duration) {
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let r = p
            .run(
                |n| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    async move {
                        if n <= fail {
                            Err(format!("failure {n}"))
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_| verdict,
            )
            .await;
        (r, calls.into_inner(), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn run_follows_the_policy() {
        let p = RetryPolicy {
            attempts: 3,
            ..policy()
        };
        // Two failures, then success: waits of 50..=100 ms and 100..=200 ms.
        let (r, calls, took) = run(&p, 2, Verdict::Transient).await;
        assert_eq!((r, calls), (Ok(3), 3));
        assert!(MS(150) <= took && took <= MS(300), "{took:?}");
        // Out of attempts: the last error.
        let (r, calls, _) = run(&p, 5, Verdict::Transient).await;
        assert_eq!((r, calls), (Err("failure 3".to_owned()), 3));
        // Permanent: at once.
        let (r, calls, took) = run(&p, 5, Verdict::Permanent).await;
        assert_eq!((r, calls, took), (Err("failure 1".to_owned()), 1, MS(0)));
        // Retry-After: waited exactly; beyond the cap, not at all.
        let (r, _, took) = run(&p, 1, Verdict::RetryAfter(Duration::from_secs(3))).await;
        assert_eq!((r, took), (Ok(2), Duration::from_secs(3)));
        let (r, calls, took) = run(&p, 1, Verdict::RetryAfter(Duration::from_secs(60))).await;
        assert_eq!((r, calls, took), (Err("failure 1".to_owned()), 1, MS(0)));
        // A deadline of 1 s and waits of 600 ms: attempts start at 0, 0.6 and 1.2 s, and
        // the third one's failure comes after the deadline.
        let p = RetryPolicy {
            attempts: 10,
            deadline: Some(Duration::from_secs(1)),
            ..policy()
        };
        let (r, calls, took) = run(&p, 9, Verdict::RetryAfter(MS(600))).await;
        assert_eq!((r, calls, took), (Err("failure 3".to_owned()), 3, MS(1200)));
        // Zero attempts is one.
        let p = RetryPolicy {
            attempts: 0,
            ..policy()
        };
        assert_eq!(run(&p, 5, Verdict::Transient).await.1, 1);
    }
}
