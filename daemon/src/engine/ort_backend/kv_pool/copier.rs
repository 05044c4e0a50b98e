//! Copies between host memory and an execution provider's memory, done by ONNX Runtime.
//!
//! Host code cannot read or write device memory, and ONNX Runtime's C API has no plain
//! copy for a classic execution provider, so a copy is a run of a one-node graph
//! (`Identity`) on the provider, its input and output bound where the data is and where it
//! goes. The input is bound without `IoBinding::bind_input`, which copies every borrowed
//! tensor first (itself by such a run). The graph is written here, a few dozen bytes of
//! ONNX protobuf, rather than shipped as a file.

use std::ffi::{CString, c_void};

use moat_core::KvDtype;
use ort::environment::Environment;
use ort::ep;
use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session};
use ort::value::{PrimitiveTensorElementType, Shape, TensorRefMut};

use super::super::super::backend::DeviceKind;
use super::bind_input_in_place;

/// A session that copies tensors of one element type on one device.
pub(super) struct Copier {
    /// Declared first so that it drops first: it refers to the session.
    binding: IoBinding,
    session: Session,
    input: CString,
}

impl Copier {
    pub fn new(
        environment: &Environment,
        element: KvDtype,
        device: DeviceKind,
    ) -> Result<Self, ort::Error> {
        let mut builder = Session::builder(environment)?
            .with_intra_threads(1)?
            .with_inter_threads(1)?
            .with_intra_op_spinning(false)?
            .with_memory_pattern(false)?;
        if device == DeviceKind::Cuda {
            builder = builder
                .with_execution_providers([ep::CUDA::default().build().error_on_failure()])?;
        }
        let session = builder.commit_from_memory(&identity_graph(element))?;
        Ok(Self {
            binding: session.create_binding()?,
            session,
            input: CString::new("input").map_err(|e| ort::Error::new(e.to_string()))?,
        })
    }

    /// Copies `len` elements of `T` from `from` (in `from_info`'s memory) to `to` (in
    /// `to_info`'s).
    ///
    /// # Safety
    /// `from` and `to` must each point at `len` live elements of `T` in the memory their
    /// info describes, and not overlap.
    pub unsafe fn copy<T: PrimitiveTensorElementType + std::fmt::Debug>(
        &mut self,
        (from, from_info): (*mut c_void, &MemoryInfo<'static>),
        (to, to_info): (*mut c_void, &MemoryInfo<'static>),
        len: usize,
    ) -> Result<(), ort::Error> {
        let shape = || Shape::new([len as i64]);
        // SAFETY: the caller's promise; the views live until the run below has finished.
        let source = unsafe { TensorRefMut::<T>::from_raw(from_info.clone(), from, shape()) }?;
        let target = unsafe { TensorRefMut::<T>::from_raw(to_info.clone(), to, shape()) }?;
        bind_input_in_place(&mut self.binding, &self.input, &source)?;
        self.binding.bind_output("output", target)?;
        let copied = self.session.run_binding(&self.binding).map(drop);
        // Nothing stays bound to memory the caller may free.
        self.binding.clear();
        copied
    }
}

/// An ONNX model of one `Identity` node from `input` to `output`, 1-D tensors of `element`.
fn identity_graph(element: KvDtype) -> Vec<u8> {
    // TensorProto.DataType: FLOAT = 1, FLOAT16 = 10.
    let data_type = match element {
        KvDtype::Float32 => 1,
        KvDtype::Float16 => 10,
    };
    let value_info = |name: &str| {
        let dim = field_bytes(2, b"n"); // Dimension.dim_param
        let shape = field_bytes(1, &dim); // TensorShapeProto.dim
        let tensor = [field_varint(1, data_type), field_bytes(2, &shape)].concat();
        let type_proto = field_bytes(1, &tensor); // TypeProto.tensor_type
        [field_bytes(1, name.as_bytes()), field_bytes(2, &type_proto)].concat()
    };
    let node = [
        field_bytes(1, b"input"),
        field_bytes(2, b"output"),
        field_bytes(4, b"Identity"),
    ]
    .concat();
    let graph = [
        field_bytes(1, &node),
        field_bytes(2, b"copy"),
        field_bytes(11, &value_info("input")),
        field_bytes(12, &value_info("output")),
    ]
    .concat();
    let opset = [field_bytes(1, b""), field_varint(2, 13)].concat();
    [
        field_varint(1, 8), // ir_version
        field_bytes(7, &graph),
        field_bytes(8, &opset),
    ]
    .concat()
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint field (wire type 0).
fn field_varint(number: u64, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(number << 3, &mut out);
    varint(value, &mut out);
    out
}

/// A length-delimited field (wire type 2): bytes, a string or a message.
fn field_bytes(number: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint((number << 3) | 2, &mut out);
    varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}
