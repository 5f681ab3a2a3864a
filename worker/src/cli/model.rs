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
use ember_model_loader::signing::{generate_keypair, read_secret_key, sign_manifest};

use super::common::TrustArgs;

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
    /// Write ember-manifest.json (SHA-256 and size of every file, BLAKE3 of every 16 MiB chunk of
    /// larger files) into a model directory.
    Manifest {
        /// The model directory.
        dir: PathBuf,
    },
    /// Sign a model directory's ember-manifest.json with a minisign secret key, writing
    /// ember-manifest.json.minisig beside it (checkable with `minisign -Vm`).
    Sign {
        /// The model directory (with its ember-manifest.json: `ember model manifest DIR`).
        dir: PathBuf,
        /// The minisign secret key file (from `minisign -G` or `ember model keygen`).
        #[arg(long, env = "EMBER_SIGNING_KEY")]
        key: PathBuf,
        /// The password of an encrypted secret key; asked for on the terminal when unset.
        #[arg(long, env = "EMBER_SIGNING_KEY_PASSWORD", hide_env_values = true)]
        key_password: Option<String>,
    },
    /// Check a model directory offline: its manifest's signature by a trusted key, then every
    /// file against the manifest.
    Verify {
        /// The model directory, or a .gguf file in a signed directory.
        dir: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Make a minisign key pair without a password (minisign -G makes password-protected
    /// ones): SECRET_KEY_FILE (keep it private) and SECRET_KEY_FILE.pub.
    Keygen {
        /// Where to write the secret key; the public key goes to the same path + `.pub`.
        #[arg(long, env = "EMBER_SIGNING_KEY")]
        key: PathBuf,
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
        ModelCommand::Sign { dir, key, key_password } => {
            let secret = read_secret_key(&key, key_password)?;
            let key_id = sign_manifest(&dir, &secret)?;
            println!("signed {} with key {key_id}", dir.join(ember_model_loader::signing::SIGNATURE_FILE).display());
            Ok(())
        }
        ModelCommand::Verify { dir, trust } => {
            let trusted = trust.keys()?;
            if trusted.is_empty() {
                anyhow::bail!("give the key(s) to trust with --trusted-key or EMBER_TRUSTED_KEYS");
            }
            let files = ember_model_loader::loader::fetch_files(
                &ember_model_loader::ModelRef::Local(dir.clone()),
                &ember_model_loader::LoadOptions { trusted_keys: trusted.clone(), ..Default::default() },
            )
            .await?;
            let verified =
                tokio::task::spawn_blocking(move || files.verify(&trusted)).await.context("verify task failed")??;
            if !verified {
                anyhow::bail!("`{}` has no ember-manifest.json", dir.display());
            }
            println!("{}: signature and every file verified", dir.display());
            Ok(())
        }
        ModelCommand::Keygen { key } => {
            let (secret, public, key_id) = generate_keypair()?;
            let public_path = PathBuf::from(format!("{}.pub", key.display()));
            // Both must be new: check the public key's path before writing the secret key, so
            // a refusal leaves nothing half made behind.
            if public_path.exists() {
                anyhow::bail!("`{}` exists already: move it away or choose another --key", public_path.display());
            }
            write_new(&key, &secret, 0o600)?;
            write_new(&public_path, &public, 0o644)?;
            println!("key {key_id}: secret key {}, public key {}", key.display(), public_path.display());
            Ok(())
        }
    }
}

/// Writes a new file (never over an existing key) with the given Unix permissions.
fn write_new(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing `{}` (it must not exist yet)", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing `{}`", path.display()))?;
    Ok(())
}
