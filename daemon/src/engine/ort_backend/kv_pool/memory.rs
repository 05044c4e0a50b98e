//! Where the KV pool's buffers live, and the only code that reads or writes them outside a
//! forward pass.
//!
//! The device is a parameter of the pool, not a fork of it: one [`KvMemory`] per pool, in
//! one of two places, behind the same operations (bind rows, zero, read and write runs of
//! positions).
//!
//! - [`KvPlacement::Host`]: zeroed host allocations the CPU kernels read in place. Nothing
//!   is resident until a run writes it, so a pool of many long slots costs the positions
//!   actually cached.
//! - [`KvPlacement::ProviderAllocator`]: one tensor per pair from the session's execution
//!   provider allocator (device memory on CUDA), reached only through ONNX Runtime's own
//!   copies, since host code cannot touch device memory. Zeroed once when allocated.
//!
//! On the CPU both placements run, so the path CUDA takes is tested on every machine.
#![allow(unsafe_code)]

use std::ffi::{CString, c_void};
use std::ops::Range;

use half::f16;
use half::slice::HalfBitsSliceExt as _;
use moat_core::KvDtype;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, PrimitiveTensorElementType, Shape, TensorElementType, TensorRefMut};

use super::super::super::backend::DeviceKind;
use super::bind_input_in_place;
use super::copier::Copier;

/// The most elements zeroed by one copy into provider memory.
const ZEROING_CHUNK: usize = 1 << 20;

/// Where a pool's buffers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPlacement {
    /// Host memory read in place by the CPU kernels.
    #[default]
    Host,
    /// The session's execution-provider allocator: device memory on CUDA.
    ProviderAllocator,
}

/// The keys and values of a run of positions of one slot, copied out of the pool: for each
/// past/present pair, for each KV head, the positions' rows (`[pairs, kv_heads, positions,
/// head_dim]`), in the pool's element type (float16 as its bits).
#[derive(Debug)]
pub(in crate::engine::ort_backend) enum KvBlock {
    Float32(Vec<f32>),
    Float16(Vec<u16>),
}

impl KvBlock {
    /// An empty block of `element`, with room for `len` values.
    pub fn with_capacity(element: KvDtype, len: usize) -> Self {
        match element {
            KvDtype::Float32 => Self::Float32(Vec::with_capacity(len)),
            KvDtype::Float16 => Self::Float16(Vec::with_capacity(len)),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Float32(values) => values.len(),
            Self::Float16(values) => values.len(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Float32(values) => std::mem::size_of_val(&**values),
            Self::Float16(values) => std::mem::size_of_val(&**values),
        }
    }
}

/// The pool's memory: one buffer per past/present pair.
pub(super) struct KvMemory {
    buffers: Buffers,
    /// What ONNX Runtime is told about the buffers when they are bound or copied.
    info: MemoryInfo<'static>,
}

enum Buffers {
    /// float16 is kept as its bits (`u16`), whose zero is allocated untouched like
    /// float32's (a `Vec<f16>` of zeros would be written element by element, making the
    /// whole pool resident at once).
    HostFloat32(Vec<Vec<f32>>),
    HostFloat16(Vec<Vec<u16>>),
    Allocated(Box<Allocated>),
}

struct Allocated {
    /// Declared before the allocator so that they are freed first.
    tensors: Vec<DynTensor>,
    element: KvDtype,
    copier: Copier,
    _allocator: Allocator,
}

impl KvMemory {
    /// `pairs` buffers of `len` zeroes each, in `placement` on `device`.
    pub fn zeroed(
        session: &Session,
        element: KvDtype,
        (pairs, len): (usize, usize),
        (placement, device): (KvPlacement, DeviceKind),
        environment: &Environment,
    ) -> Result<Self, String> {
        match placement {
            KvPlacement::Host => Ok(Self {
                buffers: match element {
                    KvDtype::Float32 => Buffers::HostFloat32(host_buffers(pairs, len)?),
                    KvDtype::Float16 => Buffers::HostFloat16(host_buffers(pairs, len)?),
                },
                info: MemoryInfo::default(),
            }),
            KvPlacement::ProviderAllocator => {
                let info = match device {
                    DeviceKind::Cpu => MemoryInfo::new(
                        AllocationDevice::CPU,
                        0,
                        AllocatorType::Device,
                        MemoryType::Default,
                    ),
                    DeviceKind::Cuda => MemoryInfo::new(
                        AllocationDevice::CUDA,
                        0,
                        AllocatorType::Device,
                        MemoryType::Default,
                    ),
                }
                .map_err(|e| e.to_string())?;
                Self::allocated(
                    (session, environment),
                    (element, device),
                    (pairs, len),
                    info,
                )
            }
        }
    }

    fn allocated(
        (session, environment): (&Session, &Environment),
        (element, device): (KvDtype, DeviceKind),
        (pairs, len): (usize, usize),
        info: MemoryInfo<'static>,
    ) -> Result<Self, String> {
        let allocator = Allocator::new(session, info.clone()).map_err(|e| {
            format!("the execution provider gives no allocator for the KV pool: {e}")
        })?;
        let tensor_type = match element {
            KvDtype::Float32 => TensorElementType::Float32,
            KvDtype::Float16 => TensorElementType::Float16,
        };
        let tensors = (0..pairs)
            .map(|_| DynTensor::new(&allocator, tensor_type, [len]))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!(
                    "the KV pool needs {} MiB per buffer on {}, which its allocator refuses \
                     ({e}); {SHRINK_THE_POOL}",
                    len.saturating_mul(element_size(element)) >> 20,
                    info.allocation_device().as_str()
                )
            })?;
        let copier = Copier::new(environment, element, device).map_err(|e| {
            format!(
                "the KV pool cannot copy to and from {}: {e}",
                info.allocation_device().as_str()
            )
        })?;
        let mut memory = Self {
            buffers: Buffers::Allocated(Box::new(Allocated {
                tensors,
                element,
                copier,
                _allocator: allocator,
            })),
            info,
        };
        // Device memory comes as the allocator last left it, perhaps another model's cache;
        // ONNX Runtime's tensors in memory the CPU can reach are zeroed when created.
        if !memory.info.is_cpu_accessible() {
            for pair in 0..pairs {
                memory
                    .zero(pair, 0..len)
                    .map_err(|e| format!("zeroing the KV pool: {e}"))?;
            }
        }
        Ok(memory)
    }

    pub fn element(&self) -> KvDtype {
        match &self.buffers {
            Buffers::HostFloat32(_) => KvDtype::Float32,
            Buffers::HostFloat16(_) => KvDtype::Float16,
            Buffers::Allocated(a) => a.element,
        }
    }

    pub fn pairs(&self) -> usize {
        match &self.buffers {
            Buffers::HostFloat32(b) => b.len(),
            Buffers::HostFloat16(b) => b.len(),
            Buffers::Allocated(a) => a.tensors.len(),
        }
    }

    /// Where element `offset` of pair `pair` lies (a device address on a device).
    pub fn address(&self, pair: usize, offset: usize) -> Option<*const c_void> {
        let base = match &self.buffers {
            Buffers::HostFloat32(b) => b.get(pair)?.as_ptr().cast::<c_void>(),
            Buffers::HostFloat16(b) => b.get(pair)?.as_ptr().cast::<c_void>(),
            Buffers::Allocated(a) => a.tensors.get(pair)?.data_ptr(),
        };
        Some(
            base.cast::<u8>()
                .wrapping_add(offset * element_size(self.element()))
                .cast(),
        )
    }

    /// Sets elements `range` of pair `pair` to zero.
    pub fn zero(&mut self, pair: usize, range: Range<usize>) -> Result<(), ort::Error> {
        match &mut self.buffers {
            Buffers::HostFloat32(b) => host_range(b, pair, range)?.fill(0.0),
            Buffers::HostFloat16(b) => host_range(b, pair, range)?.fill(0),
            Buffers::Allocated(_) => {
                // From one bounded host buffer of zeroes, however large the range.
                let step = range.len().min(ZEROING_CHUNK);
                let zeros = match self.element() {
                    KvDtype::Float32 => KvBlock::Float32(vec![0.0; step]),
                    KvDtype::Float16 => KvBlock::Float16(vec![0; step]),
                };
                let mut at = range.start;
                while at < range.end {
                    let len = step.min(range.end - at);
                    self.write(pair, at, &zeros, 0..len)?;
                    at += len;
                }
            }
        }
        Ok(())
    }

    /// Appends elements `range` of pair `pair` to `out`, which is of the pool's type.
    pub fn read(
        &mut self,
        pair: usize,
        range: Range<usize>,
        out: &mut KvBlock,
    ) -> Result<(), ort::Error> {
        match (&mut self.buffers, out) {
            (Buffers::HostFloat32(b), KvBlock::Float32(out)) => {
                out.extend_from_slice(host_range_ref(b, pair, range)?);
            }
            (Buffers::HostFloat16(b), KvBlock::Float16(out)) => {
                out.extend_from_slice(host_range_ref(b, pair, range)?);
            }
            (Buffers::Allocated(_), KvBlock::Float32(out)) => {
                let from = out.len();
                out.resize(from + range.len(), 0.0);
                self.copy_out::<f32>(pair, range.start, &mut out[from..])?;
            }
            (Buffers::Allocated(_), KvBlock::Float16(out)) => {
                let from = out.len();
                out.resize(from + range.len(), 0);
                self.copy_out::<f16>(pair, range.start, out[from..].reinterpret_cast_mut())?;
            }
            _ => return Err(mismatch()),
        }
        Ok(())
    }

    /// Writes `values[part]` to pair `pair` from element `at` on.
    pub fn write(
        &mut self,
        pair: usize,
        at: usize,
        values: &KvBlock,
        part: Range<usize>,
    ) -> Result<(), ort::Error> {
        let to = at..at + part.len();
        match (&mut self.buffers, values) {
            (Buffers::HostFloat32(b), KvBlock::Float32(v)) => {
                host_range(b, pair, to)?.copy_from_slice(slice(v, part)?);
            }
            (Buffers::HostFloat16(b), KvBlock::Float16(v)) => {
                host_range(b, pair, to)?.copy_from_slice(slice(v, part)?);
            }
            (Buffers::Allocated(_), KvBlock::Float32(v)) => {
                self.copy_in::<f32>(pair, at, slice(v, part)?)?;
            }
            (Buffers::Allocated(_), KvBlock::Float16(v)) => {
                self.copy_in::<f16>(pair, at, slice(v, part)?.reinterpret_cast())?;
            }
            _ => return Err(mismatch()),
        }
        Ok(())
    }

    /// Binds `rows` of every buffer (`row_len` elements a row, `shape` the bound shape) as
    /// that pair's past and present.
    pub fn bind_rows<'a>(
        &mut self,
        binding: &mut IoBinding,
        names: impl Iterator<Item = (&'a CString, &'a String)>,
        rows: &Range<usize>,
        row_len: usize,
        shape: &[usize],
    ) -> Result<(), ort::Error> {
        let offset = rows.start * row_len;
        let len = rows.len() * row_len;
        for (pair, (past, present)) in names.enumerate() {
            let at = self.address_mut(pair, offset, len)?;
            let bound = match self.element() {
                KvDtype::Float32 => bind_view::<f32>(binding, &self.info, at, shape, past, present),
                KvDtype::Float16 => bind_view::<f16>(binding, &self.info, at, shape, past, present),
            };
            bound?;
        }
        Ok(())
    }

    /// The address of elements `offset..offset + len` of pair `pair`, checked to lie
    /// within it.
    fn address_mut(
        &mut self,
        pair: usize,
        offset: usize,
        len: usize,
    ) -> Result<*mut c_void, ort::Error> {
        let size = match &mut self.buffers {
            Buffers::HostFloat32(b) => b.get(pair).map(Vec::len),
            Buffers::HostFloat16(b) => b.get(pair).map(Vec::len),
            Buffers::Allocated(a) => a
                .tensors
                .get(pair)
                .map(|t| t.shape().iter().product::<i64>().try_into().unwrap_or(0)),
        };
        match (size, self.address(pair, offset)) {
            (Some(size), Some(at)) if offset + len <= size => Ok(at.cast_mut()),
            _ => Err(ort::Error::new(format!(
                "elements {offset}..{} are outside KV buffer {pair}",
                offset + len
            ))),
        }
    }

    /// Copies elements from `at` on of pair `pair` into the host slice `out`.
    fn copy_out<T: PrimitiveTensorElementType + std::fmt::Debug>(
        &mut self,
        pair: usize,
        at: usize,
        out: &mut [T],
    ) -> Result<(), ort::Error> {
        self.copy_host::<T>((pair, at), (out.as_mut_ptr().cast(), out.len()), false)
    }

    /// Copies the host slice `values` into pair `pair` from element `at` on.
    fn copy_in<T: PrimitiveTensorElementType + std::fmt::Debug>(
        &mut self,
        pair: usize,
        at: usize,
        values: &[T],
    ) -> Result<(), ort::Error> {
        // The host side is mutable only in type here: a copy reads its input.
        let host = values.as_ptr().cast_mut().cast();
        self.copy_host::<T>((pair, at), (host, values.len()), true)
    }

    /// Copies `len` elements between the host memory at `host` and pair `pair` from element
    /// `at` on: into the pool when `into_pool`, out of it otherwise.
    fn copy_host<T: PrimitiveTensorElementType + std::fmt::Debug>(
        &mut self,
        (pair, at): (usize, usize),
        (host, len): (*mut c_void, usize),
        into_pool: bool,
    ) -> Result<(), ort::Error> {
        if len == 0 {
            return Ok(());
        }
        let pool = self.address_mut(pair, at, len)?;
        let Buffers::Allocated(allocated) = &mut self.buffers else {
            return Err(mismatch());
        };
        let host_info = MemoryInfo::default();
        let (from, to) = if into_pool {
            ((host, &host_info), (pool, &self.info))
        } else {
            ((pool, &self.info), (host, &host_info))
        };
        // SAFETY: `pool` was checked to hold `len` elements of the pool, and `host` is a
        // live host slice of `len` elements (the callers' slices), which the pool's memory
        // cannot overlap.
        unsafe { allocated.copier.copy::<T>(from, to, len) }
    }
}

fn bind_view<T: PrimitiveTensorElementType + std::fmt::Debug>(
    binding: &mut IoBinding,
    info: &MemoryInfo<'static>,
    at: *mut c_void,
    shape: &[usize],
    past: &CString,
    present: &str,
) -> Result<(), ort::Error> {
    // SAFETY: `at` was checked to hold `shape`'s elements of the pool's type; the pool owns
    // both the memory and the binding, and never moves the memory.
    let view = unsafe { raw_view::<T>(info, at, shape) }?;
    bind_input_in_place(binding, past, &view)?;
    binding.bind_output(present, view)
}

/// A view of `shape`'s elements of `T` at `at`, in the memory `info` describes.
///
/// # Safety
/// `at` must point at that many live elements of `T` in that memory, for as long as the
/// view (or anything it is bound to) is used.
unsafe fn raw_view<'a, T: PrimitiveTensorElementType + std::fmt::Debug>(
    info: &MemoryInfo<'static>,
    at: *mut c_void,
    shape: &[usize],
) -> Result<TensorRefMut<'a, T>, ort::Error> {
    let shape = Shape::new(shape.iter().map(|&d| d as i64));
    // SAFETY: the caller's promise.
    unsafe { TensorRefMut::from_raw(info.clone(), at, shape) }
}

/// What an operator can do about a pool that does not fit: fewer slots, or shorter ones.
pub(super) const SHRINK_THE_POOL: &str = "lower engine.max_batch or engine.kv_slot_tokens";

fn element_size(element: KvDtype) -> usize {
    match element {
        KvDtype::Float32 => std::mem::size_of::<f32>(),
        KvDtype::Float16 => std::mem::size_of::<u16>(),
    }
}

fn mismatch() -> ort::Error {
    ort::Error::new("the values are of another element type than the KV pool")
}

fn slice<T>(values: &[T], part: Range<usize>) -> Result<&[T], ort::Error> {
    values
        .get(part)
        .ok_or_else(|| ort::Error::new("a copy of KV positions is shorter than its range"))
}

fn host_range<T>(
    buffers: &mut [Vec<T>],
    pair: usize,
    range: Range<usize>,
) -> Result<&mut [T], ort::Error> {
    buffers
        .get_mut(pair)
        .and_then(|b| b.get_mut(range))
        .ok_or_else(|| ort::Error::new("KV positions outside the pool"))
}

fn host_range_ref<T>(
    buffers: &[Vec<T>],
    pair: usize,
    range: Range<usize>,
) -> Result<&[T], ort::Error> {
    buffers
        .get(pair)
        .and_then(|b| b.get(range))
        .ok_or_else(|| ort::Error::new("KV positions outside the pool"))
}

/// Numbers whose all-zero bit pattern is the value zero.
trait ZeroBits: Copy + Default {}
impl ZeroBits for f32 {}
impl ZeroBits for u16 {}

fn host_buffers<T: ZeroBits>(pairs: usize, len: usize) -> Result<Vec<Vec<T>>, String> {
    (0..pairs).map(|_| zeroed_vec(len)).collect()
}

/// `len` zeroes from the allocator's zeroed memory: for buffers this large, fresh anonymous
/// mappings, so nothing is resident until written. Unlike `vec![0; len]`, a refused
/// allocation is an error, not an abort.
fn zeroed_vec<T: ZeroBits>(len: usize) -> Result<Vec<T>, String> {
    let refused = || {
        format!(
            "the KV pool needs {} MiB of address space per buffer, which this host refuses; \
             {SHRINK_THE_POOL}",
            len.saturating_mul(std::mem::size_of::<T>()) >> 20
        )
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| refused())?;
    // SAFETY: `layout` has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(refused());
    }
    without_huge_pages(ptr.cast(), layout.size());
    // SAFETY: `ptr` was allocated by the global allocator with `layout` (`len` elements of
    // `T`), and all of them are initialised: zero bits are zero for every `ZeroBits` type.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Asks the kernel not to back `len` bytes at `ptr` with transparent huge pages.
///
/// Where they are on for every mapping (`/sys/kernel/mm/transparent_hugepage/enabled` =
/// `always`, the default of some distributions), the first position a sequence writes in a
/// head's run would make a whole 2 MiB page resident: 32 sequences of 40 positions took
/// 10.8 GiB instead of 60 MiB. With 4 KiB pages the pool costs what is written. A kernel
/// that refuses the advice (none of this on it, or a range not of whole pages) changes
/// nothing but that.
fn without_huge_pages(ptr: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    // The allocation's pages, from the page it starts in to the page it ends in. Where a
    // small buffer shares its edge pages with other allocations, the advice changes only
    // how those pages are backed, never what they hold.
    let start = (ptr as usize) & !(PAGE - 1);
    let end = (ptr as usize).saturating_add(len);
    let Some(start) = std::ptr::NonNull::new(start as *mut std::ffi::c_void) else {
        return;
    };
    // SAFETY: the range lies in memory this process owns (the allocation just made, and
    // the allocator's own page around its start); the advice changes how pages are backed,
    // never their contents.
    if let Err(e) = unsafe {
        nix::sys::mman::madvise(
            start,
            end - start.as_ptr() as usize,
            nix::sys::mman::MmapAdvise::MADV_NOHUGEPAGE,
        )
    } {
        tracing::debug!(error = %e, "the kernel took no advice against huge pages for the KV pool");
    }
}
