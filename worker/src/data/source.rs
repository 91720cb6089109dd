//! Reading corpus files as documents: plain text (a file is a document),
//! JSON Lines (each line's text field is a document) and Parquet (each
//! row's text column is a document).
//!
//! Files are read in bounded pieces, so a reader never holds more than one
//! block of a text file, one line of a JSON Lines file or one batch of
//! Parquet rows, however large the file.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type as SchemaType;
use pipewright_spec::{DataFormat, DataSpec, DEFAULT_TEXT_FIELD};

use super::DataError;

/// Bytes read from a text file at a time.
const BLOCK_BYTES: usize = 1 << 20;

/// Receives the documents of a file, each as one or more non-empty pieces
/// of text between `start` and `end`. A document without pieces is empty.
pub(crate) trait DocumentSink {
    /// A document begins.
    fn start(&mut self) -> Result<(), DataError>;
    /// The next piece of the current document.
    fn text(&mut self, piece: &str) -> Result<(), DataError>;
    /// The current document is complete.
    fn end(&mut self) -> Result<(), DataError>;
}

/// How a file turned out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every document was delivered.
    Read,
    /// A text file that is not UTF-8 text (invalid UTF-8 or a NUL byte):
    /// the document begun may have received pieces and has no `end`; the
    /// sink must forget it.
    NotText,
}

/// How the files of a corpus are read.
#[derive(Clone, Debug)]
pub(crate) struct Reading {
    format: Option<DataFormat>,
    field: String,
}

impl Reading {
    pub(crate) fn new(spec: &DataSpec) -> Self {
        Self {
            format: spec.format,
            field: spec
                .text_field
                .clone()
                .unwrap_or_else(|| DEFAULT_TEXT_FIELD.to_owned()),
        }
    }

    /// The format `path` is read in: the manifest's, else by extension.
    pub(crate) fn format_of(&self, path: &Path) -> DataFormat {
        if let Some(f) = self.format {
            return f;
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl") => DataFormat::Jsonl,
            Some("parquet") => DataFormat::Parquet,
            _ => DataFormat::Text,
        }
    }

    /// A short, stable description of the settings, for cache keys.
    pub(crate) fn describe(&self) -> String {
        format!("format={:?};field={}", self.format, self.field)
    }

    /// Delivers the documents of `path` to `sink`, in file order.
    pub(crate) fn read(
        &self,
        path: &Path,
        sink: &mut dyn DocumentSink,
    ) -> Result<Outcome, DataError> {
        match self.format_of(path) {
            DataFormat::Text => read_text(path, sink),
            DataFormat::Jsonl => read_jsonl(path, &self.field, sink).map(|()| Outcome::Read),
            DataFormat::Parquet => read_parquet(path, &self.field, sink).map(|()| Outcome::Read),
        }
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn record_error(path: &Path, at: String, message: String) -> DataError {
    DataError::Record {
        path: path.to_path_buf(),
        at,
        message,
    }
}

/// A text file as one document, in blocks cut at character boundaries.
fn read_text(path: &Path, sink: &mut dyn DocumentSink) -> Result<Outcome, DataError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut buf = vec![0u8; BLOCK_BYTES + 4];
    // Bytes of a character cut by the end of the previous block.
    let mut carry = 0usize;
    sink.start()?;
    loop {
        let n = match file.read(&mut buf[carry..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(path)(e)),
        };
        let filled = carry + n;
        if n == 0 {
            if carry > 0 {
                // The file ends inside a character.
                return Ok(Outcome::NotText);
            }
            break;
        }
        let block = &buf[..filled];
        if block[carry..].contains(&0) {
            return Ok(Outcome::NotText);
        }
        let valid = match std::str::from_utf8(block) {
            Ok(_) => filled,
            // Only an incomplete character at the very end may wait for
            // the next block.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => return Ok(Outcome::NotText),
        };
        if valid > 0 {
            // Checked just above.
            let text = std::str::from_utf8(&block[..valid]).map_err(|_| DataError::Record {
                path: path.to_path_buf(),
                at: "text".into(),
                message: "invalid UTF-8".into(),
            })?;
            sink.text(text)?;
        }
        buf.copy_within(valid..filled, 0);
        carry = filled - valid;
    }
    sink.end()?;
    Ok(Outcome::Read)
}

/// One JSON object per line; blank lines are skipped.
fn read_jsonl(path: &Path, field: &str, sink: &mut dyn DocumentSink) -> Result<(), DataError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut reader = BufReader::with_capacity(BLOCK_BYTES, file);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(io_error(path))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let at = || format!("line {number}");
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&line)
            .map_err(|e| {
                let what = if e.is_data() {
                    "is not a JSON object".to_owned()
                } else {
                    format!("is not valid JSON ({e})")
                };
                record_error(path, at(), what)
            })?;
        let text = match object.remove(field) {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(record_error(
                    path,
                    at(),
                    format!("field `{field}` is {}, not a string", json_kind(&other)),
                ));
            }
            None => {
                return Err(record_error(
                    path,
                    at(),
                    format!(
                        "has no field `{field}` (set data.textField to the field holding the text)"
                    ),
                ));
            }
        };
        sink.start()?;
        if !text.is_empty() {
            sink.text(&text)?;
        }
        sink.end()?;
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The string column `field` of a Parquet file, row by row.
fn read_parquet(path: &Path, field: &str, sink: &mut dyn DocumentSink) -> Result<(), DataError> {
    let file = File::open(path).map_err(io_error(path))?;
    let unreadable = |e: parquet::errors::ParquetError| DataError::Format {
        path: path.to_path_buf(),
        message: format!("cannot read it as Parquet: {e}"),
    };
    let reader = SerializedFileReader::new(file).map_err(unreadable)?;
    let schema = reader.metadata().file_metadata().schema();
    let column = schema
        .get_fields()
        .iter()
        .find(|f| f.name() == field)
        .ok_or_else(|| {
            let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            DataError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "has no column `{field}` (columns: {}); set data.textField to the column \
                     holding the text",
                    names.join(", ")
                ),
            }
        })?
        .clone();
    if !is_string_column(&column) {
        return Err(DataError::Format {
            path: path.to_path_buf(),
            message: format!(
                "column `{field}` is not a string column ({})",
                describe(&column)
            ),
        });
    }
    let projection = SchemaType::group_type_builder(schema.name())
        .with_fields(vec![column])
        .build()
        .map_err(unreadable)?;
    let rows = reader.get_row_iter(Some(projection)).map_err(unreadable)?;
    for (index, row) in rows.enumerate() {
        let at = || format!("row {index}");
        let row = row.map_err(|e| record_error(path, at(), format!("cannot be read: {e}")))?;
        let value = row.get_column_iter().next().map(|(_, v)| v);
        let text = match value {
            Some(Field::Str(s)) => s.as_str(),
            Some(Field::Null) | None => {
                return Err(record_error(path, at(), format!("`{field}` is null")));
            }
            Some(other) => {
                return Err(record_error(
                    path,
                    at(),
                    format!("`{field}` is not a string: {other}"),
                ));
            }
        };
        sink.start()?;
        if !text.is_empty() {
            sink.text(text)?;
        }
        sink.end()?;
    }
    Ok(())
}

/// A primitive byte-array column annotated as a UTF-8 string.
fn is_string_column(t: &SchemaType) -> bool {
    if t.is_group() {
        return false;
    }
    let info = t.get_basic_info();
    t.get_physical_type() == PhysicalType::BYTE_ARRAY
        && !(info.has_repetition() && info.repetition() == parquet::basic::Repetition::REPEATED)
        && (matches!(info.logical_type_ref(), Some(LogicalType::String))
            || info.converted_type() == ConvertedType::UTF8)
}

fn describe(t: &SchemaType) -> String {
    if t.is_group() {
        return "a group".into();
    }
    let info = t.get_basic_info();
    match info.logical_type_ref() {
        Some(l) => format!("{:?} {l:?}", t.get_physical_type()),
        None => format!("{:?}", t.get_physical_type()),
    }
}
