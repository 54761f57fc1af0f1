//! The edge runtime: evaluates an encrypted model on frames; nothing here can decrypt.

use super::circuit::Engine;
use super::eval::{self, LayerParams};
use super::tfhe_backend::{self, TfheBackend};
use super::{
    entropy, pack_digits, tables, EncryptedInput, EncryptedModel, EncryptedOutput, FheError, Frame,
    FrameInput, PublicMaterial, COMPRESSION_PARAMS, COMPRESSION_PARAMS_NAME, PARAMS, PARAMS_NAME,
};
use crate::model::Model;
use serde::Serialize;
use std::time::Instant;
#[allow(unused_imports)]
use tfhe::prelude::*;
use tfhe::shortint::list_compression::CompressionKey;
use tfhe::shortint::parameters::ShortintCompactCiphertextListCastingMode;
use tfhe::shortint::{Ciphertext, CompactPublicKey, ServerKey};

/// Timing of one encrypted inference.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InferStats {
    pub pbs: u64,
    pub pbs_per_node: Vec<u64>,
    pub expand_s: f64,
    pub eval_s: f64,
    /// Packing the output digits (keyswitch into one GLWE per 256 digits, no PBS).
    pub pack_s: f64,
}

/// The edge runtime: the encrypted model, the public material and a dedicated FHE thread
/// pool. Nothing here can decrypt.
pub struct EdgeRuntime {
    pub arch: Model,
    params: Vec<Option<LayerParams<Ciphertext, tfhe_backend::SecretTable>>>,
    engine: Engine<TfheBackend>,
    public_key: CompactPublicKey,
    compression: CompressionKey,
    pool: rayon::ThreadPool,
    planned: Vec<u64>,
    /// The plan with the frame held in the clear; `None` when the model cannot run so.
    planned_clear: Option<Vec<u64>>,
}

impl EdgeRuntime {
    /// Decompresses the server key and the encrypted parameters (no PBS) and starts a
    /// pool of `threads` FHE workers (0 = one per core).
    pub fn new(
        model: &EncryptedModel,
        public: PublicMaterial,
        threads: usize,
    ) -> Result<Self, FheError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fhe-{i}"))
            .build()
            .map_err(|e| FheError::Pool(e.to_string()))?;
        let (planned, _) = eval::plan(&model.arch)?;
        let planned_clear = eval::check_device_clear(&model.arch)
            .ok()
            .map(|_| eval::plan_mode(&model.arch, eval::InputMode::DeviceClear))
            .transpose()?
            .map(|(p, _)| p);
        let ((server_key, compression), params) = pool.install(|| {
            rayon::join(
                || {
                    let (integer, ..) = public.server_key.decompress().into_raw_parts();
                    (
                        ServerKey::from(integer),
                        public.compression_key.decompress().into_raw_parts(),
                    )
                },
                || model.decompress(),
            )
        });
        if server_key.message_modulus != PARAMS.message_modulus
            || server_key.carry_modulus != PARAMS.carry_modulus
            || server_key.ciphertext_lwe_dimension()
                != PARAMS
                    .glwe_dimension
                    .to_equivalent_lwe_dimension(PARAMS.polynomial_size)
        {
            return Err(FheError::Decode {
                what: "server key",
                msg: format!("not a key for {PARAMS_NAME}"),
            });
        }
        let pksk = &compression.packing_key_switching_key;
        if pksk.input_key_lwe_dimension() != server_key.ciphertext_lwe_dimension()
            || pksk.output_glwe_size()
                != COMPRESSION_PARAMS
                    .packing_ks_glwe_dimension()
                    .to_glwe_size()
            || pksk.output_polynomial_size() != COMPRESSION_PARAMS.packing_ks_polynomial_size()
            || pksk.decomposition_level_count() != COMPRESSION_PARAMS.packing_ks_level()
            || pksk.decomposition_base_log() != COMPRESSION_PARAMS.packing_ks_base_log()
            || compression.lwe_per_glwe != COMPRESSION_PARAMS.lwe_per_glwe()
            || compression.storage_log_modulus != COMPRESSION_PARAMS.storage_log_modulus()
        {
            return Err(FheError::Decode {
                what: "compression key",
                msg: format!("not a key for {COMPRESSION_PARAMS_NAME}"),
            });
        }
        let public_key = public.public_key.into_raw_parts().0.into_raw_parts();
        let params = params
            .into_iter()
            .map(|p| {
                p.map(|p| {
                    let t: Vec<_> = p
                        .tables
                        .iter()
                        .map(|t| tables::expand_table(&server_key, t))
                        .collect();
                    p.with_tables(t)
                })
            })
            .collect();
        Ok(EdgeRuntime {
            arch: model.arch.clone(),
            params,
            engine: Engine::new(TfheBackend::new(server_key)),
            public_key,
            compression,
            pool,
            planned,
            planned_clear,
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// PBS per node with encrypted input, planned from the architecture alone.
    pub fn planned_pbs(&self) -> &[u64] {
        &self.planned
    }

    /// PBS per node in an input mode; an error says why a model cannot run device-clear.
    pub fn planned_pbs_in(&self, mode: eval::InputMode) -> Result<&[u64], FheError> {
        match mode {
            eval::InputMode::Encrypted => Ok(&self.planned),
            eval::InputMode::DeviceClear => match &self.planned_clear {
                Some(p) => Ok(p),
                None => Err(eval::check_device_clear(&self.arch).unwrap_err().into()),
            },
        }
    }

    /// The frame as `mode` feeds it: encrypted with the public key, or kept in the clear.
    pub fn frame_input(&self, mode: eval::InputMode, x: &[u8]) -> FrameInput {
        match mode {
            eval::InputMode::Encrypted => FrameInput::Encrypted(self.encrypt(x)),
            eval::InputMode::DeviceClear => FrameInput::Clear(x.to_vec()),
        }
    }

    pub fn server_key(&self) -> &ServerKey {
        &self.engine.backend.server_key
    }

    /// Encrypts a quantized frame with the public key.
    pub fn encrypt(&self, input: &[u8]) -> EncryptedInput {
        entropy::seed_thread();
        let msgs = eval::input_digits(&self.arch, input);
        EncryptedInput(self.public_key.encrypt_slice(&msgs))
    }

    /// Runs the encrypted model on an encrypted frame.
    pub fn infer(&self, input: &EncryptedInput) -> Result<(EncryptedOutput, InferStats), FheError> {
        self.infer_frame(Frame::Encrypted(input))
    }

    /// Runs the encrypted model on a frame, encrypted or held in the clear.
    pub fn infer_frame(&self, frame: Frame<'_>) -> Result<(EncryptedOutput, InferStats), FheError> {
        let t0 = Instant::now();
        let cts = match frame {
            Frame::Encrypted(input) => Some(
                input
                    .0
                    .expand(ShortintCompactCiphertextListCastingMode::NoCasting)
                    .map_err(|e| FheError::Decode {
                        what: "encrypted input",
                        msg: e.to_string(),
                    })?,
            ),
            Frame::Clear(_) => {
                self.planned_pbs_in(eval::InputMode::DeviceClear)?;
                None
            }
        };
        let expand_s = t0.elapsed().as_secs_f64();
        let before = self.engine.pbs_count();
        let t1 = Instant::now();
        let out = self.pool.install(|| match (cts, frame) {
            (Some(cts), _) => eval::run(&self.engine, &self.arch, &self.params, cts),
            (None, Frame::Clear(x)) => {
                eval::run_device_clear(&self.engine, &self.arch, &self.params, x)
            }
            (None, Frame::Encrypted(_)) => unreachable!("expanded above"),
        })?;
        let eval_s = t1.elapsed().as_secs_f64();
        let layout = out.layout();
        let pbs_per_node = out.pbs_per_node.clone();
        let digits = out.flatten();
        let t2 = Instant::now();
        let packed = self
            .pool
            .install(|| pack_digits(&self.compression, &digits));
        let stats = InferStats {
            pbs: self.engine.pbs_count() - before,
            pbs_per_node,
            expand_s,
            eval_s,
            pack_s: t2.elapsed().as_secs_f64(),
        };
        Ok((EncryptedOutput { layout, packed }, stats))
    }

    /// [`Self::infer`], calling `tick(done, planned)` every `every` while it runs (and once
    /// at the end): PBS done since the call (frames running at the same time on this
    /// runtime count into it too) and PBS planned for one frame.
    pub fn infer_watched(
        &self,
        frame: Frame<'_>,
        every: std::time::Duration,
        tick: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(EncryptedOutput, InferStats), FheError> {
        let planned: u64 = match frame {
            Frame::Encrypted(_) => self.planned.iter().sum(),
            Frame::Clear(_) => self
                .planned_pbs_in(eval::InputMode::DeviceClear)?
                .iter()
                .sum(),
        };
        let base = self.engine.pbs_count();
        let done = std::sync::atomic::AtomicBool::new(false);
        let (lock, cv) = (std::sync::Mutex::new(()), std::sync::Condvar::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    guard = cv
                        .wait_timeout(guard, every)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if !done.load(std::sync::atomic::Ordering::Acquire) {
                        tick(self.engine.pbs_count() - base, planned);
                    }
                }
            });
            let r = self.infer_frame(frame);
            {
                let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
                done.store(true, std::sync::atomic::Ordering::Release);
            }
            cv.notify_all();
            if r.is_ok() {
                tick(self.engine.pbs_count() - base, planned);
            }
            r
        })
    }

    /// Runs `f` on the FHE pool (for benchmarks of single PBS on the same threads).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}
