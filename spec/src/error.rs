//! Errors of loading and validating a manifest.
//!
//! Every error names the field it is about as a dotted path from the root of
//! the manifest (`spec.model.heads`, `spec.data.sources[1]`), because "invalid
//! manifest" alone sends the user hunting through the whole file.

use std::fmt;
use std::path::PathBuf;

/// One semantic problem with one field of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.model.heads`.
    pub field: String,
    /// What is wrong with it, e.g. `6 does not divide spec.model.dim (256)`.
    pub message: String,
}

impl FieldError {
    /// A problem with `field`, described by `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Why a manifest was refused.
#[derive(thiserror::Error, Debug)]
pub enum SpecError {
    /// The manifest file could not be read.
    #[error("cannot read manifest {}: {source}", path.display())]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The text is not YAML, or does not have the shape of a `TrainingRun`
    /// (wrong type, unknown field, missing field).
    #[error("{}", prefixed(field, message))]
    Parse {
        /// Dotted path where the problem was found; empty when it concerns the
        /// document as a whole (YAML syntax, empty file).
        field: String,
        /// What is wrong, with line and column for YAML syntax errors.
        message: String,
    },
    /// The manifest is well-formed but breaks one or more rules; all of them
    /// are listed so the user can fix the file in one pass.
    #[error("invalid manifest:{}", lines(.0))]
    Invalid(Vec<FieldError>),
}

fn prefixed(field: &str, message: &str) -> String {
    if field.is_empty() {
        message.to_owned()
    } else {
        format!("{field}: {message}")
    }
}

fn lines(errors: &[FieldError]) -> String {
    errors.iter().map(|e| format!("\n  {e}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_error_displays_path_then_problem() {
        let e = FieldError::new("spec.model.heads", "6 does not divide spec.model.dim (256)");
        assert_eq!(
            e.to_string(),
            "spec.model.heads: 6 does not divide spec.model.dim (256)"
        );
    }

    #[test]
    fn invalid_puts_each_problem_on_its_own_line() {
        let e = SpecError::Invalid(vec![
            FieldError::new("kind", "must be TrainingRun"),
            FieldError::new("spec.training.steps", "must be at least 1"),
        ]);
        assert_eq!(
            e.to_string(),
            "invalid manifest:\n  kind: must be TrainingRun\n  spec.training.steps: must be at least 1"
        );
    }

    #[test]
    fn io_error_names_the_file() {
        let e = SpecError::Io {
            path: PathBuf::from("runs/quickstart.yaml"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(e.to_string().contains("runs/quickstart.yaml"), "{e}");
    }

    #[test]
    fn parse_error_without_field_is_not_prefixed() {
        let e = SpecError::Parse {
            field: String::new(),
            message: "the manifest is empty".into(),
        };
        assert_eq!(e.to_string(), "the manifest is empty");
    }
}
