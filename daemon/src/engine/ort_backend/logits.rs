//! Reading the rows of the logits a run returns: one row per position the run was given,
//! each the model's vocabulary wide.

use ort::value::DynValue;

use super::super::backend::BackendError;

/// Copies the last row of the logits into `row`.
pub(super) fn copy_last_row(logits: &DynValue, row: &mut [f32]) -> Result<(), BackendError> {
    let data = logits_data(logits, row.len())?;
    row.copy_from_slice(&data[data.len() - row.len()..]);
    Ok(())
}

/// Copies row `at` of the logits (every position of every run row, in order) into `row`.
pub(super) fn copy_logits_row(
    logits: &DynValue,
    at: usize,
    row: &mut [f32],
) -> Result<(), BackendError> {
    let width = row.len();
    let data = logits_data(logits, width)?;
    let found = data
        .get(at * width..(at + 1) * width)
        .ok_or_else(|| BackendError::Runtime {
            during: "reading logits",
            message: format!(
                "logits row {at} asked of {} rows",
                data.len() / width.max(1)
            ),
        })?;
    row.copy_from_slice(found);
    Ok(())
}

/// The logits' values, once their rows are known to be `width` wide.
fn logits_data(logits: &DynValue, width: usize) -> Result<&[f32], BackendError> {
    let (shape, data) = logits
        .try_extract_tensor::<f32>()
        .map_err(|e| BackendError::Runtime {
            during: "reading logits",
            message: e.to_string(),
        })?;
    let found = shape.last().copied().unwrap_or(0) as usize;
    if found != width || data.len() < width {
        return Err(BackendError::LogitsShape {
            expected: width,
            found,
            detail: "the graph's logits width differs from vocab_size in moat-model.json",
        });
    }
    Ok(data)
}
