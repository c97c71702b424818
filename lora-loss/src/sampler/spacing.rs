//! Where the inference timesteps sit on the training schedule (diffusers' `timestep_spacing`).

use serde::{Deserialize, Serialize};

use crate::check::config;
use crate::Result;

/// How `num_steps` inference timesteps are laid over the `N` training timesteps (diffusers'
/// `timestep_spacing`, Table 2 of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
/// Steps are Flawed").
///
/// diffusers' `"trailing"` is not offered: numpy's float `arange` gives it one step too many for
/// some step counts (61, 103, …), so "the same as diffusers" would mean reproducing that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `linspace(0, N − 1, num_steps)`, descending: starts at `N − 1` and ends at 0. The
    /// timesteps are fractional in general; [`DdimSampler`](crate::DdimSampler) rounds them
    /// (half to even, as numpy), [`EulerSampler`](crate::EulerSampler) interpolates σ between
    /// them. The default of diffusers' Euler scheduler, and what it uses for SD 1.5 (whose
    /// scheduler config does not name a spacing).
    Linspace,
    /// `k · (N / num_steps) + steps_offset` for `k = num_steps − 1, …, 0` (integer division).
    /// With `steps_offset = 1` this is SD 1.5's DDIM schedule (`981, 961, …, 1` for 50 steps).
    Leading {
        /// Added to every timestep (SD 1.5's scheduler config has 1).
        steps_offset: i64,
    },
}

impl TimestepSpacing {
    /// SD 1.5's DDIM spacing: leading, `steps_offset = 1`.
    pub const SD15_LEADING: Self = Self::Leading { steps_offset: 1 };

    /// The descending timesteps as diffusers' `set_timesteps` computes them, in f64 (integers for
    /// [`Self::Leading`]; for [`Self::Linspace`] numpy's `linspace` values before any cast).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) when `num_steps` is not in `1..=n` or a leading
    /// timestep falls outside `0..n`.
    pub(crate) fn timesteps(self, num_steps: usize, n: i64) -> Result<Vec<f64>> {
        let steps = i64::try_from(num_steps).unwrap_or(i64::MAX);
        if steps < 1 || steps > n {
            return Err(config("num_steps", format!("must be in 1..={n}, got {num_steps}")));
        }
        let out: Vec<f64> = match self {
            Self::Linspace => {
                // numpy's linspace: k · ((stop − start) / (num − 1)) + start, the last set to stop.
                let last = (n - 1) as f64;
                let step = if steps > 1 { last / (steps - 1) as f64 } else { 0.0 };
                (0..steps)
                    .rev()
                    .map(|k| if k == steps - 1 && steps > 1 { last } else { k as f64 * step })
                    .collect()
            }
            Self::Leading { steps_offset } => {
                let ratio = n / steps;
                let out: Vec<f64> =
                    (0..steps).rev().map(|k| (k * ratio + steps_offset) as f64).collect();
                let (hi, lo) = (out[0], out[out.len() - 1]);
                if lo < 0.0 || hi >= n as f64 {
                    return Err(config(
                        "steps_offset",
                        format!(
                            "{steps_offset} puts the timesteps at {lo}..={hi}, outside 0..{n} \
                             for {num_steps} steps"
                        ),
                    ));
                }
                out
            }
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_leading_50() {
        let t = TimestepSpacing::SD15_LEADING.timesteps(50, 1000).unwrap();
        assert_eq!(t.len(), 50);
        assert_eq!((t[0], t[1], t[49]), (981.0, 961.0, 1.0));
    }

    #[test]
    fn linspace_ends() {
        let t = TimestepSpacing::Linspace.timesteps(20, 1000).unwrap();
        assert_eq!((t[0], t[19]), (999.0, 0.0));
        assert!((t[1] - 999.0 * 18.0 / 19.0).abs() < 1e-12);
        assert_eq!(TimestepSpacing::Linspace.timesteps(1, 1000).unwrap(), vec![0.0]);
    }

    #[test]
    fn rejects_bad_counts() {
        for s in [0, 1001] {
            assert!(TimestepSpacing::Linspace.timesteps(s, 1000).is_err());
        }
        // 1000 leading steps + offset 1 would index timestep 1000.
        assert!(TimestepSpacing::SD15_LEADING.timesteps(1000, 1000).is_err());
        assert!(TimestepSpacing::Leading { steps_offset: 0 }.timesteps(1000, 1000).is_ok());
    }
}
