//! Which frames deserve an encrypted inference: a sampling interval and a motion gate, so a
//! static scene costs no FHE. Pure: time and pixels in, a decision out.

use std::time::{Duration, Instant};

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Too soon after the last accepted frame.
    Interval,
    /// Too similar to the last accepted frame.
    Static,
}

pub struct Gate {
    interval: Duration,
    threshold: f64,
    last_time: Option<Instant>,
    last: Option<Vec<f32>>,
}

impl Gate {
    pub fn new(interval: Duration, threshold: f64) -> Self {
        Gate {
            interval,
            threshold,
            last_time: None,
            last: None,
        }
    }

    /// `x`: the frame as model-input intensities in [0, 1].
    pub fn decide(&mut self, x: &[f32], now: Instant) -> Decision {
        if let Some(t) = self.last_time {
            if now.duration_since(t) < self.interval {
                return Decision::Interval;
            }
        }
        if self.threshold > 0.0 {
            if let Some(prev) = &self.last {
                if prev.len() == x.len() && !x.is_empty() {
                    let mad = prev
                        .iter()
                        .zip(x)
                        .map(|(a, b)| (a - b).abs() as f64)
                        .sum::<f64>()
                        / x.len() as f64;
                    if mad < self.threshold {
                        return Decision::Static;
                    }
                }
            }
        }
        self.last_time = Some(now);
        self.last = Some(x.to_vec());
        Decision::Accept
    }

    /// The last accepted frame was not used after all (all inference slots busy): let the
    /// next one through even if similar, so a busy period never hides a scene change.
    pub fn forget(&mut self) {
        self.last = None;
        self.last_time = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_and_motion() {
        let t0 = Instant::now();
        let mut g = Gate::new(Duration::from_millis(100), 0.05);
        let a = vec![0.0f32; 16];
        let mut b = a.clone();
        b[0] = 0.5; // mean abs diff 0.03: static
        let mut c = a.clone();
        c.iter_mut().take(4).for_each(|v| *v = 1.0); // 0.25: motion
        assert_eq!(g.decide(&a, t0), Decision::Accept);
        assert_eq!(
            g.decide(&c, t0 + Duration::from_millis(50)),
            Decision::Interval
        );
        assert_eq!(
            g.decide(&b, t0 + Duration::from_millis(150)),
            Decision::Static
        );
        assert_eq!(
            g.decide(&c, t0 + Duration::from_millis(200)),
            Decision::Accept
        );
        g.forget();
        assert_eq!(
            g.decide(&c, t0 + Duration::from_millis(210)),
            Decision::Accept
        );
        let mut off = Gate::new(Duration::ZERO, 0.0);
        assert_eq!(off.decide(&a, t0), Decision::Accept);
        assert_eq!(off.decide(&a, t0), Decision::Accept);
    }
}
