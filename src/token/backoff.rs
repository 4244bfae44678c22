//! Exponential backoff with jitter, as a pure function of the attempt number and a random
//! fraction, so tests can pin it without sleeping.

use std::time::Duration;

/// The pause after the `failures`-th consecutive failure (1-based): `initial · 2^(failures-1)`,
/// capped at `max`, then "equal jitter": between half and all of that. Jitter keeps many
/// sidecars that failed together from retrying together.
pub(crate) fn delay(initial: Duration, max: Duration, failures: u32, random: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    let random = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.5
    };
    // f64 rounding can overshoot by a few ns for bases of months; the cap is the promise.
    (base / 2 + (base / 2).mul_f64(random)).min(max)
}

/// A uniform fraction in [0, 1) from the system RNG.
pub(crate) fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_then_caps() {
        assert_eq!(delay(MS(200), MS(1000), 1, 1.0), MS(200));
        assert_eq!(delay(MS(200), MS(1000), 2, 1.0), MS(400));
        assert_eq!(delay(MS(200), MS(1000), 3, 1.0), MS(800));
        assert_eq!(delay(MS(200), MS(1000), 4, 1.0), MS(1000));
        assert_eq!(delay(MS(200), MS(1000), u32::MAX, 1.0), MS(1000));
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        assert_eq!(delay(MS(200), MS(1000), 1, 0.0), MS(100));
        assert_eq!(delay(MS(200), MS(1000), 9, 0.0), MS(500));
        assert_eq!(delay(MS(200), MS(1000), 9, f64::NAN), MS(750));
        for _ in 0..100 {
            let r = random_fraction();
            assert!((0.0..1.0).contains(&r));
            let d = delay(MS(200), MS(1000), 2, r);
            assert!(d >= MS(200) && d <= MS(400));
        }
    }
}
