//! Reading a manifest from YAML.
//!
//! The YAML is first parsed into a generic tree (`serde_json::Value`) and only
//! then mapped onto [`TrainingRun`] through `serde_path_to_error`. The detour
//! costs nothing that matters for a file of a few dozen lines and is what lets
//! a type error, an unknown field or a missing field be reported with the
//! dotted path of the field instead of only a position in the text.

use std::path::Path;

use serde_saphyr::{NonFiniteFloatPolicy, Options, UserMessageFormatter};

use crate::error::SpecError;
use crate::types::TrainingRun;
use crate::validate::validate;

/// Reads, parses and validates the manifest at `path`.
///
/// # Errors
/// [`SpecError::Io`] naming `path` when it cannot be read, otherwise as
/// [`parse_manifest`].
pub fn load_manifest(path: &Path) -> Result<TrainingRun, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_manifest(&text)
}

/// Parses and validates a manifest given as YAML text.
///
/// # Errors
/// [`SpecError::Parse`] for YAML syntax errors (with line and column) and for
/// text that does not have the shape of a `TrainingRun` (with the field path);
/// [`SpecError::Invalid`] listing every rule of [`validate`] the manifest
/// breaks.
pub fn parse_manifest(yaml: &str) -> Result<TrainingRun, SpecError> {
    let tree = parse_tree(yaml)?;
    let run: TrainingRun = serde_path_to_error::deserialize(tree).map_err(shape_error)?;
    validate(&run).map_err(SpecError::Invalid)?;
    Ok(run)
}

/// Parses YAML into a generic tree, reporting syntax errors by position and
/// refusing documents that are not a mapping at all.
fn parse_tree(yaml: &str) -> Result<serde_json::Value, SpecError> {
    let mut options = Options::default();
    // A rendered source snippet would make the error span several lines;
    // line and column are enough to find the spot.
    options.with_snippet = false;
    // `.nan` / `.inf` become strings in the tree, so a float field holding one
    // is refused with its path ("invalid type: string .nan, expected f64")
    // instead of a path-less error from the YAML layer.
    options.non_finite_float_policy = NonFiniteFloatPolicy::AsString;
    let tree: serde_json::Value =
        serde_saphyr::from_str_with_options(yaml, options).map_err(|e| SpecError::Parse {
            field: String::new(),
            // The user formatter leaves out hints meant for programmers
            // (which option to change); the text ends "at line L, column C".
            message: format!(
                "YAML error: {}",
                e.render_with_formatter(&UserMessageFormatter)
            ),
        })?;
    if tree.is_null() {
        return Err(SpecError::Parse {
            field: String::new(),
            message: "the manifest is empty".into(),
        });
    }
    if !tree.is_object() {
        return Err(SpecError::Parse {
            field: String::new(),
            message: "the manifest must be a YAML mapping with apiVersion, kind, metadata and spec"
                .into(),
        });
    }
    Ok(tree)
}

/// Turns a deserialization error into a `Parse` error naming the field.
fn shape_error(e: serde_path_to_error::Error<serde_json::Error>) -> SpecError {
    let parent = match e.path().to_string() {
        // serde_path_to_error writes the root as "."; we leave it empty.
        root if root == "." => String::new(),
        path => path,
    };
    let message = e.inner().to_string();
    // serde reports a missing field at the struct that lacks it; naming the
    // field itself is what the user needs to find the spot to add it.
    if let Some(name) = missing_field_name(&message) {
        let field = if parent.is_empty() {
            name.to_owned()
        } else {
            format!("{parent}.{name}")
        };
        return SpecError::Parse {
            field,
            message: "missing field (required, no default)".into(),
        };
    }
    SpecError::Parse {
        field: parent,
        message,
    }
}

/// The field name in serde's "missing field `name`" message, if it is one.
fn missing_field_name(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_field_name_is_extracted_from_serde_message() {
        assert_eq!(missing_field_name("missing field `dim`"), Some("dim"));
        assert_eq!(missing_field_name("invalid type: string"), None);
    }

    #[test]
    fn empty_text_is_refused_as_empty() {
        let err = parse_manifest("# only a comment\n").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
