//! Per-step records (loss, learning rate, gradient norm, images/s) and `metrics.parquet`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Float32Array, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use candle_core::{DType, Tensor};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::optim::Clip;

use super::{TrainError, io_err};

/// One step's record.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Step (0-based).
    pub step: u64,
    /// The training loss (MAE: masked-patch loss; fine-tuning: the weighted task sum).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Images per second of this step.
    pub images_per_s: f64,
    /// Samples per level, `80m:12 200m:20`.
    pub levels: String,
    /// Further named values, one `metrics.parquet` column each: MAE's `baseline` (the loss of
    /// predicting each patch's mean on the same batch, ≈ 1: what the MAE beats), fine-tuning's
    /// `loss_SIC`, `loss_SOD`, `loss_FLOE`.
    pub extra: Vec<(String, f32)>,
}

impl StepRecord {
    /// A named extra value.
    pub fn value(&self, name: &str) -> Option<f32> {
        self.extra.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// When a step began: the host's clock and, on a GPU, a timed mark queued on the device's
/// stream, which the device passes once it has finished the work queued before the step (the
/// previous step) and the host has begun queuing this one.
pub(crate) struct StepStart {
    at: Instant,
    #[cfg(feature = "cuda")]
    mark: Option<crate::cuda::DeviceMark>,
}

impl StepStart {
    /// Now, on `dev`.
    pub fn now(dev: &candle_core::Device) -> Result<Self, TrainError> {
        #[cfg(feature = "cuda")]
        let mark = match dev {
            candle_core::Device::Cuda(d) => Some(crate::cuda::DeviceMark::record(d)?),
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = dev;
        Ok(Self {
            at: Instant::now(),
            #[cfg(feature = "cuda")]
            mark,
        })
    }
}

/// A step's values still on its device: the loss, named extras and, where clipping left it
/// there, the gradient norm. On a GPU their copy to the host is queued behind the step
/// ([`crate::cuda::Readback`]) and read once the next step is queued, so that the device never
/// waits for the host between steps; elsewhere they are read at once.
///
/// The step's time is its own whenever the record is read: on the host, from its start to its
/// values; on a GPU, the device's time from the step's start mark to the readback's mark. A
/// record read late (beside the next one, at a checkpoint or the run's end) keeps its rate.
pub(crate) struct PendingRecord {
    record: StepRecord,
    values: Deferred,
    norm_queued: bool,
    images: usize,
    start: StepStart,
}

enum Deferred {
    /// The values and the moment they were ready.
    Ready(Vec<f32>, Instant),
    #[cfg(feature = "cuda")]
    Queued(crate::cuda::Readback),
}

impl PendingRecord {
    /// `record` with its loss, extras' values (in order: `extras`' values, each tensor's
    /// flattened) and gradient norm still to come from `loss`, `extras` and `clip`; `images` in
    /// the step, which began at `start`.
    pub fn new(
        record: StepRecord,
        images: usize,
        start: StepStart,
        loss: &Tensor,
        extras: &[Tensor],
        clip: &Clip,
    ) -> Result<Self, TrainError> {
        let mut parts = vec![loss.to_dtype(DType::F32)?.reshape(1)?];
        for e in extras {
            parts.push(e.to_dtype(DType::F32)?.flatten_all()?);
        }
        let (mut record, norm_queued) = (record, matches!(clip, Clip::Device { .. }));
        match clip {
            Clip::Device { sumsq, .. } => parts.push(sumsq.sqrt()?.to_dtype(DType::F32)?),
            Clip::Host { norm, .. } => record.grad_norm = *norm,
        }
        let all = Tensor::cat(&parts, 0)?;
        #[cfg(feature = "cuda")]
        if all.device().is_cuda() {
            return Ok(Self {
                record,
                values: Deferred::Queued(crate::cuda::Readback::start(&all)?),
                norm_queued,
                images,
                start,
            });
        }
        let values = all.to_vec1::<f32>()?;
        Ok(Self {
            record,
            values: Deferred::Ready(values, Instant::now()),
            norm_queued,
            images,
            start,
        })
    }

    /// Whether its values are still on their way (a GPU), rather than read.
    pub fn queued(&self) -> bool {
        !matches!(self.values, Deferred::Ready(..))
    }

    /// The record, its values read (waiting for the step if it is still running), with the
    /// step's own rate. A loss that is not finite is an error.
    pub fn finish(self) -> Result<StepRecord, TrainError> {
        let (values, secs) = match self.values {
            Deferred::Ready(v, done) => (v, (done - self.start.at).as_secs_f64()),
            #[cfg(feature = "cuda")]
            Deferred::Queued(r) => {
                let (v, done) = r.finish()?;
                let secs = match &self.start.mark {
                    Some(start) => start.secs_to(&done)?,
                    None => self.start.at.elapsed().as_secs_f64(),
                };
                (v, secs)
            }
        };
        let mut record = self.record;
        let loss = values[0];
        if !loss.is_finite() {
            return Err(TrainError::Setup(format!(
                "step {}: the loss is {loss}; lower train.lr or check the data",
                record.step
            )));
        }
        record.loss = loss;
        for ((_, v), x) in record.extra.iter_mut().zip(&values[1..]) {
            *v = *x;
        }
        if self.norm_queued {
            record.grad_norm = f64::from(values[values.len() - 1]);
        }
        record.images_per_s = self.images as f64 / secs.max(1e-9);
        Ok(record)
    }

    /// [`PendingRecord::finish`], then the record to `on_step` and onto `records`.
    pub fn emit(
        self,
        records: &mut Vec<StepRecord>,
        on_step: &dyn Fn(&StepRecord),
    ) -> Result<(), TrainError> {
        let rec = self.finish()?;
        on_step(&rec);
        records.push(rec);
        Ok(())
    }
}

/// Write the records as `metrics.parquet` (through a temporary file): `step`, `loss`, `lr`,
/// `grad_norm`, `images_per_s`, `levels` and one `f32` column per extra value of the first
/// record.
pub fn write_metrics(path: &Path, records: &[StepRecord]) -> Result<(), TrainError> {
    let names: Vec<String> = records
        .first()
        .map(|r| r.extra.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let mut fields = vec![
        Field::new("step", DataType::UInt64, false),
        Field::new("loss", DataType::Float32, false),
        Field::new("lr", DataType::Float64, false),
        Field::new("grad_norm", DataType::Float64, false),
        Field::new("images_per_s", DataType::Float64, false),
        Field::new("levels", DataType::Utf8, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(
            records.iter().map(|r| r.step),
        )),
        Arc::new(Float32Array::from_iter_values(
            records.iter().map(|r| r.loss),
        )),
        Arc::new(Float64Array::from_iter_values(records.iter().map(|r| r.lr))),
        Arc::new(Float64Array::from_iter_values(
            records.iter().map(|r| r.grad_norm),
        )),
        Arc::new(Float64Array::from_iter_values(
            records.iter().map(|r| r.images_per_s),
        )),
        Arc::new(StringArray::from_iter_values(
            records.iter().map(|r| r.levels.as_str()),
        )),
    ];
    for n in &names {
        fields.push(Field::new(n, DataType::Float32, false));
        cols.push(Arc::new(Float32Array::from_iter_values(
            records.iter().map(|r| r.value(n).unwrap_or(f32::NAN)),
        )));
    }
    let batch =
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| io_err(path, e))?;
    write_parquet(path, &batch)
}

/// Write one record batch as a Parquet file, through a temporary file renamed into place.
pub(crate) fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), TrainError> {
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| io_err(&tmp, e))?;
    w.write(batch).map_err(|e| io_err(&tmp, e))?;
    w.close().map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Read `metrics.parquet` (empty when absent).
pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>, TrainError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, UInt64Type};
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| io_err(path, e))?;
        let col = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| io_err(path, format!("no column {name}")))
        };
        let (step, loss, lr) = (col("step")?, col("loss")?, col("lr")?);
        let (gn, ips, lv) = (col("grad_norm")?, col("images_per_s")?, col("levels")?);
        let bad = || io_err(path, "unexpected column types");
        let step = step.as_primitive_opt::<UInt64Type>().ok_or_else(bad)?;
        let loss = loss.as_primitive_opt::<Float32Type>().ok_or_else(bad)?;
        let fixed = ["step", "loss", "lr", "grad_norm", "images_per_s", "levels"];
        let extra: Vec<(String, &arrow_array::Float32Array)> = b
            .schema()
            .fields()
            .iter()
            .filter(|f| !fixed.contains(&f.name().as_str()))
            .map(|f| {
                let c = col(f.name())?;
                Ok((
                    f.name().clone(),
                    c.as_primitive_opt::<Float32Type>().ok_or_else(bad)?,
                ))
            })
            .collect::<Result<_, TrainError>>()?;
        let lr = lr.as_primitive_opt::<Float64Type>().ok_or_else(bad)?;
        let gn = gn.as_primitive_opt::<Float64Type>().ok_or_else(bad)?;
        let ips = ips.as_primitive_opt::<Float64Type>().ok_or_else(bad)?;
        let lv = lv.as_string_opt::<i32>().ok_or_else(bad)?;
        for i in 0..b.num_rows() {
            out.push(StepRecord {
                step: step.value(i),
                loss: loss.value(i),
                lr: lr.value(i),
                grad_norm: gn.value(i),
                images_per_s: ips.value(i),
                levels: lv.value(i).to_string(),
                extra: extra.iter().map(|(n, c)| (n.clone(), c.value(i))).collect(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use candle_core::Device;

    use super::*;

    fn record(step: u64) -> StepRecord {
        StepRecord {
            step,
            loss: f32::NAN,
            lr: 1e-3,
            grad_norm: f64::NAN,
            images_per_s: 0.0,
            levels: String::new(),
            extra: vec![("baseline".into(), f32::NAN)],
        }
    }

    /// Each record's rate is its own step's, however late it is read: two records read back
    /// to back (as at a checkpoint or a run's end) once counted the second over the
    /// microseconds between the reads.
    #[test]
    fn a_record_read_late_keeps_its_steps_rate() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let clip = Clip::Host {
            norm: 2.5,
            scale: 1.0,
        };
        let step = |n: u64, loss: f32| -> Result<PendingRecord, TrainError> {
            let start = StepStart::now(&dev)?;
            std::thread::sleep(Duration::from_millis(40));
            let loss = Tensor::new(&[loss], &dev)?.reshape(())?;
            let baseline = Tensor::new(&[1.5f32], &dev)?;
            PendingRecord::new(record(n), 8, start, &loss, &[baseline], &clip)
        };
        let (a, b) = (step(0, 0.75)?, step(1, 0.5)?);
        // Both are read well after their steps ended, one right after the other.
        std::thread::sleep(Duration::from_millis(1000));
        let (a, b) = (a.finish()?, b.finish()?);
        for (r, loss) in [(&a, 0.75), (&b, 0.5)] {
            assert_eq!(r.loss, loss);
            assert_eq!(r.value("baseline"), Some(1.5));
            assert_eq!(r.grad_norm, 2.5);
            // 8 images in a step of 40 ms and a little more (a loaded machine may stretch it):
            // counting to the read would give a second or more.
            let secs = 8.0 / r.images_per_s;
            assert!((0.04..0.8).contains(&secs), "step {}: {secs} s", r.step);
        }
        Ok(())
    }

    #[test]
    fn a_loss_that_is_not_finite_is_an_error() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let clip = Clip::Host {
            norm: 1.0,
            scale: 1.0,
        };
        let loss = Tensor::new(&[f32::INFINITY], &dev)?.reshape(())?;
        let pending = PendingRecord::new(record(7), 4, StepStart::now(&dev)?, &loss, &[], &clip)?;
        let err = pending.finish().unwrap_err().to_string();
        assert!(err.contains("step 7: the loss is inf"), "{err}");
        Ok(())
    }
}
