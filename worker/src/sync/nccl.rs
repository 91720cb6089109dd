//! Gradient averaging between replicas on GPUs with NCCL (cargo feature
//! `cuda`), one rank per GPU. The CPU ring ([`super::RingMember`]) stays the
//! path for CPU workers. NCCL is loaded when first used, like every CUDA
//! library here.

use cudarc::nccl::{Comm, Id, ReduceOp};
use pipewright_spec::Aggregation;

use crate::kernels::cuda::{Gpu, GpuError, F32};

/// One rank of a NCCL communicator over the replicas of a stage.
pub struct NcclGroup {
    comm: Comm,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world_size())
            .finish()
    }
}

/// Whether the NCCL library loads.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen libnccl by its known names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(e: cudarc::nccl::result::NcclError) -> GpuError {
    GpuError::Unsupported(format!("NCCL: {e:?}"))
}

impl NcclGroup {
    /// A new unique id for a communicator; rank 0 makes it and the
    /// coordinator hands its 128 bytes to the other ranks.
    pub fn new_id() -> Result<Id, GpuError> {
        if !nccl_present() {
            return Err(GpuError::MissingLibrary("libnccl"));
        }
        Id::new().map_err(nccl_err)
    }

    /// Join communicator `id` as `rank` of `world` on `gpu`'s stream.
    pub fn join(gpu: &Gpu, rank: usize, world: usize, id: Id) -> Result<Self, GpuError> {
        if !nccl_present() {
            return Err(GpuError::MissingLibrary("libnccl"));
        }
        let comm = Comm::from_rank(gpu.stream().clone(), rank, world, id).map_err(nccl_err)?;
        Ok(Self { comm })
    }

    /// Replace `grad` with the mean over every rank, in place (queued on
    /// the stream like the kernels).
    pub fn all_reduce_mean(&self, grad: &mut F32) -> Result<(), GpuError> {
        self.comm
            .all_reduce_in_place(grad, &ReduceOp::Avg)
            .map_err(nccl_err)?;
        Ok(())
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// Whether this group can combine gradients as `aggregation` asks:
    /// only the mean. The robust rules need every replica's contribution
    /// on every replica (see `docs/byzantine.md`), which only the CPU ring
    /// gathers.
    pub fn check_aggregation(aggregation: Aggregation) -> Result<(), GpuError> {
        match aggregation {
            Aggregation::Mean => Ok(()),
            other => Err(GpuError::Unsupported(format!(
                "aggregation {} is not available on GPUs (NCCL averages only); use the CPU workers or aggregation: mean",
                other.name()
            ))),
        }
    }
}
