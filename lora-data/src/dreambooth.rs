//! kohya's DreamBooth folder convention: `train_data_dir/10_sks dog/*.png` is a subset with
//! `num_repeats = 10` and `class_tokens = "sks dog"`
//! (`config_util.generate_dreambooth_subsets_config_by_subdirs`).

use std::path::{Path, PathBuf};

use crate::config::SubsetConfig;
use crate::error::{Error, Result};

/// Parses a folder name `"<repeats>_<class tokens>"`: `Some((10, "sks dog"))` for
/// `"10_sks dog"`, `None` when the name does not start with an integer (kohya ignores such
/// folders). Everything after the first `_` is the class tokens (`"_"`s inside are kept).
#[must_use]
pub fn parse_dreambooth_dir_name(name: &str) -> Option<(i64, String)> {
    let (head, tail) = name.split_once('_').unwrap_or((name, ""));
    let repeats = head.trim().parse::<i64>().ok()?;
    Some((repeats, tail.to_string()))
}

/// Subsets from DreamBooth-style folders.
#[derive(Debug, Clone, Default)]
pub struct DreamBoothDirs {
    /// One subset per `N_tokens` folder with `N >= 1`, train folders first, sorted by name.
    pub subsets: Vec<SubsetConfig>,
    /// Sub-folders that do not follow the convention (no leading integer, or `N < 1`); kohya
    /// skips them with a warning, so they are reported here rather than dropped silently.
    pub ignored: Vec<PathBuf>,
}

impl DreamBoothDirs {
    /// Scans `train_data_dir` (and `reg_data_dir`, whose subsets get `is_reg = true`).
    /// Each subset starts from `template` (caption settings, extension, flip, ...) with
    /// `image_dir`, `num_repeats`, `class_tokens` and `is_reg` filled in.
    pub fn scan(
        train_data_dir: &Path,
        reg_data_dir: Option<&Path>,
        template: &SubsetConfig,
    ) -> Result<Self> {
        let mut out = Self::default();
        out.scan_one(train_data_dir, false, template, "train_data_dir")?;
        if let Some(reg) = reg_data_dir {
            out.scan_one(reg, true, template, "reg_data_dir")?;
        }
        if !out.subsets.iter().any(|s| !s.is_reg) {
            return Err(Error::Layout {
                path: train_data_dir.to_path_buf(),
                reason: "no `<repeats>_<class tokens>` sub-folders found (DreamBooth layout)"
                    .into(),
            });
        }
        Ok(out)
    }

    fn scan_one(
        &mut self,
        dir: &Path,
        is_reg: bool,
        template: &SubsetConfig,
        key: &str,
    ) -> Result<()> {
        if !dir.is_dir() {
            return Err(Error::MissingDir { path: dir.to_path_buf(), origin: format!("`{key}`") });
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for sub in entries {
            let name =
                sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match parse_dreambooth_dir_name(&name) {
                Some((n, tokens)) if n >= 1 => {
                    let mut s = template.clone();
                    s.image_dir = sub;
                    s.num_repeats = u32::try_from(n).unwrap_or(u32::MAX);
                    s.class_tokens = Some(tokens);
                    s.is_reg = is_reg;
                    self.subsets.push(s);
                }
                _ => self.ignored.push(sub),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names() {
        assert_eq!(parse_dreambooth_dir_name("10_sks dog"), Some((10, "sks dog".into())));
        assert_eq!(parse_dreambooth_dir_name("3_a_b"), Some((3, "a_b".into())));
        assert_eq!(parse_dreambooth_dir_name("5"), Some((5, String::new())));
        assert_eq!(parse_dreambooth_dir_name("dog_10"), None);
        assert_eq!(parse_dreambooth_dir_name("0_x"), Some((0, "x".into())));
    }
}
