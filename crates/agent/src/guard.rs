//! Pure checks of the decryption agent, no I/O: per-device rate limiting and the
//! post-decryption range check. Together with the layout check in `agent.rs` they
//! keep the agent from being a decryption oracle for the edge.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A token bucket per device: `burst` decryptions at once, refilled at `per_minute`.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_minute: f64, burst: f64) -> Self {
        RateLimiter {
            per_sec: per_minute / 60.0,
            burst,
            buckets: HashMap::new(),
        }
    }

    fn refill(&mut self, device: &str, now: Instant) -> &mut f64 {
        let (per_sec, burst) = (self.per_sec, self.burst);
        let (tokens, last) = self
            .buckets
            .entry(device.to_string())
            .or_insert((burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * per_sec;
        *tokens = (*tokens + refill).min(burst);
        *last = now;
        tokens
    }

    /// Takes one token for `device`; false when it is over its limit.
    pub fn allow(&mut self, device: &str, now: Instant) -> bool {
        let tokens = self.refill(device, now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until `device` has a token again (zero if it has one now).
    pub fn wait(&mut self, device: &str, now: Instant) -> Duration {
        let per_sec = self.per_sec;
        let missing = (1.0 - *self.refill(device, now)).max(0.0);
        // config bounds keep per_sec positive and finite; cap anyway, a Duration must not
        // overflow
        Duration::from_secs_f64((missing / per_sec).min(3600.0))
    }
}

/// Every decrypted logit must lie in the range the model's last layer can produce, and the
/// label must name a class: anything else was not computed by this model.
pub fn check_range(
    logits: &[i64],
    label: usize,
    lo: i64,
    hi: i64,
    classes: usize,
) -> Result<(), String> {
    if logits.len() != classes {
        return Err(format!(
            "{} logits, the model has {classes} classes",
            logits.len()
        ));
    }
    if let Some(v) = logits.iter().find(|&&v| v < lo || v > hi) {
        return Err(format!("logit {v} outside the model's range {lo}..={hi}"));
    }
    if label >= classes {
        return Err(format!("label {label} is not one of the {classes} classes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills() {
        let t = Instant::now();
        let mut r = RateLimiter::new(60.0, 2.0);
        assert!(r.allow("a", t));
        assert!(r.allow("a", t));
        assert!(!r.allow("a", t));
        assert!(r.allow("b", t), "per device");
        assert!(r.allow("a", t + Duration::from_millis(1100)));
        assert!(!r.allow("a", t + Duration::from_millis(1200)));
        // 0.1 token left at 1.1 s, 0.2 at 1.2 s: 0.8 s to the next
        let w = r.wait("a", t + Duration::from_millis(1200));
        assert!(
            w > Duration::from_millis(790) && w <= Duration::from_millis(810),
            "{w:?}"
        );
        assert_eq!(r.wait("b", t), Duration::ZERO);
    }

    #[test]
    fn ranges() {
        assert!(check_range(&[0, 5], 1, -3, 5, 2).is_ok());
        assert!(check_range(&[0, 6], 1, -3, 5, 2).is_err());
        assert!(check_range(&[0, 5], 2, -3, 5, 2).is_err());
        assert!(check_range(&[0], 0, -3, 5, 2).is_err());
    }
}
