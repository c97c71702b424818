//! Ordered rank / alpha / LR-weight rules and their resolution per module.
//!
//! # Precedence
//!
//! Resolution starts from the config's global `rank`, `alpha`, `conv_rank`, `conv_alpha` and
//! an LR weight of 1. Rules are then applied **in order**, and every field a matching rule
//! sets overwrites the value so far: **the last matching rule wins, field by field**. kohya's
//! block-wise lists become rules placed before the user's own rules, so an explicit user rule
//! always beats a block entry.
//!
//! The layer kind then picks the pair: Linear layers and 1x1 convs use `rank`/`alpha`,
//! larger kernels use `conv_rank`/`conv_alpha` (kohya, `kohya.md` §1.4); without a
//! `conv_rank` they get no adapter. A rank of 0 or an LR weight of 0 means "no adapter"
//! (kohya drops blocks whose LR weight is 0). A missing or zero alpha means alpha = rank.

use serde::{Deserialize, Serialize};

use crate::target::{Matcher, Pattern};
use crate::{Error, Result};

/// One rank / alpha / LR-weight override for the modules its pattern matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Which modules the rule applies to.
    pub pattern: Pattern,
    /// Rank for Linear layers and 1x1 convs (0 = no adapter).
    #[serde(default)]
    pub rank: Option<i64>,
    /// Alpha for Linear layers and 1x1 convs.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Rank for convs with a kernel larger than 1x1 (0 = no adapter).
    #[serde(default)]
    pub conv_rank: Option<i64>,
    /// Alpha for convs with a kernel larger than 1x1.
    #[serde(default)]
    pub conv_alpha: Option<f64>,
    /// Multiplier of the learning rate of the matched adapters (0 = no adapter).
    #[serde(default)]
    pub lr_weight: Option<f64>,
    /// Whether matching no module is an error. Defaults to `true`; the rules made from
    /// kohya's block-wise lists set it to `false`, because those positional lists name blocks
    /// that never hold a target (IN00, OUT00-02 without conv LoRA).
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

impl Rule {
    /// A rule that sets nothing yet; chain the fields you need.
    pub fn new(pattern: Pattern) -> Self {
        Rule {
            pattern,
            rank: None,
            alpha: None,
            conv_rank: None,
            conv_alpha: None,
            lr_weight: None,
            required: true,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: &str| Error::Config {
            key: format!("rules[{}]", self.pattern),
            reason: reason.into(),
        };
        if self.rank.is_some_and(|r| r < 0) || self.conv_rank.is_some_and(|r| r < 0) {
            return Err(bad("rank must be >= 0"));
        }
        for a in [self.alpha, self.conv_alpha, self.lr_weight].into_iter().flatten() {
            if !a.is_finite() || a < 0.0 {
                return Err(bad("alpha and lr_weight must be finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// The global values resolution starts from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Defaults {
    pub(crate) rank: i64,
    pub(crate) alpha: Option<f64>,
    pub(crate) conv_rank: Option<i64>,
    pub(crate) conv_alpha: Option<f64>,
}

/// What a module resolves to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    /// Adapter rank (> 0).
    pub rank: i64,
    /// Adapter alpha (> 0; a missing or zero alpha already replaced by the rank).
    pub alpha: f64,
    /// LR multiplier (> 0).
    pub lr_weight: f64,
}

/// Compiled, ordered rules with per-rule hit counts.
#[derive(Debug, Clone)]
pub(crate) struct RuleSet {
    defaults: Defaults,
    rules: Vec<(Rule, Matcher)>,
}

impl RuleSet {
    pub(crate) fn new(defaults: Defaults, rules: Vec<Rule>) -> Result<Self> {
        let rules = rules
            .into_iter()
            .map(|r| {
                r.check()?;
                let m = r.pattern.compile()?;
                Ok((r, m))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RuleSet { defaults, rules })
    }

    pub(crate) fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|(r, _)| r)
    }

    /// Resolves `path`; `wide_kernel` is true for convs larger than 1x1. Returns the indices
    /// of the rules that matched (for the "matched nothing" check) and the result, `None` when
    /// the module gets no adapter.
    pub(crate) fn resolve(&self, path: &str, wide_kernel: bool) -> (Vec<usize>, Option<Resolved>) {
        let d = self.defaults;
        let (mut rank, mut alpha) = (Some(d.rank), d.alpha);
        let (mut conv_rank, mut conv_alpha, mut lr) = (d.conv_rank, d.conv_alpha, 1.0);
        let mut hits = Vec::new();
        for (i, (rule, m)) in self.rules.iter().enumerate() {
            if !m.is_match(path) {
                continue;
            }
            hits.push(i);
            rank = rule.rank.or(rank);
            alpha = rule.alpha.or(alpha);
            conv_rank = rule.conv_rank.or(conv_rank);
            conv_alpha = rule.conv_alpha.or(conv_alpha);
            lr = rule.lr_weight.unwrap_or(lr);
        }
        let (rank, alpha) = if wide_kernel { (conv_rank, conv_alpha) } else { (rank, alpha) };
        let resolved = match rank {
            Some(rank) if rank > 0 && lr > 0.0 => {
                let alpha = alpha.filter(|&a| a != 0.0).unwrap_or(rank as f64);
                Some(Resolved { rank, alpha, lr_weight: lr })
            }
            _ => None,
        };
        (hits, resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rules: Vec<Rule>) -> RuleSet {
        let d = Defaults { rank: 4, alpha: Some(1.0), conv_rank: None, conv_alpha: None };
        RuleSet::new(d, rules).unwrap()
    }

    #[test]
    fn last_matching_rule_wins_per_field() {
        let mut a = Rule::new(Pattern::Glob("down_blocks.**".into()));
        a.rank = Some(8);
        a.alpha = Some(2.0);
        let mut b = Rule::new(Pattern::Suffix("to_q".into()));
        b.rank = Some(16);
        let s = set(vec![a, b]);
        let (hits, r) = s.resolve("down_blocks.0.attentions.0.to_q", false);
        assert_eq!(hits, vec![0, 1]);
        assert_eq!(r, Some(Resolved { rank: 16, alpha: 2.0, lr_weight: 1.0 }));
        let (_, r) = s.resolve("up_blocks.0.attentions.0.to_q", false);
        assert_eq!(r, Some(Resolved { rank: 16, alpha: 1.0, lr_weight: 1.0 }));
    }

    #[test]
    fn wide_convs_need_conv_rank_and_zero_disables() {
        let mut a = Rule::new(Pattern::Glob("**".into()));
        a.lr_weight = Some(0.0);
        let s = set(vec![]);
        assert_eq!(s.resolve("x.conv1", true).1, None);
        assert!(s.resolve("x.conv1", false).1.is_some());
        assert_eq!(set(vec![a]).resolve("x.to_q", false).1, None);
        let d = Defaults { rank: 4, alpha: Some(0.0), conv_rank: Some(2), conv_alpha: None };
        let s = RuleSet::new(d, vec![]).unwrap();
        assert_eq!(s.resolve("c", true).1, Some(Resolved { rank: 2, alpha: 2.0, lr_weight: 1.0 }));
        assert_eq!(s.resolve("l", false).1, Some(Resolved { rank: 4, alpha: 4.0, lr_weight: 1.0 }));
    }

    #[test]
    fn invalid_rules_are_errors() {
        let mut a = Rule::new(Pattern::Suffix("x".into()));
        a.alpha = Some(f64::NAN);
        let d = Defaults { rank: 4, alpha: None, conv_rank: None, conv_alpha: None };
        assert!(RuleSet::new(d, vec![a]).is_err());
    }
}
