//! The `torchscript` backend: `model.pt` with a `forward` over the batched inputs.
//!
//! Jobs are stacked along a new dim 0. Variable dims (`-1` in `jetbatch.toml`) are padded with the
//! input's `pad_value` to the longest job in the batch, and outputs with `trim` rules are cut back
//! to each job's own length, so a job's result does not depend on what shares its batch.

use tch::{CModule, Device, IValue, Kind, Tensor};

use super::{EngineError, LoadedModel};
use crate::job::{JobInput, JobKind, Output};
use crate::plan::{InputSpec, ModelConfig, ModelPlan};
use crate::tensor::{DType, TensorData};

pub struct TorchScript {
    module: CModule,
    device: Device,
    /// Floating inputs are cast to this kind (f16/bf16 on CUDA).
    float_kind: Option<Kind>,
    config: ModelConfig,
}

fn kind_of(d: DType) -> Kind {
    match d {
        DType::F32 => Kind::Float,
        DType::F64 => Kind::Double,
        DType::F16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

fn dtype_of(k: Kind) -> Result<DType, EngineError> {
    Ok(match k {
        Kind::Float => DType::F32,
        Kind::Double => DType::F64,
        Kind::Half => DType::F16,
        Kind::BFloat16 => DType::Bf16,
        Kind::Int64 => DType::I64,
        Kind::Int => DType::I32,
        Kind::Uint8 => DType::U8,
        Kind::Bool => DType::Bool,
        other => return Err(EngineError::Model(format!("output dtype {other:?} has no wire dtype"))),
    })
}

fn tch_err(e: tch::TchError) -> EngineError {
    EngineError::from_tch(e)
}

impl TorchScript {
    pub fn load(spec: &ModelPlan, device: Device) -> Result<TorchScript, EngineError> {
        let path = spec.dir.join("model.pt");
        let mut module = CModule::load_on_device(&path, device)
            .map_err(|e| EngineError::Load(format!("{}: {}", path.display(), super::error::summary(&e.to_string()))))?;
        module.set_eval();
        // Reduced precision only where it is fast; CPU runs the weights as saved.
        let float_kind = match spec.config.dtype.map(kind_of) {
            Some(k @ (Kind::Half | Kind::BFloat16)) if device.is_cuda() => {
                module.to(device, k, false);
                Some(k)
            }
            _ => None,
        };
        Ok(TorchScript { module, device, float_kind, config: spec.config.clone() })
    }

    /// One batched tensor for input `i`: one copy when shapes agree, padded stacking otherwise.
    fn batch_input(&self, spec: &InputSpec, tensors: &[&TensorData]) -> Result<Tensor, EngineError> {
        let first = &tensors.first().ok_or_else(|| EngineError::Model("an empty batch".into()))?.shape;
        if tensors.iter().any(|t| t.shape.len() != first.len()) {
            return Err(EngineError::Model(format!("input '{}': jobs of different ranks", spec.name)));
        }
        let kind = kind_of(spec.dtype);
        let batched = if tensors.iter().all(|t| &t.shape == first) {
            let mut bytes = Vec::with_capacity(tensors.len() * tensors[0].data.len());
            for t in tensors {
                bytes.extend_from_slice(&t.data);
            }
            let mut shape = vec![tensors.len() as i64];
            shape.extend_from_slice(first);
            Tensor::f_from_data_size(&bytes, &shape, kind).map_err(tch_err)?
        } else {
            let longest: Vec<i64> =
                (0..first.len()).map(|d| tensors.iter().map(|t| t.shape[d]).max().unwrap_or(0)).collect();
            let rows = tensors
                .iter()
                .map(|t| {
                    let row = Tensor::f_from_data_size(&t.data, &t.shape, kind).map_err(tch_err)?;
                    // constant_pad_nd takes (before, after) pairs from the last dim backwards.
                    let pad: Vec<i64> = longest.iter().zip(&t.shape).rev().flat_map(|(&l, &s)| [0, l - s]).collect();
                    row.f_constant_pad_nd(&pad).map_err(tch_err).and_then(|p| {
                        if spec.pad_value == 0.0 {
                            Ok(p)
                        } else {
                            // Write the pad value only into the padding (the job's own region keeps its values).
                            let mask = Tensor::f_ones(&t.shape, (Kind::Bool, Device::Cpu))
                                .and_then(|m| m.f_constant_pad_nd(&pad))
                                .map_err(tch_err)?;
                            p.f_where_scalarother(&mask, spec.pad_value).map_err(tch_err)
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Tensor::f_stack(&rows, 0).map_err(tch_err)?
        };
        let on_device = batched.f_to_device(self.device).map_err(tch_err)?;
        match self.float_kind {
            Some(k) if on_device.is_floating_point() => on_device.f_to_kind(k).map_err(tch_err),
            _ => Ok(on_device),
        }
    }

    fn forward(&self, jobs: &[&[TensorData]]) -> Result<Vec<Output>, EngineError> {
        let mut args = Vec::with_capacity(self.config.inputs.len() + 1);
        for (i, spec) in self.config.inputs.iter().enumerate() {
            let column: Vec<&TensorData> =
                jobs.iter().map(|j| j.get(i).ok_or_else(|| EngineError::Model(format!("a job lacks input {i}")))).collect::<Result<_, _>>()?;
            args.push(IValue::Tensor(self.batch_input(spec, &column)?));
        }
        if self.config.lengths_input {
            let dim = self.config.inputs[0].shape.iter().position(|&d| d == -1).expect("checked at load");
            let lengths: Vec<i64> = jobs
                .iter()
                .map(|j| j.first().and_then(|t| t.shape.get(dim).copied()).ok_or_else(|| EngineError::Model("input 0 lacks its variable dim".into())))
                .collect::<Result<_, _>>()?;
            args.push(IValue::Tensor(Tensor::from_slice(&lengths).to_device(self.device)));
        }
        let outputs = match self.module.forward_is(&args).map_err(tch_err)? {
            IValue::Tensor(t) => vec![t],
            IValue::Tuple(items) | IValue::GenericList(items) => items
                .into_iter()
                .map(|v| match v {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(EngineError::Model(format!("forward returned a non-tensor item: {other:?}"))),
                })
                .collect::<Result<_, _>>()?,
            IValue::TensorList(ts) => ts,
            other => return Err(EngineError::Model(format!("forward returned {other:?}, not tensors"))),
        };
        let n = jobs.len() as i64;
        let mut per_job: Vec<Vec<TensorData>> = vec![Vec::with_capacity(outputs.len()); jobs.len()];
        for (o, out) in outputs.iter().enumerate() {
            if out.dim() == 0 || out.size()[0] != n {
                return Err(EngineError::Model(format!("output {o} has shape {:?}; expected batch dim {n}", out.size())));
            }
            let out = out.f_to_device(Device::Cpu).map_err(tch_err)?;
            let trims = self.config.outputs.get(o).map(|s| s.trim.as_slice()).unwrap_or_default();
            for (j, job) in jobs.iter().enumerate() {
                let mut row = out.f_get(j as i64).map_err(tch_err)?;
                for t in trims {
                    let len = job
                        .get(t.input)
                        .and_then(|x| x.shape.get(t.input_dim).copied())
                        .ok_or_else(|| EngineError::Model(format!("output {o}: trim by a dim the job's inputs lack")))?;
                    row = row.f_narrow(t.dim as i64, 0, len).map_err(tch_err)?;
                }
                per_job[j].push(to_data(&row)?);
            }
        }
        Ok(per_job.into_iter().map(Output::Tensor).collect())
    }
}

fn to_data(t: &Tensor) -> Result<TensorData, EngineError> {
    let t = t.contiguous();
    let dtype = dtype_of(t.kind())?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut data, numel).map_err(tch_err)?;
    Ok(TensorData { dtype, shape: t.size(), data })
}

impl LoadedModel for TorchScript {
    fn run(&mut self, kind: JobKind, inputs: &[&JobInput]) -> Result<Vec<Output>, EngineError> {
        debug_assert_eq!(kind, JobKind::Tensor, "validated at the edge");
        let jobs: Vec<&[TensorData]> = inputs
            .iter()
            .map(|i| match i {
                JobInput::Tensor(t) => t.as_slice(),
                other => unreachable!("validated at the edge: {other:?}"),
            })
            .collect();
        self.forward(&jobs)
    }

    fn warmup(&mut self) -> Result<(), EngineError> {
        let dummy: Vec<TensorData> = self
            .config
            .inputs
            .iter()
            .map(|s| {
                let shape: Vec<i64> = s.shape.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
                let numel: usize = shape.iter().map(|&d| d as usize).product();
                TensorData { dtype: s.dtype, shape, data: vec![0; numel * s.dtype.size()] }
            })
            .collect();
        self.forward(&[&dummy]).map(|_| ())
    }

    fn release_cache(&mut self) {
        // tch exposes no emptyCache; splitting the batch is what recovers. Synchronise so the
        // failed allocation's stream work is finished before the retry.
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }
}
