//! Caption processing in kohya's order (`BaseDataset.process_caption`).
//!
//! 1. `caption_prefix + " " + caption`, `caption + " " + caption_suffix`.
//! 2. Whole-caption dropout: `caption_dropout_rate` (one draw, only when the rate is > 0) or
//!    every `caption_dropout_every_n_epochs`-th epoch. A dropped caption is `""` and skips the
//!    rest.
//! 3. Wildcards (`enable_wildcard`): a random line of a multi-line caption, then every
//!    `{a|b|c}` replaced by a random option (`{{` / `}}` escape braces). Without wildcards
//!    only the first line is used.
//! 4. When `shuffle_caption`, `token_warmup_step > 0` or `caption_tag_dropout_rate > 0`: split
//!    into fixed / flexible (/ fixed suffix) tags by `keep_tokens_separator` (e.g. `|||`) or
//!    the first `keep_tokens` tags; token warm-up truncates the flexible tags; they are
//!    shuffled, then each is dropped with `caption_tag_dropout_rate`; the parts are joined with
//!    `", "` (always comma-space, like kohya).
//! 5. `secondary_separator` is replaced by `caption_separator`.
//!
//! All randomness comes from a [`PyRandom`] consumed in kohya's order, so for a given
//! generator state the result equals kohya's (checked against a fixture).

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

use crate::pyrandom::PyRandom;

/// Caption settings of one subset (kohya's subset keys of the same names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionConfig {
    /// Shuffle the flexible tags.
    pub shuffle_caption: bool,
    /// Tag separator (default `","`).
    pub caption_separator: String,
    /// Number of leading tags kept in place.
    pub keep_tokens: usize,
    /// Separator marking the fixed prefix (and an optional fixed suffix), e.g. `"|||"`.
    pub keep_tokens_separator: Option<String>,
    /// Separator replaced by `caption_separator` after shuffling (`a;;;b` is one tag).
    pub secondary_separator: Option<String>,
    /// Expand `{a|b}` wildcards and pick a random line of multi-line captions.
    pub enable_wildcard: bool,
    /// Text put before the caption (joined with a space).
    pub caption_prefix: Option<String>,
    /// Text put after the caption (joined with a space).
    pub caption_suffix: Option<String>,
    /// Probability of dropping the whole caption.
    pub caption_dropout_rate: f64,
    /// Drop every caption on epochs divisible by this (0 = never).
    pub caption_dropout_every_n_epochs: u32,
    /// Probability of dropping each flexible tag.
    pub caption_tag_dropout_rate: f64,
    /// Flexible tags kept at step 0 of the token warm-up (default 1).
    pub token_warmup_min: usize,
    /// Steps of the token warm-up; a value below 1 is a fraction of the total steps.
    pub token_warmup_step: f64,
}

impl Default for CaptionConfig {
    fn default() -> Self {
        Self {
            shuffle_caption: false,
            caption_separator: ",".into(),
            keep_tokens: 0,
            keep_tokens_separator: None,
            secondary_separator: None,
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
        }
    }
}

/// Where training is when a caption is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptionStep {
    /// Current epoch (kohya counts from 1 during training).
    pub epoch: u32,
    /// Current global step.
    pub step: u64,
    /// Total training steps (resolves a fractional `token_warmup_step`).
    pub max_train_steps: u64,
}

impl CaptionConfig {
    /// The warm-up length in steps: kohya replaces a value `< 1` by
    /// `⌊token_warmup_step · max_train_steps⌋` on first use.
    #[must_use]
    pub fn warmup_steps(&self, max_train_steps: u64) -> f64 {
        if self.token_warmup_step < 1.0 {
            (self.token_warmup_step * max_train_steps as f64).floor()
        } else {
            self.token_warmup_step
        }
    }

    fn separator(&self) -> &str {
        if self.caption_separator.is_empty() {
            ","
        } else {
            &self.caption_separator
        }
    }

    /// Processes one caption (see the module docs for the order of operations).
    pub fn process(&self, caption: &str, at: CaptionStep, rng: &mut PyRandom) -> String {
        let mut caption = caption.to_string();
        if let Some(p) = self.caption_prefix.as_deref().filter(|p| !p.is_empty()) {
            caption = format!("{p} {caption}");
        }
        if let Some(s) = self.caption_suffix.as_deref().filter(|s| !s.is_empty()) {
            caption = format!("{caption} {s}");
        }
        let mut dropped =
            self.caption_dropout_rate > 0.0 && rng.random() < self.caption_dropout_rate;
        dropped = dropped
            || (self.caption_dropout_every_n_epochs > 0
                && at.epoch % self.caption_dropout_every_n_epochs == 0);
        if dropped {
            return String::new();
        }
        caption = if self.enable_wildcard {
            expand_wildcards(&caption, rng)
        } else {
            caption.split('\n').next().unwrap_or("").to_string()
        };
        let warmup = self.warmup_steps(at.max_train_steps);
        if self.shuffle_caption || warmup > 0.0 || self.caption_tag_dropout_rate > 0.0 {
            caption = self.process_tags(&caption, at, warmup, rng);
        }
        if let Some(sec) = self.secondary_separator.as_deref().filter(|s| !s.is_empty()) {
            caption = caption.replace(sec, self.separator());
        }
        caption
    }

    fn process_tags(
        &self,
        caption: &str,
        at: CaptionStep,
        warmup: f64,
        rng: &mut PyRandom,
    ) -> String {
        let sep = self.separator();
        let split_nonempty = |s: &str| -> Vec<String> {
            s.split(sep).map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()
        };
        let mut fixed = Vec::new();
        let mut flex;
        let mut fixed_suffix = Vec::new();
        match self
            .keep_tokens_separator
            .as_deref()
            .filter(|k| !k.is_empty() && caption.contains(*k))
        {
            Some(kts) => {
                let (fixed_part, rest) = caption.split_once(kts).unwrap_or((caption, ""));
                let flex_part = match rest.split_once(kts) {
                    Some((f, suffix)) => {
                        fixed_suffix = split_nonempty(suffix);
                        f
                    }
                    None => rest,
                };
                fixed = split_nonempty(fixed_part);
                flex = split_nonempty(flex_part);
            }
            None => {
                // kohya keeps empty tags on this path (no filter after strip).
                let tokens: Vec<String> =
                    caption.trim().split(sep).map(|t| t.trim().to_string()).collect();
                flex = tokens.clone();
                if self.keep_tokens > 0 {
                    let k = self.keep_tokens.min(tokens.len());
                    fixed = tokens[..k].to_vec();
                    flex = tokens[k..].to_vec();
                }
            }
        }
        if warmup > 0.0 && (at.step as f64) < warmup {
            let ratio = (flex.len() as f64 - self.token_warmup_min as f64) / warmup;
            let len = (at.step as f64 * ratio).floor() as i64 + self.token_warmup_min as i64;
            let n = flex.len() as i64;
            // Python slice `flex[:len]`: negative counts from the end, clamped to [0, n].
            let end = if len < 0 { (n + len).max(0) } else { len.min(n) };
            flex.truncate(end as usize);
        }
        if self.shuffle_caption {
            rng.shuffle(&mut flex);
        }
        if self.caption_tag_dropout_rate > 0.0 {
            flex.retain(|_| rng.random() >= self.caption_tag_dropout_rate);
        }
        let mut all = fixed;
        all.extend(flex);
        all.extend(fixed_suffix);
        all.join(", ")
    }
}

fn wildcard_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // A literal pattern: compiling it cannot fail.
    RE.get_or_init(|| Regex::new(r"\{([^}]+)\}").expect("valid literal regex"))
}

/// kohya's wildcard expansion: a random line, `{{`/`}}` escapes, `{a|b|c}` choices.
fn expand_wildcards(caption: &str, rng: &mut PyRandom) -> String {
    let mut caption = caption.to_string();
    if caption.contains('\n') {
        let lines: Vec<&str> = caption.split('\n').collect();
        caption = rng.choice(&lines).copied().unwrap_or("").to_string();
    }
    let mut open = String::from("⦅");
    let mut close = String::from("⦆");
    while caption.contains(&open) || caption.contains(&close) {
        open.push('⦅');
        close.push('⦆');
    }
    let escaped = caption.replace("{{", &open).replace("}}", &close);
    let replaced = wildcard_regex().replace_all(&escaped, |c: &regex::Captures<'_>| {
        let options: Vec<&str> = c[1].split('|').collect();
        rng.choice(&options).copied().unwrap_or("").to_string()
    });
    replaced.replace(&open, "{").replace(&close, "}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_tokens_separator_stays_literal_without_tag_options() {
        let c =
            CaptionConfig { keep_tokens_separator: Some("|||".into()), ..CaptionConfig::default() };
        let got = c.process("a ||| b, c", CaptionStep::default(), &mut PyRandom::new(0));
        assert_eq!(got, "a ||| b, c");
    }

    #[test]
    fn every_n_epochs_drops_without_consuming_randomness() {
        let c = CaptionConfig { caption_dropout_every_n_epochs: 2, ..CaptionConfig::default() };
        let mut rng = PyRandom::new(1);
        let at = CaptionStep { epoch: 4, ..CaptionStep::default() };
        assert_eq!(c.process("x, y", at, &mut rng), "");
        assert_eq!(rng.random(), PyRandom::new(1).random());
    }

    #[test]
    fn escaped_braces_survive_wildcards() {
        let c = CaptionConfig { enable_wildcard: true, ..CaptionConfig::default() };
        let got = c.process("{{x}} {a|a}", CaptionStep::default(), &mut PyRandom::new(3));
        assert_eq!(got, "{x} a");
    }
}
