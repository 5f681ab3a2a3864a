//! `ember model ...`: import a GGUF as a Hugging Face directory, quantize a GGUF, write a
//! manifest.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::quantized::GgmlDType;
use candle_core::DType;
use clap::Subcommand;
use ember_model_loader::gguf::{convert_gguf, import_gguf, ImportOptions};
use ember_model_loader::manifest::Manifest;
use ember_model_loader::quantize::{quantize_gguf, QuantType};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Convert a GGUF Llama file into a Hugging Face directory (safetensors, config.json,
    /// tokenizer.json, tokenizer_config.json, ember-manifest.json).
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// The directory to write.
        out_dir: PathBuf,
        /// Precision of the written weights: f32, f16 or bf16.
        #[arg(long, env = "EMBER_IMPORT_DTYPE", default_value = "f32")]
        dtype: String,
    },
    /// Rewrite a GGUF file with its weights stored as f32 or f16 (for comparing precisions
    /// against llama.cpp, which reads only GGUF).
    ConvertGguf {
        /// The source .gguf file.
        file: PathBuf,
        /// The .gguf file to write.
        out: PathBuf,
        /// f32 or f16.
        #[arg(long, env = "EMBER_CONVERT_DTYPE", default_value = "f16")]
        dtype: String,
    },
    /// Rewrite a GGUF file with its weights quantized (or as f32/f16/bf16), metadata kept:
    /// q8_0, q4_0, q4_1, q5_0, q4_k_m (Q4_K with Q6_K for half of attn_v/ffn_down and the
    /// output, as llama.cpp's Q4_K_M), f32, f16, bf16.
    Quantize {
        /// The source .gguf file (any type candle reads).
        file: PathBuf,
        /// The .gguf file to write.
        out: PathBuf,
        /// The target type.
        #[arg(long = "type", env = "EMBER_QUANTIZE_TYPE")]
        ty: String,
    },
    /// Write ember-manifest.json (SHA-256 and size of every file) into a model directory.
    Manifest {
        /// The model directory.
        dir: PathBuf,
    },
}

pub async fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::ImportGguf { file, out_dir, dtype } => {
            let dtype = match dtype.as_str() {
                "f32" => DType::F32,
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                other => anyhow::bail!("unknown --dtype `{other}`: use f32, f16 or bf16"),
            };
            let out = out_dir.clone();
            let manifest = tokio::task::spawn_blocking(move || import_gguf(&file, &out, ImportOptions { dtype }))
                .await
                .context("import task failed")??;
            for (name, d) in &manifest.files {
                println!("{:>12}  {}  {}", d.size, d.sha256, out_dir.join(name).display());
            }
            Ok(())
        }
        ModelCommand::ConvertGguf { file, out, dtype } => {
            let dtype = match dtype.as_str() {
                "f32" => GgmlDType::F32,
                "f16" => GgmlDType::F16,
                other => anyhow::bail!("unknown --dtype `{other}`: use f32 or f16"),
            };
            let shown = out.display().to_string();
            tokio::task::spawn_blocking(move || convert_gguf(&file, &out, dtype))
                .await
                .context("convert task failed")??;
            println!("wrote {shown}");
            Ok(())
        }
        ModelCommand::Quantize { file, out, ty } => {
            let ty: QuantType = ty.parse()?;
            if file.is_dir() {
                anyhow::bail!(
                    "`{}` is a directory: quantize reads a .gguf file (safetensors input is not supported yet)",
                    file.display()
                );
            }
            let shown = out.display().to_string();
            tokio::task::spawn_blocking(move || quantize_gguf(&file, &out, ty))
                .await
                .context("quantize task failed")??;
            println!("wrote {shown}");
            Ok(())
        }
        ModelCommand::Manifest { dir } => {
            if !dir.is_dir() {
                anyhow::bail!("`{}` is not a directory: give the model's directory", dir.display());
            }
            let manifest = Manifest::write_for_dir(&dir)?;
            println!(
                "wrote {} entries to {}",
                manifest.files.len(),
                dir.join(ember_model_loader::manifest::MANIFEST_FILE).display()
            );
            Ok(())
        }
    }
}
