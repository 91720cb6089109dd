//! Training on a CUDA device (cargo feature `cuda`): the [`Trainer`] keeps
//! its data, sampling, schedule and checkpoints, and hands each step's
//! micro-batches to a [`DeviceModel`] holding the whole model on one GPU.
//! The host copy of the model is refreshed from the device before an
//! evaluation or a checkpoint, so checkpoints, `eval` and `export` are the
//! CPU path's.

use std::time::Instant;

use super::{StepReport, TrainError, Trainer};
use crate::kernels::cuda::{Gpu, GpuError};
use crate::model::cuda::DeviceModel;

impl From<GpuError> for TrainError {
    fn from(e: GpuError) -> Self {
        TrainError::Device(e.to_string())
    }
}

impl Trainer {
    /// Move training to `gpu`: every stage's parameters and Adam moments are
    /// uploaded into one [`DeviceModel`] (one GPU holds every stage).
    pub fn use_device(&mut self, gpu: Gpu) -> Result<(), TrainError> {
        if self.stages.iter().any(|s| s.bottleneck_rank().is_some()) {
            return Err(TrainError::Device(
                "pipeline.codec lowrank (the learned bottleneck) is not available on the CUDA device yet; use codec f32/f16/bf16/int8 or --device cpu".into(),
            ));
        }
        let recompute = match self.manifest.spec.training.recompute {
            crate::model::Recompute::Off => None,
            crate::model::Recompute::Full => Some("full"),
            crate::model::Recompute::Selective => Some("selective"),
        };
        if let Some(policy) = recompute {
            return Err(TrainError::Device(format!(
                "spec.training.recompute: {policy} is not available on the CUDA device (the device model keeps every activation); use recompute: none there, or --device cpu"
            )));
        }
        let mut params = Vec::new();
        let mut m = Vec::new();
        let mut v = Vec::new();
        let mut t = 0;
        for (stage, opt) in self.stages.iter().zip(&self.opts) {
            for (i, p) in stage.params().into_iter().enumerate() {
                params.push(p);
                m.push(opt.m[i].as_slice());
                v.push(opt.v[i].as_slice());
            }
            t = opt.t;
        }
        let rows = self.manifest.spec.training.micro_batch_size * self.model.seq_len;
        let model = DeviceModel::new(gpu, &self.model, &params, Some((&m, &v)), t, rows)?;
        self.device = Some(model);
        Ok(())
    }

    /// One step on the device: the same micro-batches, loss scaling,
    /// clipping and schedule as [`Trainer::train_step`] on the CPU.
    pub(super) fn device_step(&mut self) -> Result<StepReport, TrainError> {
        let start = Instant::now();
        let step = self.step;
        let loss = self.run_micro_batches(|t, _, batch, scale| {
            let device = t.device.as_mut().expect("device_step needs a device");
            Ok(device.forward_backward(&batch.tokens, &batch.targets, batch.rows, scale)?)
        })?;
        let device = self.device.as_mut().expect("device_step needs a device");
        let grad_norm = device.grad_norm()?;
        let clip = self.optim.clip_factor(grad_norm);
        let lr = self.optim.lr_at(step);
        device.step(&self.optim, lr, clip)?;
        Ok(self.finish_step(loss, grad_norm, lr, start))
    }

    /// Copy the device's weights and Adam moments into the host stages.
    pub(super) fn sync_host(&mut self) -> Result<(), TrainError> {
        let Some(device) = &self.device else {
            return Ok(());
        };
        let host = device.download()?;
        for (stage, opt) in self.stages.iter_mut().zip(&mut self.opts) {
            for (i, p) in stage.params_mut().into_iter().enumerate() {
                let h = host.get(&p.name).ok_or_else(|| {
                    TrainError::Device(format!("the device model has no {}", p.name))
                })?;
                p.data.copy_from_slice(&h.data);
                opt.m[i].copy_from_slice(&h.m);
                opt.v[i].copy_from_slice(&h.v);
            }
            opt.t = device.adam_t;
        }
        Ok(())
    }
}
