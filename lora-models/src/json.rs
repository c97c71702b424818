//! Reading upstream `config.json` files (diffusers, transformers) with errors that name the
//! file and the key.
//!
//! Upstream configs carry dozens of keys we do not model. We read the ones that change the
//! architecture, and reject values we do not implement instead of silently building a
//! different network.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// A parsed upstream `config.json`.
#[derive(Debug)]
pub(crate) struct JsonConfig {
    path: PathBuf,
    value: Value,
}

impl JsonConfig {
    /// Reads and parses `path`.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("bad JSON: {e}"),
        })?;
        if !value.is_object() {
            return Err(Error::File {
                path: path.to_path_buf(),
                reason: "not a JSON object".into(),
            });
        }
        Ok(Self { path: path.to_path_buf(), value })
    }

    fn err(&self, key: &str, what: &str) -> Error {
        Error::File { path: self.path.clone(), reason: format!("`{key}`: {what}") }
    }

    /// The raw value of `key` (`None` when absent or `null`).
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// An integer, or `default` when absent.
    pub(crate) fn int_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_i64().ok_or_else(|| self.err(key, &format!("expected an integer, got {v}")))
            }
        }
    }

    /// A required integer.
    pub(crate) fn int(&self, key: &str) -> Result<i64> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        v.as_i64().ok_or_else(|| self.err(key, &format!("expected an integer, got {v}")))
    }

    /// A float, or `default` when absent.
    pub(crate) fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| self.err(key, &format!("expected a number, got {v}")))
            }
        }
    }

    /// A boolean, or `default` when absent.
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_bool().ok_or_else(|| self.err(key, &format!("expected a boolean, got {v}")))
            }
        }
    }

    /// A string, or `default` when absent.
    pub(crate) fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_str().ok_or_else(|| self.err(key, &format!("expected a string, got {v}")))
            }
        }
    }

    /// A list of integers; a single integer is broadcast to `len` entries.
    pub(crate) fn ints_or_broadcast(&self, key: &str, len: usize) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let n = n.as_i64().ok_or_else(|| self.err(key, "expected integers"))?;
                Ok(Some(vec![n; len]))
            }
            Some(Value::Array(a)) => {
                let v = a
                    .iter()
                    .map(|x| x.as_i64().ok_or_else(|| self.err(key, "expected integers")))
                    .collect::<Result<Vec<_>>>()?;
                if v.len() != len {
                    return Err(self.err(key, &format!("expected {len} entries, got {}", v.len())));
                }
                Ok(Some(v))
            }
            Some(v) => Err(self.err(key, &format!("expected an integer or a list, got {v}"))),
        }
    }

    /// A required list of integers.
    pub(crate) fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let v = self
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.err(key, "expected a list"))?;
        v.iter().map(|x| x.as_i64().ok_or_else(|| self.err(key, "expected integers"))).collect()
    }

    /// A required list of strings.
    pub(crate) fn strs(&self, key: &str) -> Result<Vec<String>> {
        let v = self
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.err(key, "expected a list"))?;
        v.iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| self.err(key, "expected strings")))
            .collect()
    }

    /// Errors unless `key` is absent, `null`, or equal to `allowed`.
    pub(crate) fn require(&self, key: &str, allowed: &Value) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) if v == allowed => Ok(()),
            Some(v) => Err(self.err(key, &format!("{v} is not supported (only {allowed})"))),
        }
    }

    /// Errors unless `key` is absent or `null`.
    pub(crate) fn require_null(&self, key: &str) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) => Err(self.err(key, &format!("{v} is not supported (only null)"))),
        }
    }
}
