//! Device names (`cpu`, `cuda`, `cuda:N`) and the count of GPUs, checked before a run starts.

use candle_core::Device;

/// A device name as written: `cpu`, `cuda` (no ordinal: `cuda:0`, or under `--dist` the
/// rank's GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    /// `cpu`.
    Cpu,
    /// `cuda` (`None`) or `cuda:N`.
    Cuda(Option<usize>),
}

impl DeviceName {
    /// Read `name`; the error says what is expected.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            s => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| Self::Cuda(Some(n)))
                .ok_or_else(|| format!("--device `{s}`: expected cpu, cuda or cuda:N")),
        }
    }
}

/// A device from its name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device, String> {
    let ordinal = match DeviceName::parse(name)? {
        DeviceName::Cpu => return Ok(Device::Cpu),
        DeviceName::Cuda(n) => n.unwrap_or(0),
    };
    #[cfg(feature = "cuda")]
    return crate::cuda::device(ordinal).map_err(|e| format!("--device {name}: {e}"));
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(format!(
            "--device {name}: this icefm was built without CUDA; build it with \
             `--features cuda` (scripts/cuda-env.sh sets up the toolchain)"
        ))
    }
}

/// GPUs this process sees (after `CUDA_VISIBLE_DEVICES`), counted without opening any: an
/// error in a build without CUDA, or where the driver cannot be loaded.
pub fn cuda_device_count() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    return candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .map(|n| usize::try_from(n).unwrap_or(0))
        .map_err(|e| format!("cannot count the GPUs: {e}"));
    #[cfg(not(feature = "cuda"))]
    Err(
        "this icefm was built without CUDA; build it with `--features cuda` \
         (scripts/cuda-env.sh sets up the toolchain)"
            .into(),
    )
}
