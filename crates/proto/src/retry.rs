//! Retry pacing shared by the camera pipeline, the edge's broker connection and the agent.

use std::time::Duration;

/// Jittered exponential backoff: `initial·2^k`, capped, times a factor in [0.75, 1.25).
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let base = initial.as_secs_f64() * 2f64.powi(failures.min(30) as i32);
    let capped = base.min(max.as_secs_f64());
    let jitter = 0.75 + rand::random::<f64>() * 0.5;
    // `max` bounds it; never panic on a configuration built in code without `check`
    Duration::try_from_secs_f64(capped * jitter).unwrap_or(max)
}
