//! icefm patch: a count of the storage operations a computation runs, with the bytes each reads
//! and writes, on any device.
//!
//! Every operation of [`crate::Storage`] (a kernel launch on a GPU, a loop on the CPU) records
//! itself here while a census is open: its name, dtype, output shape, bytes read (the distinct
//! elements of each operand's layout: a broadcast operand counts once) and bytes written, and
//! for matrix products the floating-point operations. The record is the same on every device
//! because it is taken above the backends, so a census on the CPU counts the launches and the
//! memory traffic the same graph makes on a GPU. Closed (the default), a census costs one relaxed
//! atomic load per operation.

use crate::{DType, Layout, Shape};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ON: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

#[derive(Default)]
struct State {
    phase: String,
    /// Operations a custom op declared while it ran ([`flops`]), for its record.
    pending_flops: u64,
    /// Bytes a custom op declared it writes besides its result ([`written`]), for its record.
    pending_written: u64,
    /// The custom op now running launched nothing ([`launchless`]): no record.
    pending_skip: bool,
    sites: Option<String>,
    entries: BTreeMap<Key, Entry>,
}

type Key = (String, String, String, String, String);

/// The operations of one kind, dtype, shape, phase and call site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The phase named by [`phase`] when they ran.
    pub phase: String,
    /// The operation: `copy (strided)`, `copy (contiguous)`, `copy2d`, `clone`, `cast f32→bf16`,
    /// `binary add`, `unary gelu`, `affine`, `reduce sum`, `matmul`, `custom icefm-…`, `fill`, ….
    pub op: String,
    /// The dtype of the result (or of the operands where there is no result).
    pub dtype: String,
    /// The result's shape (the copied shape for copies).
    pub shape: String,
    /// The innermost stack frame in the source files [`start`] named (`""` without them).
    pub site: String,
    /// How many ran.
    pub calls: u64,
    /// Bytes read, all calls together.
    pub bytes_read: u64,
    /// Bytes written, all calls together.
    pub bytes_written: u64,
    /// Floating-point operations (matrix products only), all calls together.
    pub flops: u64,
}

/// Open a census (clearing any earlier one) in phase `""`. `sites`: also record each
/// operation's call site, the innermost frame of its stack in a source file whose path contains
/// this (as `model/src/`: a stack trace per operation, slow, and it needs the binary's line
/// tables).
pub fn start(sites: Option<&str>) {
    let sites = sites.map(str::to_string);
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some(State {
        sites,
        ..State::default()
    });
    ON.store(true, Ordering::Relaxed);
}

/// Name the phase the following operations belong to.
pub fn phase(name: &str) {
    if let Some(s) = STATE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        s.phase = name.to_string();
    }
}

/// Close the census and return what it counted, in key order (phase, op, dtype, shape, site).
pub fn finish() -> Vec<Entry> {
    ON.store(false, Ordering::Relaxed);
    STATE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .map(|s| s.entries.into_values().collect())
        .unwrap_or_default()
}

/// Whether a census is open.
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Declare, from inside a custom op's forward, the floating-point operations it performs: the
/// census records them with the op (it cannot see inside one). Nothing when no census is open.
pub fn flops(n: u64) {
    if on() {
        if let Some(s) = STATE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.pending_flops += n;
        }
    }
}

/// Declare, from inside a custom op's forward, bytes it writes besides its result (a second
/// output it keeps for a later op): the census adds them to the op's record. Nothing when no
/// census is open.
pub fn written(n: u64) {
    if on() {
        if let Some(s) = STATE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.pending_written += n;
        }
    }
}

/// Declare, from inside a custom op's forward, that it launches nothing and moves nothing (it
/// hands on a result an earlier op computed): the census does not record it. Nothing when no
/// census is open.
pub fn launchless() {
    if on() {
        if let Some(s) = STATE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            s.pending_skip = true;
        }
    }
}

/// A copy between the host and the device: `upload` (a tensor made from host values) or
/// `read back` (a tensor's values read on the host). On the CPU these are the copies the same
/// code makes on a GPU, where an upload from pageable memory or a read back can make the host
/// wait for the device's queue. icefm: a step should make none (its tests count them).
pub(crate) fn transfer(op: &str, dtype: DType, elems: usize) {
    if on() {
        let bytes = (elems * dtype.size_in_bytes()) as u64;
        record(op, dtype, &Shape::from(elems), bytes, bytes, 0);
    }
}

/// Bytes of the distinct elements `l` addresses (dimensions of stride 0 count once).
pub(crate) fn layout_bytes(l: &Layout, dtype: DType) -> u64 {
    let n: usize = l
        .dims()
        .iter()
        .zip(l.stride())
        .map(|(&d, &s)| if s == 0 { 1 } else { d })
        .product();
    (n * dtype.size_in_bytes()) as u64
}

/// Bytes of a contiguous `shape` of `dtype`.
pub(crate) fn shape_bytes(shape: &Shape, dtype: DType) -> u64 {
    (shape.elem_count() * dtype.size_in_bytes()) as u64
}

/// Record one operation (only call when [`on`]).
pub(crate) fn record(op: &str, dtype: DType, shape: &Shape, read: u64, written: u64, flops: u64) {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = guard.as_mut() else { return };
    if std::mem::take(&mut s.pending_skip) {
        return;
    }
    let site = s.sites.as_deref().map(caller_site).unwrap_or_default();
    let key = (
        s.phase.clone(),
        op.to_string(),
        format!("{dtype:?}").to_lowercase(),
        format!("{:?}", shape.dims()),
        site,
    );
    let e = s.entries.entry(key.clone()).or_insert_with(|| Entry {
        phase: key.0,
        op: key.1,
        dtype: key.2,
        shape: key.3,
        site: key.4,
        calls: 0,
        bytes_read: 0,
        bytes_written: 0,
        flops: 0,
    });
    e.calls += 1;
    e.bytes_read += read;
    e.bytes_written += written + std::mem::take(&mut s.pending_written);
    e.flops += flops + std::mem::take(&mut s.pending_flops);
}

/// The innermost stack frame whose source file's path contains `place` (as `model/src/`), as
/// `function (file:line)`. Frames name their functions without paths where the binary has only
/// line tables, so the place is matched on the file.
fn caller_site(place: &str) -> String {
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let lines: Vec<&str> = bt.lines().map(str::trim).collect();
    // Frames read `N: function`, their location on the next line as `at path:line:column`.
    for pair in lines.windows(2) {
        let (Some((_, name)), Some(at)) = (pair[0].split_once(": "), pair[1].strip_prefix("at "))
        else {
            continue;
        };
        if at.contains(place) {
            let file = at.rsplit(['/', '\\']).next().unwrap_or(at);
            return format!("{name} ({file})");
        }
    }
    String::new()
}

/// While a backward pass runs: name the graph node whose gradient the following operations
/// compute (the phase becomes `backward: <op>`); `None` when the pass ends.
pub(crate) fn node(op: Option<&crate::op::Op>) {
    use crate::op::Op;
    let label = op.map(|op| match op {
        Op::Binary(_, _, b) => format!("{b:?}").to_lowercase(),
        Op::Unary(_, u) => format!("{u:?}").to_lowercase(),
        Op::Cmp(..) => "cmp".into(),
        Op::Reduce(_, r, _) => format!("{r:?}").to_lowercase(),
        Op::Matmul(..) => "matmul".into(),
        Op::Gather(..) => "gather".into(),
        Op::Scatter(..) | Op::ScatterAdd(..) => "scatter".into(),
        Op::IndexSelect(..) => "index_select".into(),
        Op::IndexAdd(..) => "index_add".into(),
        Op::WhereCond(..) => "where".into(),
        Op::Conv1D { .. } | Op::ConvTranspose1D { .. } => "conv1d".into(),
        Op::Conv2D { .. } | Op::ConvTranspose2D { .. } => "conv2d".into(),
        Op::AvgPool2D { .. } | Op::MaxPool2D { .. } => "pool2d".into(),
        Op::UpsampleNearest1D { .. }
        | Op::UpsampleNearest2D { .. }
        | Op::UpsampleBilinear2D { .. } => "upsample".into(),
        Op::Cat(..) => "cat".into(),
        Op::Affine { .. } => "affine".into(),
        Op::ToDType(..) => "to_dtype".into(),
        Op::Copy(..) => "copy".into(),
        Op::Broadcast(..) => "broadcast".into(),
        Op::Narrow(..) => "narrow".into(),
        Op::SliceScatter0(..) => "slice_scatter".into(),
        Op::Reshape(..) => "reshape".into(),
        Op::ToDevice(..) => "to_device".into(),
        Op::Transpose(..) => "transpose".into(),
        Op::Permute(..) => "permute".into(),
        Op::Elu(..) => "elu".into(),
        Op::Powf(..) => "powf".into(),
        Op::CustomOp1(_, c) => c.name().into(),
        Op::CustomOp2(_, _, c) => c.name().into(),
        Op::CustomOp3(_, _, _, c) => c.name().into(),
    });
    if let Some(s) = STATE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let base = s.phase.split(": ").next().unwrap_or("").to_string();
        s.phase = match label {
            Some(l) => format!("{base}: {l}"),
            None => base,
        };
    }
}
