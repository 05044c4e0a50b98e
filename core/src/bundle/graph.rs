//! An ONNX graph as the node reads it before ONNX Runtime sees it: which operators it runs
//! and which files its tensors read their data from.
//!
//! A bundle is the trust boundary for graphs: a signature says who shipped a graph, not
//! what the graph may ask of the node. So every graph is read here, at import and again at
//! every load, and refused when it asks for more than serving a model needs:
//!
//! - an operator outside the allow-list of [`operators`], or an operator set of any other
//!   domain (a custom operator library cannot be smuggled in);
//! - model-local functions, which would let a graph define operators of its own;
//! - a tensor whose external data `location` is an absolute path, has a `..` component, is
//!   ONNX Runtime's memory-address marker, or is not a plain relative path; in a bundle,
//!   also one the signed manifest does not list, or a range beyond the listed file's size.
//!
//! Subgraphs (the branches of `If`, the bodies of `Loop`, training graphs) are read the
//! same way, to a bounded depth. Reading is a walk over the protobuf bytes in place
//! ([`proto`]): no tensor data is copied, and no input makes it panic.

mod operators;
mod proto;

pub use operators::{MICROSOFT_DOMAIN, ONNX_DOMAINS, domain_served, operator_served};
use proto::{Fields, Span, Value, WireError};

use super::manifest::FileEntry;

/// The graph file of every bundle and model directory.
pub const GRAPH_FILE: &str = "model.onnx";
/// How deep subgraphs may nest (a model's own graph is depth 0).
pub const MAX_GRAPH_DEPTH: usize = 16;
/// ONNX Runtime reads a tensor whose location is this marker from the process memory at
/// the address its `offset` gives, not from a file.
pub const MEMORY_ADDRESS_TAG: &str = "*/_ORT_MEM_ADDR_/*";
/// The most characters of a name from the graph an error repeats: the graph is the
/// sender's text, and errors reach logs and audit records.
const SHOWN_CHARS: usize = 160;

/// What the graph check found in an accepted graph.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphInventory {
    /// Every external data reference, in the order the graph holds them.
    pub external: Vec<ExternalData>,
}

/// One tensor's reference to data in a file beside the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalData {
    pub tensor: String,
    /// A plain relative path (checked): no root, no `.` or `..` component.
    pub location: String,
    pub offset: u64,
    /// `None`: the rest of the file.
    pub length: Option<u64>,
}

/// Why a tensor's external data is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExternalDataProblem {
    #[error("the tensor is marked external but names no location")]
    NoLocation,
    #[error("an absolute path reaches outside the model")]
    Absolute,
    #[error("a '..' component reaches outside the model")]
    ParentDirectory,
    #[error("ONNX Runtime would read process memory, not a file")]
    MemoryAddress,
    #[error("it is not a plain relative path (an empty, '.' or NUL-holding name)")]
    NotPlain,
    #[error("the signed manifest does not list it")]
    NotListed,
    #[error("its {key} is not a decimal number of bytes")]
    BadNumber { key: &'static str },
    #[error("bytes {offset}..{end} lie beyond the file's {size} bytes")]
    BeyondFile { offset: u64, end: u64, size: u64 },
    #[error("no such file lies beside the graph")]
    Missing,
    #[error("it is a symbolic link")]
    Symlink,
    #[error("it is not a regular file")]
    NotAFile,
}

/// Why a graph is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("it is not a readable ONNX model: {reason} (byte {offset})")]
    Malformed { offset: usize, reason: &'static str },
    #[error("it holds no graph")]
    NoGraph,
    #[error("its subgraphs nest more than {MAX_GRAPH_DEPTH} deep")]
    TooDeep,
    #[error(
        "it imports operator domain {domain:?}: moat serves the standard ONNX operators and \
         ONNX Runtime's {MICROSOFT_DOMAIN} operators, never a custom operator library"
    )]
    DomainNotServed { domain: String },
    #[error(
        "node {node:?} is operator {op_type:?} of domain {domain:?}, which moat does not serve \
         (docs/bundles.md says which are)"
    )]
    OperatorNotServed {
        node: String,
        domain: String,
        op_type: String,
    },
    #[error("it defines a function of its own ({name:?}): model-local functions are not served")]
    LocalFunction { name: String },
    #[error("tensor {tensor:?} reads its data from {location:?}: {problem}")]
    ExternalData {
        tensor: String,
        location: String,
        problem: ExternalDataProblem,
    },
}

impl From<WireError> for GraphError {
    fn from(e: WireError) -> Self {
        GraphError::Malformed {
            offset: e.offset,
            reason: e.reason,
        }
    }
}

/// Reads an ONNX model (`ModelProto` bytes) and refuses what moat does not serve; returns
/// the external data references that the caller must still hold to its own rule (listed in
/// the manifest, or regular files inside the model directory).
pub fn inspect(model: &[u8]) -> Result<GraphInventory, GraphError> {
    let mut walk = Walk::default();
    let mut graphs = 0usize;
    let mut fields = Fields::new(Span {
        bytes: model,
        offset: 0,
    });
    while let Some(field) = fields.next_field() {
        let field = field?;
        match field.number {
            7 => {
                graphs += 1;
                walk.graph(field.span()?, 0)?;
            }
            8 => walk.opset_import(field.span()?)?,
            20 => walk.training_info(field.span()?)?,
            25 => {
                let name = last_string(field.span()?, 1)?;
                return Err(GraphError::LocalFunction { name: shown(name) });
            }
            _ => {}
        }
    }
    if graphs == 0 {
        return Err(GraphError::NoGraph);
    }
    Ok(GraphInventory {
        external: walk.external,
    })
}

impl GraphInventory {
    /// A bundle's rule: every external file is one the signed manifest lists, and every
    /// range lies within its listed size.
    pub fn check_listed(&self, files: &[FileEntry]) -> Result<(), GraphError> {
        for data in &self.external {
            let Some(file) = files.iter().find(|f| f.path == data.location) else {
                return Err(data.refused(ExternalDataProblem::NotListed));
            };
            data.check_range(file.size)?;
        }
        Ok(())
    }
}

impl ExternalData {
    /// The error that refuses this reference for `problem`.
    pub fn refused(&self, problem: ExternalDataProblem) -> GraphError {
        GraphError::ExternalData {
            tensor: self.tensor.clone(),
            location: shown(self.location.as_bytes()),
            problem,
        }
    }

    /// Refuses a range that does not lie within a file of `size` bytes.
    pub fn check_range(&self, size: u64) -> Result<(), GraphError> {
        let end = self.offset.checked_add(self.length.unwrap_or(0));
        match end {
            Some(end) if self.offset <= size && end <= size => Ok(()),
            _ => Err(self.refused(ExternalDataProblem::BeyondFile {
                offset: self.offset,
                end: end.unwrap_or(u64::MAX),
                size,
            })),
        }
    }
}

/// What a walk has gathered so far.
#[derive(Debug, Default)]
struct Walk {
    external: Vec<ExternalData>,
}

impl Walk {
    fn opset_import(&mut self, opset: Span<'_>) -> Result<(), GraphError> {
        let domain = last_string(opset, 1)?;
        if !domain_served(domain) {
            return Err(GraphError::DomainNotServed {
                domain: shown(domain),
            });
        }
        Ok(())
    }

    fn training_info(&mut self, info: Span<'_>) -> Result<(), GraphError> {
        // The initialization and algorithm graphs.
        fields_one_and_two(info, |graph| self.graph(graph, 0))
    }

    fn graph(&mut self, graph: Span<'_>, depth: usize) -> Result<(), GraphError> {
        if depth > MAX_GRAPH_DEPTH {
            return Err(GraphError::TooDeep);
        }
        let mut fields = Fields::new(graph);
        while let Some(field) = fields.next_field() {
            let field = field?;
            match field.number {
                1 => self.node(field.span()?, depth)?,
                5 => self.tensor(field.span()?)?,
                15 => self.sparse_tensor(field.span()?)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn node(&mut self, node: Span<'_>, depth: usize) -> Result<(), GraphError> {
        // A later value of a field replaces an earlier one, as protobuf parsers read it.
        let (mut name, mut op_type, mut domain): (&[u8], &[u8], &[u8]) = (b"", b"", b"");
        let mut fields = Fields::new(node);
        while let Some(field) = fields.next_field() {
            let field = field?;
            match field.number {
                3 => name = field.span()?.bytes,
                4 => op_type = field.span()?.bytes,
                7 => domain = field.span()?.bytes,
                5 => self.attribute(field.span()?, depth)?,
                _ => {}
            }
        }
        if !operator_served(domain, op_type) {
            return Err(GraphError::OperatorNotServed {
                node: shown(name),
                domain: shown(domain),
                op_type: shown(op_type),
            });
        }
        Ok(())
    }

    /// Every tensor and graph an attribute holds, whatever its declared type says.
    fn attribute(&mut self, attribute: Span<'_>, depth: usize) -> Result<(), GraphError> {
        let mut fields = Fields::new(attribute);
        while let Some(field) = fields.next_field() {
            let field = field?;
            match field.number {
                // t, tensors
                5 | 10 => self.tensor(field.span()?)?,
                // g, graphs
                6 | 11 => self.graph(field.span()?, depth + 1)?,
                // sparse_tensor, sparse_tensors
                22 | 23 => self.sparse_tensor(field.span()?)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn sparse_tensor(&mut self, sparse: Span<'_>) -> Result<(), GraphError> {
        // The values and indices tensors.
        fields_one_and_two(sparse, |tensor| self.tensor(tensor))
    }

    fn tensor(&mut self, tensor: Span<'_>) -> Result<(), GraphError> {
        let mut name: &[u8] = b"";
        let mut marked_external = false;
        let mut reference = ExternalReference::default();
        let mut fields = Fields::new(tensor);
        while let Some(field) = fields.next_field() {
            let field = field?;
            match (field.number, field.value) {
                (8, _) => name = field.span()?.bytes,
                (13, _) => reference.read_entry(field.span()?)?,
                (14, Value::Varint(location)) => marked_external = location == 1,
                (14, _) => {
                    return Err(GraphError::Malformed {
                        offset: field.offset,
                        reason: "a tensor's data_location is not a number",
                    });
                }
                _ => {}
            }
        }
        reference.into_external(shown(name), marked_external, &mut self.external)
    }
}

/// A tensor's `external_data` entries: every `location` it names, and the range.
#[derive(Debug, Default)]
struct ExternalReference<'a> {
    locations: Vec<&'a [u8]>,
    offset: Option<&'a [u8]>,
    length: Option<&'a [u8]>,
}

impl<'a> ExternalReference<'a> {
    fn read_entry(&mut self, entry: Span<'a>) -> Result<(), GraphError> {
        let key = last_string(entry, 1)?;
        let value = last_string(entry, 2)?;
        match key {
            b"location" => self.locations.push(value),
            b"offset" => self.offset = Some(value),
            b"length" => self.length = Some(value),
            _ => {}
        }
        Ok(())
    }

    /// Checks every location (ONNX Runtime reads one of them, whichever it takes) and adds
    /// the accepted references to `out`.
    fn into_external(
        self,
        tensor: String,
        marked_external: bool,
        out: &mut Vec<ExternalData>,
    ) -> Result<(), GraphError> {
        if marked_external && self.locations.is_empty() {
            return Err(GraphError::ExternalData {
                tensor,
                location: String::new(),
                problem: ExternalDataProblem::NoLocation,
            });
        }
        for location in self.locations {
            let refused = |problem| GraphError::ExternalData {
                tensor: tensor.clone(),
                location: shown(location),
                problem,
            };
            let location = plain_relative_path(location).map_err(refused)?;
            let number = |value: Option<&[u8]>, key| match value {
                None => Ok(None),
                Some(text) => decimal(text)
                    .map(Some)
                    .ok_or_else(|| refused(ExternalDataProblem::BadNumber { key })),
            };
            let offset = number(self.offset, "offset")?.unwrap_or(0);
            let length = number(self.length, "length")?;
            out.push(ExternalData {
                tensor: tensor.clone(),
                location,
                offset,
                length,
            });
        }
        Ok(())
    }
}

/// `location` as a path relative to the model's directory that stays inside it.
fn plain_relative_path(location: &[u8]) -> Result<String, ExternalDataProblem> {
    let text = std::str::from_utf8(location).map_err(|_| ExternalDataProblem::NotPlain)?;
    if text == MEMORY_ADDRESS_TAG {
        return Err(ExternalDataProblem::MemoryAddress);
    }
    if text.starts_with('/') {
        return Err(ExternalDataProblem::Absolute);
    }
    if text.split('/').any(|part| part == "..") {
        return Err(ExternalDataProblem::ParentDirectory);
    }
    if text.contains('\0') || text.split('/').any(|part| part.is_empty() || part == ".") {
        return Err(ExternalDataProblem::NotPlain);
    }
    Ok(text.to_owned())
}

/// A decimal number with nothing around it (no sign, no spaces), as moat accepts it.
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// Calls `visit` with each field numbered 1 or 2 of a message, in order: the two message
/// fields of a `TrainingInfoProto` or a `SparseTensorProto`.
fn fields_one_and_two<'a>(
    message: Span<'a>,
    mut visit: impl FnMut(Span<'a>) -> Result<(), GraphError>,
) -> Result<(), GraphError> {
    let mut fields = Fields::new(message);
    while let Some(field) = fields.next_field() {
        let field = field?;
        if let 1 | 2 = field.number {
            visit(field.span()?)?;
        }
    }
    Ok(())
}

/// The last value of string field `number` in a message, or empty bytes.
fn last_string(span: Span<'_>, number: u64) -> Result<&[u8], GraphError> {
    let mut found: &[u8] = b"";
    let mut fields = Fields::new(span);
    while let Some(field) = fields.next_field() {
        let field = field?;
        if field.number == number {
            found = field.span()?.bytes;
        }
    }
    Ok(found)
}

/// Text from the graph, as an error may repeat it: lossy UTF-8, at most [`SHOWN_CHARS`].
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.into_owned(),
    }
}

#[cfg(test)]
mod tests;
